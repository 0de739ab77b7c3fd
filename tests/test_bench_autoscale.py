"""The autoscaling simulation (service/bench/autoscale_sim.py) follows KEDA's rule, and the bench command
writes its report and pictures. Pure Python: no Redis, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from service.bench.autoscale_sim import KedaRule, burst_trace, day_trace, simulate

ROOT = Path(__file__).resolve().parents[1]
RULE = KedaRule(list_length=2, startup_s=30.0)


def test_fixed_worker_serves_jobs_back_to_back():
    run = simulate([0, 10, 20], [100, 100, 100], fixed=1)
    assert [lat for _, lat in run.latencies] == [100, 190, 280]
    assert run.queue_peak == 2 and run.end_s == 300 and run.worker_s == 300


def test_burst_scales_to_ceil_queue_over_list_length_within_max():
    run = simulate([0.0] * 7, [600.0] * 7, rule=RULE)  # 1 pod takes one job, 6 wait: ceil(6 / 2) = 3 pods
    assert run.pods_peak == 3
    many = simulate([0.0] * 40, [600.0] * 40, rule=RULE)
    assert many.pods_peak == RULE.max_replicas  # ceil(39 / 2) = 20, bounded by maxReplicaCount
    assert len(many.latencies) == 40  # warm shutdown: every job finishes, also on pods being removed


def test_new_pods_serve_only_after_start_up():
    run = simulate([0.0, 0.0, 0.0], [1000.0] * 3, rule=replace(RULE, list_length=1))
    starts = sorted(arrival + latency - 1000.0 for arrival, latency in run.latencies)
    assert starts[0] == 0 and all(start >= RULE.startup_s for start in starts[1:])


def test_scale_up_is_rate_limited():
    run = simulate([0.0] * 100, [100.0] * 100, rule=replace(RULE, max_replicas=50, polling_s=5))
    first = [pods for t, _, pods, _ in run.series if t == 0]
    assert first == [1 + RULE.scale_up_pods]  # at most 4 pods per 15 s window, even with 99 queued


def test_scale_down_waits_for_the_stabilisation_window():
    rule = replace(RULE, scale_down_window_s=600, list_length=1)
    run = simulate([0.0] * 5 + [3000.0], [60.0] * 6, rule=rule, sample_s=1)
    busy_until = max(arrival + latency for arrival, latency in run.latencies[:5])
    pods_after = {t: pods for t, _, pods, _ in run.series}
    assert pods_after[int(busy_until) + 10] > 1  # queue empty, but the window still holds the high wish
    assert pods_after[600 + 60 * 4 + 30] == 1  # then one pod per minute goes, down to minReplicaCount


def test_running_jobs_are_invisible_to_the_list_metric():
    """Four jobs on four pods, none waiting: the redis-list rule wants 1 pod, a running-aware one keeps 4."""
    rule = replace(RULE, list_length=1, scale_down_window_s=60)
    arrivals, cost = [0.0] * 4, [2000.0] * 4
    listed = simulate(arrivals, cost, rule=rule, sample_s=1)
    running = simulate(arrivals, cost, rule=replace(rule, count_running=True), sample_s=1)
    ready = lambda run, t: next(r for s, _, _, r in run.series if s == t)  # noqa: E731
    assert ready(listed, 1000) == 1 and ready(running, 1000) == 4
    assert len(listed.latencies) == 4  # the removed pods finished their jobs first (warm shutdown)


def test_traces_have_the_promised_shape():
    day = day_trace(300.0, 0.5, 6.0, seed=1)
    per_hour = [sum(1 for a in day if h * 3600 <= a < (h + 1) * 3600) for h in range(24)]
    assert max(range(24), key=per_hour.__getitem__) in range(12, 19) and per_hour[3] < per_hour[15] / 4
    burst = burst_trace(300.0, 1.0, 40, seed=1)
    assert sum(1 for a in burst if 1800 <= a <= 1860) >= 40 and burst == sorted(burst)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "autoscale", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bench_command_reports_and_draws(tmp_path):
    out = cli("--trace", "burst", "--burst-jobs", "20", "--png", str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["traces"]["burst"]
    for fleet in ("autoscaled", "fixed_same_cost", "fixed_matching_p99"):
        assert report[fleet]["jobs"] == report["jobs"] and report[fleet]["worker_hours"] > 0
    assert report["fixed_matching_p99"]["latency_p99_s"] <= report["autoscaled"]["latency_p99_s"]
    png = tmp_path / "autoscale-burst.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bad", [["--clips", "0"], ["--min-replicas", "5", "--max-replicas", "2"]])
def test_bench_command_refuses_bad_input_in_one_line(bad):
    out = cli(*bad)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("motionguard: error:")
