"""MC-loss drift: is the stream of recent clips still distributed like the bundle's clean calibration?

Attacked clips carry a much higher motion-consistency (MC) loss than clean ones (paper, Fig. 5).
Each clip's threshold test (``suspected_attack``) looks at one clip; this module looks at the
*distribution* of the last N clips, which also catches attacks too weak to cross the per-clip
threshold one by one, and a camera/codec change that moves every clip a little.

The statistic: two-sample Kolmogorov-Smirnov
--------------------------------------------
``D = sup_x |F_window(x) - F_clean(x)|``, where ``F_window`` is the empirical CDF of the window's MC
losses (before defence) and ``F_clean`` that of the clean values the bundle's calibration keeps
(``Calibration.sample``).  Why KS and not PSI or Wasserstein-1:

* **Bounded, in [0, 1]**: one alert threshold fits every bundle, model and resolution.  Wasserstein-1
  is in units of MC loss (its threshold would have to be re-chosen for each bundle); PSI is unbounded
  and needs a bin choice plus a smoothing constant for empty bins, which is exactly where attack
  traffic lands (above the top clean quantile).
* **Scale- and shift-free** (invariant to any monotone transform of the loss): changing the MC-loss
  weights, Lsim or lambda_smooth does not change what "0.4" means.
* **Readable**: when a share ``p`` of the window lies above every clean value (a burst of attacked
  clips), ``D >= p`` -- "at least 40 % of recent clips look unlike clean traffic" is ``D >= 0.4``.
* **A known null distribution**: with ``n`` window clips and ``m`` clean values, ``D`` of clean
  traffic exceeds ``c(alpha) * sqrt((n + m) / (n m))`` with probability ``alpha``
  (``c = 1.95`` for 0.001).  For the alert's minimum window (30 clips) against 200 clean values that
  is 0.38; the alert threshold 0.4 (``DRIFT_ALERT_THRESHOLD``) is above it, and larger windows only
  make clean traffic's ``D`` smaller.  :func:`ks_pvalue` gives the asymptotic p-value.

Where the window lives
----------------------
Workers run on several hosts, so no process sees every clip.  Each worker pushes ``(mc_loss,
suspected)`` of every clip it scores into one capped Redis list per bundle (``LPUSH`` + ``LTRIM`` in a
MULTI transaction; :class:`DriftWindow`), and publishes the bundle's calibration next to it.  Whoever
exports the gauges (the API's ``/metrics``, through :class:`DriftCollector`) reads the list at scrape
time, so the window holds the last N clips of *all* workers and there is one series per bundle, not
one per worker.  Redis keys expire after ``ttl_s`` without traffic, so a retired bundle's series go
away by themselves.

This module imports neither torch nor numpy: the API process (no torch in its image) uses it.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DRIFT_ALERT_THRESHOLD",
    "DRIFT_MIN_CLIPS",
    "DriftCollector",
    "DriftSnapshot",
    "DriftWindow",
    "calibration_reference",
    "drift_families",
    "drift_snapshot",
    "ks_pvalue",
    "ks_statistic",
    "psi",
    "suspected_share",
    "wasserstein1",
]

#: The alert threshold of ``motionguard_mc_loss_drift`` used by docker/prometheus/rules (keep in step).
DRIFT_ALERT_THRESHOLD = 0.4
#: Fewer clips than this in the window and the drift alert stays quiet (KS on tiny windows is noise).
DRIFT_MIN_CLIPS = 30
DEFAULT_WINDOW = 200
KEY_PREFIX = "motionguard:drift"


# ---------------------------------------------------------------------------------------------
# Pure statistics
# ---------------------------------------------------------------------------------------------


def _finite_sorted(values: Iterable[float]) -> list[float]:
    return sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))


def ks_statistic(window: Iterable[float], reference: Iterable[float]) -> float:
    """Two-sample Kolmogorov-Smirnov ``D`` in [0, 1] (ties handled exactly); NaN if either is empty."""
    a, b = _finite_sorted(window), _finite_sorted(reference)
    if not a or not b:
        return math.nan
    n, m = len(a), len(b)
    best = 0.0
    for x in a + b:  # the supremum is reached at a data point; evaluate both right-continuous CDFs there
        diff = abs(bisect.bisect_right(a, x) / n - bisect.bisect_right(b, x) / m)
        if diff > best:
            best = diff
    return best


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic p-value of a two-sample KS ``d`` (Kolmogorov distribution, Stephens' correction)."""
    if n <= 0 or m <= 0 or not math.isfinite(d):
        return math.nan
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = 2.0 * (-1) ** (j - 1) * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return min(1.0, max(0.0, total))


def wasserstein1(window: Iterable[float], reference: Iterable[float]) -> float:
    """Wasserstein-1 (earth mover's) distance between two empirical distributions, in loss units."""
    a, b = _finite_sorted(window), _finite_sorted(reference)
    if not a or not b:
        return math.nan
    n, m = len(a), len(b)
    points = sorted(set(a + b))
    total = 0.0
    for left, right in zip(points, points[1:], strict=False):
        fa = bisect.bisect_right(a, left) / n
        fb = bisect.bisect_right(b, left) / m
        total += abs(fa - fb) * (right - left)
    return total


def psi(window: Iterable[float], reference: Iterable[float], bins: int = 10, floor: float = 1e-4) -> float:
    """Population stability index over the reference's quantile bins (for comparison; unbounded)."""
    a, b = _finite_sorted(window), _finite_sorted(reference)
    if not a or not b:
        return math.nan
    edges = sorted({b[min(len(b) - 1, int(len(b) * k / bins))] for k in range(1, bins)})

    def shares(values: list[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for v in values:
            counts[bisect.bisect_right(edges, v)] += 1
        return [max(c / len(values), floor) for c in counts]

    return sum((p - q) * math.log(p / q) for p, q in zip(shares(a), shares(b), strict=True))


def suspected_share(flags: Iterable[bool]) -> float:
    """Share of suspected attacks in the window; NaN for an empty window."""
    flags = list(flags)
    return sum(1 for f in flags if f) / len(flags) if flags else math.nan


def calibration_reference(calibration, points: int = 200) -> list[float]:
    """The clean values to compare with: ``calibration.sample``, else a sample rebuilt from its quantiles.

    ``calibration`` is a ``models.bundle_meta.Calibration`` or its JSON dict.  Without a kept sample the
    quantiles (keys like ``"0.5"`` or ``"p50"``) are interpolated linearly into ``points`` values.
    """
    if calibration is None:
        return []
    data = calibration if isinstance(calibration, dict) else calibration.model_dump()
    sample = [float(v) for v in data.get("sample") or [] if math.isfinite(float(v))]
    if sample:
        return sample
    knots: list[tuple[float, float]] = []
    for key, value in (data.get("quantiles") or {}).items():
        text = str(key).lower().lstrip("pq")
        try:
            q = float(text)
        except ValueError:
            continue
        if q > 1:
            q /= 100.0
        knots.append((q, float(value)))
    knots.sort()
    if len(knots) < 2:
        return [float(data["mean"])] if "mean" in data else []
    out = []
    for i in range(points):
        q = (i + 0.5) / points
        q = min(max(q, knots[0][0]), knots[-1][0])
        j = max(1, bisect.bisect_left([k[0] for k in knots], q))
        (q0, v0), (q1, v1) = knots[j - 1], knots[min(j, len(knots) - 1)]
        out.append(v0 if q1 == q0 else v0 + (v1 - v0) * (q - q0) / (q1 - q0))
    return out


@dataclass(frozen=True)
class DriftSnapshot:
    """The window's drift figures: KS ``drift`` in [0, 1], ``suspected_share``, ``clips`` in the window."""

    drift: float
    suspected_share: float
    clips: int
    reference_size: int
    pvalue: float
    mean_mc_loss: float


def drift_snapshot(entries: Sequence[tuple[float, bool]], reference: Sequence[float]) -> DriftSnapshot:
    losses = [loss for loss, _ in entries if math.isfinite(loss)]
    d = ks_statistic(losses, reference)
    return DriftSnapshot(
        drift=d,
        suspected_share=suspected_share(flag for _, flag in entries),
        clips=len(entries),
        reference_size=len(reference),
        pvalue=ks_pvalue(d, len(losses), len(reference)),
        mean_mc_loss=sum(losses) / len(losses) if losses else math.nan,
    )


# ---------------------------------------------------------------------------------------------
# The Redis-backed window shared by all workers
# ---------------------------------------------------------------------------------------------


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DriftWindow:
    """The last ``size`` clips' ``(mc_loss_before, suspected)`` of one bundle, across every worker.

    ``redis`` is a ``redis.Redis`` client (``decode_responses`` either way).  Workers call
    :meth:`publish_calibration` once at start-up and :meth:`record` per clip; exporters call
    :meth:`snapshot`.
    """

    def __init__(
        self,
        redis,
        model: str,
        version: str,
        size: int = DEFAULT_WINDOW,
        *,
        prefix: str = KEY_PREFIX,
        ttl_s: int = 7 * 24 * 3600,
    ):
        if size < 1:
            raise ValueError("the drift window needs at least one clip")
        self.redis, self.model, self.version, self.size, self.ttl_s = redis, model, version, size, ttl_s
        self.prefix = prefix
        base = f"{prefix}:{model}:{version}"
        self.window_key, self.calibration_key = f"{base}:window", f"{base}:calibration"
        self.registry_key = f"{prefix}:bundles"

    @property
    def member(self) -> str:
        return json.dumps([self.model, self.version])

    def publish_calibration(self, calibration) -> None:
        """Store the clean reference for exporters (which may not have the bundle on disk)."""
        reference = calibration_reference(calibration)
        threshold = None
        if calibration is not None:
            data = calibration if isinstance(calibration, dict) else calibration.model_dump()
            threshold = data.get("threshold")
        payload = json.dumps({"reference": reference, "threshold": threshold, "window": self.size})
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.calibration_key, payload, ex=self.ttl_s)
        pipe.sadd(self.registry_key, self.member)
        pipe.execute()

    def record(self, mc_loss: float, suspected: bool) -> None:
        self.record_many([(mc_loss, suspected)])

    def record_many(self, entries: Iterable[tuple[float, bool]]) -> None:
        items = [json.dumps([float(loss), bool(flag), round(time.time(), 3)]) for loss, flag in entries]
        if not items:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(self.window_key, *items)
        pipe.ltrim(self.window_key, 0, self.size - 1)
        pipe.expire(self.window_key, self.ttl_s)
        pipe.expire(self.calibration_key, self.ttl_s)
        pipe.sadd(self.registry_key, self.member)
        pipe.execute()

    def entries(self) -> list[tuple[float, bool]]:
        out = []
        for raw in self.redis.lrange(self.window_key, 0, self.size - 1):
            try:
                loss, flag, *_ = json.loads(_text(raw))
                out.append((float(loss), bool(flag)))
            except (ValueError, TypeError):
                continue
        return out

    def reference(self) -> list[float]:
        raw = self.redis.get(self.calibration_key)
        if raw is None:
            return []
        try:
            return [float(v) for v in json.loads(_text(raw)).get("reference") or []]
        except (ValueError, TypeError, AttributeError):
            return []

    def snapshot(self, reference: Sequence[float] | None = None) -> DriftSnapshot:
        return drift_snapshot(self.entries(), self.reference() if reference is None else reference)

    def clear(self) -> None:
        self.redis.delete(self.window_key)

    @classmethod
    def known(cls, redis, prefix: str = KEY_PREFIX, size: int = DEFAULT_WINDOW) -> list[DriftWindow]:
        """Every bundle some worker has published to this Redis (stale ones are pruned)."""
        windows = []
        for raw in redis.smembers(f"{prefix}:bundles"):
            try:
                model, version = json.loads(_text(raw))
            except (ValueError, TypeError):
                redis.srem(f"{prefix}:bundles", raw)
                continue
            window = cls(redis, model, version, size, prefix=prefix)
            if not redis.exists(window.window_key, window.calibration_key):
                redis.srem(f"{prefix}:bundles", raw)
                continue
            raw_cal = redis.get(window.calibration_key)
            if raw_cal is not None:
                try:
                    window.size = int(json.loads(_text(raw_cal)).get("window") or size)
                except (ValueError, TypeError, AttributeError):
                    pass
            windows.append(window)
        return sorted(windows, key=lambda w: (w.model, w.version))


def drift_families(redis, prefix: str = KEY_PREFIX, metric: str = "mc_loss") -> list:
    """The drift gauges of every bundle's window, as ``prometheus_client`` metric families.

    ``motionguard_<metric>_drift``, ``motionguard_<metric>_suspected_share`` and
    ``motionguard_<metric>_drift_window_clips``, labelled ``model`` and ``version``; ``metric`` is
    ``mc_loss`` (the MC loss before defence) or ``attack_score`` (the multi-signal flag's score, its
    windows under their own ``prefix``).  Raises on Redis errors (the caller decides; a scrape should
    usually go on without these series).
    """
    from prometheus_client.core import GaugeMetricFamily

    labels = ["model", "version"]
    what = "MC loss before defence" if metric == "mc_loss" else metric.replace("_", " ")
    drift = GaugeMetricFamily(
        f"motionguard_{metric}_drift",
        f"Two-sample KS distance in [0,1] between the recent window of clips' {what} "
        "and the bundle's clean calibration",
        labels=labels,
    )
    share = GaugeMetricFamily(
        f"motionguard_{metric}_suspected_share",
        "Share of suspected attacks among the recent window of clips",
        labels=labels,
    )
    clips = GaugeMetricFamily(f"motionguard_{metric}_drift_window_clips", "Clips in the drift window", labels=labels)
    for window in DriftWindow.known(redis, prefix):
        snap = window.snapshot()
        key = [window.model, window.version]
        drift.add_metric(key, snap.drift)
        share.add_metric(key, snap.suspected_share)
        clips.add_metric(key, snap.clips)
    return [drift, share, clips]


class DriftCollector:
    """A ``prometheus_client`` collector over :func:`drift_families` (for a process with its own registry).

    A Redis error makes it yield nothing: the scrape still succeeds, and absent series are what the
    alerts expect.
    """

    def __init__(self, redis, prefix: str = KEY_PREFIX):
        self.redis, self.prefix = redis, prefix

    def describe(self):
        return []  # collected lazily: no Redis round trip at registration

    def collect(self):
        try:
            families = drift_families(self.redis, self.prefix)
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis is down
            return
        yield from families
