"""A non-forking RQ worker with a real heartbeat while a job runs.

``SimpleWorker`` runs jobs in its own process, so the bundle is loaded once (and CUDA is never
forked), but it refreshes nothing while a job runs: its started-registry entry lives for the whole
job timeout, which is how a killed worker's job ends up stuck in ``started``. Here a thread renews
the worker key, the execution and the registry entry every ``heartbeat_interval_s`` with a TTL of
``heartbeat_ttl_s``, so a vanished worker is detected within seconds (``worker.recovery``). A second
thread publishes a liveness key with the bundle it serves, read by the API's ``/readyz``.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker, WorkerStatus

from service.settings import Settings

log = logging.getLogger(__name__)


class ModelWorker(SimpleWorker):
    settings: Settings  # set by worker.main before work() starts
    bundle_info: dict = {}

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.settings.heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._job_heartbeat, args=(job, execution, stop), daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _job_heartbeat(self, job: Job, execution, stop: threading.Event) -> None:
        while not stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # noqa: BLE001 - a missed beat is retried; recovery waits heartbeat_ttl_s
                log.debug("job heartbeat failed", exc_info=True)


class LivenessThread(threading.Thread):
    """Keeps ``<prefix>:worker:<name>`` alive (TTL heartbeat_ttl_s) with the bundle this worker serves."""

    def __init__(self, worker: ModelWorker, settings: Settings, info: dict):
        super().__init__(name="motionguard-liveness", daemon=True)
        self.worker, self.settings = worker, settings
        self.key = settings.key("worker", worker.name)
        self.value = json.dumps({**info, "pid": os.getpid(), "name": worker.name})
        self.stopped = threading.Event()

    def beat(self) -> None:
        self.worker.connection.set(self.key, self.value, ex=self.settings.heartbeat_ttl_s)

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # noqa: BLE001
                log.debug("liveness beat failed", exc_info=True)
            if self.stopped.wait(self.settings.heartbeat_interval_s):
                break

    def stop(self) -> None:
        self.stopped.set()
        try:
            self.worker.connection.delete(self.key)
        except Exception:  # noqa: BLE001
            pass


def live_workers(connection, settings: Settings) -> list[dict]:
    """The workers whose liveness key has not expired (torch-free, used by the API)."""
    keys = list(connection.scan_iter(match=settings.key("worker", "*"), count=200))
    values = connection.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]
