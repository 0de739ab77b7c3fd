"""``motionguard bench load``: upload/poll load against a running service, and whether it loses jobs.

C concurrent clients send N uploads in all (``POST /classify``, no retries: a 503 or 429 is counted
and the client moves on), then poll every accepted job until it ends. Prints JSON: accepted/s,
enqueue latency percentiles (the time to a 202), the 503/429 counts, and how many accepted jobs
reached a terminal state with a result, which must equal the number accepted (exit status 1
otherwise). Without ``--url`` it runs its own service (``motionguard serve`` with the embedded
Redis, W workers, a tiny random bundle unless ``--bundle`` is given), as ``bench service`` does.
Loopback only by default; every loop is bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from service.bench.client import TERMINAL, bearer, percentile, run_threads, submit

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", "-n", type=int, default=64, help="uploads in all")
    parser.add_argument("--url", default=None, help="a running service (default: start an embedded one)")
    parser.add_argument("--api-key", default=os.environ.get("MOTIONGUARD_BENCH_API_KEY"), help="Bearer key to send")
    parser.add_argument("--steps", type=int, default=0, help="defence steps per job (0: classify only, fast)")
    parser.add_argument("--clips", type=int, default=1, help="clips per uploaded video")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the accepted jobs to end")
    parser.add_argument("--poll-ms", type=float, default=200.0, help="status polling interval per job")
    embedded = parser.add_argument_group("embedded service (without --url)")
    embedded.add_argument("--workers", type=int, default=2, help="worker processes")
    embedded.add_argument("--bundle", type=Path, default=None, help="bundle (default: a tiny random one)")
    embedded.add_argument("--random-frames", type=int, default=4, help="random bundle: frames per clip")
    embedded.add_argument("--random-size", type=int, default=32, help="random bundle: clip height and width")
    embedded.add_argument("--max-queued", type=int, default=None, help="MOTIONGUARD_MAX_QUEUED (503 past it)")
    embedded.add_argument(
        "--max-inflight", type=int, default=None, help="MOTIONGUARD_MAX_INFLIGHT_PER_KEY (429; default: no cap)"
    )


def _geometry(base: str, headers: dict) -> tuple[int, int, int]:
    import httpx

    body = httpx.get(f"{base}/models", headers=headers, timeout=30).json()
    return body["input"]["frames"], body["input"]["height"], body["input"]["width"]


def drive(base: str, video: bytes, args: argparse.Namespace, headers: dict) -> dict:
    """The load itself: submissions by C clients, then polling of every accepted job to its end."""
    import httpx

    lock = threading.Lock()
    remaining = [args.requests]
    latencies: list[float] = []
    accepted: list[str] = []
    counts = {"503": 0, "429": 0, "other": 0}
    other_examples: list[str] = []
    params = {"defend": "true" if args.steps else "false", "steps": args.steps}

    def submitter() -> None:
        with httpx.Client(base_url=base, timeout=120, headers=headers) as client:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                started = time.perf_counter()
                try:
                    response = submit(client, video, params, "load.mp4")
                    status, text = response.status_code, response.text
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    if status == 202:
                        latencies.append(elapsed)
                        accepted.append(response.json()["job_id"])
                    elif str(status) in counts:
                        counts[str(status)] += 1
                    else:
                        counts["other"] += 1
                        if len(other_examples) < 3:
                            other_examples.append(f"{status}: {text[:200]}")

    submit_s = run_threads(submitter, args.concurrency)

    outcome: dict[str, dict] = {}
    pending = list(accepted)
    deadline = time.monotonic() + args.timeout

    def poller() -> None:
        with httpx.Client(base_url=base, timeout=60, headers=headers) as client:
            while time.monotonic() < deadline:
                with lock:
                    if not pending:
                        return
                    job_id = pending.pop(0)
                try:
                    body = client.get(f"/jobs/{job_id}").json()
                except (httpx.HTTPError, ValueError):
                    body = {}
                with lock:
                    if body.get("status") in TERMINAL:
                        outcome[job_id] = body
                    else:
                        pending.append(job_id)
                time.sleep(args.poll_ms / 1000 / max(1, len(pending)))

    drain_s = run_threads(poller, min(args.concurrency, max(1, len(accepted))))
    finished = [b for b in outcome.values() if b["status"] == "finished" and b.get("result")]
    failed = [b for b in outcome.values() if b["status"] != "finished"]
    errors: dict[str, int] = {}
    for body in failed:
        code = (body.get("error") or {}).get("code", body["status"])
        errors[code] = errors.get(code, 0) + 1
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "accepted": len(accepted),
        "rejected_503": counts["503"],
        "rejected_429": counts["429"],
        "other_responses": counts["other"],
        "other_examples": other_examples,
        "submit_wall_s": round(submit_s, 3),
        "accepted_per_s": round(len(accepted) / submit_s, 2) if submit_s else None,
        "enqueue_latency_ms": {
            "p50": round(percentile(latencies, 0.5), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "max": round(max(latencies), 1) if latencies else None,
        },
        "terminal": len(outcome),
        "finished_with_result": len(finished),
        "failed_or_canceled": errors,
        "not_terminal_after_timeout": len(accepted) - len(outcome),
        "drain_s": round(drain_s, 2),
        "jobs_per_s_end_to_end": round(len(finished) / (submit_s + drain_s), 3) if accepted else None,
        "all_accepted_finished": len(finished) == len(accepted),
    }


def run(args: argparse.Namespace) -> int:
    from models.errors import UserError
    from service.bench.service import _make_video, start_embedded_service, stop_service

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.concurrency < 1 or args.requests < 1:
        raise UserError("--concurrency and --requests must be at least 1")
    headers = bearer(args.api_key)
    work = Path(tempfile.mkdtemp(prefix="motionguard-load-"))
    server = None
    setup: dict = {"url": args.url or "embedded"}
    try:
        if args.url:
            base = args.url.rstrip("/")
        else:
            bundle_dir = args.bundle
            if bundle_dir is None:
                from models.bundle.load import make_random_bundle

                bundle_dir = make_random_bundle(
                    work / "bundle", frames=args.random_frames, size=args.random_size, steps=max(1, args.steps)
                )
            limits = {"MOTIONGUARD_MAX_INFLIGHT_PER_KEY": str(args.max_inflight or max(10, args.requests))}
            if args.max_queued:
                limits["MOTIONGUARD_MAX_QUEUED"] = str(args.max_queued)
            server, base = start_embedded_service(work, bundle_dir, args.workers, limits)
            setup.update(workers=args.workers, max_queued=args.max_queued or 100, bundle=str(bundle_dir))
        frames, height, width = _geometry(base, headers)
        setup.update(input={"frames": frames, "height": height, "width": width}, clips=args.clips, steps=args.steps)
        video_path = work / "load.mp4"
        _make_video(video_path, frames * args.clips, height + height % 2, width + width % 2)
        summary = drive(base, video_path.read_bytes(), args, headers)
    finally:
        if server is not None:
            stop_service(server)
    summary = {"benchmark": "load", **summary, "setup": setup}
    sys.stdout.write(json.dumps(summary) + "\n")
    if not summary["all_accepted_finished"]:
        lost = summary["accepted"] - summary["finished_with_result"]
        log.error("%d accepted job(s) did not finish with a result", lost)
        return 1
    return 0
