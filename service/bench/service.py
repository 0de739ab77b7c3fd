"""``motionguard bench service``: end-to-end latency and the service's overhead on defended jobs.

Runs ``motionguard serve`` (embedded Redis, W workers) as a child process and drives it over
HTTP with W closed-loop clients (each submits its next job when the previous one ended), so jobs
rarely wait in the queue and end-to-end minus in-worker compute is the service's own cost:
upload, probe, enqueue, dequeue, result storage and polling. In-worker compute is the job's
``timings_ms.total`` (decode + defence + classify + encode, measured inside the worker).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.bench.client import closed_loop, percentile

log = logging.getLogger(__name__)


def add_bundle_arguments(parser: argparse.ArgumentParser, random_size: int) -> None:
    """The bundle a service bench serves: the given one, the demo, or random weights of a chosen geometry
    (read by ``prepare_bench``)."""
    parser.add_argument("--bundle", type=Path, default=None, help="bundle (default: MOTIONGUARD_BUNDLE_DIR / demo)")
    parser.add_argument("--random-bundle", action="store_true", help="a random bundle of --random-* geometry")
    parser.add_argument("--random-frames", type=int, default=16, help="random bundle: frames per clip")
    parser.add_argument("--random-size", type=int, default=random_size, help="random bundle: clip height and width")
    parser.add_argument("--random-steps", type=int, default=20, help="random bundle: its default defence steps")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=8, help="measured jobs (after one warm-up job per worker)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (and concurrent clients)")
    add_bundle_arguments(parser, random_size=128)
    parser.add_argument("--steps", type=int, default=None, help="defence steps (default: the bundle's)")
    parser.add_argument("--clips", type=int, default=1, help="clips per uploaded video")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="status polling interval")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_error(log_path: Path) -> str:
    """': <the one-line error>' a worker or serve printed (e.g. --device cuda without CUDA), or ''."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "error:" in line:
            return ": " + line.split("error:", 1)[1].strip()
    return ""


def start_embedded_service(
    work: Path, bundle_dir: Path, workers: int, extra_env: dict[str, str]
) -> tuple[subprocess.Popen, str]:
    """Start ``motionguard serve`` (embedded Redis, ``workers`` workers, no API keys) on a free port
    and wait until ``/readyz`` counts every worker; returns the process and its base URL.

    The service's log goes to ``work/serve.log``; access logging is off because one line per status
    poll would be measured as service overhead."""
    import httpx

    from models.errors import UserError

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MOTIONGUARD_REDIS_URL", "MOTIONGUARD_API_KEYS")}
    env.update(MOTIONGUARD_BUNDLE_DIR=str(bundle_dir), MOTIONGUARD_DATA_DIR=str(work / "data"), **extra_env)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers)]
    cmd.append("--no-access-log")
    server = subprocess.Popen(
        cmd, env=env, stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=base, timeout=30) as probe:
        while True:
            if server.poll() is not None:
                raise UserError(f"the service exited early{_first_error(work / 'serve.log')}; see {work / 'serve.log'}")
            try:
                ready = probe.get("/readyz").json()
                if ready.get("ready") and ready.get("workers", 0) >= workers:
                    return server, base
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                stop_service(server)
                raise UserError(f"the service was not ready after 300 s; see {work / 'serve.log'}")
            time.sleep(0.5)


def stop_service(server: subprocess.Popen) -> None:
    """SIGTERM (workers finish their job), then kill what is still there after 90 s."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=90)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 2),
        "p50": round(percentile(values, 0.5), 2),
        "p90": round(percentile(values, 0.9), 2),
        "p99": round(percentile(values, 0.99), 2),
    }


def _make_video(path: Path, frames: int, height: int, width: int) -> None:
    """A smooth pattern moving 2 px per frame, at the bundle's geometry (no resize cost measured)."""
    import numpy as np

    from worker.video import encode_mp4

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for t in range(frames):
        x = xx - 2 * t
        rgb = [0.5 + 0.4 * np.sin(0.15 * x + c) * np.cos(0.1 * yy - c) for c in range(3)]
        images.append((np.clip(np.stack(rgb, -1), 0, 1) * 255).astype(np.uint8))
    encode_mp4(np.stack(images), path)


def prepare_bench(args: argparse.Namespace, prefix: str):
    """What the service benches share before they start a service: quiet httpx, SIGTERM that
    unwinds, a work directory, the bundle (``--bundle`` or a ``--random-bundle``), the defence
    steps (``--steps`` or the bundle's) and an ``--clips``-clip video at the bundle's geometry.
    Returns (work, bundle_dir, meta, steps, video bytes)."""
    from models.bundle_meta import DEFAULT_BUNDLE_DIR, read_bundle_meta

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    # SIGTERM (e.g. from `timeout`) must unwind through the caller's finally, or the service is orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = Path(tempfile.mkdtemp(prefix=prefix))
    bundle_dir = args.bundle or Path(os.environ.get("MOTIONGUARD_BUNDLE_DIR", DEFAULT_BUNDLE_DIR))
    if args.random_bundle:
        from models.bundle.load import make_random_bundle

        bundle_dir = make_random_bundle(
            work / "bundle", frames=args.random_frames, size=args.random_size, steps=args.random_steps
        )
    meta = read_bundle_meta(bundle_dir)
    steps = args.steps if args.steps is not None else meta.defense.steps
    video_path = work / "bench.mp4"
    _make_video(video_path, meta.input.frames * args.clips, meta.input.height, meta.input.width)
    return work, bundle_dir, meta, steps, video_path.read_bytes()


def run(args: argparse.Namespace) -> int:
    work, bundle_dir, meta, steps, video = prepare_bench(args, "motionguard-bench-")

    server, base = start_embedded_service(
        work, bundle_dir, args.workers, {"MOTIONGUARD_MAX_INFLIGHT_PER_KEY": str(max(10, args.workers * 2))}
    )
    try:
        params = {"defend": "true", "steps": steps}
        poll_s = args.poll_ms / 1000
        closed_loop(base, {}, video, params, args.workers, args.workers, poll_s)  # warm-up: a job per worker
        samples, wall = closed_loop(base, {}, video, params, args.workers, args.jobs, poll_s)
    finally:
        stop_service(server)

    e2e = [s["e2e_ms"] for s in samples]
    compute = [s["compute_ms"] for s in samples]
    overhead = [s["e2e_ms"] - s["compute_ms"] for s in samples]
    summary = {
        "benchmark": "service",
        "bundle": f"{meta.name} v{meta.version}",
        "input": {"frames": meta.input.frames, "height": meta.input.height, "width": meta.input.width},
        "jobs": len(samples),
        "workers": args.workers,
        "clips_per_job": args.clips,
        "defense_steps": steps,
        "poll_ms": args.poll_ms,
        "latency_ms": _summary(e2e),
        "throughput_jobs_per_s": round(len(samples) / wall, 4),
        "compute_ms": _summary(compute),
        "queue_ms_mean": round(statistics.fmean(s["queue_ms"] for s in samples), 2),
        "overhead_ms": _summary(overhead),
        "overhead_fraction": {
            "of_mean_latency": round(statistics.fmean(overhead) / statistics.fmean(e2e), 4),
            "p50": round(percentile([o / t for o, t in zip(overhead, e2e, strict=True)], 0.5), 4),
        },
    }
    if not args.json:
        log.info(
            "%d jobs, %d workers: p50 %.0f ms, compute %.0f ms, overhead %.0f ms (%.1f %%)",
            len(samples),
            args.workers,
            summary["latency_ms"]["p50"],
            summary["compute_ms"]["p50"],
            summary["overhead_ms"]["p50"],
            100 * summary["overhead_fraction"]["of_mean_latency"],
        )
    sys.stdout.write(json.dumps(summary, indent=None if args.json else 2) + "\n")
    return 0
