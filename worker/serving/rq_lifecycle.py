"""The one place that calls RQ's private job-ending API, for jobs the worker runs outside ``perform_job``.

A batching worker (``worker.serving.batching``) runs several jobs in one compute, so it cannot hand
each to RQ's ``perform_job``; it ends each job the way ``perform_job`` would, with the worker's
``_finalize_success`` / ``_finalize_failure`` (status, result, the started -> finished/failed
registries, callbacks, the execution's end). Those are private: RQ may rename or change them in any
release. Keeping every such call here means one module to read on an RQ upgrade, and
``tests/test_rq_lifecycle.py`` pins what they do (written against RQ 3.0.0) on a real Redis.
"""

from __future__ import annotations

from typing import Any

from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import BaseWorker


def finalize_success(worker: BaseWorker, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
    """What RQ does after a job returned: the job ``finished`` with its result, in the finished registry."""
    worker._finalize_success(job, queue, execution, return_value)


def finalize_failure(worker: BaseWorker, job: Job, queue: Queue, execution: Execution, exc: BaseException) -> None:
    """What RQ does after a job raised ``exc``: the job ``failed`` with its traceback, in the failed registry."""
    worker._finalize_failure(job, queue, execution, (type(exc), exc, exc.__traceback__))
