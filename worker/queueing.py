"""Queue and job naming shared by the API and the workers (torch-free, so the API can enqueue)."""

from __future__ import annotations

from redis import Redis
from rq.queue import Queue
from rq.serializers import JSONSerializer

from worker.settings import Settings

# Enqueued by name: the API never imports the job function (it pulls in torch).
JOB_FUNCTION = "worker.serving.jobs.analyse_job"


def make_queue(connection: Redis, settings: Settings) -> Queue:
    """The service's queue, with RQ's JSON serializer: nothing client-sent is ever unpickled."""
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


def queue_key(settings: Settings) -> str:
    """The Redis list RQ keeps the queued job ids in (what KEDA and the queue-depth gauge read)."""
    return Queue.redis_queue_namespace_prefix + settings.queue_name


def cancel_key(settings: Settings, job_id: str) -> str:
    """Set by ``DELETE /jobs/{id}``; the worker polls it between defence steps."""
    return settings.key("cancel", job_id)
