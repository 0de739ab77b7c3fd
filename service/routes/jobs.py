"""``POST /classify``, ``GET /jobs/{id}``, ``GET /jobs/{id}/restored``, ``DELETE /jobs/{id}``."""

from __future__ import annotations

import logging
import math
import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from models.defense_mode import parse_mode, resolve_policy
from models.errors import VideoError
from service import admission, metrics
from service.deps import Owner, RedisDep, SettingsDep
from service.errors import ApiError, responses
from service.job_view import fetch_owned, job_info, state_of
from service.routes.models import UNKNOWN_MODEL, resolve_model
from service.schemas import Canceled, JobAccepted, JobInfo
from worker.queueing import JOB_FUNCTION, cancel_key, model_queue
from worker.repository import ModelEntry
from worker.settings import Settings
from worker.storage import RESTORED_FORMATS, blob_store, discard_upload, stash_upload, upload_path
from worker.video import VideoInfo, VideoLimits, VideoTooLarge, probe_video

log = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "a video file"}},
                }
            }
        },
    }
}


def _check_params(settings: Settings, top_k: int, steps: int | None, epsilon: float | None) -> None:
    """Bounds that depend on the server's configuration (static bounds are in the Query declarations)."""
    if top_k > settings.max_top_k:
        raise ApiError(422, "invalid_parameter", f"top_k: at most {settings.max_top_k}", reason="bad_parameter")
    if steps is not None and steps > settings.max_steps:
        raise ApiError(422, "invalid_parameter", f"steps: at most {settings.max_steps}", reason="bad_parameter")
    if epsilon is not None and epsilon > settings.max_epsilon:
        raise ApiError(422, "invalid_parameter", f"epsilon: at most {settings.max_epsilon:.6f}", reason="bad_parameter")


#: ``defend=`` values: true/false/auto, and the other spellings the boolean parameter accepted before
#: ``auto`` existed (so existing clients see no change).
DefendParam = Literal["true", "false", "auto", "True", "False", "1", "0", "yes", "no", "on", "off"]


def _defense_mode(defend: str | None, meta, settings: Settings) -> str | None:
    """The job's ``defend`` as a mode name (None: the worker's default); 422 for an unknown value,
    or for ``auto`` when the bundle has no threshold to decide with."""
    try:
        mode = parse_mode(defend) if defend is not None else None
        resolve_policy(meta, **settings.bundle_overrides).mode(mode)  # the worker resolves it the same way
    except ValueError as exc:
        raise ApiError(422, "invalid_parameter", str(exc), reason="bad_parameter") from None
    return mode


def _probe(path, settings: Settings) -> VideoInfo:
    try:
        return probe_video(path, VideoLimits.from_settings(settings))
    except VideoTooLarge as exc:
        raise ApiError(413, "video_too_large", str(exc), reason="too_large") from None
    except VideoError as exc:
        raise ApiError(415, "not_a_video", str(exc), reason="not_video") from None


def _estimated_clips(info: VideoInfo, frames_per_clip: int, settings: Settings) -> int:
    frames = info.frames or (int(info.duration_s * float(info.fps)) if info.duration_s else settings.max_frames)
    return max(1, min(settings.max_clips, math.ceil(min(frames, settings.max_frames) / frames_per_clip)))


def _accepted(job_id: str, status: str) -> JSONResponse:
    url = f"/jobs/{job_id}"
    body = JobAccepted(job_id=job_id, status=status, status_url=url).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": url})


@router.post(
    "/classify",
    status_code=202,
    response_model=JobAccepted,
    summary="Upload a video; classify it (purified per defend=true|false|auto) in the background",
    responses={
        202: {"description": "accepted; poll status_url (also in Location)"},
        **responses(401, 409, 413, 415, 422, 429, 503),
        **UNKNOWN_MODEL,
    },
    openapi_extra=MULTIPART_BODY,
)
async def classify(
    request: Request,
    owner: Owner,
    settings: SettingsDep,
    connection: RedisDep,
    defend: Annotated[
        DefendParam | None,
        Query(
            description="true: purify every clip; false: none; auto: only clips whose MC loss before the "
            "defence is above the bundle's threshold (default: the bundle's defense.mode, 'always' = true)",
        ),
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, description="labels to return (at most max_top_k)")] = None,
    multi: Annotated[bool | None, Query(description="multi-constraint MC loss (default: the bundle's)")] = None,
    steps: Annotated[int | None, Query(ge=0, description="defence steps (default: the bundle's; <= max_steps)")] = None,
    epsilon: Annotated[float | None, Query(gt=0, description="purification radius eps_r (<= max_epsilon)")] = None,
    model: Annotated[
        str | None, Query(max_length=200, description="a model of GET /models (default: the server's default model)")
    ] = None,
    version: Annotated[
        str | None, Query(max_length=200, description="a version of that model (default: the one served)")
    ] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JSONResponse:
    entry = resolve_model(request, model, version)  # 404 unknown, 422 not served: before anything is stored
    top_k = top_k or settings.default_top_k
    _check_params(settings, top_k, steps, epsilon)
    mode = _defense_mode(defend, entry.meta, settings)
    if steps is None:
        steps = settings.default_steps
    job_id = secrets.token_hex(16)
    # One atomic step in Redis (service.admission): idempotent replay, queue capacity, in-flight cap.
    existing = await run_in_threadpool(
        admission.admit, connection, settings, owner, job_id, idempotency_key, entry.name
    )
    if existing:
        job = await run_in_threadpool(fetch_owned, connection, existing, owner)
        return _accepted(job.id, state_of(job))
    path = upload_path(settings, job_id)
    try:
        await receive_upload_checked(request, path, settings)
        info = await run_in_threadpool(_probe, path, settings)
        meta = entry.meta
        bundle_steps = steps if steps is not None else meta.defense.steps
        clips = _estimated_clips(info, meta.input.frames, settings)
        params = {"defend": mode, "top_k": top_k, "multi": multi, "steps": steps, "epsilon": epsilon}
        await run_in_threadpool(stash_upload, connection, settings, job_id)
        await run_in_threadpool(_enqueue, connection, settings, job_id, owner, params, clips, bundle_steps, entry)
    except BaseException:
        discard_upload(connection, settings, job_id)
        admission.release(connection, settings, owner, job_id, idempotency_key, entry.name)
        raise
    if idempotency_key:
        admission.complete_idempotency(connection, settings, owner, idempotency_key, job_id)
    metrics.SUBMITTED.labels(meta.name, meta.version).inc()
    return _accepted(job_id, "queued")


async def receive_upload_checked(request: Request, path, settings: Settings) -> None:
    from service.upload import receive_upload

    size = await receive_upload(request, path, settings.max_upload_bytes)
    if size == 0:
        raise ApiError(415, "not_a_video", "the uploaded file is empty", reason="not_video")


def _enqueue(
    connection, settings: Settings, job_id: str, owner: str, params: dict, clips: int, steps: int, entry: ModelEntry
) -> None:
    """On the model's queue, pinned to the bundle (name, version, sha256): no other one runs it."""
    queue = model_queue(connection, settings, entry.name)
    queue.enqueue(
        JOB_FUNCTION,
        params,
        job_id=job_id,
        job_timeout=settings.job_timeout(clips, steps),
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.result_ttl_s,
        ttl=settings.result_ttl_s,
        meta={"owner": owner, "estimated_clips": clips, "model": entry.ref},
    )


@router.get(
    "/jobs/{job_id}", response_model=JobInfo, responses=responses(401, 404, 503), summary="Job status and result"
)
def get_job(
    job_id: str,
    owner: Owner,
    settings: SettingsDep,
    connection: RedisDep,
) -> JobInfo:
    return job_info(connection, settings, fetch_owned(connection, job_id, owner))


@router.get(
    "/jobs/{job_id}/restored",
    summary="The restored (purified) frames: H.264 mp4, or lossless FFV1/Matroska or npz of float frames",
    response_class=Response,
    responses={
        200: {
            "description": "the restored video",
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}} for _, media in RESTORED_FORMATS.values()
            },
        },
        **responses(401, 404, 409, 503),
    },
)
def get_restored(
    job_id: str,
    owner: Owner,
    settings: SettingsDep,
    connection: RedisDep,
    format: Annotated[
        Literal["mp4", "ffv1", "npz"], Query(description="mp4 (lossy), ffv1 (lossless), npz (float32)")
    ] = "mp4",
) -> Response:
    job = fetch_owned(connection, job_id, owner)
    if state_of(job) != "finished":
        raise ApiError(409, "not_finished", "the job has not finished; no restored video yet")
    name, media = RESTORED_FORMATS[format]
    data = blob_store(settings, connection).get(job.id, name)
    if data is None:
        raise ApiError(404, "not_found", f"no restored video in format {format} (expired or not produced)")
    return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{job.id}-{name}"'})


@router.delete(
    "/jobs/{job_id}",
    response_model=Canceled,
    status_code=202,
    summary="Cancel a queued or running job",
    responses=responses(401, 404, 409, 503),
)
def cancel_job(
    job_id: str,
    owner: Owner,
    settings: SettingsDep,
    connection: RedisDep,
) -> Canceled:
    job = fetch_owned(connection, job_id, owner)
    state = state_of(job)
    if state == "queued":
        job.cancel()
        discard_upload(connection, settings, job.id)
        return Canceled(job_id=job.id, status="canceled")
    if state == "started":
        # The worker checks this flag between defence steps and ends the job as canceled.
        connection.set(cancel_key(settings, job.id), "1", ex=settings.result_ttl_s)
        return Canceled(job_id=job.id, status="canceled")
    raise ApiError(409, "job_ended", f"the job has already ended ({state})")
