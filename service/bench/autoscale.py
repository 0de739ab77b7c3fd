"""``motionguard bench autoscale``: replay traffic against KEDA's queue rule and against fixed fleets.

For a burst and a day-shaped trace (``service.bench.autoscale_sim``) it reports, for the autoscaled
workers (the ScaledObject of docker/k8s by default), for a fixed fleet of the same cost (as many
workers as the autoscaled run's average), and for the smallest fixed fleet that matches the
autoscaled p99: p50/p99 job latency (upload to result), worker-hours and the queue peak. A job costs
``--clip-s`` x ``--clips`` seconds of one worker; the default 330 s is the measured ``bench service``
figure for one 16x128x128 clip at 20 defence steps on 2 CPU cores (docs/benchmarks.md). With
``--png DIR`` it draws queue length, replicas and latency over time, one PNG per trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.bench.autoscale_sim import KedaRule, Run, burst_trace, day_trace, simulate

log = logging.getLogger(__name__)

MEASURED_CLIP_S = 330.0  # bench service, 16x128x128, 20 steps, 1 CPU worker (docs/benchmarks.md)


def configure(parser: argparse.ArgumentParser) -> None:
    rule = KedaRule()
    parser.add_argument("--trace", choices=("day", "burst", "both"), default="both")
    parser.add_argument("--clip-s", type=float, default=MEASURED_CLIP_S, help="worker seconds per clip (measured)")
    parser.add_argument("--clips", type=int, default=1, help="clips per job")
    parser.add_argument("--peak-workers", type=float, default=6.0, help="day trace: load at 15:00, in busy workers")
    parser.add_argument("--trough-workers", type=float, default=0.5, help="day trace: load at 03:00")
    parser.add_argument("--base-workers", type=float, default=1.0, help="burst trace: background load")
    parser.add_argument("--burst-jobs", type=int, default=40, help="burst trace: uploads within one minute")
    parser.add_argument("--seed", type=int, default=0)
    keda = parser.add_argument_group("the scaling rule (defaults: docker/k8s ScaledObject)")
    keda.add_argument("--list-length", type=int, default=rule.list_length, help="KEDA listLength (jobs per worker)")
    keda.add_argument("--min-replicas", type=int, default=rule.min_replicas)
    keda.add_argument("--max-replicas", type=int, default=rule.max_replicas)
    keda.add_argument("--polling-s", type=int, default=rule.polling_s)
    keda.add_argument("--scale-down-window-s", type=int, default=rule.scale_down_window_s)
    keda.add_argument("--startup-s", type=float, default=rule.startup_s, help="pod creation to first job")
    keda.add_argument(
        "--count-running", action="store_true", help="metric = waiting + running jobs (not the redis-list scaler)"
    )
    parser.add_argument("--png", type=Path, default=None, help="directory for autoscale-<trace>.png")


def _rule(args: argparse.Namespace) -> KedaRule:
    return KedaRule(
        list_length=args.list_length,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        polling_s=args.polling_s,
        scale_down_window_s=args.scale_down_window_s,
        startup_s=args.startup_s,
        count_running=args.count_running,
    )


def smallest_matching_fleet(arrivals: list[float], job_s: list[float], p99_s: float, upper: int) -> tuple[int, Run]:
    """The fewest fixed workers whose p99 latency is at most ``p99_s`` (p99 falls as workers are added)."""
    low, high = 1, upper
    best = simulate(arrivals, job_s, fixed=high)
    while best.summary()["latency_p99_s"] > p99_s:  # even ``upper`` is not enough: widen
        high *= 2
        best = simulate(arrivals, job_s, fixed=high)
    while low < high:
        mid = (low + high) // 2
        run = simulate(arrivals, job_s, fixed=mid)
        if run.summary()["latency_p99_s"] <= p99_s:
            high, best = mid, run
        else:
            low = mid + 1
    return high, best


def compare(arrivals: list[float], job_cost_s: float, rule: KedaRule) -> dict:
    job_s = [job_cost_s] * len(arrivals)
    auto = simulate(arrivals, job_s, rule=rule)
    hours = auto.end_s / 3600
    same_cost = max(1, round(auto.worker_s / auto.end_s))
    fixed = simulate(arrivals, job_s, fixed=same_cost)
    p99 = auto.summary()["latency_p99_s"]
    matching, matched = smallest_matching_fleet(arrivals, job_s, p99, upper=max(rule.max_replicas, same_cost))
    result = {
        "jobs": len(arrivals),
        "simulated_hours": round(hours, 2),
        "autoscaled": auto.summary(),
        "fixed_same_cost": {"workers": same_cost, **fixed.summary()},
        "fixed_matching_p99": {"workers": matching, **matched.summary()},
    }
    result["worker_hours_saved_vs_matching_fleet"] = round(
        1 - result["autoscaled"]["worker_hours"] / result["fixed_matching_p99"]["worker_hours"], 3
    )
    result["_runs"] = {
        "autoscaled": auto,
        f"{same_cost} fixed workers (same cost)": fixed,
        f"{matching} fixed workers (p99 <= autoscaled)": matched,
    }
    return result


def plot(path: Path, title: str, runs: dict[str, Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    for label, run in runs.items():
        hours = [row[0] / 3600 for row in run.series]
        axes[0].plot(hours, [row[1] for row in run.series], label=label)
        axes[1].step(hours, [row[2] for row in run.series], where="post", label=label)
        axes[2].scatter([a / 3600 for a, _ in run.latencies], [lat / 60 for _, lat in run.latencies], s=4, label=label)
    axes[0].set_ylabel("queued jobs")
    axes[1].set_ylabel("worker pods")
    axes[2].set_ylabel("job latency (min)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("hours (latency plotted at the job's arrival)")
    axes[0].set_title(title)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from models.errors import UserError

    if args.clip_s <= 0 or args.clips < 1 or args.list_length < 1 or not 0 <= args.min_replicas <= args.max_replicas:
        raise UserError("need --clip-s > 0, --clips >= 1, --list-length >= 1, 0 <= --min-replicas <= --max-replicas")
    if args.min_replicas == 0:
        raise UserError("--min-replicas 0 is not simulated (the API's /readyz needs a live worker; see docs/deploy.md)")
    rule = _rule(args)
    job_cost_s = args.clip_s * args.clips
    traces = {
        "day": lambda: day_trace(job_cost_s, args.trough_workers, args.peak_workers, args.seed),
        "burst": lambda: burst_trace(job_cost_s, args.base_workers, args.burst_jobs, args.seed),
    }
    report: dict = {"benchmark": "autoscale", "job_s": job_cost_s, "rule": rule.__dict__, "traces": {}}
    for name in ("day", "burst") if args.trace == "both" else (args.trace,):
        result = compare(traces[name](), job_cost_s, rule)
        runs = result.pop("_runs")
        report["traces"][name] = result
        if args.png:
            path = args.png / f"autoscale-{name}.png"
            plot(path, f"{name} trace, {job_cost_s:.0f} s per job: autoscaled (KEDA rule) vs fixed fleets", runs)
            log.info("wrote %s", path)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0
