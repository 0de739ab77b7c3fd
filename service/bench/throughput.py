"""``motionguard bench throughput``: clips/s and latency of a batching worker at several batch limits.

A closed loop of C concurrent clients (each submits its next one-video job as soon as its previous
one ended) against the embedded service (``motionguard serve``, embedded Redis, one worker started
with ``MOTIONGUARD_MAX_BATCH_CLIPS`` = each value of ``--batch`` in turn, all in one run) or
against a running service (``--url``: its workers' batch limit as deployed, one setting). Per
setting and client count it prints clips/s, jobs/s, p50/p99 end-to-end latency, the worker's mean
batch size, and the mean per-job time of each stage (as the worker measured it: a batched job's
``defense`` is the wall time of the batch it shared), as JSON; with ``--out`` it also writes the
JSON and a PNG (clips/s and p99 latency against the batch limit).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from service.bench.client import bearer, closed_loop, percentile
from service.bench.service import add_bundle_arguments

log = logging.getLogger(__name__)

STAGES = ("queue", "decode", "defense", "classify", "figures", "encode", "total")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be integers >= 1: {text!r}")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=_int_list, default=[1, 2, 4, 8], help="batch limits, e.g. 1,2,4,8,16")
    parser.add_argument("--clients", type=_int_list, default=[8], help="concurrent clients, e.g. 8 or 8,1")
    parser.add_argument("--jobs", type=int, default=16, help="measured jobs per setting and client count")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured jobs first (default: the most clients)")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="MOTIONGUARD_MAX_BATCH_DELAY_MS of the worker")
    parser.add_argument("--steps", type=int, default=None, help="defence steps (default: the bundle's)")
    parser.add_argument("--clips", type=int, default=1, help="clips per uploaded video")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="status polling interval per client")
    parser.add_argument("--url", default=None, help="a running service (default: start an embedded one per setting)")
    parser.add_argument("--api-key", default=os.environ.get("MOTIONGUARD_BENCH_API_KEY"), help="Bearer key to send")
    parser.add_argument("--device", default=None, help="embedded worker's device: cpu or cuda[:n]")
    add_bundle_arguments(parser, random_size=224)
    parser.add_argument("--out", type=Path, default=None, help="write throughput.json and throughput.png here")


def _check_args(args: argparse.Namespace) -> None:
    from models.errors import UserError

    if args.jobs < 1 or args.clips < 1 or args.poll_ms <= 0 or args.delay_ms < 0:
        raise UserError("--jobs and --clips must be >= 1, --poll-ms > 0, --delay-ms >= 0")
    if args.url and len(args.batch) > 1:
        raise UserError("--url measures the service as deployed: give one --batch value (its workers' limit)")
    # --device cuda without CUDA: the embedded service's worker refuses it with a one-line error and
    # serve exits, which start_embedded_service reports (the service package itself imports no torch).


def summarise(samples: list[dict], wall_s: float, batch_limit: int | None, clients: int) -> dict:
    """One setting's figures. Mean batch size = clips / batches, where a job whose clips ran in a
    batch of k clips stands for 1/k of a batch per clip (exact for one-clip jobs)."""
    e2e = [s["e2e_ms"] for s in samples]
    clips = sum(len(s["result"]["clips"]) for s in samples)
    batches = sum(len(s["result"]["clips"]) / max(1, s["result"].get("batch", {}).get("clips", 1)) for s in samples)
    stages = {
        stage: round(statistics.fmean(s["result"]["timings_ms"].get(stage, 0.0) for s in samples), 2)
        for stage in STAGES
    }
    return {
        "batch_limit": batch_limit,
        "clients": clients,
        "jobs": len(samples),
        "clips": clips,
        "wall_s": round(wall_s, 3),
        "clips_per_s": round(clips / wall_s, 4),
        "jobs_per_s": round(len(samples) / wall_s, 4),
        "latency_ms": {
            "mean": round(statistics.fmean(e2e), 1),
            "p50": round(percentile(e2e, 0.5), 1),
            "p99": round(percentile(e2e, 0.99), 1),
        },
        "mean_batch_clips": round(clips / batches, 3) if batches else None,
        "stage_ms_mean": stages,
    }


def _ratios(settings: list[dict], delay_ms: float) -> dict:
    """Side-by-side ratios against batch limit 1 at the same client count, and the issue's targets."""
    out: dict[str, dict] = {}
    for clients in sorted({s["clients"] for s in settings}):
        rows = {s["batch_limit"]: s for s in settings if s["clients"] == clients}
        base = rows.get(1)
        if base is None:
            continue
        out[f"clients={clients}"] = {
            f"batch={limit}": {
                "clips_per_s_vs_batch1": round(row["clips_per_s"] / base["clips_per_s"], 3),
                "p99_ms_minus_batch1": round(row["latency_ms"]["p99"] - base["latency_ms"]["p99"], 1),
                "p99_within_batch1_plus_delay": row["latency_ms"]["p99"] <= base["latency_ms"]["p99"] + delay_ms,
            }
            for limit, row in sorted(rows.items())
        }
    return out


def plot(summary: dict, path: Path) -> None:
    """Clips/s and p99 latency against the batch limit, one line per client count."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax_rate, ax_p99 = fig.subplots(1, 2)
    for clients in sorted({s["clients"] for s in summary["settings"]}):
        rows = sorted((s for s in summary["settings"] if s["clients"] == clients), key=lambda s: s["batch_limit"])
        limits = [s["batch_limit"] for s in rows]
        ax_rate.plot(limits, [s["clips_per_s"] for s in rows], marker="o", label=f"{clients} client(s)")
        ax_p99.plot(limits, [s["latency_ms"]["p99"] / 1000 for s in rows], marker="o", label=f"{clients} client(s)")
    limits = sorted({s["batch_limit"] for s in summary["settings"]})
    for ax, title in ((ax_rate, "throughput (clips/s)"), (ax_p99, "p99 end-to-end latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(limits, [str(limit) for limit in limits])
        ax.set_xlabel("batch limit (clips)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    geometry = summary["input"]
    fig.suptitle(
        f"{summary['bundle']} {geometry['frames']}x{geometry['height']}x{geometry['width']}, "
        f"{summary['defense_steps']} steps, {summary['device']}, delay {summary['delay_ms']:.0f} ms"
    )
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def run(args: argparse.Namespace) -> int:
    from service.bench.service import prepare_bench, start_embedded_service, stop_service

    _check_args(args)
    work, bundle_dir, meta, steps, video = prepare_bench(args, "motionguard-throughput-")
    headers = bearer(args.api_key)
    params = {"defend": "true", "steps": steps}
    poll_s = args.poll_ms / 1000
    warmup = args.warmup if args.warmup is not None else max(args.clients)
    device = args.device or os.environ.get("MOTIONGUARD_DEVICE", "cpu")

    settings: list[dict] = []
    for limit in args.batch:
        server = None
        try:
            if args.url:
                base = args.url.rstrip("/")
            else:
                env = {
                    "MOTIONGUARD_MAX_BATCH_CLIPS": str(limit),
                    "MOTIONGUARD_MAX_BATCH_DELAY_MS": str(args.delay_ms),
                    "MOTIONGUARD_MAX_INFLIGHT_PER_KEY": str(max(10, 2 * max(args.clients))),
                    "MOTIONGUARD_DEVICE": device,
                }
                server, base = start_embedded_service(work, bundle_dir, 1, env)
            if warmup:
                closed_loop(base, headers, video, params, min(warmup, max(args.clients)), warmup, poll_s)
            for clients in args.clients:
                samples, wall = closed_loop(base, headers, video, params, clients, args.jobs, poll_s)
                row = summarise(samples, wall, limit, clients)
                settings.append(row)
                log.info(
                    "batch %d, %d client(s): %.3f clips/s, p50 %.0f ms, p99 %.0f ms, mean batch %.2f",
                    limit,
                    clients,
                    row["clips_per_s"],
                    row["latency_ms"]["p50"],
                    row["latency_ms"]["p99"],
                    row["mean_batch_clips"] or 0,
                )
        finally:
            if server is not None:
                stop_service(server)

    summary = {
        "benchmark": "throughput",
        "bundle": f"{meta.name} v{meta.version}",
        "input": {"frames": meta.input.frames, "height": meta.input.height, "width": meta.input.width},
        "defense_steps": steps,
        "clips_per_job": args.clips,
        "delay_ms": args.delay_ms,
        "device": device if not args.url else f"as deployed at {args.url}",
        "torch_threads": os.environ.get("MOTIONGUARD_TORCH_THREADS") or os.environ.get("OMP_NUM_THREADS"),
        "poll_ms": args.poll_ms,
        "settings": settings,
        "ratios": _ratios(settings, args.delay_ms),
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot(summary, args.out / "throughput.png")
        log.info("wrote %s and %s", args.out / "throughput.json", args.out / "throughput.png")
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
