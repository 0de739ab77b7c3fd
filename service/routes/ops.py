"""Operations routes: ``/healthz`` (process up), ``/readyz`` (Redis, a live worker, the bundle),
``/models`` (bundle, labels, defence defaults, limits) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.deps import Owner, RedisDep, SettingsDep
from service.errors import responses
from service.schemas import DefenseDefaults, Health, Limits, ModelsInfo, Ready
from worker.serving.model_worker import live_workers

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
    "/models",
    response_model=ModelsInfo,
    summary="The bundle served: labels, input, defence defaults, limits",
    responses=responses(401, 503),
)
def models(request: Request, _owner: Owner, settings: SettingsDep):
    meta = request.app.state.bundle_meta
    if meta is None:
        from service.errors import ApiError

        raise ApiError(503, "no_bundle", f"no readable bundle at {settings.bundle_dir}", headers={"Retry-After": "30"})
    d = meta.defense
    return ModelsInfo(
        name=meta.name,
        version=meta.version,
        labels=meta.labels,
        input=meta.input.model_dump(),
        defense=DefenseDefaults(
            steps=d.steps,
            step_size=d.step_size,
            epsilon=d.epsilon,
            multi=d.multi,
            mode=settings.defense_mode or d.mode,
            threshold=meta.auto_threshold(settings.defense_threshold),
        ),
        calibration=(
            {k: v for k, v in meta.calibration.model_dump().items() if k != "sample"} if meta.calibration else None
        ),
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_steps=settings.max_steps,
            max_epsilon=settings.max_epsilon,
            max_top_k=settings.max_top_k,
            max_clips=settings.max_clips,
        ),
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (API counters + worker aggregates from Redis)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def prometheus_metrics() -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
