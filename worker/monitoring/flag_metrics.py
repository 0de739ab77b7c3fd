"""The attack flag's metrics (issue 24): per-signal histograms, the combined score, and its drift.

Workers add each clip's flag signals to ``motionguard_attack_signal{signal}`` and its score to
``motionguard_attack_score`` (fixed-bucket histograms in Redis, like ``worker.monitoring.metrics``),
and push the score into a second drift window per bundle (``worker.monitoring.drift.DriftWindow``
under its own key prefix) whose clean reference is the score of the bundle's calibration clips; the
API exports its KS distance as ``motionguard_attack_score_drift``. The score's scale is the same for
every bundle (1 = the flag's threshold), so one set of buckets and one alert fit all.

Torch-free: the API process imports the names and buckets from here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

#: The flag's signals (``models.defense.flag.SIGNALS``; a test keeps the two in step).
SIGNAL_NAMES: tuple[str, ...] = ("mc", "mc_multi", "updates", "noise", "margin", "purify_change")
#: Signal values span MC losses (~0.01) to probability distances (0..1): log-spaced buckets.
SIGNAL_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0)
#: The combined score over its threshold: > 1 is a suspected attack.
SCORE_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
SCORE_DRIFT_SUFFIX = "score"


def score_drift_prefix(drift_prefix: str) -> str:
    """Key prefix of the attack-score drift windows (beside the MC-loss ones)."""
    return f"{drift_prefix}:{SCORE_DRIFT_SUFFIX}"


def score_reference(flag: Mapping | object | None) -> list[float]:
    """The clean scores of the bundle's flag calibration (``FlagCalibration.score_sample``), on the
    served scale; [] for a bundle without a flag."""
    if flag is None:
        return []
    data = flag if isinstance(flag, Mapping) else flag.model_dump()
    return [float(v) for v in data.get("score_sample") or [] if math.isfinite(float(v))]


def observe_flags(
    pipe,
    observe,
    scores: Sequence[float | None],
    signals: Sequence[Mapping[str, float]],
) -> None:
    """Add clips' flag figures to a Redis pipeline; ``observe(pipe, name, label, buckets, values)`` is
    the histogram writer of ``worker.monitoring.metrics``."""
    observe(pipe, "attack_score", "score", SCORE_BUCKETS, [s for s in scores if s is not None and math.isfinite(s)])
    by_signal: dict[str, list[float]] = {}
    for clip in signals:
        for name, value in clip.items():
            if name in SIGNAL_NAMES and math.isfinite(float(value)):
                by_signal.setdefault(name, []).append(float(value))
    for name, values in by_signal.items():
        observe(pipe, "attack_signal", name, SIGNAL_BUCKETS, values)


def record_score_drift(
    connection, drift_prefix: str, model: str, version: str, size: int, flag, entries: Iterable[tuple[float, bool]]
) -> None:
    """Push (score, suspected) of clips into the bundle's attack-score drift window."""
    from worker.monitoring.drift import DriftWindow

    entries = [(float(s), bool(f)) for s, f in entries if s is not None and math.isfinite(float(s))]
    if not entries or not model:
        return
    window = DriftWindow(connection, model, version, size, prefix=score_drift_prefix(drift_prefix))
    window.publish_calibration({"sample": score_reference(flag), "threshold": 1.0})
    window.record_many(entries)
