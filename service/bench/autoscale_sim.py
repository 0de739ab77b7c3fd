"""A second-by-second simulation of model workers under KEDA's redis-list rule, or a fixed fleet.

Pure Python (no torch, no cluster): it answers "how many workers does this traffic need, and what
would queue-driven autoscaling do" before a cluster exists. The rule is the one the ScaledObject in
docker/k8s deploys (``KedaRule``'s defaults are that object's values; tests/test_k8s.py checks it):

- every ``polling_s`` the metric is LLEN of the RQ queue: waiting jobs only, running ones are not
  in that list; desired = ceil(metric / list_length), unchanged within the HPA's 10 % tolerance,
  bounded by min/max replicas;
- scale-up is immediate but at most ``scale_up_pods`` per ``scale_up_period_s``; scale-down takes
  the highest recommendation of the last ``scale_down_window_s`` (HPA stabilisation) and removes at
  most ``scale_down_pods`` per ``scale_down_period_s``;
- a new pod serves after ``startup_s`` (scheduling, image pull, bundle load) and costs from its
  creation; a removed pod is the newest one (the ReplicaSet's choice: not-ready first, then the most
  recently ready); a busy one finishes its job first (warm shutdown) and costs until then.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KedaRule:
    list_length: int = 1
    min_replicas: int = 1
    max_replicas: int = 8
    polling_s: int = 15
    scale_up_pods: int = 4
    scale_up_period_s: int = 15
    scale_down_window_s: int = 300
    scale_down_pods: int = 1
    scale_down_period_s: int = 60
    tolerance: float = 0.1
    startup_s: float = 90.0
    count_running: bool = False  # True: the metric is waiting + running jobs (not the redis-list scaler)


@dataclass
class Pod:
    created: float
    ready_at: float
    busy_until: float = 0.0
    leaving: bool = False

    def busy(self, now: float) -> bool:
        return self.busy_until > now


@dataclass
class Run:
    """What one simulated run measured; ``series`` rows are (t_s, queued, pods, ready pods)."""

    latencies: list[tuple[float, float]] = field(default_factory=list)  # (arrival_s, latency_s)
    series: list[tuple[float, int, int, int]] = field(default_factory=list)
    worker_s: float = 0.0
    queue_peak: int = 0
    pods_peak: int = 0
    end_s: float = 0.0

    def summary(self) -> dict:
        values = sorted(latency for _, latency in self.latencies)
        return {
            "jobs": len(values),
            "latency_p50_s": round(percentile(values, 50), 1),
            "latency_p99_s": round(percentile(values, 99), 1),
            "latency_max_s": round(values[-1], 1) if values else 0.0,
            "worker_hours": round(self.worker_s / 3600, 2),
            "queue_peak": self.queue_peak,
            "pods_peak": self.pods_peak,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (the value that q % of the jobs did not exceed)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def simulate(
    arrivals: list[float],
    job_s: list[float],
    *,
    rule: KedaRule | None = None,
    fixed: int = 0,
    sample_s: int = 60,
    drain_limit_s: float = 7 * 24 * 3600,
) -> Run:
    """Run the trace (sorted arrival times, each job's compute seconds) to the last job's end."""
    if rule is None and fixed < 1:
        raise ValueError("a fixed fleet needs at least one worker")
    run = Run()
    pods = [Pod(created=0.0, ready_at=0.0) for _ in range(rule.min_replicas if rule else fixed)]
    queue: deque[int] = deque()
    history: deque[tuple[int, int]] = deque()  # (t, recommendation) for the scale-down window
    added: deque[int] = deque()  # creation times, for the scale-up rate limit
    removed: deque[int] = deque()
    next_job, t = 0, 0
    while next_job < len(arrivals) or queue or any(p.busy(t) for p in pods):
        if t > drain_limit_s + (arrivals[-1] if arrivals else 0):
            raise RuntimeError("the trace did not drain: the fleet is too small for it")
        while next_job < len(arrivals) and arrivals[next_job] <= t:
            queue.append(next_job)
            next_job += 1
        pods = [p for p in pods if not (p.leaving and not p.busy(t))]  # warm shutdown done
        for pod in pods:
            if queue and not pod.leaving and pod.ready_at <= t and not pod.busy(t):
                job = queue.popleft()
                pod.busy_until = t + job_s[job]
                run.latencies.append((arrivals[job], pod.busy_until - arrivals[job]))
        if rule and t % rule.polling_s == 0:
            _autoscale(rule, t, pods, len(queue), history, added, removed)
        run.worker_s += len(pods)
        run.queue_peak = max(run.queue_peak, len(queue))
        run.pods_peak = max(run.pods_peak, len(pods))
        if t % sample_s == 0:
            ready = sum(1 for p in pods if p.ready_at <= t and not p.leaving)
            run.series.append((t, len(queue), len(pods), ready))
        t += 1
    run.end_s = t
    return run


def _autoscale(rule: KedaRule, t: int, pods: list[Pod], queued: int, history, added, removed) -> None:
    current = [p for p in pods if not p.leaving]
    metric = queued + (sum(1 for p in current if p.busy(t)) if rule.count_running else 0)
    want = math.ceil(metric / rule.list_length)
    if current and abs(metric / (rule.list_length * len(current)) - 1) <= rule.tolerance:
        want = len(current)  # the HPA ignores changes within its tolerance
    want = min(rule.max_replicas, max(rule.min_replicas, want))
    history.append((t, want))
    while history and history[0][0] <= t - rule.scale_down_window_s:
        history.popleft()
    if want < len(current):
        want = max(w for _, w in history)  # scale down only as far as the window's highest wish
    for window, period in ((added, rule.scale_up_period_s), (removed, rule.scale_down_period_s)):
        while window and window[0] <= t - period:
            window.popleft()
    if want > len(current):
        for _ in range(min(want - len(current), rule.scale_up_pods - len(added))):
            pods.append(Pod(created=t, ready_at=t + rule.startup_s))
            added.append(t)
    elif want < len(current):
        victims = sorted(current, key=lambda p: (p.ready_at <= t, -p.ready_at))  # not ready, then newest
        for pod in victims[: min(len(current) - want, rule.scale_down_pods - len(removed))]:
            pod.leaving = True
            removed.append(t)
            if not pod.busy(t):
                pods.remove(pod)


# --------------------------------------------------------------------------------- traces


def poisson_arrivals(rate_per_s, horizon_s: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process whose rate varies with time (thinning)."""
    rng = random.Random(seed)
    peak = max(rate_per_s(s) for s in range(0, int(horizon_s) + 1, 60)) or 1e-9
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= horizon_s:
            return out
        if rng.random() * peak <= rate_per_s(t):
            out.append(t)


def day_trace(job_s: float, trough_workers: float, peak_workers: float, seed: int) -> list[float]:
    """24 h of arrivals: the load (in busy workers) runs from ``trough`` at 03:00 to ``peak`` at 15:00."""

    def rate(t: float) -> float:
        shape = (1 - math.cos(2 * math.pi * (t / 3600 - 3) / 24)) / 2
        return (trough_workers + (peak_workers - trough_workers) * shape) / job_s

    return poisson_arrivals(rate, 24 * 3600, seed)


def burst_trace(job_s: float, base_workers: float, burst_jobs: int, seed: int) -> list[float]:
    """2 h of background load, and ``burst_jobs`` uploads within one minute at 00:30."""
    rng = random.Random(seed + 1)
    background = poisson_arrivals(lambda t: base_workers / job_s, 2 * 3600, seed)
    return sorted(background + [1800 + rng.uniform(0, 60) for _ in range(burst_jobs)])
