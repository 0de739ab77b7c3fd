"""Monitoring: the drift statistic, the Redis-shared window, Prometheus config/rules/alert unit tests
(promtool), the Grafana dashboard, and (integration) a real Prometheus scraping a running exporter."""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from worker.drift import (
    DRIFT_ALERT_THRESHOLD,
    DRIFT_MIN_CLIPS,
    DriftCollector,
    DriftWindow,
    calibration_reference,
    drift_snapshot,
    ks_pvalue,
    ks_statistic,
    psi,
    suspected_share,
    wasserstein1,
)

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "docker" / "prometheus"
RULES = sorted((PROM_DIR / "rules").glob("*.yml"))
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "motionguard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool absent (Debian package 'prometheus')")


def _clean(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(-1.0, 0.25) for _ in range(n)]


# --------------------------------------------------------------------------------- the statistic


def test_ks_known_answers():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0  # disjoint supports
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)
    assert ks_statistic([0.0, 1.0], [0.0]) == pytest.approx(0.5)  # ties counted exactly
    assert math.isnan(ks_statistic([], [1.0]))
    assert math.isnan(ks_statistic([1.0], []))
    assert ks_statistic([1.0, float("nan"), 2.0], [1.0, 2.0]) == 0.0  # non-finite values are dropped


def test_ks_identical_distribution_is_small_and_shift_is_large():
    reference = _clean(200, seed=0)
    same = ks_statistic(_clean(100, seed=1), reference)
    assert same < 0.2
    assert ks_pvalue(same, 100, 200) > 0.01
    shifted = ks_statistic([3.0 * x for x in _clean(100, seed=2)], reference)  # attacked: MC loss x3
    assert shifted > 0.9
    assert ks_pvalue(shifted, 100, 200) < 1e-10


def test_ks_equals_share_of_outliers():
    """D >= p when a share p of the window lies above every clean value (the alert's reading)."""
    reference = _clean(200, seed=0)
    window = _clean(60, seed=3) + [10.0] * 40  # 40 % attacked
    assert ks_statistic(window, reference) >= 0.4 - 1e-9


def test_ks_is_scale_free():
    reference, window = _clean(200, 0), [x * 1.3 for x in _clean(80, 4)]
    d = ks_statistic(window, reference)
    assert ks_statistic([1000 * x for x in window], [1000 * x for x in reference]) == pytest.approx(d)
    assert ks_statistic([math.log(x) for x in window], [math.log(x) for x in reference]) == pytest.approx(d)


def test_clean_windows_stay_below_the_alert_threshold():
    """Null distribution check of the alert threshold at the smallest window the alert accepts."""
    reference = _clean(200, seed=0)
    worst = max(ks_statistic(_clean(DRIFT_MIN_CLIPS, seed=100 + i), reference) for i in range(200))
    assert worst < DRIFT_ALERT_THRESHOLD


def test_other_statistics_known_answers():
    ref = _clean(200, 0)
    assert wasserstein1(ref, ref) == 0.0
    assert wasserstein1([0.0, 1.0], [1.0, 2.0]) == pytest.approx(1.0)  # shift by 1
    assert psi(ref, ref) == pytest.approx(0.0)
    assert psi([5.0] * 50, ref) > 1.0
    assert suspected_share([True, False, False, True]) == 0.5
    assert math.isnan(suspected_share([]))


def test_calibration_reference_from_sample_or_quantiles():
    from models.bundle_meta import Calibration

    cal = Calibration(n=3, quantiles={"0.5": 1.0}, mean=1.0, std=0.1, threshold=2.0, sample=[0.9, 1.0, 1.1])
    assert calibration_reference(cal) == [0.9, 1.0, 1.1]
    no_sample = Calibration(n=100, quantiles={"0.01": 1.0, "0.5": 2.0, "0.99": 3.0}, mean=2, std=0.5, threshold=3)
    ref = calibration_reference(no_sample)
    assert len(ref) == 200 and min(ref) >= 1.0 and max(ref) <= 3.0
    assert sorted(ref)[100] == pytest.approx(2.0, abs=0.02)
    assert calibration_reference({"quantiles": {"p10": 1.0, "p90": 2.0}, "mean": 1.5})[0] == pytest.approx(1.0)
    assert calibration_reference(None) == []


def test_snapshot():
    snap = drift_snapshot([(1.0, False), (5.0, True), (float("nan"), False)], [1.0, 1.1])
    assert snap.clips == 3 and snap.suspected_share == pytest.approx(1 / 3)
    assert snap.drift == pytest.approx(0.5) and snap.mean_mc_loss == pytest.approx(3.0)


# --------------------------------------------------------------------------------- Redis window


@pytest.fixture
def redis_client():
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at 127.0.0.1:6379: {exc}")
    prefix = f"test-drift-{uuid.uuid4().hex[:8]}"
    yield client, prefix
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def test_window_is_shared_and_capped(redis_client):
    client, prefix = redis_client
    reference = _clean(200, 0)
    # two workers (two clients) write into the same bundle's window
    w1 = DriftWindow(client, "m", "1", size=50, prefix=prefix)
    w2 = DriftWindow(client.__class__.from_url("redis://127.0.0.1:6379/0"), "m", "1", size=50, prefix=prefix)
    w1.publish_calibration({"sample": reference, "threshold": 1.0})
    for i, value in enumerate(_clean(30, 5)):
        (w1 if i % 2 else w2).record(value, False)
    snap = w1.snapshot()
    assert snap.clips == 30 and snap.reference_size == 200 and snap.drift < DRIFT_ALERT_THRESHOLD
    w2.record_many([(10.0, True)] * 60)  # an attack burst: the window keeps the newest 50
    snap = w1.snapshot()
    assert snap.clips == 50 and snap.suspected_share == 1.0 and snap.drift == 1.0
    assert [(w.model, w.version, w.size) for w in DriftWindow.known(client, prefix)] == [("m", "1", 50)]


def test_collector_exports_drift_per_bundle(redis_client):
    from prometheus_client import CollectorRegistry, generate_latest

    client, prefix = redis_client
    reference = _clean(200, 0)
    clean, attacked = DriftWindow(client, "m", "1", prefix=prefix), DriftWindow(client, "m", "2", prefix=prefix)
    for window in (clean, attacked):
        window.publish_calibration({"sample": reference})
    clean.record_many((v, False) for v in _clean(40, 7))
    attacked.record_many((3 * v, True) for v in _clean(40, 8))
    registry = CollectorRegistry()
    registry.register(DriftCollector(client, prefix))
    text = generate_latest(registry).decode()
    values = {
        (m["name"], m["version"]): float(m["value"])
        for m in re.finditer(
            r'^(?P<name>motionguard_\w+)\{model="m",version="(?P<version>\d)"\} (?P<value>\S+)$', text, re.M
        )
    }
    assert values[("motionguard_mc_loss_drift", "1")] < DRIFT_ALERT_THRESHOLD
    assert values[("motionguard_mc_loss_drift", "2")] > 0.9
    assert values[("motionguard_mc_loss_suspected_share", "2")] == 1.0
    assert values[("motionguard_mc_loss_drift_window_clips", "1")] == 40.0


def test_collector_survives_redis_down():
    from prometheus_client import CollectorRegistry, generate_latest

    redis = pytest.importorskip("redis")
    registry = CollectorRegistry()
    registry.register(DriftCollector(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)))
    assert b"motionguard_mc_loss_drift" not in generate_latest(registry)


# --------------------------------------------------------------------------------- Prometheus files


def _run_promtool(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@needs_promtool
def test_promtool_check_config():
    _run_promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_promtool_check_rules():
    out = _run_promtool("check", "rules", *[str(p.relative_to(PROM_DIR)) for p in RULES]).stdout
    assert "SUCCESS" in out


def _alert_names() -> set[str]:
    yaml = pytest.importorskip("yaml")
    names = set()
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {rule["alert"] for rule in group["rules"] if "alert" in rule}
    return names


@needs_promtool
def test_promtool_alert_unit_tests():
    _run_promtool("test", "rules", "tests/alerts_test.yml")


def test_every_alert_is_unit_tested_firing_and_quiet():
    yaml = pytest.importorskip("yaml")
    alerts = _alert_names()
    assert {
        "MotionguardMCLossDrift",
        "MotionguardSuspectedAttackRate",
        "MotionguardQueueBacklog",
        "MotionguardNoLiveWorker",
        "MotionguardJobFailureRate",
    } <= alerts
    firing, quiet = set(), set()
    for case in yaml.safe_load((PROM_DIR / "tests" / "alerts_test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - firing == set(), "alerts without a firing test"
    assert alerts - quiet == set(), "alerts without a not-firing test"


def test_drift_alert_threshold_matches_code():
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load((PROM_DIR / "rules" / "motionguard-alerts.yml").read_text())["groups"][0]["rules"]
    expr = next(r["expr"] for r in rules if r.get("alert") == "MotionguardMCLossDrift")
    assert f"> {DRIFT_ALERT_THRESHOLD}" in expr and f">= {DRIFT_MIN_CLIPS}" in expr


def test_every_alert_has_a_runbook_section():
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    headings = [line.lstrip("#").strip().lower() for line in doc.splitlines() if line.startswith("#")]
    anchors = {re.sub(r"[^a-z0-9-]", "", heading.replace(" ", "-")) for heading in headings}
    for alert in _alert_names():
        assert alert.lower() in anchors, f"docs/monitoring.md has no section for {alert}"
