"""End to end over HTTP: the FastAPI app under uvicorn, a real Redis, real ``motionguard worker`` processes.

The bundle is a tiny random one (4 frames, 64x64, 2 defence steps), so the labels carry no meaning;
what is checked is the contract: status codes, the result's shape, per-clip MC losses, and that the
restored video decodes with the expected frame count and stays within eps_r of the resized input.
"""

from __future__ import annotations

import io
import os
import time

import httpx
import numpy as np
import pytest
from conftest import ALICE, BOB, LiveServer, settings_from_env, wait_done, write_video

from worker.video import cut_clips, decode_video, read_frames

pytestmark = pytest.mark.integration


def submit(api: str, path, headers=ALICE, **params) -> httpx.Response:
    with open(path, "rb") as handle:
        return httpx.post(
            f"{api}/classify", params=params, files={"file": ("clip.mp4", handle)}, headers=headers, timeout=30
        )


def expected_clips(path, count_clips: int) -> np.ndarray:
    """The resized input frames clip after clip, as the worker cuts them: (K*T, 3, 64, 64) floats."""
    clips = cut_clips(decode_video(path, 64, 64).frames, 4, count_clips).clips
    return clips.reshape(-1, 3, 64, 64)


def test_health_models_openapi(api):
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api}/readyz").json()
    assert ready["ready"] and ready["workers"] >= 1 and ready["bundle_loaded"]
    models = httpx.get(f"{api}/models", headers=ALICE).json()
    assert models["labels"] == ["class0", "class1", "class2"] and models["input"]["frames"] == 4
    spec = httpx.get(f"{api}/openapi.json").json()
    post = spec["paths"]["/classify"]["post"]
    assert {"202", "401", "413", "415", "422", "429", "503"} <= set(post["responses"])
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert "HTTPValidationError" not in str(spec)  # 422s are documented as the JSON error body


def test_synthetic_clip_end_to_end(api, tmp_path):
    path = write_video(tmp_path / "v.mp4", count=10, height=80, width=96)
    response = submit(api, path, top_k=2, steps=2)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == job["status_url"] == f"/jobs/{job['job_id']}"
    assert len(job["job_id"]) == 32
    body = wait_done(api, job["job_id"])
    assert body["status"] == "finished", body
    assert body["created_at"] and body["started_at"] and body["ended_at"]
    result = body["result"]
    assert result["defended"] and len(result["labels"]) == 2
    assert [c["start_frame"] for c in result["clips"]] == [0, 4, 8]
    for clip in result["clips"]:
        assert clip["mc_loss_before"] > 0 and clip["mc_loss_after"] > 0 and len(clip["mc_trajectory"]) == 3
    assert {"queue", "decode", "defense", "classify", "encode", "total"} <= set(result["timings_ms"])
    eps = result["defense"]["epsilon"]
    reference = expected_clips(path, 4)

    lossless = httpx.get(f"{api}{result['restored_url']}?format=ffv1", headers=ALICE)
    assert lossless.status_code == 200 and lossless.headers["content-type"] == "video/x-matroska"
    frames = read_frames(io.BytesIO(lossless.content)).transpose(0, 3, 1, 2) / 255.0
    assert frames.shape == (12, 3, 64, 64)
    assert np.abs(frames - reference).max() <= eps + 0.5 / 255 + 1e-6  # uint8 rounding only

    exact = np.load(io.BytesIO(httpx.get(f"{api}{result['restored_url']}?format=npz", headers=ALICE).content))
    assert np.abs(exact["frames"] - reference).max() <= eps + 1e-5

    mp4 = httpx.get(f"{api}{result['restored_url']}", headers=ALICE)
    assert mp4.headers["content-type"] == "video/mp4"
    decoded = read_frames(io.BytesIO(mp4.content)).transpose(0, 3, 1, 2) / 255.0
    assert decoded.shape == (12, 3, 64, 64)
    assert np.abs(decoded - reference).mean() <= eps + 6 / 255  # plus H.264 yuv420p codec error

    assert httpx.get(f"{api}/jobs/{job['job_id']}", headers=BOB).status_code == 404
    assert httpx.get(f"{api}{result['restored_url']}", headers=BOB).status_code == 404
    metrics = httpx.get(f"{api}/metrics").text
    assert (
        "motionguard_jobs_submitted_total" in metrics
        and 'motionguard_mc_loss_bucket{le="+Inf",model="random-test",phase="before",version="0"}' in metrics
    )


def test_undefended_and_idempotency(api, tmp_path):
    path = write_video(tmp_path / "v.avi", count=6, kind="avi")
    headers = {**ALICE, "Idempotency-Key": "same-request-1"}
    first = submit(api, path, headers=headers, defend="false")
    second = submit(api, path, headers=headers, defend="false")
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    body = wait_done(api, first.json()["job_id"])
    assert body["status"] == "finished" and not body["result"]["defended"]
    for clip in body["result"]["clips"]:
        assert clip["mc_loss_before"] == clip["mc_loss_after"]


def test_real_clips(api, shared_data):
    for path in sorted(shared_data.glob("*.mp4")) + sorted(shared_data.glob("*.avi")):
        defend = "true" if path.suffix == ".mp4" else "false"  # one of each keeps the suite fast
        response = submit(api, path, steps=1, defend=defend)
        assert response.status_code == 202, (path.name, response.text)
        body = wait_done(api, response.json()["job_id"], timeout=120)
        assert body["status"] == "finished", (path.name, body)
        result = body["result"]
        assert len(result["clips"]) == 4 and result["video"]["truncated"]  # MAX_CLIPS=4 in the test env
        mp4 = httpx.get(f"{api}{result['restored_url']}", headers=ALICE)
        assert read_frames(io.BytesIO(mp4.content)).shape == (16, 64, 64, 3)


@pytest.mark.parametrize(
    "name, content, status, code",
    [
        ("empty", b"", 415, "not_a_video"),
        ("text", b"definitely not a video\n" * 200, 415, "not_a_video"),
    ],
)
def test_bad_bytes(api, tmp_path, name, content, status, code):
    path = tmp_path / name
    path.write_bytes(content)
    response = submit(api, path)
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_truncated_single_frame_and_oversized(api, tmp_path):
    full = write_video(tmp_path / "v.mp4", count=12).read_bytes()
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(full[: len(full) // 2])
    response = submit(api, truncated)
    assert response.status_code == 415 and response.json()["error"]["code"] == "not_a_video"
    single = submit(api, write_video(tmp_path / "one.mp4", count=1))
    assert single.status_code == 415 and "at least 2" in single.json()["error"]["message"]
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(3_200_000))
    response = submit(api, big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


@pytest.mark.parametrize(
    "params",
    [
        {"top_k": 0},
        {"top_k": 999},
        {"steps": -1},
        {"steps": 10_000},
        {"epsilon": 0},
        {"epsilon": 0.9},
        {"defend": "perhaps"},
    ],
)
def test_bad_parameters(api, tmp_path, params):
    path = write_video(tmp_path / "v.mp4", count=4)
    response = submit(api, path, **params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_parameter"


def test_missing_field_auth_and_404s(api, tmp_path):
    assert httpx.post(f"{api}/classify", files={"other": ("x", b"1")}, headers=ALICE).status_code == 422
    path = write_video(tmp_path / "v.mp4", count=4)
    assert submit(api, path, headers={}).status_code == 401
    wrong = submit(api, path, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{api}/jobs/{'0' * 32}", headers=ALICE).json()["error"]["code"] == "not_found"
    assert httpx.get(f"{api}/jobs/../../etc", headers=ALICE).status_code == 404
    assert httpx.get(f"{api}/nowhere").json()["error"]["code"] == "not_found"
    assert httpx.get(f"{api}/models").status_code == 401


def test_undecodable_job_fails_and_worker_keeps_serving(api, service_env, tmp_path):
    """Input that passes the probe but not the worker (here: bytes swapped after the probe)."""
    from redis import Redis

    from worker.queueing import make_queue
    from worker.storage import upload_path

    settings = settings_from_env(service_env)
    connection = Redis.from_url(settings.redis_url)
    job_id = "f" * 32
    upload_path(settings, job_id).write_bytes(b"garbage" * 100)
    from service.deps import owner_of

    make_queue(connection, settings).enqueue(
        "worker.serving.jobs.analyse_job", {"defend": True}, job_id=job_id, meta={"owner": owner_of("key-alice")}
    )
    body = wait_done(api, job_id)
    assert body["status"] == "failed" and body["error"]["code"] == "invalid_video"
    assert "not a readable video" in body["error"]["message"]
    path = write_video(tmp_path / "v.mp4", count=4)
    assert wait_done(api, submit(api, path).json()["job_id"])["status"] == "finished"


def test_cancel_queued_and_running(api, tmp_path):
    path = write_video(tmp_path / "v.mp4", count=8)
    jobs = [submit(api, path, steps=50).json()["job_id"] for _ in range(3)]
    # Two workers take two jobs and the third waits: cancel the running ones and the queued one as soon
    # as one is observed started (50 steps, the most the API takes, leave the widest margin for that).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [httpx.get(f"{api}/jobs/{j}", headers=ALICE).json()["status"] for j in jobs]
        if "started" in states:
            break
        time.sleep(0.1)
    assert "started" in states, states
    for job_id in jobs:
        response = httpx.delete(f"{api}/jobs/{job_id}", headers=ALICE)
        assert response.status_code in (202, 409), response.text
    ended = {job_id: wait_done(api, job_id) for job_id in jobs}
    started = [j for j, s in zip(jobs, states, strict=True) if s == "started"]
    assert all(ended[j]["status"] == "canceled" for j in started), ended
    assert ended[started[0]]["error"]["code"] == "canceled"
    assert httpx.delete(f"{api}/jobs/{started[0]}", headers=ALICE).status_code == 409


def test_admission_limits_and_redis_down(service_env, tmp_path):
    """Queue full -> 503 + Retry-After, per-key cap -> 429 (a queue no worker serves), Redis down -> 503."""
    import uuid

    from service.app import create_app

    path = write_video(tmp_path / "v.mp4", count=4)
    tag = uuid.uuid4().hex[:8]
    full = settings_from_env(service_env, queue_name=f"idle-{tag}", key_prefix=f"idle-{tag}", max_queued=1)
    with LiveServer(create_app(full, run_recovery=False)) as server:
        assert submit(server.url, path).status_code == 202
        response = submit(server.url, path)
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "queue_full"
    capped = settings_from_env(
        service_env, queue_name=f"idle2-{tag}", key_prefix=f"idle2-{tag}", max_inflight_per_key=1
    )
    with LiveServer(create_app(capped, run_recovery=False)) as server:
        assert submit(server.url, path).status_code == 202
        response = submit(server.url, path)
        assert response.status_code == 429 and response.json()["error"]["code"] == "too_many_jobs"
        assert submit(server.url, path, headers=BOB).status_code == 202  # the cap is per key
    down = settings_from_env(service_env, redis_url="redis://127.0.0.1:1/0")
    with LiveServer(create_app(down, run_recovery=False)) as server:
        response = submit(server.url, path)
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "unavailable"
        assert httpx.get(f"{server.url}/readyz").status_code == 503
    tiny = settings_from_env(service_env, queue_name=f"idle3-{tag}", key_prefix=f"idle3-{tag}", max_pixels=32 * 32)
    with LiveServer(create_app(tiny, run_recovery=False)) as server:
        response = submit(server.url, path)  # 96x80 declared: refused before any frame is decoded
        assert response.status_code == 413 and response.json()["error"]["code"] == "video_too_large"
    no_bundle = settings_from_env(service_env, bundle_dir=str(tmp_path / "missing"))
    with LiveServer(create_app(no_bundle, run_recovery=False)) as server:
        response = submit(server.url, path)
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_bundle"
        assert httpx.get(f"{server.url}/models", headers=ALICE).status_code == 503
