"""Batching across jobs: one worker purifies the clips of several queued jobs as one batch.

A worker that runs one job at a time computes a one-clip upload at batch 1, which on a GPU is
bound by kernel launches, not arithmetic. RQ has no batch dequeue (its maintainers point to more
workers, rq #928); a GPU serving one process per card needs batching across requests, as Triton's
dynamic batcher does. So after the worker has taken a job it takes further queued analysis jobs,
waiting at most ``max_batch_delay_ms`` (Triton's ``max_queue_delay_microseconds``), until
``max_batch_clips`` clips are gathered (the API's per-job estimate), then:

1. each job is decoded and cut on its own (``worker.serving.inference.prepare_video``): an undecodable
   video fails only its own job;
2. the clips are grouped by what must match (``DefenseRequest``: defence mode always/auto/off and
   its threshold, steps, epsilon, multi-constraint) and each group is computed in batches of at
   most ``max_batch_clips`` clips, clips of several jobs side by side (``compute_clips``, where
   ``Pipeline.predict`` decides per clip: in auto mode only clips over the threshold are purified,
   and clips that stop early leave the purification); other settings run as separate batches;
3. a job whose clips are all computed gets its result assembled, stored and recorded at once.

Every job keeps its own RQ lifecycle, through RQ's own calls: ``prepare_execution`` (an execution
in the ``StartedJobRegistry``), ``prepare_job_execution`` (status ``started``, worker name), a
heartbeat for each execution from the worker's heartbeat thread (so ``worker.recovery`` requeues
every job of a SIGKILLed worker), and the worker's ``finalize_success``/``finalize_failure``
(result or failure, registries, callbacks: RQ's private calls, isolated in
``worker.serving.rq_lifecycle``). A canceled job, or one past its timeout, ends at the next defence
step and its clips leave the purification (``Pipeline.predict(leave=...)``); the others go on.
Nothing is pickled.

The worker is seen through ``BatchHost``, the few things a batch needs of it (``ModelWorker``
implements it); this module does not import the worker.

Timeouts: the API sizes a job's timeout for its own clips; in a batch the job shares the compute
with the batch's other clips, so its limit is scaled by (estimated batch clips / its clips). RQ's
death penalty over the whole run is the backstop for a hung compute.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from redis import Redis
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException
from rq.utils import now

from worker.queueing import JOB_FUNCTION, cancel_key
from worker.serving import runtime
from worker.serving.inference import (
    DefenseRequest,
    JobCanceled,
    JobCompute,
    PreparedVideo,
    assemble_result,
    compute_clips,
    defense_request,
    figures_of,
    prepare_video,
)
from worker.serving.jobs import REDIS_DOWN, JobParams, begin_job, record_failure, store_outputs
from worker.settings import Settings
from worker.storage import discard_upload
from worker.video import VideoLimits

log = logging.getLogger(__name__)

POLL_S = 0.005  # how often the queue is looked at while a batch waits to fill
CANCEL_POLL_S = 0.25  # how often the jobs' cancel flags are read during the compute
BACKSTOP_SLACK_S = 10  # the death penalty fires this long after the latest job's own deadline


@runtime_checkable
class BatchHost(Protocol):
    """What a batch needs of the worker that runs it (``worker.serving.model_worker.ModelWorker``)."""

    settings: Settings
    connection: Redis
    queues: list[Queue]
    job_class: type[Job]
    serializer: Any
    death_penalty_class: type

    @property
    def stopping(self) -> bool:
        """A shutdown was requested: take no further job."""
        ...

    def accepts(self, job: Job, queue: Queue) -> bool:
        """Whether this worker may run a job it dequeued (else the worker has moved it elsewhere)."""
        ...

    def prepare_execution(self, job: Job) -> Execution: ...

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None: ...

    def track(self, job: Job, execution: Execution) -> None:
        """Heartbeat this execution until ``untrack``."""
        ...

    def untrack(self, execution: Execution) -> None: ...

    def finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        """End the job as RQ does after it returned ``return_value``."""
        ...

    def finalize_failure(self, job: Job, queue: Queue, execution: Execution, exc: BaseException) -> None:
        """End the job as RQ does after it raised ``exc``."""
        ...


@dataclass(eq=False)  # identity: one Member per job, usable as a dict key
class Member:
    """One job of a batch, from dequeue to its end."""

    job: Job
    queue: Queue
    execution: Execution
    started: float = field(default_factory=time.perf_counter)
    started_mono: float = field(default_factory=time.monotonic)
    params: JobParams | None = None
    path: Path | None = None
    queued_s: float = 0.0
    request: DefenseRequest | None = None
    video: PreparedVideo | None = None
    compute: JobCompute | None = None
    deadline: float = math.inf  # time.monotonic() past which the job ends with a timeout
    canceled: bool = False
    ended: bool = False

    @property
    def estimated_clips(self) -> int:
        return max(1, int(self.job.meta.get("estimated_clips") or 1))


class BatchLeft(Exception):
    """Every job of the batch being computed has ended (canceled, timed out): stop computing it."""


class BatchRun:
    """Gather jobs after ``first`` and run them as batches; every job ends here, one way or another."""

    def __init__(self, worker: BatchHost, first: Job, queue: Queue):
        self.worker = worker
        self.settings = worker.settings
        self.connection = worker.connection
        self.bundle = runtime.bundle()
        self.members: list[Member] = [self._start(first, queue)]
        self._polled = 0.0

    # --- RQ lifecycle, per job ------------------------------------------------------------------

    def _start(self, job: Job, queue: Queue) -> Member:
        """What ``SimpleWorker.execute_job`` + ``perform_job`` do before running a job."""
        execution = self.worker.prepare_execution(job)
        self.worker.track(job, execution)
        self.worker.prepare_job_execution(job, remove_from_intermediate_queue=len(self.worker.queues) == 1)
        job.started_at = now()
        return Member(job=job, queue=queue, execution=execution)

    def _end(self, member: Member) -> None:
        member.ended = True
        self.worker.untrack(member.execution)
        try:
            discard_upload(self.connection, self.settings, member.job.id)
        except REDIS_DOWN:
            pass

    def succeed(self, member: Member, return_value: dict) -> None:
        try:
            self.worker.finalize_success(member.job, member.queue, member.execution, return_value)
        finally:
            self._end(member)

    def fail(self, member: Member, exc: BaseException) -> None:
        """Record why the job ended (meta + metric) and let RQ fail it (registries, result)."""
        if member.ended:
            return
        try:
            record_failure(member.job, self.connection, self.settings, exc)
            self.worker.finalize_failure(member.job, member.queue, member.execution, exc)
        finally:
            self._end(member)

    # --- gathering ------------------------------------------------------------------------------

    def gather(self) -> None:
        """Take further queued analysis jobs until ``max_batch_clips`` clips (estimated) or the delay."""
        limit = self.settings.max_batch_clips
        deadline = time.monotonic() + self.settings.max_batch_delay_ms / 1000
        clips = sum(m.estimated_clips for m in self.members)
        while clips < limit and not self.worker.stopping:
            result = Queue.dequeue_any(
                self.worker.queues,
                None,
                connection=self.connection,
                job_class=self.worker.job_class,
                serializer=self.worker.serializer,
            )
            if result is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(POLL_S, remaining))
                continue
            job, queue = result
            if job.func_name != JOB_FUNCTION:  # not ours to batch: back to the front, for the next round
                queue.intermediate_queue.remove(job.id)
                queue.push_job_id(job.id, at_front=True)
                break
            if not self.worker.accepts(job, queue):  # admitted for another bundle: now on that one's pinned queue
                continue
            member = self._start(job, queue)
            self.members.append(member)
            clips += member.estimated_clips

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> None:
        """Raises only what Redis raised while it was away: the worker then stops these jobs'
        heartbeats and waits for Redis, and ``worker.recovery`` requeues whatever was not recorded."""
        self.gather()
        total = sum(m.estimated_clips for m in self.members)
        for member in self.members:
            timeout = member.job.timeout or Queue.DEFAULT_TIMEOUT
            member.deadline = member.started_mono + timeout * max(1.0, total / member.estimated_clips)
        backstop = max(m.deadline for m in self.members) - time.monotonic() + BACKSTOP_SLACK_S
        log.info("batch of %d job(s), %d clip(s) estimated", len(self.members), total)
        try:
            with self.worker.death_penalty_class(
                math.ceil(backstop), JobTimeoutException, job_id=self.members[0].job.id
            ):
                for member in self.members:
                    self._prepare(member)
                for request, members in self._groups().items():
                    self._compute_group(request, members)
        except JobTimeoutException as exc:
            for member in self.members:
                self.fail(member, exc)
        except REDIS_DOWN:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in the batch fails its jobs, never the worker
            log.exception("the batch failed")
            for member in self.members:
                self.fail(member, exc)
        for member in self.members:  # nothing may stay started: a bug here must not leave a job hanging
            if not member.ended:
                self.fail(member, RuntimeError("the batch ended before this job"))

    def _prepare(self, member: Member) -> None:
        """Stage 1 for one job; a video that cannot be used fails this job only."""
        job = member.job
        try:
            member.path, member.queued_s = begin_job(job, self.connection, self.settings)
            member.params = JobParams.of(job.args[0] if job.args else {}, self.settings)
            member.request = defense_request(
                self.bundle,
                defend=member.params.defend,
                steps=member.params.steps,
                epsilon=member.params.epsilon,
                multi=member.params.multi,
                figures=self.settings.clip_figures,
            )
            member.video = prepare_video(
                member.path, self.bundle, VideoLimits.from_settings(self.settings), self.settings.max_clips
            )
            member.compute = JobCompute.empty(len(member.video.spans))
        except (JobTimeoutException, *REDIS_DOWN):  # the backstop fired, or Redis is away: the whole batch
            raise
        except Exception as exc:  # noqa: BLE001 - named by record_failure (invalid_video, internal, ...)
            self.fail(member, exc)

    def _groups(self) -> dict[DefenseRequest, list[Member]]:
        groups: dict[DefenseRequest, list[Member]] = {}
        for member in self.members:
            if not member.ended:
                groups.setdefault(member.request, []).append(member)
        return groups

    def _compute_group(self, request: DefenseRequest, members: list[Member]) -> None:
        """Stage 2 in batches of at most ``max_batch_clips`` clips, stage 3 as each job completes."""
        pending = [(m, i) for m in members for i in range(len(m.video.spans))]
        limit = self.settings.max_batch_clips
        while True:
            pending = [(m, i) for m, i in pending if not m.ended]
            if not pending:
                return
            chunk, pending = pending[:limit], pending[limit:]
            chunk_members = list(dict.fromkeys(m for m, _ in chunk))
            check = self._checker(chunk_members)
            try:
                check()
                clips = np.stack([m.video.clips[i] for m, i in chunk])
                outputs, timings = compute_clips(
                    self.bundle,
                    clips,
                    request,
                    figure_index=[i for _, i in chunk],
                    check=check,
                    gone=lambda chunk=chunk: [m.ended for m, _ in chunk],
                )
            except BatchLeft:
                continue
            except (JobTimeoutException, *REDIS_DOWN):
                raise
            except Exception as exc:  # noqa: BLE001 - the batch's compute failed: its jobs fail, the rest go on
                log.exception("a batch of %d clip(s) failed", len(chunk))
                for member in chunk_members:
                    self.fail(member, exc)
                continue
            ids = {m.job.id for m in chunk_members}
            for (member, index), output in zip(chunk, outputs, strict=True):
                if not member.ended:
                    member.compute.add(index, output)
            for member in chunk_members:
                if member.ended:
                    continue
                member.compute.add_batch(timings, ids)
                if member.compute.complete:
                    self._finish(member)

    def _checker(self, members: list[Member]) -> Callable[[], None]:
        """Called at every defence step: jobs canceled or past their deadline leave the batch."""

        def check() -> None:
            clock = time.monotonic()
            if clock - self._polled > CANCEL_POLL_S:
                self._polled = clock
                self._read_cancel_flags()
            for member in members:
                if member.ended:
                    continue
                if member.canceled:
                    self.fail(member, JobCanceled("the job was canceled"))
                elif clock > member.deadline:
                    self.fail(member, JobTimeoutException(f"the job exceeded its {member.job.timeout} s timeout"))
            if all(member.ended for member in members):
                raise BatchLeft()

        return check

    def _read_cancel_flags(self) -> None:
        live = [m for m in self.members if not m.ended]
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for member in live:
                    pipe.exists(cancel_key(self.settings, member.job.id))
                flags = pipe.execute()
        except REDIS_DOWN:  # Redis briefly away: keep computing, the flags are read again later
            return
        for member, flag in zip(live, flags, strict=True):
            member.canceled = member.canceled or bool(flag)

    def _finish(self, member: Member) -> None:
        """Stage 3: assemble, encode and store this job's result, then let RQ finish it."""
        try:
            result, frames = assemble_result(
                self.bundle, member.video, member.request, member.compute, member.params.top_k, member.started
            )
            value = store_outputs(
                member.job.id,
                self.connection,
                self.settings,
                result,
                frames,
                figures_of(member.compute),
                member.started,
                member.queued_s,
            )
        except (JobTimeoutException, *REDIS_DOWN):
            raise
        except Exception as exc:  # noqa: BLE001 - storage_error, internal: this job only
            self.fail(member, exc)
            return
        self.succeed(member, value)
