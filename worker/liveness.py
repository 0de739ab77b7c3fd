"""Which model workers are alive, and what each serves: a key per worker with a short TTL.

A worker process beats ``<prefix>:worker:<name>`` (``LivenessThread``) with the bundle it serves;
the API reads the keys that have not expired (``live_workers``) for ``/readyz``, ``/models``, the
metrics and the recovery scan. Torch-free and RQ-free: the API process imports it, the worker's
serving side (``worker.serving``) does not need to be importable there.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Protocol

from redis import Redis

from worker.periodic import PeriodicThread
from worker.settings import Settings

log = logging.getLogger(__name__)


class NamedWorker(Protocol):
    """What the beat needs of a worker: its name and its Redis connection (an RQ worker has both)."""

    name: str
    connection: Redis


class LivenessThread(PeriodicThread):
    """Keeps ``<prefix>:worker:<name>`` alive (TTL heartbeat_ttl_s) with the bundle this worker serves."""

    def __init__(self, worker: NamedWorker, settings: Settings, info: dict):
        super().__init__("motionguard-liveness", settings.heartbeat_interval_s, immediate=True)
        self.worker, self.settings = worker, settings
        self.key = settings.key("worker", worker.name)
        self.value = json.dumps({**info, "pid": os.getpid(), "name": worker.name})

    def beat(self) -> None:
        self.worker.connection.set(self.key, self.value, ex=self.settings.heartbeat_ttl_s)

    def tick(self) -> None:
        try:
            self.beat()
        except Exception:  # noqa: BLE001
            log.debug("liveness beat failed", exc_info=True)

    def stop(self) -> None:
        super().stop()
        try:
            self.worker.connection.delete(self.key)
        except Exception:  # noqa: BLE001
            pass


def live_workers(connection: Redis, settings: Settings) -> list[dict]:
    """The workers whose liveness key has not expired (torch-free, used by the API)."""
    keys = list(connection.scan_iter(match=settings.key("worker", "*"), count=200))
    values = connection.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]
