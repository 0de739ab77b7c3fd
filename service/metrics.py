"""The API's Prometheus metrics: its own counters, plus the workers' aggregates read from Redis.

One registry per process (``REGISTRY``); ``/metrics`` serves it. Names follow the design.
"""

from __future__ import annotations

import logging
import math
import statistics

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from worker import metrics as worker_metrics

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

SUBMITTED = Counter("motionguard_jobs_submitted_total", "jobs accepted by POST /classify", registry=REGISTRY)
REJECTED = Counter("motionguard_requests_rejected_total", "requests refused, by reason", ["reason"], registry=REGISTRY)
MODEL_INFO = Gauge("motionguard_model_info", "the bundle this service serves", ["name", "version"], registry=REGISTRY)


class RedisAggregates:
    """Collector for what the workers record in Redis (``worker.metrics``) and the queue depth."""

    def __init__(self, app_state):
        self.state = app_state

    def _hist(self, connection, settings, name: str, label_name: str, buckets, doc: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(f"motionguard_{name}", doc, labels=[label_name])
        labels = worker_metrics.STAGES if name == "job_seconds" else ("before", "after")
        for label in labels:
            raw = connection.hgetall(worker_metrics.hist_key(settings, name, label))
            data = {k.decode(): float(v) for k, v in raw.items()}
            cumulative, points = 0.0, []
            for bound in buckets:
                cumulative += data.get(repr(bound), 0.0)
                points.append((repr(bound), cumulative))
            cumulative += data.get("inf", 0.0)
            points.append(("+Inf", cumulative))
            family.add_metric([label], points, data.get("sum", 0.0))
        return family

    def collect(self):
        connection, settings = getattr(self.state, "redis", None), getattr(self.state, "settings", None)
        if connection is None or settings is None:
            return
        try:
            counters = {
                k.decode(): float(v) for k, v in connection.hgetall(settings.key(worker_metrics.COUNTERS_KEY)).items()
            }
            finished = CounterMetricFamily("motionguard_jobs_finished", "jobs ended, by status", labels=["status"])
            for status in ("finished", "failed", "canceled"):
                finished.add_metric([status], counters.get(f"jobs_finished:{status}", 0.0))
            suspected = CounterMetricFamily("motionguard_suspected_attacks", "clips flagged as suspected attacks")
            suspected.add_metric([], counters.get("suspected_attacks", 0.0))
            depth = GaugeMetricFamily("motionguard_queue_depth", "jobs waiting in the queue")
            depth.add_metric([], float(connection.llen(f"rq:queue:{settings.queue_name}")))
            families = [
                finished,
                suspected,
                depth,
                self._hist(
                    connection, settings, "job_seconds", "stage", worker_metrics.SECONDS_BUCKETS, "job time per stage"
                ),
                self._hist(
                    connection, settings, "mc_loss", "phase", worker_metrics.MC_LOSS_BUCKETS, "per-clip MC loss"
                ),
            ]
            drift = self._drift(connection, settings)
            if drift is not None:
                gauge = GaugeMetricFamily(
                    "motionguard_mc_loss_drift",
                    "(mean recent MC loss before defence - clean calibration mean) / calibration std",
                )
                gauge.add_metric([], drift)
                families.append(gauge)
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is away
            log.warning("could not read worker metrics from Redis", exc_info=True)
            return
        yield from families

    def _drift(self, connection, settings) -> float | None:
        meta = getattr(self.state, "bundle_meta", None)
        calibration = getattr(meta, "calibration", None)
        if calibration is None:
            return None
        values = [float(v) for v in connection.lrange(settings.key(worker_metrics.MC_WINDOW_KEY), 0, -1)]
        if not values:
            return None
        std = calibration.std if calibration.std > 0 else 1.0
        drift = (statistics.fmean(values) - calibration.mean) / std
        return drift if math.isfinite(drift) else None


def install_collector(app_state) -> RedisAggregates:
    collector = RedisAggregates(app_state)
    try:
        REGISTRY.register(collector)
    except ValueError:  # already registered by an earlier app in this process (tests)
        for existing in list(REGISTRY._collector_to_names):
            if isinstance(existing, RedisAggregates):
                REGISTRY.unregister(existing)
        REGISTRY.register(collector)
    return collector
