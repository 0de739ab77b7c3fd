"""A job runs only on a worker whose bundle is the one the job was admitted for.

The API records the resolved bundle in the job's meta (``model: {name, version, sha256}``, the
digest of ``worker.repository``) and enqueues it on the model's queue, which every worker of that
model takes from, whatever version it has loaded (one queue and one autoscaler per model, so a
rolling upgrade needs no new queue). A worker that takes a job recorded for another bundle (a
version it does not have, or the same version with other weights) never runs it: the job moves to
the pinned queue of that bundle (``worker.queueing.pinned_queue``), on which only workers with
exactly that bundle listen, ahead of their model's queue. A pinned job that no live worker can run
is failed with a clear error by ``worker.recovery.fail_unserved`` after ``model_wait_s``.

Jobs without a recorded model (tools, jobs queued before models existed) run on a worker of the
default model, the only kind that listens on the plain queue.
"""

from __future__ import annotations

import logging
import time

from redis import Redis
from rq.job import Job
from rq.queue import Queue
from rq.registry import clean_registries

from worker.queueing import pinned_queue
from worker.serving.model_worker import ModelWorker
from worker.settings import Settings

log = logging.getLogger(__name__)

PINNED_POLL_S = 1  # longest wait of an idle worker before it looks at its pinned queue again (s)


def same_bundle(ref: dict, identity: dict) -> bool:
    """Whether a job's recorded model is this exact bundle: name, version and digest."""
    return all(ref.get(k) == identity.get(k) for k in ("name", "version", "sha256"))


def accept(connection: Redis, settings: Settings, identity: dict, job: Job, queue: Queue) -> bool:
    """True: this worker (bundle ``identity``) runs the dequeued ``job``. False: the job was not for
    this bundle and now waits on its own bundle's pinned queue."""
    ref = job.meta.get("model")
    if not ref or same_bundle(ref, identity):
        return True
    target = pinned_queue(connection, settings, str(ref.get("name")), str(ref.get("sha256", "")))
    job.meta["reroutes"] = int(job.meta.get("reroutes", 0)) + 1
    with connection.pipeline() as pipe:  # one MULTI: a worker dying here loses nothing
        pipe.multi()
        target.enqueue_job(job, pipeline=pipe)
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)  # RQ keeps a dequeued id there until it starts
        pipe.execute()
    log.info(
        "job %s is for %s v%s (sha256 %.12s), not this worker's %s v%s (sha256 %.12s): moved to %s",
        job.id,
        ref.get("name"),
        ref.get("version"),
        ref.get("sha256", ""),
        identity.get("name"),
        identity.get("version"),
        identity.get("sha256", ""),
        target.name,
    )
    return False


class RoutedWorker(ModelWorker):
    """A model worker that runs only the jobs admitted for its bundle (``identity``).

    It blocks on its model's queue alone (RQ then keeps a dequeued id in the queue's intermediate
    list until the job starts, so a worker killed in between loses nothing) and looks at its
    bundle's pinned queue before each wait, which is at most ``PINNED_POLL_S`` long."""

    identity: dict = {}  # {name, version, sha256}, set by worker.cli.worker before work() starts
    pinned: Queue | None = None  # this bundle's pinned queue (worker.queueing.pinned_queue)

    def accepts(self, job: Job, queue: Queue) -> bool:
        return accept(self.connection, self.settings, self.identity, job, queue)

    def _take_pinned(self) -> tuple[Job, Queue] | None:
        if self.pinned is None:
            return None
        return Queue.dequeue_any(
            [self.pinned], None, connection=self.connection, job_class=self.job_class, serializer=self.serializer
        )

    def unsubscribe(self) -> None:
        """RQ's, with a bounded wait. redis-py 8's ``PubSubWorkerThread.stop()`` joins the thread without
        a timeout, and RQ's pubsub thread (``sleep_time=60``) sleeps up to a minute once unsubscribed,
        so the warm shutdown of an idle worker could take a minute, past compose's or serve's grace."""
        if self.pubsub_thread:
            self.pubsub.unsubscribe()
            self.pubsub_thread.stop(timeout=1)
            self.pubsub.close()

    def clean_queue_registries(self) -> None:
        """RQ's maintenance of the worker's queues, and of its pinned queue too (a job taken from it by
        a worker that died before starting it is not left in its intermediate list)."""
        super().clean_queue_registries()
        if self.pinned is not None and self.pinned.acquire_maintenance_lock():
            try:
                clean_registries(self.pinned, self._exc_handlers)
                self.pinned.intermediate_queue.cleanup(self, self.pinned)
            finally:
                self.pinned.release_maintenance_lock()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        idle_since = time.monotonic()
        while True:
            result = self._take_pinned()
            if result is None:
                wait = None if timeout is None else max(1, min(PINNED_POLL_S, timeout))
                result = super().dequeue_job_and_maintain_ttl(wait, max_idle_time=None if wait is None else wait)
            if result is not None:
                if self.accepts(*result):
                    return result
                continue
            if timeout is None or self.stopping:
                return None  # burst mode: the queues are empty
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                return None
