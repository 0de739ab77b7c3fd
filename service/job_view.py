"""Reading jobs back: RQ job + our meta + stored result -> the design's job object.

A job is visible only to the owner recorded at submission; anything else (unknown, expired,
another key's, malformed id) is the same 404 so ids cannot be probed.
"""

from __future__ import annotations

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from service.errors import ApiError
from service.schemas import JobInfo
from worker.settings import Settings
from worker.storage import JOB_ID_RE, load_result

STATE = {
    "queued": "queued",
    "deferred": "queued",
    "scheduled": "queued",
    "started": "started",
    "finished": "finished",
    "failed": "failed",
    "stopped": "canceled",
    "canceled": "canceled",
}


def fetch_owned(connection: Redis, job_id: str, owner: str) -> Job:
    if not JOB_ID_RE.fullmatch(job_id):
        raise ApiError(404, "not_found", "no such job")
    try:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        raise ApiError(404, "not_found", "no such job") from None
    if job.meta.get("owner") != owner:
        raise ApiError(404, "not_found", "no such job")
    return job


def state_of(job: Job) -> str:
    status = job.get_status(refresh=False)
    state = STATE.get(str(status.value if hasattr(status, "value") else status), "queued")
    if state == "failed" and job.meta.get("canceled"):
        return "canceled"
    return state


def _rq_failure(job: Job) -> dict[str, str]:
    """A failure RQ recorded itself (no meta from our job function): say what kind, never a traceback."""
    latest = job.latest_result()
    text = (getattr(latest, "exc_string", None) or "") if latest is not None else ""
    if "AbandonedJobError" in text:
        return {"code": "worker_died", "message": "the worker processing this job died"}
    if "JobTimeoutException" in text:
        return {"code": "timeout", "message": "the job exceeded its timeout"}
    return {"code": "failed", "message": "the job failed"}


def job_info(connection: Redis, settings: Settings, job: Job) -> JobInfo:
    state = state_of(job)
    result = load_result(connection, settings, job.id) if state == "finished" else None
    error = None
    if state in ("failed", "canceled"):
        error = job.meta.get("error") or _rq_failure(job)
    elif state == "finished" and result is None:
        state, error = "failed", {"code": "expired", "message": "the job's result has expired"}
    return JobInfo(
        job_id=job.id,
        status=state,
        created_at=job.enqueued_at or job.created_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        result=result,
        error=error,
        queue_position=job.get_position() if state == "queued" else None,
    )
