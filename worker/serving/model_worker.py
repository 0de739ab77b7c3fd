"""A non-forking RQ worker with a real heartbeat while a job runs.

``SimpleWorker`` runs jobs in its own process, so the bundle is loaded once (and CUDA is never
forked), but it refreshes nothing while a job runs: its started-registry entry lives for the whole
job timeout, which is how a killed worker's job ends up stuck in ``started``. Here a thread renews
the worker key, the execution and the registry entry every ``heartbeat_interval_s`` with a TTL of
``heartbeat_ttl_s``, so a vanished worker is detected within seconds (``worker.recovery``). A second
thread (``worker.liveness``, started by ``worker.cli.worker``) publishes a liveness key with the
bundle it serves, read by the API's ``/readyz``.

With ``max_batch_clips`` > 1 a job of ``worker.serving.jobs.analyse_job`` is run by ``worker.serving.batching``
together with further queued jobs; the heartbeat thread then beats every job of the batch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import UnixSignalDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from worker import recovery
from worker.queueing import JOB_FUNCTION
from worker.serving import rq_lifecycle
from worker.settings import Settings

log = logging.getLogger(__name__)


REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


class RepeatingDeathPenalty(UnixSignalDeathPenalty):
    """RQ's SIGALRM job timeout, fired again every ``refire_s`` until the job's context ends.

    RQ's fires once. Its exception is raised wherever the job's main thread is when the signal
    arrives, and a library may swallow it there: PyAV runs Python in its log callback under an
    ``except Exception``, so a timeout landing in a decode or an encode is printed and lost. The job
    then runs on with no deadline at all, and one blocked in a write (a hung volume) stays
    ``started`` for ever, its heartbeat alive. Fired again, the timeout reaches the job at its next
    stop; a job whose first timeout did propagate has left the context (which cancels the timer)
    long before the second."""

    refire_s = 5.0

    def setup_death_penalty(self) -> None:
        if self._timeout is None or self._timeout <= 0:  # RQ's "no timeout"
            return
        self._fired = 0
        signal.signal(signal.SIGALRM, self.handle_death_penalty)
        signal.setitimer(signal.ITIMER_REAL, self._timeout, self.refire_s)

    def handle_death_penalty(self, signum, frame) -> None:
        self._fired += 1
        if self._fired > 1:
            log.warning("job timeout fired again (%d): the first was swallowed on its way out", self._fired)
        super().handle_death_penalty(signum, frame)

    def cancel_death_penalty(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


class ModelWorker(SimpleWorker):
    """Rides out a Redis outage instead of quitting: RQ's loop survives a lost connection only while
    it waits for a job; here a job that could not be recorded, and the loop's own bookkeeping,
    wait for Redis to come back (the job is then requeued by ``worker.recovery``).

    Implements ``worker.serving.batching.BatchHost``: what a batch of jobs needs of its worker."""

    settings: Settings  # set by worker.cli.worker before work() starts
    bundle_info: dict = {}
    death_penalty_class = RepeatingDeathPenalty
    max_connection_wait_time = 4.0  # RQ's reconnect backoff while idle (its default grows to 60 s)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.settings.heartbeat_ttl_s

    def wait_for_redis(self, what: str) -> None:
        """Block until Redis answers again (or a shutdown is requested)."""
        log.warning("Redis unreachable (%s); waiting for it", what)
        started = time.monotonic()
        while not self._stop_requested and self._shutdown_requested_date is None:
            try:
                self.connection.ping()
                log.warning("Redis is back after %.1f s", time.monotonic() - started)
                return
            except REDIS_DOWN:
                time.sleep(0.5)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._beats: dict[str, tuple[Job, Execution]] = {}  # execution id -> the job it runs
        self._beats_lock = threading.Lock()

    def accepts(self, job: Job, queue: Queue) -> bool:
        """Whether this worker may run a job it dequeued (``worker.serving.routing.RoutedWorker``
        runs only jobs admitted for its bundle); the batching worker asks for every job it gathers."""
        return True

    @property
    def stopping(self) -> bool:
        """A warm or cold shutdown was requested: finish what runs, take nothing more."""
        return bool(self._stop_requested or self._shutdown_requested_date is not None)

    def track(self, job: Job, execution: Execution) -> None:
        """Heartbeat this job's execution until ``untrack`` (every job of a batch has its own)."""
        with self._beats_lock:
            self._beats[execution.id] = (job, execution)

    def untrack(self, execution: Execution) -> None:
        with self._beats_lock:
            self._beats.pop(execution.id, None)

    def finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        rq_lifecycle.finalize_success(self, job, queue, execution, return_value)

    def finalize_failure(self, job: Job, queue: Queue, execution: Execution, exc: BaseException) -> None:
        rq_lifecycle.finalize_failure(self, job, queue, execution, exc)

    def execute_job(self, job: Job, queue: Queue) -> None:
        batched = self.settings.max_batch_clips > 1 and job.func_name == JOB_FUNCTION
        execution = None if batched else self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._job_heartbeat, args=(stop,), daemon=True)
        beat.start()
        try:
            if batched:
                from worker.serving.batching import BatchRun

                BatchRun(self, job, queue).run()
            else:
                self.track(job, execution)
                self.perform_job(job, queue, execution)
        except REDIS_DOWN:
            # The jobs' outcomes could not be recorded: their heartbeats stop, so once Redis is back
            # the recovery scan requeues them (bounded by max_retries) or fails them with a reason.
            with self._beats_lock:
                self._beats.clear()
            self.wait_for_redis(f"recording job {job.id}")
        finally:
            stop.set()
            beat.join()
            with self._beats_lock:
                self._beats.clear()
        try:
            self.set_state(WorkerStatus.IDLE)
        except REDIS_DOWN:
            self.wait_for_redis("setting the worker idle")

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except REDIS_DOWN:
            self.wait_for_redis("checking for suspension")

    def clean_registries(self) -> None:
        """RQ's registry maintenance, under the service's recovery lock and right after its recovery
        scan. RQ's started-registry cleanup fails a job whose entry expired (``AbandonedJobError``),
        where ``worker.recovery`` requeues it (bounded by ``max_retries``): a worker starting more than
        a heartbeat TTL after a crash ran RQ's cleanup before any recovery scan and failed the dead
        worker's job (CI, ``test_embedded_persistence``). Now the recovery has taken every expired
        entry first, and no scan elsewhere interleaves with RQ's cleanup."""
        with recovery.recovery_lock(self.connection, self.settings, recovery.lock_ttl_s(self.settings)) as held:
            if held:
                recovery.recover_locked(self.connection, self.settings)
            self.clean_queue_registries()

    def clean_queue_registries(self) -> None:
        """RQ's own maintenance of the worker's queues (subclasses add theirs)."""
        super().clean_registries()

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except REDIS_DOWN:
            self.wait_for_redis("maintenance")

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        try:
            return super().heartbeat(timeout, pipeline)
        except REDIS_DOWN:
            if pipeline is not None:
                raise
            self.wait_for_redis("worker heartbeat")

    def _job_heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.heartbeat_interval_s):
            with self._beats_lock:
                running = list(self._beats.values())
            for job, execution in running:
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # noqa: BLE001 - a missed beat is retried; recovery waits heartbeat_ttl_s
                    log.debug("job heartbeat failed", exc_info=True)
