"""The RQ adapter (``worker.serving.rq_lifecycle``) ends a job exactly as RQ's own ``perform_job`` does.

The batching worker ends its jobs through RQ's private ``_finalize_success``/``_finalize_failure``;
these tests pin what that means in the installed RQ on a real Redis with real RQ jobs: each job is
run once by RQ itself (``perform_job``) and once started the way the batch starts it and ended by
the adapter, and both must leave the same trace (status, registries, result, execution). An RQ
release that changes those calls fails here, not in production.
"""

from __future__ import annotations

import uuid

import pytest
from redis import Redis
from rq.job import JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now

from worker.serving import rq_lifecycle
from worker.serving.batching import BatchHost
from worker.serving.model_worker import ModelWorker
from worker.settings import Settings


@pytest.fixture
def rq_setup():
    connection = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        connection.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no Redis at 127.0.0.1:6379: {exc}")
    name = f"test-rq-lifecycle-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, connection=connection, serializer=JSONSerializer)
    worker = ModelWorker([queue], connection=connection, serializer=JSONSerializer, name=name)
    worker.settings = Settings(redis_url="redis://127.0.0.1:6379/0", key_prefix=name, queue_name=name)
    worker.register_birth()
    yield connection, queue, worker
    worker.register_death()
    for key in connection.scan_iter(f"*{name}*"):
        connection.delete(key)


def _start(queue: Queue, worker: ModelWorker, func: str, *args):
    """Enqueue and start a job as ``worker.serving.batching.BatchRun`` does."""
    queue.enqueue(func, *args)
    job, _ = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    job.started_at = now()
    return job, execution


def _trace(queue: Queue, job, execution) -> dict:
    job.refresh()
    result = job.latest_result()
    return {
        "status": job.get_status(),
        "finished": job.id in queue.finished_job_registry,
        "failed": job.id in queue.failed_job_registry,
        "started": job.id in queue.started_job_registry,
        "intermediate": job.id in queue.intermediate_queue.get_job_ids(),
        "execution_left": bool(queue.connection.exists(execution.key)),
        "result_type": result.type if result else None,
        "return_value": result.return_value if result else None,
        "error": (result.exc_string or "").strip().splitlines()[-1] if result and result.exc_string else None,
        "ended": job.ended_at is not None,
    }


def test_finalize_success_ends_a_job_as_rq_does(rq_setup):
    _, queue, worker = rq_setup
    job, execution = _start(queue, worker, "builtins.len", "abcd")
    assert worker.perform_job(job, queue, execution)  # RQ itself
    expected = _trace(queue, job, execution)

    job, execution = _start(queue, worker, "builtins.len", "abcd")
    assert _trace(queue, job, execution)["started"]
    rq_lifecycle.finalize_success(worker, job, queue, execution, 4)  # the adapter, after the batch's compute
    assert _trace(queue, job, execution) == expected
    assert expected["status"] == JobStatus.FINISHED and expected["finished"] and not expected["started"]
    assert expected["return_value"] == 4


def test_finalize_failure_ends_a_job_as_rq_does(rq_setup):
    _, queue, worker = rq_setup
    job, execution = _start(queue, worker, "builtins.int", "not a number")
    assert not worker.perform_job(job, queue, execution)  # RQ itself: int() raises ValueError
    expected = _trace(queue, job, execution)

    job, execution = _start(queue, worker, "builtins.int", "not a number")
    assert _trace(queue, job, execution)["started"]
    try:
        int("not a number")
    except ValueError as exc:
        rq_lifecycle.finalize_failure(worker, job, queue, execution, exc)
    assert _trace(queue, job, execution) == expected
    assert expected["status"] == JobStatus.FAILED and expected["failed"] and not expected["started"]
    assert expected["error"].startswith("ValueError")


def test_the_model_worker_is_a_batch_host(rq_setup):
    """``BatchRun`` sees the worker only through ``BatchHost``; the worker provides every part of it."""
    _, _, worker = rq_setup
    assert isinstance(worker, BatchHost)
    missing = [name for name in ("finalize_success", "finalize_failure", "track", "untrack", "accepts")
               if not callable(getattr(worker, name, None))]  # fmt: skip
    assert missing == []


def test_job_timeout_swallowed_once_fires_again(tmp_path):
    """The worker's death penalty (``RepeatingDeathPenalty``): a job whose first timeout a library
    swallows (as PyAV's log callback does) and which then blocks in a write no one reads still ends
    with ``JobTimeoutException``, and the timer and handler are reset afterwards. Deterministic: both
    opens of the FIFO block until a signal, since nothing ever reads it."""
    import os
    import signal

    from rq.timeouts import JobTimeoutException

    from worker.serving.model_worker import RepeatingDeathPenalty

    class Quick(RepeatingDeathPenalty):
        refire_s = 0.2

    fifo = tmp_path / "nobody-reads"
    os.mkfifo(fifo)
    swallowed = []
    assert ModelWorker.death_penalty_class is RepeatingDeathPenalty
    with pytest.raises(JobTimeoutException):
        with Quick(1, JobTimeoutException):
            try:
                open(fifo, "wb")
            except JobTimeoutException:
                swallowed.append(True)  # what a library's ``except Exception`` does with it
            open(fifo, "wb")
    assert swallowed == [True]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
