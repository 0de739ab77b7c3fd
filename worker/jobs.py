"""The RQ job: analyse one stored upload and store its result and restored video.

Arguments are plain JSON (the job id names the stored upload; parameters are numbers and flags)
and the queue uses RQ's JSON serializer, so nothing a client sent is ever unpickled.
Failures the client caused (undecodable or hostile video) are recorded in the job's meta as
``{code, message}`` for the API to show, and the worker goes on serving.
"""

from __future__ import annotations

import io
import logging
import time
from fractions import Fraction
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from models.errors import UserError
from worker import metrics, runtime
from worker.inference import JobCanceled, analyse_video
from worker.queueing import cancel_key
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


def analyse_job(params: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point. ``params``: defend, top_k, multi, steps, epsilon (validated by the API)."""
    job = get_current_job()
    job_id = job.id
    settings, connection = runtime.settings(), runtime.connection()
    job.meta["worker"] = runtime.worker_name()
    job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
    job.save_meta()
    queued_s = (job.started_at - job.enqueued_at).total_seconds() if job.started_at and job.enqueued_at else 0.0
    path = fetch_upload(connection, settings, job_id)
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
    try:
        result, frames = analyse_video(
            path,
            runtime.bundle(),
            defend=bool(params.get("defend", True)),
            top_k=int(params.get("top_k", settings.default_top_k)),
            multi=params.get("multi"),
            steps=params.get("steps"),
            epsilon=params.get("epsilon"),
            limits=VideoLimits.from_settings(settings),
            max_clips=settings.max_clips,
            should_stop=should_stop,
            figures=figures,
        )
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
        timings["total"] = round((time.perf_counter() - t0) * 1000, 2)
        timings["queue"] = round(queued_s * 1000, 2)
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
        )
        log.info("job %s finished in %.0f ms", job_id, timings["total"])
        return {"stored": True, "compute_ms": timings["total"]}
    except JobCanceled:
        job.meta["canceled"] = True
        _record_failure(job, connection, settings, "canceled", "the job was canceled", status="canceled")
        raise
    except UserError as exc:
        _record_failure(job, connection, settings, "invalid_video", str(exc))
        log.info("job %s failed: %s", job_id, exc)
        raise
    except StorageError as exc:
        _record_failure(job, connection, settings, "storage_error", str(exc))
        log.error("job %s failed: %s", job_id, exc)
        raise
    except JobTimeoutException:
        _record_failure(job, connection, settings, "timeout", f"the job exceeded its {job.timeout} s timeout")
        raise
    except Exception as exc:
        _record_failure(job, connection, settings, "internal", f"internal error ({type(exc).__name__})")
        raise
    finally:
        discard_upload(connection, settings, job_id)
