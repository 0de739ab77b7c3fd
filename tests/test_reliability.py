"""Reliability (issue 8): back-pressure, and faults injected into a running service.

Each test runs the real thing: the FastAPI app under uvicorn, a real Redis, real ``motionguard
worker`` processes. What ``tests/test_service.py`` already covers is not repeated here (the 503/429
status codes, a worker SIGKILLed mid-job ends finished or ``worker_died``); these tests add what the
reliability report needs: the rejections counted in ``/metrics``, the *time* a killed worker's job
takes to be retried, warm shutdown on SIGTERM, a Redis restart under load (own ``redis-server`` with
append-only persistence), a full or unwritable blob store, and a job past its timeout.

Measured figures are printed as ``RELIABILITY <name> <json>`` lines (``pytest -s`` shows them) and
quoted in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import ALICE, LiveServer, WorkerPool, free_port, settings_from_env, wait_done, write_video

pytestmark = pytest.mark.integration


def report(name: str, **figures) -> None:
    print(f"\nRELIABILITY {name} {json.dumps(figures)}")


def submit(url: str, path: Path, headers=ALICE, **params) -> httpx.Response:
    with open(path, "rb") as handle:
        return httpx.post(
            f"{url}/classify", params=params, files={"file": ("clip.mp4", handle)}, headers=headers, timeout=30
        )


def status(url: str, job_id: str, headers=ALICE) -> dict:
    return httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=10).json()


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout} s")


def rejected(metrics_text: str, reason: str) -> float:
    match = re.search(rf'^motionguard_requests_rejected_total\{{reason="{reason}"\}} (\S+)$', metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


class Stack:
    """A private service: own queue and key prefix, own data dir, N workers, the API over HTTP."""

    def __init__(self, base_env: dict[str, str], tmp: Path, redis_url: str | None = None, **env):
        tag = uuid.uuid4().hex[:8]
        self.env = {
            **base_env,
            "MOTIONGUARD_QUEUE_NAME": f"rel-{tag}",
            "MOTIONGUARD_KEY_PREFIX": f"rel-{tag}",
            "MOTIONGUARD_DATA_DIR": str(tmp / "data"),
            **({"MOTIONGUARD_REDIS_URL": redis_url} if redis_url else {}),
            **{f"MOTIONGUARD_{k.upper()}": str(v) for k, v in env.items()},
        }
        (tmp / "logs").mkdir(exist_ok=True)
        self.pool = WorkerPool(self.env, tmp / "logs")
        self.settings = settings_from_env(self.env)
        self.server: LiveServer | None = None

    def start(self, workers: int) -> Stack:
        from service.app import create_app

        self.pool.start(workers)
        self.server = LiveServer(create_app(self.settings)).__enter__()
        self.pool.wait_live(workers)
        return self

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        if self.server:
            self.server.__exit__(None, None, None)
        self.pool.stop()

    def job(self, job_id: str):
        from redis import Redis
        from rq.job import Job
        from rq.serializers import JSONSerializer

        return Job.fetch(job_id, connection=Redis.from_url(self.settings.redis_url), serializer=JSONSerializer)


# --- Back-pressure ---------------------------------------------------------------------------------


def test_backpressure_is_counted_in_metrics(service_env, tmp_path):
    """503 queue_full (Retry-After, JSON body) and 429 per key, each counted by reason in /metrics.

    A queue no worker serves, so the backlog stays where the test puts it."""
    from service.app import create_app

    path = write_video(tmp_path / "v.mp4", count=4)
    tag = uuid.uuid4().hex[:8]
    settings = settings_from_env(
        service_env,
        queue_name=f"bp-{tag}",
        key_prefix=f"bp-{tag}",
        data_dir=str(tmp_path / "data"),
        max_queued=2,
        max_inflight_per_key=1,
    )
    with LiveServer(create_app(settings, run_recovery=False)) as server:
        before = httpx.get(f"{server.url}/metrics").text
        assert submit(server.url, path).status_code == 202
        limited = submit(server.url, path)  # alice has 1 in flight: per-key cap
        assert limited.status_code == 429 and limited.headers["Retry-After"].isdigit()
        assert limited.json() == {"error": {"code": "too_many_jobs", "message": limited.json()["error"]["message"]}}
        assert submit(server.url, path, headers={"Authorization": "Bearer key-bob"}).status_code == 202
        full = submit(server.url, path, headers={"Authorization": "Bearer key-bob"})  # 2 queued = max_queued
        assert full.status_code == 503 and int(full.headers["Retry-After"]) > 0
        assert full.json()["error"]["code"] == "queue_full"
        after = httpx.get(f"{server.url}/metrics").text
        assert rejected(after, "rate_limited") == rejected(before, "rate_limited") + 1
        assert rejected(after, "queue_full") == rejected(before, "queue_full") + 1
        assert re.search(r"^motionguard_queue_depth\{model=\"random-test\"\} 2\.0$", after, re.M)
        # Refused before the body was read: only the two accepted uploads are on disk.
        assert len(list(settings.upload_dir.iterdir())) == 2
        from redis import Redis

        from worker.queueing import make_queue

        make_queue(Redis.from_url(settings.redis_url), settings).empty()


# --- Jobs past their timeout, blob store full or unwritable (the session's workers) ------------------


def test_job_past_its_timeout_fails_with_reason_timeout(service_env, workers, tmp_path):
    """An API whose job timeout is 1 s sizes its jobs' RQ timeout so (read on a queue no worker
    serves); such a job on the session's workers ends ``failed`` with code ``timeout``, and the
    worker serves the next job.

    No speed assumption: the job cannot finish before its deadline whatever the CPU, because its
    first output file is a FIFO no one reads (opening it for writing blocks) until RQ's death
    penalty (SIGALRM) interrupts it."""
    from redis import Redis

    from service.app import create_app

    alive = [p for p in workers.procs if p.poll() is None]
    path = write_video(tmp_path / "v.mp4", count=16)
    tag = uuid.uuid4().hex[:8]
    short = settings_from_env(
        service_env,
        queue_name=f"timeout-{tag}",
        key_prefix=f"timeout-{tag}",
        job_timeout_base_s=1,
        job_timeout_per_clip_step_s=0.001,
    )
    with LiveServer(create_app(short, run_recovery=False)) as server:
        sized = submit(server.url, path, steps=50).json()["job_id"]
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from worker.storage import discard_upload

    connection = Redis.from_url(short.redis_url)
    job = Job.fetch(sized, connection=connection, serializer=JSONSerializer)
    timeout = job.timeout
    assert timeout == 1
    job.delete()
    discard_upload(connection, short, sized)

    settings = settings_from_env(service_env)
    job_id = uuid.uuid4().hex
    folder = settings.blob_dir / job_id
    _stall_outputs(folder, tmp_path / "nobody-reads")
    with LiveServer(create_app(settings, run_recovery=False)) as server:
        started = time.monotonic()
        _enqueue_direct(settings, path, job_id, job_timeout=timeout)
        body = wait_done(server.url, job_id, timeout=120)
        assert body["status"] == "failed", body
        assert body["error"]["code"] == "timeout" and "1 s timeout" in body["error"]["message"], body
        report("timeout", timeout_s=1, failed_after_s=round(time.monotonic() - started, 2))
        follow = wait_done(server.url, submit(server.url, write_video(tmp_path / "s.mp4", count=4)).json()["job_id"])
        assert follow["status"] == "finished", follow
    assert all(p.poll() is None for p in alive)
    shutil.rmtree(folder, ignore_errors=True)


def _enqueue_direct(settings, video: Path, job_id: str, owner_key: str = "key-alice", job_timeout: int = 300) -> str:
    """Enqueue a job as the API would, with its id chosen beforehand (to prepare its blob folder)."""
    from redis import Redis

    from service.deps import owner_of
    from worker.queueing import make_queue
    from worker.storage import upload_path

    upload_path(settings, job_id).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(video, upload_path(settings, job_id))
    make_queue(Redis.from_url(settings.redis_url), settings).enqueue(
        "worker.serving.jobs.analyse_job",
        {"defend": True, "steps": 1, "top_k": 2},
        job_id=job_id,
        job_timeout=job_timeout,
        meta={"owner": owner_of(owner_key)},
    )
    return job_id


def _stall_outputs(folder: Path, fifo: Path) -> None:
    """The job's output files lead to a FIFO no one reads: storing them blocks (in ``open``) until the
    job's timeout, a signal, or a reader. A job stalled so cannot end before the test acts."""
    if not fifo.exists():
        os.mkfifo(fifo)
    folder.mkdir(parents=True)
    for name in ("restored.mp4", "restored.mkv", "restored.npz"):
        (folder / f".{name}.tmp").symlink_to(fifo)


def _obstruct(kind: str, folder: Path) -> None:
    if kind == "full":
        # Every write the blob store makes for this job lands on /dev/full: a real ENOSPC.
        folder.mkdir(parents=True)
        for name in ("restored.mp4", "restored.mkv", "restored.npz"):
            (folder / f".{name}.tmp").symlink_to("/dev/full")
    else:
        # A file where the job's folder must go: the store cannot create it (EEXIST / ENOTDIR).
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.write_bytes(b"")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full is absent")
@pytest.mark.parametrize("kind", ["full", "unwritable"])
def test_blob_store_full_or_unwritable(api, service_env, workers, tmp_path, kind):
    """The job ends ``failed`` with ``storage_error`` and the OS reason; the worker survives and
    serves the next job (which stores its output normally)."""
    alive = [p for p in workers.procs if p.poll() is None]
    settings = settings_from_env(service_env)
    video = write_video(tmp_path / "v.mp4", count=8)
    job_id = uuid.uuid4().hex
    _obstruct(kind, settings.blob_dir / job_id)
    _enqueue_direct(settings, video, job_id)
    body = wait_done(api, job_id)
    assert body["status"] == "failed", body
    assert body["error"]["code"] == "storage_error", body
    expected = "No space left on device" if kind == "full" else "File exists"
    assert expected in body["error"]["message"] or "Not a directory" in body["error"]["message"], body
    assert all(p.poll() is None for p in alive)
    follow = wait_done(api, submit(api, video, steps=1).json()["job_id"])
    assert follow["status"] == "finished", follow
    assert httpx.get(f"{api}{follow['result']['restored_url']}", headers=ALICE).status_code == 200
    if kind == "unwritable":
        (settings.blob_dir / job_id).unlink()


# --- Worker SIGKILL and SIGTERM mid-job (a private service with two workers) --------------------------

HEARTBEAT_TTL_S, RECOVERY_INTERVAL_S = 3, 0.5
# A killed worker's job is requeued once its started-registry entry (renewed every second with
# heartbeat_ttl_s) expires and the next recovery scan runs: heartbeat_ttl_s + recovery_interval_s,
# plus scheduling slack on a busy machine.
RETRY_BOUND_S = HEARTBEAT_TTL_S + RECOVERY_INTERVAL_S + 5


# Fault tests for workers taking one job at a time and for batching workers (worker.serving.batching).
BATCHING = [
    pytest.param({}, id="one-job"),
    pytest.param({"max_batch_clips": 4, "max_batch_delay_ms": 200}, id="batching"),
]


@pytest.fixture(scope="module")
def fault_stack(service_env, tmp_path_factory, request):
    """Two workers taking one job at a time, or batching workers: the test's indirect parameter."""
    stack = Stack(
        service_env,
        tmp_path_factory.mktemp("faults"),
        heartbeat_ttl_s=HEARTBEAT_TTL_S,
        recovery_interval_s=RECOVERY_INTERVAL_S,
        **request.param,
    )
    try:
        yield stack.start(2)
    finally:
        stack.stop()


def _running_on(stack: Stack, url: str, job_id: str) -> tuple[str, subprocess.Popen]:
    """Wait for the job to start; the name and process of the worker running it."""
    wait_for(lambda: status(url, job_id)["status"] == "started", 60, what="job started")
    name = wait_for(lambda: stack.job(job_id).meta.get("worker"), 10, what="job's worker recorded")
    index = int(name.rsplit("-w", 1)[1])
    return name, stack.pool.procs[index]


# One-job workers only: the batching worker's SIGKILL, with the same bound, is
# test_batching.test_sigkilled_batching_worker_every_job_requeued_and_run_once.
@pytest.mark.parametrize("fault_stack", BATCHING[:1], indirect=True)
def test_worker_sigkill_mid_job_is_retried_within_bound(fault_stack, tmp_path):
    """A worker SIGKILLed while its job runs: the job is requeued within the bound and finishes on the
    other worker. No speed assumption: the job's outputs lead to a FIFO no one reads, so its first run
    cannot end before the kill, which follows the observation that it started; the folder is removed
    at once, so the retry (a heartbeat TTL later at the earliest) stores as usual. The workers'
    registry (``WorkerPool.live``) names the process that runs the job."""
    url = fault_stack.url
    job_id = uuid.uuid4().hex
    folder = fault_stack.settings.blob_dir / job_id
    _stall_outputs(folder, tmp_path / "nobody-reads")  # the first run cannot end before the kill
    _enqueue_direct(fault_stack.settings, write_video(tmp_path / "v.mp4", count=4), job_id)
    victim_name, victim = _running_on(fault_stack, url, job_id)
    assert {w["name"]: w["pid"] for w in fault_stack.pool.live()}[victim_name] == victim.pid
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    shutil.rmtree(folder)  # the retry stores its outputs as usual

    def retried():
        job = fault_stack.job(job_id)
        return job.meta.get("worker_deaths") == 1 and job.get_status(refresh=False) in ("queued", "started")

    wait_for(retried, 60, 0.05, "job requeued")
    retry_s = time.monotonic() - killed
    body = wait_done(url, job_id, timeout=180)
    total_s = time.monotonic() - killed
    assert body["status"] == "finished", body
    job = fault_stack.job(job_id)
    assert job.meta["worker"] != victim_name and job.meta["attempts"] == 2
    report("sigkill", requeued_after_s=round(retry_s, 2), finished_after_s=round(total_s, 2), bound_s=RETRY_BOUND_S)
    assert retry_s < RETRY_BOUND_S


class _Drain:
    """Reads a FIFO until stopped: the reader a stalled job's outputs wait for.

    The read end stays open the whole time, and the drain holds a write end of its own, so the
    reader never sees end-of-file between two of the job's files. (A reader that reopened the FIFO
    after each file let the job's next writer open while the old read end was still there, then
    close under it: the job's write failed with EPIPE and the job with ``storage_error``.)"""

    def __init__(self, fifo: Path):
        import threading

        self.read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader: writers' opens now return
        self.keep_fd = os.open(fifo, os.O_WRONLY)  # a writer: the reader never sees end-of-file
        os.set_blocking(self.read_fd, True)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            os.read(self.read_fd, 1 << 16)

    def stop(self) -> None:
        self.stopping.set()
        os.write(self.keep_fd, b"x")  # wakes the reader blocked in read
        self.thread.join()
        os.close(self.keep_fd)
        os.close(self.read_fd)


@pytest.mark.parametrize("fault_stack", BATCHING, indirect=True)
def test_worker_sigterm_mid_job_finishes_it_and_exits_0(fault_stack, tmp_path):
    """Warm shutdown: the running job finishes on the worker that got SIGTERM, which then exits 0.

    No speed assumption: the job's outputs lead to a FIFO that is read only after SIGTERM (sent once
    the job is observed started), so the job is still running when the signal arrives whatever the
    CPU, and it can finish only afterwards."""
    url = fault_stack.url
    job_id = uuid.uuid4().hex
    folder = fault_stack.settings.blob_dir / job_id
    fifo = tmp_path / "read-after-sigterm"
    _stall_outputs(folder, fifo)
    _enqueue_direct(fault_stack.settings, write_video(tmp_path / "v.mp4", count=4), job_id)
    name, proc = _running_on(fault_stack, url, job_id)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    drain = _Drain(fifo)
    try:
        assert proc.wait(timeout=120) == 0
    finally:
        drain.stop()
    exit_s = time.monotonic() - signalled
    shutil.rmtree(folder)
    body = status(url, job_id)
    assert body["status"] == "finished", body
    job = fault_stack.job(job_id)
    assert job.meta["worker"] == name and job.meta["attempts"] == 1 and not job.meta.get("worker_deaths")
    report("sigterm", exited_after_s=round(exit_s, 2), exit_code=0)


# --- Redis restarted under load (own redis-server with append-only persistence) ----------------------


class RedisServer:
    """``redis-server`` on a free loopback port, AOF on (as docker-compose.yml runs it), restartable."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        cmd = [
            shutil.which("redis-server"),
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT)
        from redis import Redis

        wait_for(lambda: _pings(Redis.from_url(self.url, socket_connect_timeout=0.2)), 20, 0.05, "redis up")

    def stop(self) -> None:
        """SIGTERM: Redis flushes the append-only file and exits, as a restart or a deploy would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def _pings(connection) -> bool:
    try:
        return bool(connection.ping())
    except Exception:
        return False


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
@pytest.mark.parametrize("batching", BATCHING)
def test_redis_restart_under_load(service_env, tmp_path, batching):
    """While Redis is down the API answers 503 (POST and GET) and /readyz fails; after it comes back
    both recover with no restart of the API or the workers, and every job accepted before the
    restart reaches a terminal state (finished)."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    stack = Stack(service_env, tmp_path, redis_url=redis.url, heartbeat_ttl_s=HEARTBEAT_TTL_S, **batching)
    try:
        stack.start(1)
        url = stack.url
        video = write_video(tmp_path / "v.mp4", count=4)
        accepted = []
        for _ in range(4):
            response = submit(url, video, steps=2)
            assert response.status_code == 202, response.text
            accepted.append(response.json()["job_id"])
        wait_for(lambda: status(url, accepted[0])["status"] == "started", 60, what="first job started")

        redis.stop()
        down_at = time.monotonic()
        response = submit(url, video, steps=1)
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert httpx.get(f"{url}/jobs/{accepted[0]}", headers=ALICE).status_code == 503
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False
        time.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))  # a few seconds down

        redis.start()
        back_at = time.monotonic()
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 120, 0.1, "/readyz 200 again")
        ready_s = time.monotonic() - back_at
        response = wait_for(
            lambda: (lambda r: r if r.status_code == 202 else None)(submit(url, video, steps=1)), 60, 0.2, "202 again"
        )
        accept_s = time.monotonic() - back_at
        accepted_after = response.json()["job_id"]

        ended = {job_id: wait_done(url, job_id, timeout=240) for job_id in [*accepted, accepted_after]}
        drained_s = time.monotonic() - back_at
        statuses = {job_id: body["status"] for job_id, body in ended.items()}
        assert all(s == "finished" for s in statuses.values()), ended
        assert all(p.poll() is None for p in stack.pool.procs), "a worker exited"
        report(
            "redis_restart",
            down_s=round(back_at - down_at, 2),
            readyz_recovered_after_s=round(ready_s, 2),
            accepting_after_s=round(accept_s, 2),
            jobs_before_restart=len(accepted),
            finished=sum(s == "finished" for s in statuses.values()),
            all_done_after_s=round(drained_s, 2),
        )
    finally:
        stack.stop()
        redis.stop()


# --- Access: keys, ownership, logging (the session's service, keys key-alice and key-bob) -------------

BOB = {"Authorization": "Bearer key-bob"}


def test_keys_ownership_and_open_operations_routes(api, workers, tmp_path, caplog):
    """Beyond test_service's 401/404 checks: every keyed route is 401 without or with a wrong key,
    every route of another key's job is 404 (status, each restored format, both pictures, cancel),
    /healthz, /readyz and /metrics stay open, and no key ever reaches a log line."""
    import logging

    caplog.set_level(logging.DEBUG)
    wrong_key = "wrong-" + uuid.uuid4().hex
    response = submit(api, write_video(tmp_path / "v.mp4", count=4), steps=1)
    job_id = response.json()["job_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)  # 128 random bits (secrets.token_hex(16))
    body = wait_done(api, job_id)
    assert body["status"] == "finished", body

    job_routes = [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/restored"),
        ("GET", f"/jobs/{job_id}/restored?format=ffv1"),
        ("GET", f"/jobs/{job_id}/restored?format=npz"),
        ("GET", f"/jobs/{job_id}/clips/0/flow.png"),
        ("GET", f"/jobs/{job_id}/clips/0/mc_loss.png"),
        ("DELETE", f"/jobs/{job_id}"),
    ]
    for method, route in [*job_routes, ("GET", "/models"), ("POST", "/classify")]:
        for headers in ({}, {"Authorization": f"Bearer {wrong_key}"}, {"Authorization": "Basic a2V5LWFsaWNlOg=="}):
            answer = httpx.request(method, f"{api}{route}", headers=headers, timeout=30)
            assert answer.status_code == 401, (method, route, headers, answer.text)
            assert answer.json()["error"]["code"] == "unauthorized"
    for method, route in job_routes:
        answer = httpx.request(method, f"{api}{route}", headers=BOB, timeout=30)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", (route, answer.text)
    for method, route in job_routes[:-1]:  # the owner sees them all
        assert httpx.request(method, f"{api}{route}", headers=ALICE, timeout=30).status_code == 200, route
    for route in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{api}{route}", timeout=30).status_code == 200, route

    logged = caplog.text + "".join(p.read_text(errors="replace") for p in workers.log_dir.glob("*.log"))
    for secret in ("key-alice", "key-bob", wrong_key):
        assert secret not in logged


def test_keys_compared_in_constant_time_and_ids_unguessable():
    """The key check uses hmac.compare_digest against every configured key (no early exit, no ==),
    stores only a hash of the key as the job's owner, and job ids are 128-bit secrets."""
    import ast
    import inspect

    from service import deps
    from service.routes import jobs as routes_jobs

    source = inspect.getsource(deps.require_owner)
    assert "hmac.compare_digest(" in source or "secrets.compare_digest(" in source
    tree = ast.parse(source.strip())
    compares = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)]
    for node in compares:  # only `is None` / `!= "bearer"` style checks, never a key compared with ==
        text = ast.unparse(node)
        assert "credentials.credentials" not in text and "sent" not in text and "key" not in text.split()[0], text
    assert "break" not in source and "return owner_of(key)" not in source
    assert deps.owner_of("key-alice") != "key-alice" and "key-alice" not in deps.owner_of("key-alice")
    assert "secrets.token_hex(16)" in inspect.getsource(routes_jobs.classify)


# --- bench load's driver against the session's service --------------------------------------------


def test_bench_load_driver_accounts_for_every_accepted_job(api, tmp_path):
    """``motionguard bench load`` (its driver, against a running service): every accepted job ends
    with a result, and the counts add up."""
    import argparse

    from service.bench.load import drive
    from service.bench.service import _make_video

    _make_video(tmp_path / "load.mp4", 4, 64, 64)
    args = argparse.Namespace(concurrency=3, requests=6, steps=0, clips=1, timeout=240.0, poll_ms=100.0)
    summary = drive(api, (tmp_path / "load.mp4").read_bytes(), args, ALICE)
    assert summary["accepted"] + summary["rejected_503"] + summary["rejected_429"] + summary["other_responses"] == 6
    assert summary["accepted"] >= 1 and summary["other_responses"] == 0, summary
    assert summary["finished_with_result"] == summary["accepted"] and summary["all_accepted_finished"], summary
    assert summary["enqueue_latency_ms"]["p50"] > 0
