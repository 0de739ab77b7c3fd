"""Operations routes: ``/healthz`` (process up), ``/readyz`` (Redis, a live worker, the bundle) and
``/metrics`` (Prometheus). ``/models`` is in ``service.routes.models``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.deps import RedisDep, SettingsDep
from service.schemas import Health, Ready
from worker.liveness import live_workers

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The API process is up (no dependencies checked)")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Ready to serve: Redis reachable, at least one live worker, with this service's bundle loaded",
    responses={503: {"model": Ready, "description": "not ready (the body says which check failed)"}},
)
def readyz(request: Request, settings: SettingsDep, connection: RedisDep):
    checks: dict[str, str] = {}
    redis_ok, workers, bundle_ok = False, [], False
    try:
        connection.ping()
        redis_ok = True
        workers = live_workers(connection, settings)
    except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
        checks["redis"] = f"unreachable ({type(exc).__name__})"
    meta = request.app.state.bundle_meta
    if meta is None:
        checks["bundle"] = f"no readable bundle at {settings.bundle_dir}"
    else:
        bundle_ok = any(w.get("bundle") == meta.name and w.get("version") == meta.version for w in workers)
        if workers and not bundle_ok:
            checks["bundle"] = f"no live worker has {meta.name} v{meta.version} loaded"
    if redis_ok and not workers:
        checks["workers"] = "no live worker"
    ready = Ready(
        ready=redis_ok and bool(workers) and bundle_ok,
        redis=redis_ok,
        workers=len(workers),
        bundle_loaded=bundle_ok,
        checks=checks,
    )
    return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (API counters + worker aggregates from Redis)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def prometheus_metrics() -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
