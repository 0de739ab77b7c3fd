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


def fire(
    urls: list[str], video: bytes, count: int, headers: dict, params: list[dict] | None = None
) -> list[httpx.Response]:
    """``count`` uploads released at once by a barrier, alternating between the API processes;
    ``params[i]``: the query of upload i (default: steps=0)."""
    barrier = threading.Barrier(count)
    responses: list[httpx.Response | None] = [None] * count

    def upload(index: int) -> None:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            responses[index] = client.post(
                f"{urls[index % len(urls)]}/classify",
                params=params[index] if params else {"steps": 0},
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


QUEUE_CAP = 3


def test_the_queue_cap_holds_under_a_burst_per_model(service_env, random_bundle, tmp_path):
    """Two API processes, no worker, ``MOTIONGUARD_MAX_QUEUED=3``: 32 simultaneous uploads for each of
    two models (64 at once) admit exactly 3 per model; every other one is a 503 queue_full with
    Retry-After, refused before its body was stored. The queue slot is reserved in the admission
    script, so uploads still being received count against the cap."""
    import shutil

    from models.bundle_meta import read_bundle_meta, write_bundle_meta

    tag = uuid.uuid4().hex[:8]
    repository = tmp_path / "repository"
    shutil.copytree(random_bundle, repository / "beta")
    meta = read_bundle_meta(repository / "beta")
    write_bundle_meta(repository / "beta", meta.model_copy(update={"name": "beta", "version": "1"}))
    env = {
        **service_env,
        "MOTIONGUARD_QUEUE_NAME": f"burst-{tag}",
        "MOTIONGUARD_KEY_PREFIX": f"burst-{tag}",
        "MOTIONGUARD_DATA_DIR": str(tmp_path / "data"),
        "MOTIONGUARD_MODEL_REPOSITORY": str(repository),
        "MOTIONGUARD_MAX_QUEUED": str(QUEUE_CAP),
        "MOTIONGUARD_MAX_INFLIGHT_PER_KEY": "1000",
    }
    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64).read_bytes()
    apis = [ServeProcess(env, tmp_path / f"api-{i}.log", "--workers", "0") for i in range(2)]
    models = [read_bundle_meta(random_bundle).name, "beta"]
    try:
        for api in apis:
            api.start()
        urls = [api.url for api in apis]
        # upload i goes to API process i % 2 and to model (i // 2) % 2: each model gets 16 per process
        params = [{"steps": 0, "model": models[(i // 2) % 2]} for i in range(2 * UPLOADS)]
        responses = fire(urls, video, 2 * UPLOADS, ALICE, params)
        for model in models:
            mine = [r for r, p in zip(responses, params, strict=True) if p["model"] == model]
            codes = Counter(r.status_code for r in mine)
            assert codes == {202: QUEUE_CAP, 503: UPLOADS - QUEUE_CAP}, (model, codes)
            for refused in (r for r in mine if r.status_code == 503):
                assert refused.json()["error"]["code"] == "queue_full" and model in refused.json()["error"]["message"]
                assert int(refused.headers["Retry-After"]) > 0
        # Only the accepted uploads were stored; each accepted job waits on its own model's queue.
        settings = settings_from_env(env)
        assert len(list(settings.upload_dir.iterdir())) == 2 * QUEUE_CAP
        from redis import Redis

        from worker.queueing import model_queue

        connection = Redis.from_url(settings.redis_url)
        for model in models:
            assert model_queue(connection, settings, model).count == QUEUE_CAP
        # A third model name is no queue at all: 404 before the upload is read.
        unknown = httpx.post(
            f"{urls[0]}/classify", params={"model": "gamma"}, files={"file": ("v.mp4", video)}, headers=ALICE
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"
        assert len(list(settings.upload_dir.iterdir())) == 2 * QUEUE_CAP
    finally:
        from redis import Redis

        from worker.queueing import model_queue

        settings = settings_from_env(env)
        for model in models:
            model_queue(Redis.from_url(settings.redis_url), settings, model).empty()
        for api in apis:
            if api.proc and api.proc.poll() is None:
                api.stop()


def test_a_queue_slot_is_free_again_once_its_job_left_the_queue(redis_url, tmp_path):
    """The per-model slot set of the admission script: a slot counts while its job waits (or while
    its upload is still being received, until the reservation deadline); it is free again once the
    job started or ended, when the refused upload is released, or when the deadline has passed."""
    from redis import Redis

    from service import admission
    from service.errors import ApiError
    from worker.queueing import model_slots_key
    from worker.settings import Settings

    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        redis_url=redis_url, key_prefix=f"slots-{tag}", queue_name=f"slots-{tag}", data_dir=tmp_path, max_queued=2
    )
    connection = Redis.from_url(redis_url)

    def admit(name: str, model: str = "alpha") -> int:
        try:
            admission.admit(connection, settings, f"owner-{name}", f"{tag}{name}", None, model)
            return 202
        except ApiError as exc:
            return exc.status

    assert [admit("a"), admit("b"), admit("c")] == [202, 202, 503]  # a and b are still uploading
    assert admit("x", model="beta") == 202  # another model, another queue
    connection.hset(f"rq:job:{tag}a", "status", "started")  # a was dequeued by a worker
    assert admit("c") == 202
    assert admit("d") == 503
    admission.release(connection, settings, "owner-b", f"{tag}b", None, "alpha")  # b's upload was refused
    assert admit("d") == 202
    connection.zadd(model_slots_key(settings, "alpha"), {f"{tag}c": 0})  # c's reservation deadline has passed
    assert admit("e") == 202 and admit("f") == 503
    connection.hset(f"rq:job:{tag}d", "status", "queued")  # d waits in the queue: its slot counts, deadline or not
    connection.zadd(model_slots_key(settings, "alpha"), {f"{tag}d": 0})
    assert admit("f") == 503
    connection.delete(f"rq:job:{tag}a", f"rq:job:{tag}d", *connection.scan_iter(match=f"slots-{tag}:*"))
