"""The API's Prometheus metrics: its own counters, plus the workers' aggregates read from Redis.

One registry per process (``REGISTRY``); ``/metrics`` serves it. Names follow the design. Worker
figures carry the ``model``/``version`` of the bundle the worker ran; live workers come from their
heartbeats; the drift gauges (KS distance of each bundle's recent window against its clean
calibration) come from ``worker.monitoring.drift``.
"""

from __future__ import annotations

import logging
from collections import Counter as Counter_

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from worker.liveness import live_workers
from worker.monitoring import flag_metrics
from worker.monitoring import metrics as worker_metrics
from worker.monitoring.drift import drift_families
from worker.queueing import queue_depths
from worker.repository import Repository

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

SUBMITTED = Counter(
    "motionguard_jobs_submitted_total", "jobs accepted by POST /classify", ["model", "version"], registry=REGISTRY
)
REJECTED = Counter("motionguard_requests_rejected_total", "requests refused, by reason", ["reason"], registry=REGISTRY)
MODEL_INFO = Gauge("motionguard_model_info", "the bundle this service serves", ["name", "version"], registry=REGISTRY)


class RedisAggregates:
    """Collector for what the workers record in Redis (``worker.monitoring.metrics``) and the queue depth."""

    def __init__(self, app_state):
        self.state = app_state

    def _hist(
        self, connection, settings, name: str, label_name: str | None, buckets, doc: str, bundles, labels=None
    ) -> HistogramMetricFamily:
        """One histogram family; ``label_name`` None: a single series per bundle (stored under ``labels[0]``)."""
        names = [label_name, "model", "version"] if label_name else ["model", "version"]
        family = HistogramMetricFamily(f"motionguard_{name}", doc, labels=names)
        labels = labels or (worker_metrics.STAGES if name == "job_seconds" else ("before", "after"))
        for model, version in bundles:
            for label in labels:
                raw = connection.hgetall(worker_metrics.hist_key(settings, name, label, model, version))
                data = {k.decode(): float(v) for k, v in raw.items()}
                cumulative, points = 0.0, []
                for bound in buckets:
                    cumulative += data.get(repr(bound), 0.0)
                    points.append((repr(bound), cumulative))
                cumulative += data.get("inf", 0.0)
                points.append(("+Inf", cumulative))
                if label_name is None and not data:
                    continue  # a bundle without this figure (a flag-less bundle's score) shows no series
                family.add_metric(([label] if label_name else []) + [model, version], points, data.get("sum", 0.0))
        return family

    def _models(self, settings) -> list[str]:
        """The served models' names (the app's repository; read from disk when there is none)."""
        repository = getattr(self.state, "repository", None) or Repository.scan(settings)
        return sorted({entry.name for entry in repository.served})

    def collect(self):
        connection, settings = getattr(self.state, "redis", None), getattr(self.state, "settings", None)
        if connection is None or settings is None:
            return
        try:
            bundles = worker_metrics.bundles(connection, settings)
            labels = ["model", "version"]
            finished = CounterMetricFamily(
                "motionguard_jobs_finished", "jobs ended, by status", labels=["status", *labels]
            )
            suspected = CounterMetricFamily(
                "motionguard_suspected_attacks", "clips flagged as suspected attacks", labels=labels
            )
            clips = CounterMetricFamily(
                "motionguard_clips",
                "clips analysed, by what the defence did (purified, stopped_early, skipped by defend=auto, off)",
                labels=["decision", *labels],
            )
            steps = CounterMetricFamily(
                "motionguard_defence_steps", "purification steps spent (forward + backward each)", labels=labels
            )
            for model, version in bundles:
                counters = {
                    k.decode(): float(v)
                    for k, v in connection.hgetall(worker_metrics.counters_key(settings, model, version)).items()
                }
                for status in ("finished", "failed", "canceled"):
                    finished.add_metric([status, model, version], counters.get(f"jobs_finished:{status}", 0.0))
                suspected.add_metric([model, version], counters.get("suspected_attacks", 0.0))
                for decision in worker_metrics.DECISIONS:
                    clips.add_metric([decision, model, version], counters.get(f"clips:{decision}", 0.0))
                steps.add_metric([model, version], counters.get("defence_steps", 0.0))
            depth = GaugeMetricFamily(
                "motionguard_queue_depth", "jobs waiting, per model (its queue and its pinned queues)", labels=["model"]
            )
            for model, count in queue_depths(connection, settings, self._models(settings)).items():
                depth.add_metric([model], float(count))
            live = GaugeMetricFamily(
                "motionguard_workers", "live workers (heartbeat in Redis)", labels=[*labels, "device"]
            )
            counts = Counter_(
                (str(w.get("bundle", "")), str(w.get("version", "")), str(w.get("device", "")))
                for w in live_workers(connection, settings)
            )
            for key, count in sorted(counts.items()):
                live.add_metric(list(key), float(count))
            families = [
                finished,
                suspected,
                clips,
                steps,
                depth,
                live,
                self._hist(
                    connection,
                    settings,
                    "job_seconds",
                    "stage",
                    worker_metrics.SECONDS_BUCKETS,
                    "job time per stage",
                    bundles,
                ),
                self._hist(
                    connection,
                    settings,
                    "mc_loss",
                    "phase",
                    worker_metrics.MC_LOSS_BUCKETS,
                    "per-clip MC loss",
                    bundles,
                ),
                *drift_families(connection, worker_metrics.drift_prefix(settings)),
                self._hist(
                    connection,
                    settings,
                    "attack_signal",
                    "signal",
                    flag_metrics.SIGNAL_BUCKETS,
                    "per-clip value of each signal of the attack flag",
                    bundles,
                    flag_metrics.SIGNAL_NAMES,
                ),
                self._hist(
                    connection,
                    settings,
                    "attack_score",
                    None,
                    flag_metrics.SCORE_BUCKETS,
                    "per-clip attack score over the flag threshold (> 1: suspected attack)",
                    bundles,
                    ("score",),
                ),
                *drift_families(
                    connection,
                    flag_metrics.score_drift_prefix(worker_metrics.drift_prefix(settings)),
                    metric="attack_score",
                ),
            ]
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is away
            log.warning("could not read worker metrics from Redis", exc_info=True)
            return
        yield from families


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
