"""Jobs of dead workers: requeued (bounded) or failed with a reason within seconds, never stuck.

RQ only notices an abandoned job when its started-registry entry expires, and a non-forking
worker registers it with the whole job timeout (rq issues #2015, #2424, #507). Our workers keep the
entry alive with a short TTL from a heartbeat thread (``worker.serving.model_worker``), so an entry that
expires means the process is gone. This scan runs in every worker and in the API; a Redis lock
makes one of them act at a time. Torch-free.

Every queue of the service is scanned (the plain one, one per model, the pinned ones of
``worker.serving.routing``), and a job requeued goes back to the queue it came from. The same scan
fails, with a clear error, a pinned job whose bundle no live worker has (``fail_unserved``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from redis import Redis
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import parse_composite_key

from worker.liveness import live_workers
from worker.monitoring import metrics
from worker.periodic import PeriodicThread
from worker.queueing import pinned_queue_name, service_queues
from worker.settings import Settings
from worker.storage import discard_upload, upload_exists

log = logging.getLogger(__name__)

WORKER_DIED = "worker_died"
MODEL_UNAVAILABLE = "model_unavailable"


def lock_ttl_s(settings: Settings) -> float:
    """How long the recovery lock lives if its holder dies holding it."""
    return max(1.0, settings.recovery_interval_s * 3)


@contextmanager
def recovery_lock(connection: Redis, settings: Settings, wait_s: float = 0.0) -> Iterator[bool]:
    """The service-wide lock of the recovery scan (one process acts at a time); yields whether it is
    held here. ``wait_s``: how long to retry while another process holds it (0: once)."""
    key = settings.key("recovery-lock")
    deadline = time.monotonic() + wait_s
    held = bool(connection.set(key, "1", nx=True, px=int(lock_ttl_s(settings) * 1000)))
    while not held and time.monotonic() < deadline:
        time.sleep(0.05)  # a lock retry: its holder's scan takes milliseconds
        held = bool(connection.set(key, "1", nx=True, px=int(lock_ttl_s(settings) * 1000)))
    try:
        yield held
    finally:
        if held:
            connection.delete(key)


def recover_dead_jobs(connection: Redis, settings: Settings) -> list[tuple[str, str]]:
    """Handle every started job whose heartbeat expired, on every queue of the service, and fail the
    pinned jobs no live worker can run; returns [(job_id, "requeued"|"failed")]. Skipped (returns
    []) while another process scans."""
    with recovery_lock(connection, settings) as held:
        return recover_locked(connection, settings) if held else []


def recover_locked(connection: Redis, settings: Settings) -> list[tuple[str, str]]:
    """``recover_dead_jobs``'s scan, for a caller that holds ``recovery_lock``."""
    actions = []
    for queue in service_queues(connection, settings):
        actions += _recover_queue(connection, settings, queue)
    unserved = fail_unserved(connection, settings, live_workers(connection, settings))
    return actions + [(job_id, "failed") for job_id in unserved]


def _recover_queue(connection: Redis, settings: Settings, queue: Queue) -> list[tuple[str, str]]:
    registry = queue.started_job_registry
    actions = []
    for raw in connection.zrangebyscore(registry.key, 0, time.time()):
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


def fail_unserved(connection: Redis, settings: Settings, workers: list[dict]) -> list[str]:
    """Fail the pinned jobs (``worker.serving.routing``) whose bundle no live worker has, once they
    waited ``model_wait_s`` there; returns their ids. ``workers``: the live workers' records."""
    served = {str(w["sha256"]) for w in workers if w.get("sha256")}
    now = datetime.now(UTC)
    failed = []
    for queue in service_queues(connection, settings):
        if "@" not in queue.name:
            continue
        for job_id in queue.get_job_ids():
            try:
                job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
            except Exception:  # noqa: BLE001 - expired or deleted meanwhile
                queue.remove(job_id)
                continue
            ref = job.meta.get("model") or {}
            digest = str(ref.get("sha256", ""))
            if digest in served or queue.name != pinned_queue_name(settings, str(ref.get("name")), digest):
                continue
            enqueued = job.enqueued_at.replace(tzinfo=UTC) if job.enqueued_at else now
            if (now - enqueued).total_seconds() < settings.model_wait_s or queue.remove(job_id) == 0:
                continue  # still within its wait, or a worker took it meanwhile
            _fail_unserved_job(connection, settings, job, ref)
            failed.append(job_id)
    return failed


def _fail_unserved_job(connection: Redis, settings: Settings, job: Job, ref: dict) -> None:
    message = (
        f"no live worker has model {ref.get('name')} version {ref.get('version')} "
        f"(sha256 {str(ref.get('sha256', ''))[:12]}), the bundle this job was submitted for, within "
        f"{settings.model_wait_s:.0f} s; it was not run on another bundle. Submit it again"
    )
    log.warning("job %s: %s", job.id, message)
    job.meta["error"] = {"code": MODEL_UNAVAILABLE, "message": message}
    job.save_meta()
    with connection.pipeline() as pipe:
        record_job_failure(job, json.dumps(job.meta["error"]), pipe)
        pipe.execute()
    discard_upload(connection, settings, job.id)
    metrics.record_job(connection, settings, "failed", model=str(ref.get("name", "")), version=ref.get("version"))


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
    ref = job.meta.get("model") or {}
    if ref.get("name"):
        metrics.record_job(connection, settings, "failed", model=str(ref["name"]), version=ref.get("version"))
    else:
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
