"""``GET /jobs/{id}/clips/{index}/flow.png`` and ``.../mc_loss.png``: a defended clip's pictures.

The worker (``worker.serving.figures``) draws them while it has the flows in hand and stores them with the
job's other blobs; this only serves them, under the same visibility rules as the job (another key's
job is a 404). 404 too when the job was not defended, the clip was not purified (defend=auto
skipped it) or there is no such clip; 409 while it runs.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import Owner, RedisDep, SettingsDep
from service.errors import ApiError, responses
from service.job_view import fetch_owned, state_of
from worker.storage import blob_store, figure_blob_name, load_result

router = APIRouter(tags=["jobs"])

PNG = {200: {"description": "PNG image", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}


def _figure(job_id: str, index: int, name: str, owner: str, settings, connection) -> Response:
    job = fetch_owned(connection, job_id, owner)
    state = state_of(job)
    if state in ("queued", "started"):
        raise ApiError(409, "not_finished", "the job has not finished; no pictures yet")
    result = load_result(connection, settings, job.id) if state == "finished" else None
    if result is None:
        raise ApiError(404, "not_found", f"no pictures: the job {state if state != 'finished' else 'has expired'}")
    if not result.get("defended"):
        raise ApiError(404, "not_defended", "the job was not defended: flow and MC-loss pictures exist only then")
    if not 0 <= index < len(result.get("clips", [])):
        raise ApiError(404, "no_such_clip", f"the job has no clip {index} ({len(result.get('clips', []))} clips)")
    if result["clips"][index].get("decision") in ("skipped", "off"):
        raise ApiError(404, "not_purified", f"clip {index} was not purified (defend=auto found it clean): no pictures")
    data = blob_store(settings, connection).get(job.id, figure_blob_name(index, name))
    if data is None:
        raise ApiError(404, "not_found", f"no {name} for clip {index} (expired or not produced)")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/jobs/{job_id}/clips/{index}/flow.png",
    summary="A defended clip's frames with their optical flow before and after purification (PNG)",
    response_class=Response,
    responses={**PNG, **responses(401, 404, 409, 503)},
)
def get_flow_png(job_id: str, index: int, owner: Owner, settings: SettingsDep, connection: RedisDep) -> Response:
    return _figure(job_id, index, "flow.png", owner, settings, connection)


@router.get(
    "/jobs/{job_id}/clips/{index}/mc_loss.png",
    summary="A defended clip's MC loss over the defence steps (PNG)",
    response_class=Response,
    responses={**PNG, **responses(401, 404, 409, 503)},
)
def get_mc_loss_png(job_id: str, index: int, owner: Owner, settings: SettingsDep, connection: RedisDep) -> Response:
    return _figure(job_id, index, "mc_loss.png", owner, settings, connection)
