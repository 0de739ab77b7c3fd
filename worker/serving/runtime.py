"""The process-wide state of a model worker: settings, the Redis connection and the loaded bundle.

The bundle is loaded once when the worker starts (``worker.cli.worker``) and every job of the process
reuses it; a job that runs outside a worker (tests, ``rq`` tooling) loads it lazily on first use.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from redis import Redis

from worker.monitoring import metrics
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, Any] = {}


def configure(
    settings: Settings, connection: Redis, bundle: Any, worker_name: str = "", identity: dict | None = None
) -> None:
    """``identity``: the bundle's ``{name, version, sha256}`` (``worker.repository``), computed once."""
    with _lock:
        _state.update(settings=settings, connection=connection, bundle=bundle, worker_name=worker_name)
        _state["identity"] = identity
    _serve(bundle)


def _serve(bundle: Any) -> None:
    """Tell the metrics which bundle this process serves (their default model/version labels)."""
    meta = getattr(bundle, "meta", None)
    if meta is not None:
        metrics.serve(meta.name, meta.version, meta.calibration)


def settings() -> Settings:
    return _state.get("settings") or get_settings()


def connection() -> Redis:
    with _lock:
        if "connection" not in _state:
            _state["connection"] = Redis.from_url(settings().redis_url or "redis://127.0.0.1:6379/0")
        return _state["connection"]


def bundle() -> Any:
    with _lock:
        if _state.get("bundle") is None:
            from models.bundle.load import load_bundle

            current = _state.get("settings") or get_settings()
            _state["bundle"] = load_bundle(current.bundle_dir, device=current.device, **current.bundle_overrides)
            _serve(_state["bundle"])
        return _state["bundle"]


def worker_name() -> str:
    return _state.get("worker_name", "")


def model_ref() -> dict[str, str]:
    """``{name, version, sha256}`` of the loaded bundle: what every result of this worker carries."""
    identity = _state.get("identity")
    if identity is None:
        from worker.repository import bundle_digest

        loaded = bundle()
        identity = {"name": loaded.meta.name, "version": loaded.meta.version, "sha256": bundle_digest(loaded.path)}
        _state["identity"] = identity
    return dict(identity)
