"""``create_app()``: the FastAPI application (no torch anywhere in this process).

The lifespan opens the Redis connection, reads the model repository's metadata (every bundle's
labels, geometry, defence defaults, calibration and digest: plain JSON; ``worker.repository``) and
runs the dead-worker recovery scan, so a job whose worker was killed is requeued or failed even when
no other worker is alive to notice.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis import Redis

from service import errors, metrics, openapi_contract
from service.routes.jobs import router as jobs_router
from service.routes.models import router as models_router
from service.routes.ops import router as ops_router
from worker.repository import Repository
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def create_app(settings: Settings | None = None, *, run_recovery: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from worker.recovery import RecoveryThread

        app.state.redis = Redis.from_url(
            settings.redis_url or DEFAULT_REDIS_URL, socket_connect_timeout=2, socket_timeout=10
        )
        app.state.repository = Repository.scan(settings)
        app.state.repository_scanned_at = time.monotonic()
        default = app.state.repository.default
        app.state.bundle_meta = default.meta if default is not None else None
        if default is None:
            log.error("bundle metadata unavailable at %s", settings.bundle_dir)
        for entry in app.state.repository.served:
            metrics.MODEL_INFO.labels(name=entry.name, version=entry.version).set(1)
        settings.upload_dir.mkdir(parents=True, exist_ok=True)
        recovery = RecoveryThread(app.state.redis, settings) if run_recovery else None
        if recovery:
            recovery.start()
        try:
            yield
        finally:
            if recovery:
                recovery.stop()
            app.state.redis.close()

    app = FastAPI(
        title="motionguard",
        version="0.1.0",
        description="Action-video classification defended by motion-consistency purification.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.bundle_meta = None
    app.state.redis = None
    app.state.repository = None
    errors.install(app)
    errors.document_validation_errors(app)
    openapi_contract.install(app, settings)
    metrics.install_collector(app.state)
    app.include_router(jobs_router)
    app.include_router(models_router)
    app.include_router(ops_router)
    _include_web_page(app)
    return app


def _include_web_page(app: FastAPI) -> None:
    """The web page (``GET /``) lives in its own module, maintained separately; optional here."""
    try:
        from service.routes.ui import router as ui_router
    except ModuleNotFoundError as exc:
        if exc.name != "service.routes.ui":
            raise
        return
    app.include_router(ui_router)


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:app_from_env``."""
    return create_app()
