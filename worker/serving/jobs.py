"""The RQ job: analyse one stored upload and store its result and restored video.

Arguments are plain JSON (the job id names the stored upload; parameters are numbers and flags)
and the queue uses RQ's JSON serializer, so nothing a client sent is ever unpickled.
Failures the client caused (undecodable or hostile video) are recorded in the job's meta as
``{code, message}`` for the API to show, and the worker goes on serving.

The steps around the analysis (``begin_job``, ``store_outputs``, ``record_failure``) are shared
with the batching worker (``worker.serving.batching``), which runs the analysis of several jobs at once.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from models.errors import UserError
from worker.monitoring import metrics
from worker.queueing import cancel_key
from worker.serving import runtime
from worker.serving.inference import JobCanceled, analyse_video
from worker.storage import (
    FIGURE_URL_KEYS,
    RESTORED_FORMATS,
    blob_store,
    discard_upload,
    fetch_upload,
    figure_blob_name,
    save_result,
)
from worker.video import VideoLimits, encode_ffv1, encode_mp4, encode_npz, to_uint8

log = logging.getLogger(__name__)


REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


def await_redis(connection, limit_s: float = 600.0) -> None:
    """Wait (bounded; the job's own timeout applies too) until Redis answers."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            connection.ping()
            return
        except REDIS_DOWN:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unreachable; the job waits to store its result")
            time.sleep(0.5)


class StorageError(Exception):
    """The job's output could not be stored (blob directory full or unwritable)."""


@dataclass(frozen=True)
class JobParams:
    """A job's analysis parameters (validated by the API), with the worker's defaults filled in."""

    defend: bool | str | None  # true / false / "auto"; None: the bundle's (or settings') default mode
    top_k: int
    multi: bool | None
    steps: int | None
    epsilon: float | None

    @classmethod
    def of(cls, params: dict[str, Any], settings) -> JobParams:
        return cls(
            defend=params.get("defend"),
            top_k=int(params.get("top_k", settings.default_top_k)),
            multi=params.get("multi"),
            steps=params.get("steps"),
            epsilon=params.get("epsilon"),
        )


def _encode_restored(frames, fps: float, formats: list[str]) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    rate = Fraction(fps or 25).limit_denominator(1001)
    as_uint8 = to_uint8(frames)
    for fmt in formats:
        buffer = io.BytesIO()
        if fmt == "mp4":
            encode_mp4(as_uint8, buffer, fps=rate)
        elif fmt == "ffv1":
            encode_ffv1(as_uint8, buffer, fps=rate)
        elif fmt == "npz":
            encode_npz(frames, buffer)
        blobs[RESTORED_FORMATS[fmt][0]] = buffer.getvalue()
    return blobs


def _record_failure(job, connection, settings, code: str, message: str, status: str = "failed") -> None:
    """Store why the job ended (``GET /jobs/{id}`` shows it as ``error``) and count the outcome."""
    job.meta["error"] = {"code": code, "message": message}
    job.save_meta()
    metrics.record_job(connection, settings, status)


def record_failure(job, connection, settings, exc: BaseException) -> None:
    """The one place a job's failure is named: its ``{code, message}`` in the meta, and the metric."""
    if isinstance(exc, JobCanceled):
        job.meta["canceled"] = True
        _record_failure(job, connection, settings, "canceled", "the job was canceled", status="canceled")
    elif isinstance(exc, UserError):
        _record_failure(job, connection, settings, "invalid_video", str(exc))
        log.info("job %s failed: %s", job.id, exc)
    elif isinstance(exc, StorageError):
        _record_failure(job, connection, settings, "storage_error", str(exc))
        log.error("job %s failed: %s", job.id, exc)
    elif isinstance(exc, JobTimeoutException):
        _record_failure(job, connection, settings, "timeout", f"the job exceeded its {job.timeout} s timeout")
    else:
        _record_failure(job, connection, settings, "internal", f"internal error ({type(exc).__name__})")


def begin_job(job, connection, settings) -> tuple[Path, float]:
    """Note which worker runs the job (and how often it was started); the upload's local path and
    the seconds the job waited in the queue."""
    job.meta["worker"] = runtime.worker_name()
    job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
    job.save_meta()
    queued_s = (job.started_at - job.enqueued_at).total_seconds() if job.started_at and job.enqueued_at else 0.0
    return fetch_upload(connection, settings, job.id), queued_s


def store_outputs(
    job_id: str,
    connection,
    settings,
    result: dict[str, Any],
    frames,
    figures: dict[int, dict[str, bytes]],
    started: float,
    queued_s: float,
) -> dict[str, Any]:
    """Encode the restored frames, store them with the clips' pictures and the result, count the
    job in the metrics; returns the RQ return value. ``started`` is the job's perf_counter start."""
    t_encode = time.perf_counter()
    blobs = _encode_restored(frames, result["video"]["fps"], settings.restored_formats)
    store = blob_store(settings, connection)
    for index, pictures in figures.items():  # defended jobs only: flow strip and MC-loss plot per clip
        for name, data in pictures.items():
            blobs[figure_blob_name(index, name)] = data
            result["clips"][index][FIGURE_URL_KEYS[name]] = f"/jobs/{job_id}/clips/{index}/{name}"
    await_redis(connection)  # a Redis restart during the compute: store once it is back
    try:
        for name, data in blobs.items():
            store.put(job_id, name, data)
    except (OSError, ResponseError) as exc:  # blob store full or unwritable: a clear reason, the worker goes on
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200] or type(exc).__name__
        try:
            store.delete(job_id)
        except Exception:  # noqa: BLE001 - best effort; the store is what failed
            pass
        raise StorageError(f"could not store the job's output ({reason})") from exc
    encode_s = time.perf_counter() - t_encode
    timings = result["timings_ms"]
    timings["encode"] = round(encode_s * 1000, 2)
    timings["total"] = round((time.perf_counter() - started) * 1000, 2)
    timings["queue"] = round(queued_s * 1000, 2)
    result["model"] = {**result.get("model", {}), **runtime.model_ref()}  # name, version and the bundle's sha256
    result["restored_url"] = f"/jobs/{job_id}/restored"
    result["restored_formats"] = list(settings.restored_formats)
    save_result(connection, settings, job_id, result)
    clips = result["clips"]
    metrics.record_job(
        connection,
        settings,
        "finished",
        {stage: value / 1000 for stage, value in timings.items()},
        [c["mc_loss_before"] for c in clips],
        [c["mc_loss_after"] for c in clips],
        sum(c["suspected_attack"] for c in clips),
        decisions=[c["decision"] for c in clips],
        defence_steps=sum(c["defence_steps"] for c in clips),
        attack_scores=[c.get("attack_score") for c in clips],
        signals=[c.get("signals") or {} for c in clips],
        suspected_flags=[bool(c["suspected_attack"]) for c in clips],
        flag=getattr(runtime.bundle().meta, "flag", None),
    )
    log.info("job %s finished in %.0f ms", job_id, timings["total"])
    return {"stored": True, "compute_ms": timings["total"]}


def analyse_job(params: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point. ``params``: defend, top_k, multi, steps, epsilon (validated by the API)."""
    job = get_current_job()
    job_id = job.id
    settings, connection = runtime.settings(), runtime.connection()
    path, queued_s = begin_job(job, connection, settings)
    last_check = [0.0, False]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last_check[0] > 0.25:
            last_check[0] = now
            try:
                last_check[1] = bool(connection.exists(cancel_key(settings, job_id)))
            except REDIS_DOWN:  # Redis briefly away: keep computing, the flag is read again later
                pass
        return last_check[1]

    t0 = time.perf_counter()
    figures: dict[int, dict[str, bytes]] = {}
    options = JobParams.of(params, settings)
    try:
        result, frames = analyse_video(
            path,
            runtime.bundle(),
            defend=options.defend,
            top_k=options.top_k,
            multi=options.multi,
            steps=options.steps,
            epsilon=options.epsilon,
            limits=VideoLimits.from_settings(settings),
            max_clips=settings.max_clips,
            should_stop=should_stop,
            figures=figures if settings.clip_figures else None,
        )
        return store_outputs(job_id, connection, settings, result, frames, figures, t0, queued_s)
    except Exception as exc:
        record_failure(job, connection, settings, exc)
        raise
    finally:
        discard_upload(connection, settings, job_id)
