"""Queue and job naming shared by the API and the workers (torch-free, so the API can enqueue)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

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


# --- Per-model queues (worker.repository): one per model name, as KEDA and the deploy files see it --
#
# The default model (MOTIONGUARD_BUNDLE_DIR's) keeps the plain ``<queue_name>`` queue, so a deployment
# of one model is what it was (same queue, same autoscaler); any other model has
# ``<queue_name>.<model>``. A model's queue holds the jobs admitted for it, every version alike (a
# rolling upgrade keeps one queue and one autoscaler). A worker that takes a job recorded for
# another bundle moves it to that bundle's pinned queue ``<queue_name>.<model>@<digest>``, which only
# workers with exactly that bundle take from (worker.serving.routing). A worker blocks on its
# model's queue alone, so RQ keeps each dequeued id in its intermediate list until the job starts.


def default_model_name(settings: Settings) -> str | None:
    """The ``name`` in ``bundle_dir``'s bundle.json (None when it is unreadable)."""
    path = Path(settings.bundle_dir) / "bundle.json"
    try:
        return _bundle_name(str(path), path.stat().st_mtime_ns)
    except OSError:
        return None


@lru_cache(maxsize=32)
def _bundle_name(path: str, _mtime_ns: int) -> str | None:
    try:
        name = json.loads(Path(path).read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return str(name) if name else None


def model_queue_name(settings: Settings, model: str) -> str:
    return settings.queue_name if model == default_model_name(settings) else f"{settings.queue_name}.{model}"


def pinned_queue_name(settings: Settings, model: str, sha256: str) -> str:
    from worker.repository import DIGEST_PREFIX

    return f"{settings.queue_name}.{model}@{sha256[:DIGEST_PREFIX]}"


def model_queue(connection: Redis, settings: Settings, model: str) -> Queue:
    return Queue(model_queue_name(settings, model), connection=connection, serializer=JSONSerializer)


def pinned_queue(connection: Redis, settings: Settings, model: str, sha256: str) -> Queue:
    return Queue(pinned_queue_name(settings, model, sha256), connection=connection, serializer=JSONSerializer)


def model_queue_key(settings: Settings, model: str) -> str:
    """The Redis list of a model's queue (KEDA's ``listName`` for that model's workers)."""
    return Queue.redis_queue_namespace_prefix + model_queue_name(settings, model)


def service_queues(connection: Redis, settings: Settings) -> list[Queue]:
    """Every RQ queue of this service (plain, per model, pinned) that RQ has seen a job in."""
    names = {settings.queue_name}
    prefix = Queue.redis_queue_namespace_prefix
    for raw in connection.smembers(Queue.redis_queues_keys):
        key = raw.decode() if isinstance(raw, bytes) else raw
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name.startswith(settings.queue_name + "."):
            names.add(name)
    return [Queue(name, connection=connection, serializer=JSONSerializer) for name in sorted(names)]


def model_slots_key(settings: Settings, model: str) -> str:
    """Sorted set of the job ids holding one of the model's ``max_queued`` slots (service.admission)."""
    return settings.key("queued_jobs", model)


def queue_depths(connection: Redis, settings: Settings, models: list[str]) -> dict[str, int]:
    """Jobs waiting per model: its queue plus the pinned queues of its bundles."""
    depths = {model: int(connection.llen(model_queue_key(settings, model))) for model in models}
    for queue in service_queues(connection, settings):
        model, pinned, _ = queue.name[len(settings.queue_name) + 1 :].rpartition("@")
        if pinned and model in depths:
            depths[model] += queue.count
    return depths
