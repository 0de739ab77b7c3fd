"""Jobs of dead workers: requeued (bounded) or failed with a reason within seconds, never stuck.

RQ only notices an abandoned job when its started-registry entry expires, and a non-forking
worker registers it with the whole job timeout (rq issues #2015, #2424, #507). Our workers keep the
entry alive with a short TTL from a heartbeat thread (``worker.serving.model_worker``), so an entry that
expires means the process is gone. This scan runs in every worker and in the API; a Redis lock
makes one of them act at a time. Torch-free.
"""

from __future__ import annotations

import json
import logging
import time

from redis import Redis
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import parse_composite_key

from worker.monitoring import metrics
from worker.periodic import PeriodicThread
from worker.queueing import make_queue
from worker.settings import Settings
from worker.storage import discard_upload, upload_exists

log = logging.getLogger(__name__)

WORKER_DIED = "worker_died"


def recover_dead_jobs(connection: Redis, settings: Settings) -> list[tuple[str, str]]:
    """Handle every started job whose heartbeat expired; returns [(job_id, "requeued"|"failed")]."""
    lock_key = settings.key("recovery-lock")
    if not connection.set(lock_key, "1", nx=True, px=max(1000, int(settings.recovery_interval_s * 3000))):
        return []
    try:
        queue = make_queue(connection, settings)
        registry = queue.started_job_registry
        entries = connection.zrangebyscore(registry.key, 0, time.time())
        actions = []
        for raw in entries:
            entry = raw.decode() if isinstance(raw, bytes) else raw
            job_id, _ = parse_composite_key(entry)
            connection.zrem(registry.key, entry)
            try:
                job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
            except Exception:  # noqa: BLE001 - expired or deleted job: nothing to recover
                continue
            if job.get_status(refresh=True) != JobStatus.STARTED:
                continue
            actions.append((job_id, _recover(connection, settings, queue, job)))
        return actions
    finally:
        connection.delete(lock_key)


def _recover(connection: Redis, settings: Settings, queue: Queue, job: Job) -> str:
    deaths = int(job.meta.get("worker_deaths", 0)) + 1
    job.meta["worker_deaths"] = deaths
    worker_name = job.meta.get("worker", "?")
    if deaths <= settings.max_retries and upload_exists(connection, settings, job.id):
        log.warning("job %s: worker %s died; requeued (attempt %d)", job.id, worker_name, deaths + 1)
        job.save_meta()
        job.started_at = None
        with connection.pipeline() as pipe:
            queue._enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()
        return "requeued"
    message = f"the worker processing this job died ({deaths} time(s)); giving up"
    log.warning("job %s: %s", job.id, message)
    job.meta["error"] = {"code": WORKER_DIED, "message": message}
    job.save_meta()
    with connection.pipeline() as pipe:
        record_job_failure(job, json.dumps(job.meta["error"]), pipe)
        pipe.execute()
    discard_upload(connection, settings, job.id)
    metrics.record_job(connection, settings, "failed")
    return "failed"


class RecoveryThread(PeriodicThread):
    """Runs ``recover_dead_jobs`` every ``recovery_interval_s`` until stopped."""

    def __init__(self, connection: Redis, settings: Settings):
        super().__init__("motionguard-recovery", settings.recovery_interval_s)
        self.connection, self.settings = connection, settings
        # After Redis was unreachable or restarted, heartbeats of live workers may have lapsed
        # meanwhile: hold the scan until they have had time to renew them, or running jobs would
        # be requeued (and run twice).
        self.grace = settings.heartbeat_ttl_s + 2 * settings.heartbeat_interval_s
        self.hold_until, self.run_id = 0.0, None

    def tick(self) -> None:
        try:
            current = self.connection.info("server").get("run_id")
            if self.run_id is not None and current != self.run_id:
                log.warning("Redis restarted; recovery scans resume in %.0f s", self.grace)
                self.hold_until = time.monotonic() + self.grace
            self.run_id = current
            if time.monotonic() >= self.hold_until:
                recover_dead_jobs(self.connection, self.settings)
        except Exception:  # noqa: BLE001 - Redis may be briefly away; try again next tick
            self.hold_until = time.monotonic() + self.grace
            log.debug("recovery scan failed", exc_info=True)
