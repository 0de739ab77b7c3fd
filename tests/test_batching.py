"""The batching worker (``worker.serving.batching``) against a real Redis and real ``motionguard worker``
processes: jobs gathered into one batch each end on their own (result, failure, cancellation,
timeout), clips with different defence settings run as separate batches, batching does not change
a clip's result, and a SIGKILLed batching worker's jobs are all requeued and run exactly once more.
"""

from __future__ import annotations

import shutil
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import ALICE, wait_done, write_video
from test_reliability import RETRY_BOUND_S, Stack, wait_for

pytestmark = pytest.mark.integration

HEARTBEAT_TTL_S = 3
LEFT_QUEUE = ("started", "finished", "failed", "canceled")  # taken by a worker (and maybe ended since)


def enqueue(stack: Stack, video: Path, timeout: int = 300, **params) -> str:
    """Enqueue a job as the API does (stored upload, owner, estimated clips), without the HTTP hop,
    so that several jobs are queued within a few milliseconds of each other."""
    from redis import Redis

    from service.deps import owner_of
    from worker.queueing import JOB_FUNCTION, make_queue
    from worker.storage import upload_path

    job_id = uuid.uuid4().hex
    settings = stack.settings
    upload_path(settings, job_id).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(video, upload_path(settings, job_id))
    make_queue(Redis.from_url(settings.redis_url), settings).enqueue(
        JOB_FUNCTION,
        {"defend": True, "top_k": 3, **params},
        job_id=job_id,
        job_timeout=timeout,
        meta={"owner": owner_of("key-alice"), "estimated_clips": 1},
    )
    return job_id


def _stack(service_env, tmp: Path, workers: int = 1, **env) -> Stack:
    return Stack(service_env, tmp, heartbeat_ttl_s=HEARTBEAT_TTL_S, recovery_interval_s=0.5, **env).start(workers)


BATCH_DELAY_MS = 4000  # longer than the timed-out job's scaled deadline (1 s x 3 clips): see below


@pytest.fixture(scope="module")
def batch_stack(service_env, tmp_path_factory):
    """One batching worker: up to 5 clips, waiting up to ``BATCH_DELAY_MS`` for them. A test that queues
    5 one-clip jobs has them gathered as soon as they are queued; one that queues fewer waits the delay."""
    stack = _stack(
        service_env, tmp_path_factory.mktemp("batching"), max_batch_clips=5, max_batch_delay_ms=BATCH_DELAY_MS
    )
    try:
        yield stack
    finally:
        stack.stop()


def _videos(tmp_path: Path, count: int) -> list[Path]:
    return [write_video(tmp_path / f"v{i}.mp4", count=4, height=64, width=64, seed=i) for i in range(count)]


def test_one_batch_many_results_equal_to_one_job_at_a_time(batch_stack, random_bundle, tmp_path):
    """Five jobs queued together: an undecodable upload fails alone (invalid_video); the steps=1 and
    steps=2 jobs run as two batches of two jobs; every clip's result is what the job gets alone."""
    from models.bundle.load import load_bundle
    from worker.serving.inference import analyse_video

    videos = _videos(tmp_path, 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 50)
    plan = [(videos[0], 1), (garbage, 1), (videos[1], 2), (videos[2], 1), (videos[3], 2)]
    ids = [enqueue(batch_stack, video, steps=steps) for video, steps in plan]
    bodies = [wait_done(batch_stack.url, job_id, timeout=180) for job_id in ids]

    assert bodies[1]["status"] == "failed" and bodies[1]["error"]["code"] == "invalid_video", bodies[1]
    bundle = load_bundle(random_bundle)
    for (video, steps), body in zip(plan, bodies, strict=True):
        if video is garbage:
            continue
        assert body["status"] == "finished", body
        result = body["result"]
        assert result["batch"] == {"clips": 2, "jobs": 2}, result["batch"]  # its settings' batch, no other
        assert result["defense"]["steps"] == steps
        alone, _ = analyse_video(video, bundle, steps=steps, top_k=3)
        for got, want in zip(result["clips"], alone["clips"], strict=True):
            assert got["mc_loss_before"] == pytest.approx(want["mc_loss_before"], abs=1e-4)
            assert got["mc_loss_after"] == pytest.approx(want["mc_loss_after"], abs=1e-3)
            assert [e["index"] for e in got["labels"]] == [e["index"] for e in want["labels"]]
        restored = httpx.get(f"{batch_stack.url}{result['restored_url']}", headers=ALICE, timeout=30)
        assert restored.status_code == 200 and len(restored.content) > 0
        flow_png = httpx.get(f"{batch_stack.url}{result['clips'][0]['flow_url']}", headers=ALICE, timeout=30)
        assert flow_png.status_code == 200 and flow_png.content[:4] == b"\x89PNG"
    workers = {batch_stack.job(job_id).meta["worker"] for job_id in ids}
    assert len(workers) == 1


def test_canceled_and_timed_out_jobs_leave_the_batch_the_others_go_on(batch_stack, tmp_path):
    """Three jobs in one batch: one canceled while it runs ends ``canceled``, one past its (scaled)
    timeout ends ``failed``/``timeout``, both before the third, which finishes.

    No speed assumption: the timed-out job is queued first, so the worker dequeues it first and then
    gathers for ``BATCH_DELAY_MS`` (3 clips < 5: the full delay) before the first defence step. Its
    deadline, 1 s scaled by 3 clips / its 1 = 3 s after its dequeue, has passed at that first step
    whatever the CPU. The cancel is sent once all three are observed ``started`` (in the batch); the
    worker reads the flag at the next defence step, before the kept job's last one."""
    videos = _videos(tmp_path, 3)
    late = enqueue(batch_stack, videos[2], steps=8, timeout=1)
    keep = enqueue(batch_stack, videos[0], steps=8)
    cancel = enqueue(batch_stack, videos[1], steps=8)
    in_batch = lambda: all(batch_stack.job(j).get_status() in LEFT_QUEUE for j in (keep, cancel, late))  # noqa: E731
    wait_for(in_batch, 60, 0.05, "all three jobs taken into the batch")
    response = httpx.delete(f"{batch_stack.url}/jobs/{cancel}", headers=ALICE, timeout=30)
    assert response.status_code == 202, response.text

    canceled = wait_done(batch_stack.url, cancel, timeout=120)
    timed_out = wait_done(batch_stack.url, late, timeout=120)
    kept = wait_done(batch_stack.url, keep, timeout=180)
    assert canceled["status"] == "canceled" and canceled["error"]["code"] == "canceled", canceled
    assert timed_out["status"] == "failed" and timed_out["error"]["code"] == "timeout", timed_out
    assert kept["status"] == "finished" and kept["result"]["batch"]["jobs"] == 3, kept
    assert canceled["ended_at"] < kept["ended_at"] and timed_out["ended_at"] < kept["ended_at"]
    from redis import Redis

    registry = f"rq:wip:{batch_stack.settings.queue_name}"  # no job of the batch stays "started"
    assert Redis.from_url(batch_stack.settings.redis_url).zcard(registry) == 0


def test_sigkilled_batching_worker_every_job_requeued_and_run_once(service_env, tmp_path):
    """A batch of three jobs on a worker that is SIGKILLed while the batch runs: every job is requeued
    by the heartbeat recovery within ``RETRY_BOUND_S`` (as a one-job worker's, test_reliability) and
    finishes on the next worker, started exactly twice in all. (These
    workers draw no clip pictures: ``clip_figures=false``.)

    The kill follows the observation that all three are started on one worker, with no sleep: the
    worker gathers for ``BATCH_DELAY_MS`` before it computes, so the batch cannot have ended by then."""
    from rq.results import Result

    stack = _stack(service_env, tmp_path, max_batch_clips=4, max_batch_delay_ms=BATCH_DELAY_MS, clip_figures="false")
    try:
        ids = [enqueue(stack, video, steps=8) for video in _videos(tmp_path, 3)]
        started = lambda: all(stack.job(j).get_status() == "started" and stack.job(j).meta.get("worker") for j in ids)  # noqa: E731
        wait_for(started, 60, 0.05, "batch started")
        victim = stack.job(ids[0]).meta["worker"]
        assert {stack.job(j).meta["worker"] for j in ids} == {victim}
        stack.pool.procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        stack.pool.procs[0].wait(timeout=10)
        requeued = lambda: all(stack.job(j).meta.get("worker_deaths") == 1 for j in ids)  # noqa: E731
        wait_for(requeued, 60, 0.05, "every job of the batch requeued")
        retry_s = time.monotonic() - killed
        assert retry_s < RETRY_BOUND_S, f"requeued after {retry_s:.1f} s"
        stack.pool.start(1)
        bodies = [wait_done(stack.url, job_id, timeout=240) for job_id in ids]
        assert all(body["status"] == "finished" for body in bodies), bodies
        assert all(clip.get("flow_url") is None for body in bodies for clip in body["result"]["clips"])
        assert all("figures" not in body["result"]["timings_ms"] for body in bodies)
        for job_id in ids:
            job = stack.job(job_id)
            assert job.meta["worker_deaths"] == 1 and job.meta["attempts"] == 2, job.meta
            assert job.meta["worker"] != victim
            successes = [r for r in job.results() if r.type == Result.Type.SUCCESSFUL]
            assert len(successes) == 1
    finally:
        stack.stop()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch-clips", "0"], {}, "--max-batch-clips must be at least 1"),
        (["--max-batch-delay-ms", "-1"], {}, "--max-batch-delay-ms must be >= 0"),
        ([], {"MOTIONGUARD_MAX_BATCH_CLIPS": "0"}, "MOTIONGUARD_MAX_BATCH_CLIPS: Input should be greater"),
    ],
)
def test_bad_batch_settings_are_one_line_errors(argv, env, message, monkeypatch, capsys):
    from service.cli import main
    from worker.settings import get_settings

    monkeypatch.setenv("MOTIONGUARD_REDIS_URL", "redis://127.0.0.1:6379/15")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert main(["worker", *argv]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("motionguard: error:") and message in err[0], err


def test_clips_of_an_ended_job_leave_the_purification(random_bundle):
    """``Pipeline.predict(leave=...)``: a clip marked gone after the first step takes no more
    gradient steps (the batch shrinks); the other clip runs every step, unchanged by the leaving."""
    import torch

    from models.bundle.load import load_bundle

    pipeline = load_bundle(random_bundle).pipeline
    clips = torch.rand(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    config = pipeline.defense.with_overrides(steps=4)
    asked = []

    def leave():
        asked.append(1)
        return torch.tensor([True, False])

    both = pipeline.predict(clips, defend="always", config=config, leave=leave)
    alone = pipeline.predict(clips[1:], defend="always", config=config)
    assert both.defence_steps.tolist() == [1, 4] and len(asked) == 4
    assert torch.allclose(both.restored[1], alone.restored[0], atol=1e-5)
