"""The periodic sweep: files on disk whose job Redis has forgotten are removed.

Results and job records expire in Redis (``result_ttl_s``), but restored videos and figures in the
"dir" blob store, and uploads, are files: without a sweep the data directory grows without bound.
A job's files go once neither its RQ job record nor its result key exists any more. An upload
whose job was never enqueued (an API process died mid-upload) goes once it is older than
``upload_reservation_s``, the longest an upload may take before its job is queued, so uploads in
progress are never touched. Blobs in the "redis" store carry their own TTL and need no sweep.
"""

from __future__ import annotations

import logging
import time

from redis import Redis, RedisError
from rq.job import Job

from worker.periodic import PeriodicThread
from worker.settings import Settings
from worker.storage import DirBlobStore, result_key, stored_uploads

log = logging.getLogger(__name__)


def job_known(connection: Redis, settings: Settings, job_id: str) -> bool:
    return bool(connection.exists(Job.key_for(job_id), result_key(settings, job_id)))


def sweep_once(connection: Redis, settings: Settings, now: float | None = None) -> dict[str, int]:
    """One pass; returns how many blob folders and uploads it removed."""
    now = time.time() if now is None else now
    removed = {"blobs": 0, "uploads": 0}
    if settings.blob_store == "dir":
        store = DirBlobStore(settings.blob_dir)
        for job_id in store.job_ids():
            if not job_known(connection, settings, job_id):
                store.delete(job_id)
                removed["blobs"] += 1
    for job_id, path in stored_uploads(settings).items():
        try:
            old = now - path.stat().st_mtime > settings.upload_reservation_s
        except FileNotFoundError:  # the worker or the API removed it meanwhile
            continue
        if old and not job_known(connection, settings, job_id):
            path.unlink(missing_ok=True)
            removed["uploads"] += 1
    if any(removed.values()):
        log.info("sweep removed %d blob folders and %d uploads of expired jobs", removed["blobs"], removed["uploads"])
    return removed


class SweepThread(PeriodicThread):
    """Runs ``sweep_once`` every ``sweep_interval_s``; a Redis outage skips a pass, never deletes."""

    def __init__(self, connection: Redis, settings: Settings):
        super().__init__("motionguard-sweep", settings.sweep_interval_s)
        self.connection, self.settings = connection, settings

    def tick(self) -> None:
        try:
            sweep_once(self.connection, self.settings)
        except (RedisError, OSError) as exc:
            log.warning("sweep skipped: %s", exc)
