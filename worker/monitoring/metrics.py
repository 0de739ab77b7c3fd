"""Worker-side metrics, aggregated in Redis so one scrape of the API covers every worker process.

Workers are many short-lived-or-not processes without a port of their own; they add to shared
counters and fixed-bucket histograms in Redis, and ``service.metrics`` turns those into the
Prometheus families of the design (``motionguard_jobs_finished_total``, ``motionguard_job_seconds``,
``motionguard_mc_loss``, ``motionguard_suspected_attacks_total``, ``motionguard_clips_total{decision}``,
``motionguard_defence_steps_total``, the MC-loss drift window).
Torch-free: the API imports the bucket definitions and key names from here.

Every figure is kept per bundle (``model``/``version`` labels): counters and histograms under keys
that end in the bundle's name and version, listed in the ``metrics:bundles`` set; each clip's MC loss
and suspected flag go to the bundle's drift window (``worker.monitoring.drift.DriftWindow``, with the bundle's
clean calibration published next to it), from which the API computes ``motionguard_mc_loss_drift``.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Iterable
from typing import Any

from redis import Redis

from worker.monitoring import flag_metrics
from worker.settings import Settings

log = logging.getLogger(__name__)

SECONDS_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
MC_LOSS_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
STAGES = ("queue", "decode", "defense", "classify", "encode", "total")
#: What the defence did with a clip (``Pipeline.predict``): ``motionguard_clips_total{decision}``.
DECISIONS = ("purified", "stopped_early", "skipped", "off")

COUNTERS_KEY = "metrics:counters"
BUNDLES_KEY = "metrics:bundles"
DRIFT_KEY = "drift"


def hist_key(settings: Settings, name: str, label: str, model: str = "", version: str = "") -> str:
    return settings.key("metrics", "hist", name, label, model, version)


def counters_key(settings: Settings, model: str = "", version: str = "") -> str:
    return settings.key(COUNTERS_KEY, model, version)


def bundles(connection: Redis, settings: Settings) -> list[tuple[str, str]]:
    """The (model, version) pairs some worker has recorded metrics for."""
    out = set()
    for raw in connection.smembers(settings.key(BUNDLES_KEY)):
        try:
            model, version = json.loads(raw)
            out.add((str(model), str(version)))
        except (ValueError, TypeError):
            continue
    return sorted(out)


def drift_prefix(settings: Settings) -> str:
    return settings.key(DRIFT_KEY)


_served: dict[str, Any] = {}


def serve(name: str, version: str, calibration: Any) -> None:
    """Name the bundle this process serves: the default labels of every ``record_job`` from now on.

    Called by the worker's runtime (``worker.serving.runtime``) when its bundle is loaded, so this
    module never imports the serving side (the API process imports it too).
    """
    _served.update(name=name, version=version, calibration=calibration)


def _served_bundle() -> tuple[str, str, Any]:
    """(name, version, calibration) of the bundle this worker process has loaded, else ("", "", None)."""
    return _served.get("name", ""), _served.get("version", ""), _served.get("calibration")


def _observe(
    pipe,
    settings: Settings,
    name: str,
    label: str,
    buckets: tuple[float, ...],
    values: Iterable[float],
    model: str = "",
    version: str = "",
):
    key = hist_key(settings, name, label, model, version)
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
    *,
    model: str | None = None,
    version: str | None = None,
    calibration: Any = None,
    decisions: Iterable[str] = (),
    defence_steps: int = 0,
    attack_scores: list[float | None] | None = None,
    signals: list[dict[str, float]] | None = None,
    suspected_flags: list[bool] | None = None,
    flag: Any = None,
) -> None:
    """Add one ended job to the shared metrics; never fails the job if Redis hiccups.

    ``model``/``version``/``calibration`` default to the bundle this worker process serves.
    ``decisions`` (one per clip) and ``defence_steps`` (their sum) feed
    ``motionguard_clips_total{decision}`` and ``motionguard_defence_steps_total``. ``attack_scores``,
    ``signals`` and ``suspected_flags`` (one per clip) feed the attack flag's histograms, the drift
    windows' suspected share and the attack-score drift window (``worker.monitoring.flag_metrics``);
    ``flag`` is the bundle's flag calibration (its clean scores: the drift reference).
    """
    if model is None:
        model, version, calibration = _served_bundle()
    version = version or ""
    try:
        with connection.pipeline(transaction=False) as pipe:
            pipe.sadd(settings.key(BUNDLES_KEY), json.dumps([model, version]))
            pipe.hincrby(counters_key(settings, model, version), f"jobs_finished:{status}", 1)
            for stage, seconds in (stage_seconds or {}).items():
                _observe(pipe, settings, "job_seconds", stage, SECONDS_BUCKETS, [seconds], model, version)
            _observe(pipe, settings, "mc_loss", "before", MC_LOSS_BUCKETS, mc_before or [], model, version)
            _observe(pipe, settings, "mc_loss", "after", MC_LOSS_BUCKETS, mc_after or [], model, version)
            if suspected:
                pipe.hincrby(counters_key(settings, model, version), "suspected_attacks", suspected)
            for decision in decisions:
                pipe.hincrby(counters_key(settings, model, version), f"clips:{decision}", 1)
            if defence_steps:
                pipe.hincrby(counters_key(settings, model, version), "defence_steps", int(defence_steps))
            if attack_scores is not None or signals is not None:

                def observe(p, name, label, buckets, values):
                    _observe(p, settings, name, label, buckets, values, model, version)

                flag_metrics.observe_flags(pipe, observe, attack_scores or [], signals or [])
            pipe.execute()
        if mc_before and model:
            from worker.monitoring.drift import DriftWindow

            window = DriftWindow(connection, model, version, settings.drift_window, prefix=drift_prefix(settings))
            threshold = getattr(calibration, "threshold", None)
            window.publish_calibration(calibration)
            flags = suspected_flags or [threshold is not None and float(v) > threshold for v in mc_before]
            window.record_many((float(v), bool(f)) for v, f in zip(mc_before, flags, strict=False))
            if attack_scores and flag is not None:
                flag_metrics.record_score_drift(
                    connection,
                    drift_prefix(settings),
                    model,
                    version,
                    settings.drift_window,
                    flag,
                    zip(attack_scores, flags, strict=False),
                )
    except Exception:  # noqa: BLE001 - metrics must never fail a job
        log.warning("could not record job metrics", exc_info=True)
