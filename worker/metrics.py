"""Worker-side metrics, aggregated in Redis so one scrape of the API covers every worker process.

Workers are many short-lived-or-not processes without a port of their own; they add to shared
counters and fixed-bucket histograms in Redis, and ``service.metrics`` turns those into the
Prometheus families of the design (``motionguard_jobs_finished_total``, ``motionguard_job_seconds``,
``motionguard_mc_loss``, ``motionguard_suspected_attacks_total``, the MC-loss drift window).
Torch-free: the API imports the bucket definitions and key names from here.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable

from redis import Redis

from service.settings import Settings

log = logging.getLogger(__name__)

SECONDS_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
MC_LOSS_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
STAGES = ("queue", "decode", "defense", "classify", "encode", "total")

COUNTERS_KEY = "metrics:counters"
MC_WINDOW_KEY = "metrics:mc_window"


def hist_key(settings: Settings, name: str, label: str) -> str:
    return settings.key("metrics", "hist", name, label)


def _observe(pipe, settings: Settings, name: str, label: str, buckets: tuple[float, ...], values: Iterable[float]):
    key = hist_key(settings, name, label)
    for value in values:
        index = bisect.bisect_left(buckets, value)
        pipe.hincrby(key, "inf" if index == len(buckets) else repr(buckets[index]), 1)
        pipe.hincrbyfloat(key, "sum", float(value))
        pipe.hincrby(key, "count", 1)


def record_job(
    connection: Redis,
    settings: Settings,
    status: str,
    stage_seconds: dict[str, float] | None = None,
    mc_before: list[float] | None = None,
    mc_after: list[float] | None = None,
    suspected: int = 0,
) -> None:
    """Add one ended job to the shared metrics; never fails the job if Redis hiccups."""
    try:
        with connection.pipeline(transaction=False) as pipe:
            pipe.hincrby(settings.key(COUNTERS_KEY), f"jobs_finished:{status}", 1)
            for stage, seconds in (stage_seconds or {}).items():
                _observe(pipe, settings, "job_seconds", stage, SECONDS_BUCKETS, [seconds])
            _observe(pipe, settings, "mc_loss", "before", MC_LOSS_BUCKETS, mc_before or [])
            _observe(pipe, settings, "mc_loss", "after", MC_LOSS_BUCKETS, mc_after or [])
            if suspected:
                pipe.hincrby(settings.key(COUNTERS_KEY), "suspected_attacks", suspected)
            if mc_before:
                pipe.lpush(settings.key(MC_WINDOW_KEY), *[repr(float(v)) for v in mc_before])
                pipe.ltrim(settings.key(MC_WINDOW_KEY), 0, settings.drift_window - 1)
            pipe.execute()
    except Exception:  # noqa: BLE001 - metrics must never fail a job
        log.warning("could not record job metrics", exc_info=True)
