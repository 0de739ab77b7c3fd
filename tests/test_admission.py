"""Exact admission across API replicas: two ``motionguard serve --workers 0`` processes share one
Redis; simultaneous uploads of one key, half to each, pass the in-flight cap exactly
``max_inflight_per_key`` times (the Lua script in service/admission.py decides atomically), every
other one gets 429, one Idempotency-Key creates one job, and every accepted job finishes on a real
worker process started afterwards."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import httpx
import pytest
from conftest import ALICE, BOB, WorkerPool, settings_from_env, wait_done, write_video
from helpers_serve import ServeProcess

pytestmark = pytest.mark.integration

CAP = 4
UPLOADS = 32


def fire(urls: list[str], video: bytes, count: int, headers: dict) -> list[httpx.Response]:
    """``count`` uploads released at once by a barrier, alternating between the API processes."""
    barrier = threading.Barrier(count)
    responses: list[httpx.Response | None] = [None] * count

    def upload(index: int) -> None:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            responses[index] = client.post(
                f"{urls[index % len(urls)]}/classify",
                params={"steps": 0},
                files={"file": ("v.mp4", video)},
                headers=headers,
            )

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(responses), "an upload got no answer"
    return responses


def test_two_api_processes_admit_exactly_the_cap(service_env, tmp_path):
    tag = uuid.uuid4().hex[:8]
    env = {
        **service_env,
        "MOTIONGUARD_QUEUE_NAME": f"adm-{tag}",
        "MOTIONGUARD_KEY_PREFIX": f"adm-{tag}",
        "MOTIONGUARD_DATA_DIR": str(tmp_path / "data"),
        "MOTIONGUARD_MAX_INFLIGHT_PER_KEY": str(CAP),
    }
    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64).read_bytes()
    apis = [ServeProcess(env, tmp_path / f"api-{i}.log", "--workers", "0") for i in range(2)]
    pool = WorkerPool(env, tmp_path)
    try:
        for api in apis:
            api.start()
        urls = [api.url for api in apis]
        responses = fire(urls, video, UPLOADS, ALICE)
        codes = Counter(r.status_code for r in responses)
        assert codes == {202: CAP, 429: UPLOADS - CAP}, codes
        assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"too_many_jobs"}
        accepted = [r.json()["job_id"] for r in responses if r.status_code == 202]
        assert {r.headers["Location"] for r in responses if r.status_code == 202} == {f"/jobs/{j}" for j in accepted}

        # One Idempotency-Key sent 8 times at once (another key's cap): one job, never two.
        idem = fire(urls, video, 8, {**BOB, "Idempotency-Key": f"same-{tag}"})
        assert {r.status_code for r in idem} <= {202, 409}
        bob_jobs = {r.json()["job_id"] for r in idem if r.status_code == 202}
        assert len(bob_jobs) == 1, bob_jobs
        assert all(r.json()["error"]["code"] == "idempotency_in_progress" for r in idem if r.status_code == 409)

        pool.start(1)
        for job_id in accepted:
            assert wait_done(urls[0], job_id, ALICE, timeout=180)["status"] == "finished"
        (bob_job,) = bob_jobs
        assert wait_done(urls[1], bob_job, BOB, timeout=180)["status"] == "finished"
        replay = fire(urls, video, 2, {**BOB, "Idempotency-Key": f"same-{tag}"})
        assert [r.json()["job_id"] for r in replay] == [bob_job, bob_job]
        # The cap counts unfinished jobs only: with all of alice's done she may upload again.
        assert Counter(r.status_code for r in fire(urls, video, CAP, ALICE)) == {202: CAP}
    finally:
        pool.stop()
        from redis import Redis

        from worker.queueing import make_queue

        settings = settings_from_env(env)
        make_queue(Redis.from_url(settings.redis_url), settings).empty()
        for api in apis:
            if api.proc and api.proc.poll() is None:
                api.stop()
