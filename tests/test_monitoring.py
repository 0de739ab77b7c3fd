"""Monitoring: the drift statistic, the Redis-shared window, Prometheus config/rules/alert unit tests
(promtool), the Grafana dashboard, and (integration) a real Prometheus scraping a running exporter."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from worker.monitoring.drift import (
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


def test_worker_records_reach_the_api_collector_per_bundle(redis_client):
    """Two workers' record_job calls (two bundles) come out of the API's collector, labelled and summed."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from models.bundle_meta import Calibration
    from service.metrics import RedisAggregates
    from worker.monitoring.metrics import record_job
    from worker.settings import Settings

    client, prefix = redis_client
    settings = Settings(redis_url="redis://127.0.0.1:6379/0", key_prefix=prefix, queue_name=prefix, drift_window=50)
    cal = Calibration(n=200, quantiles={"0.5": 0.37}, mean=0.37, std=0.1, threshold=0.8, sample=_clean(200, 0))
    stages = {"queue": 0.5, "decode": 0.1, "defense": 2.0, "classify": 0.3, "encode": 0.2, "total": 2.6}
    for worker in range(2):  # each "worker" is another connection; v1 clean, v2 attacked
        connection = client.__class__.from_url("redis://127.0.0.1:6379/0")
        record_job(connection, settings, "finished", stages, _clean(20, 10 + worker), _clean(20, 20), 0,
                   model="m", version="1", calibration=cal,
                   decisions=["skipped"] * 18 + ["purified", "stopped_early"], defence_steps=27)  # fmt: skip
        record_job(connection, settings, "finished", stages, [2.0] * 20, _clean(20, 30), 20,
                   model="m", version="2", calibration=cal, decisions=["off"] * 20)  # fmt: skip
        record_job(connection, settings, "failed", model="m", version="1", calibration=cal)
    registry = CollectorRegistry()
    registry.register(RedisAggregates(SimpleNamespace(redis=client, settings=settings)))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("motionguard_jobs_finished_total", status="finished", model="m", version="1") == 2
    assert value("motionguard_jobs_finished_total", status="failed", model="m", version="1") == 2
    assert value("motionguard_suspected_attacks_total", model="m", version="2") == 40
    assert value("motionguard_mc_loss_count", phase="before", model="m", version="1") == 40
    assert value("motionguard_job_seconds_count", stage="queue", model="m", version="2") == 2
    assert value("motionguard_job_seconds_bucket", stage="defense", model="m", version="1", le="1") == 0
    assert value("motionguard_job_seconds_bucket", stage="defense", model="m", version="1", le="2.5") == 2
    assert value("motionguard_mc_loss_drift_window_clips", model="m", version="1") == 40
    assert value("motionguard_mc_loss_drift", model="m", version="1") < DRIFT_ALERT_THRESHOLD
    assert value("motionguard_mc_loss_drift", model="m", version="2") == 1.0
    assert value("motionguard_mc_loss_suspected_share", model="m", version="2") == 1.0
    assert value("motionguard_mc_loss_suspected_share", model="m", version="1") == 0.0
    # per served model: the shipped ones here (the default model and v1.1, served by name)
    for model in ("motionshapes-robust", "motionshapes"):
        assert value("motionguard_queue_depth", model=model) == 0
    # the adaptive defence: clips per decision and the steps spent, per bundle, summed over workers
    assert value("motionguard_clips_total", decision="skipped", model="m", version="1") == 36
    assert value("motionguard_clips_total", decision="purified", model="m", version="1") == 2
    assert value("motionguard_clips_total", decision="stopped_early", model="m", version="1") == 2
    assert value("motionguard_clips_total", decision="off", model="m", version="2") == 40
    assert value("motionguard_clips_total", decision="skipped", model="m", version="2") == 0
    assert value("motionguard_defence_steps_total", model="m", version="1") == 54
    assert value("motionguard_defence_steps_total", model="m", version="2") == 0


def test_record_job_labels_with_the_bundle_the_process_serves(redis_client):
    """A worker names its bundle once (``metrics.serve``, called by its runtime when the bundle loads);
    every record_job without explicit labels is then counted under that bundle."""
    from models.bundle_meta import Calibration
    from worker.monitoring import metrics
    from worker.settings import Settings

    client, prefix = redis_client
    settings = Settings(redis_url="redis://127.0.0.1:6379/0", key_prefix=prefix, queue_name=prefix, drift_window=50)
    cal = Calibration(n=200, quantiles={"0.5": 0.37}, mean=0.37, std=0.1, threshold=0.8, sample=_clean(200, 0))
    before = dict(metrics._served)
    try:
        metrics.serve("served", "7", cal)
        metrics.record_job(client, settings, "finished", {"total": 1.0}, [0.2, 0.9], [0.1, 0.1], 1)
    finally:
        metrics._served.clear()
        metrics._served.update(before)
    assert metrics.bundles(client, settings) == [("served", "7")]
    assert client.hget(metrics.counters_key(settings, "served", "7"), "jobs_finished:finished") == b"1"


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


RUNBOOK = "docs/monitoring.md"


def test_every_alert_has_a_runbook_section():
    doc = (ROOT / RUNBOOK).read_text()
    headings = [line.lstrip("#").strip().lower() for line in doc.splitlines() if line.startswith("#")]
    anchors = {re.sub(r"[^a-z0-9-]", "", heading.replace(" ", "-")) for heading in headings}
    for alert in _alert_names():
        assert alert.lower() in anchors, f"{RUNBOOK} has no runbook section for {alert}"
    # ... and every alert's runbook annotation leads to its own section there.
    yaml = pytest.importorskip("yaml")
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in (r for r in group["rules"] if "alert" in r):
                assert rule["annotations"]["runbook"] == f"{RUNBOOK}#{rule['alert'].lower()}", rule["alert"]


# --------------------------------------------------------------------------------- Grafana

#: The metric names the processes export (DESIGN.md's list plus the drift window's companions).
EXPORTED_METRICS = {
    "motionguard_jobs_submitted_total",
    "motionguard_jobs_finished_total",
    "motionguard_job_seconds",
    "motionguard_queue_depth",
    "motionguard_mc_loss",
    "motionguard_suspected_attacks_total",
    "motionguard_mc_loss_drift",
    "motionguard_mc_loss_suspected_share",
    "motionguard_mc_loss_drift_window_clips",
    "motionguard_model_info",
    "motionguard_workers",
    "motionguard_requests_rejected_total",
    "motionguard_clips_total",
    "motionguard_defence_steps_total",
    "motionguard_attack_signal",
    "motionguard_attack_score",
    "motionguard_attack_score_drift",
    "motionguard_attack_score_suspected_share",
    "motionguard_attack_score_drift_window_clips",
}
HISTOGRAMS = {"motionguard_job_seconds", "motionguard_mc_loss", "motionguard_attack_signal", "motionguard_attack_score"}
PROMQL_WORDS = {
    *"sum min max avg count stddev stdvar topk bottomk quantile count_values group".split(),
    *"by without on ignoring group_left group_right and or unless bool offset le inf nan".split(),
}


def _series_names(expr: str) -> set[str]:
    """Metric names an expression selects (labels, functions, keywords and Grafana variables removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\()?", expr):
        if match.group(2) is None and match.group(1).lower() not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def _known_series() -> set[str]:
    yaml = pytest.importorskip("yaml")
    known = {"up", "ALERTS"} | set(EXPORTED_METRICS)
    known |= {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "count", "sum")}
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            known |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return known


def _dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            out.append((annotation["name"], annotation["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            out.append((var["name"], re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query["query"])))
    return out


def test_series_name_extraction():
    assert _series_names('sum by (le) (rate(motionguard_mc_loss_bucket{phase="before"}[5m]))') == {
        "motionguard_mc_loss_bucket"
    }
    assert _series_names("a:b:c > 0.4 and on (model) d >= 30 or vector(0)") == {"a:b:c", "d"}


def test_dashboard_parses_and_every_expr_uses_known_series():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    known = _known_series()
    for title, expr in exprs:
        names = _series_names(expr)
        assert names, f"{title}: no series in {expr!r}"
        assert names <= known, f"{title}: unknown series {names - known} in {expr!r}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_covers_the_issue():
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(_series_names(expr) for _, expr in _dashboard_exprs(dashboard)))
    for needed in (
        "motionguard_mc_loss_bucket",  # before/after distributions over time (heatmaps)
        "motionguard:mc_loss:p90_5m",
        "motionguard:mc_loss_drift:max",
        "motionguard:suspected_attack_ratio:rate5m",
        "motionguard:queue_depth:max",
        "motionguard:job_seconds:p95_5m",  # latency percentiles per stage
        "motionguard:workers_live:sum",
        "motionguard:defence_skip_ratio:rate5m",  # the adaptive defence (issue 18)
        "motionguard:clips_by_decision:rate5m",
        "motionguard:defence_steps_per_clip:rate5m",
    ):
        assert needed in used, needed
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert {("before" in p["targets"][0]["expr"], "after" in p["targets"][0]["expr"]) for p in heatmaps} == {
        (True, False),
        (False, True),
    }


def test_rules_reference_known_series():
    yaml = pytest.importorskip("yaml")
    known = _known_series()
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                names = _series_names(rule["expr"])
                assert names <= known, f"{rule.get('record') or rule.get('alert')}: unknown {names - known}"


def test_grafana_provisioning():
    yaml = pytest.importorskip("yaml")
    prov = ROOT / "docker" / "grafana" / "provisioning"
    datasources = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasources[0]["type"] == "prometheus" and datasources[0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((prov / "dashboards" / "motionguard.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


# --------------------------------------------------------------------------------- integration
# A real Prometheus (Debian package, loopback, 1 s scrapes, the repository's rules) scrapes the API
# started with the command docker-compose.yml runs, in front of two `motionguard worker` processes
# (the compose worker command) on a tiny random bundle calibrated here on clean synthetic clips.

PROMETHEUS = shutil.which("prometheus")
SHIFTS = [(1, 0), (2, 1), (0, 2), (-1, 1), (2, -2), (1, 1)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mixed_video(path: Path, seed: int, clips: int, noise: float = 0.0) -> Path:
    """``clips`` 4-frame clips of independent textures and motions, one after the other (H.264).

    ``noise`` > 0 adds strong uniform pixel noise: a stand-in for attacked clips (high MC loss)."""
    import numpy as np

    from worker.video import encode_mp4, to_uint8

    from helpers_video import translating_clip

    rng = np.random.default_rng(seed)
    parts = [
        translating_clip(4, 64, SHIFTS[rng.integers(len(SHIFTS))], int(rng.integers(1 << 30)))[0].numpy()
        for _ in range(clips)
    ]
    frames = np.concatenate(parts)
    if noise:
        frames = np.clip(frames + rng.uniform(-noise, noise, frames.shape), 0, 1)
    encode_mp4(to_uint8(frames.astype(np.float32)), path)
    return path


def _calibrate(bundle_dir: Path, videos: list[Path]) -> list[float]:
    """Clean calibration through the worker's own code path (decode, cut, MC loss before defence)."""
    import statistics

    from models.bundle.load import load_bundle
    from models.bundle_meta import Calibration, read_bundle_meta, write_bundle_meta
    from worker.serving.inference import analyse_video

    bundle = load_bundle(bundle_dir)
    sample = []
    for video in videos:
        result, _ = analyse_video(video, bundle, defend=False, max_clips=64)
        sample += [clip["mc_loss_before"] for clip in result["clips"]]
    ordered = sorted(sample)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    meta = read_bundle_meta(bundle_dir)
    meta.calibration = Calibration(
        n=len(sample),
        quantiles={str(p): q(p) for p in (0.01, 0.1, 0.5, 0.9, 0.99)},
        mean=statistics.fmean(sample),
        std=statistics.pstdev(sample),
        threshold=q(0.99),
        threshold_quantile=0.99,
        sample=sample,
    )
    write_bundle_meta(bundle_dir, meta)
    return sample


class _Prometheus:
    def __init__(self, workdir: Path, api_port: int):
        yaml = pytest.importorskip("yaml")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules_dir = workdir / "rules"
        rules_dir.mkdir(parents=True)
        for path in RULES:  # the repository's rules, evaluated every second
            doc = yaml.safe_load(path.read_text())
            for group in doc["groups"]:
                group["interval"] = "1s"
            (rules_dir / path.name).write_text(yaml.safe_dump(doc))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_dir / "*.yml")],
            "scrape_configs": [
                {
                    "job_name": "motionguard-api",
                    "scrape_interval": "1s",
                    "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> list[dict]:
        import httpx

        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, predicate, timeout: float = 30.0):
        import time

        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                last = self.query(expr)
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{expr}: condition not met in {timeout} s; last result {last}")

    def wait_evaluated_after(self, moment: float, timeout: float = 30.0) -> None:
        """Until every rule group has been evaluated on data after ``moment`` (epoch seconds): what a
        check of the recorded series at a steady state waits for, instead of a sleep."""
        import time
        from datetime import datetime

        import httpx

        def stamp(text: str) -> float:  # RFC 3339 with nanoseconds; datetime takes microseconds
            head, _, frac = text.rstrip("Z").partition(".")
            return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()

        deadline, groups = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            groups = httpx.get(f"{self.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            if groups and all(stamp(g["lastEvaluation"]) > moment for g in groups):
                return
            time.sleep(0.5)
        raise AssertionError(f"rule groups not evaluated after {moment}: {[g.get('lastEvaluation') for g in groups]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _compose_command(service: str) -> list[str]:
    yaml = pytest.importorskip("yaml")
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service]["command"]
    assert command[0] == "motionguard"
    return command


def _run_jobs(api: str, videos: list[Path]) -> list[dict]:
    import httpx
    from conftest import wait_done

    ids = []
    for video in videos:
        with open(video, "rb") as handle:
            response = httpx.post(
                f"{api}/classify", params={"defend": "false"}, files={"file": (video.name, handle)}, timeout=30
            )
        assert response.status_code == 202, response.text
        ids.append(response.json()["job_id"])
    return [wait_done(api, job_id, headers=None) for job_id in ids]


def _alert_expr(name: str) -> str:
    yaml = pytest.importorskip("yaml")
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == name:
                    return rule["expr"]
    raise KeyError(name)


def _service_missing() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is None for name in ("service.serve", "service.app", "worker.cli.worker"))


@pytest.mark.integration
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server absent (Debian package 'prometheus')")
@pytest.mark.skipif(
    _service_missing(),
    reason="the service (service.serve, service.app, worker.cli.worker) is not built yet",
)
def test_prometheus_sees_drift_cross_its_threshold_after_attacks(tmp_path):
    """Clean clips keep the drift alert expression empty; a burst of attacked clips makes it fire."""
    import os
    import time

    import httpx

    redis = pytest.importorskip("redis")
    redis_url = "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=0.5).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at 127.0.0.1:6379: {exc}")
    from models.bundle.load import make_random_bundle

    t_start = time.monotonic()
    bundle_dir = make_random_bundle(tmp_path / "bundle")
    clean_sample = _calibrate(bundle_dir, [_mixed_video(tmp_path / f"cal{i}.mp4", i, 40) for i in (1, 2)])
    window = 30
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "MOTIONGUARD_REDIS_URL": redis_url,
        "MOTIONGUARD_QUEUE_NAME": f"mgmon-{tag}",
        "MOTIONGUARD_KEY_PREFIX": f"mgmon-{tag}",
        "MOTIONGUARD_BUNDLE_DIR": str(bundle_dir),
        "MOTIONGUARD_DATA_DIR": str(tmp_path / "data"),
        "MOTIONGUARD_DRIFT_WINDOW": str(window),
        "MOTIONGUARD_MAX_CLIPS": "40",
        "MOTIONGUARD_HEARTBEAT_TTL_S": "3",
        "MOTIONGUARD_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MOTIONGUARD_API_KEYS", None)
    api_port = _free_port()
    api_cmd = _compose_command("api")[1:]
    api_cmd[api_cmd.index("--host") + 1] = "127.0.0.1"  # loopback only
    api_cmd[api_cmd.index("--port") + 1] = str(api_port)
    commands = [api_cmd, _compose_command("worker")[1:], _compose_command("worker")[1:]]
    procs, logs = [], []
    prometheus = None
    api = f"http://127.0.0.1:{api_port}"
    try:
        for i, argv in enumerate(commands):
            logs.append(open(tmp_path / f"proc{i}.log", "wb"))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service.cli", *argv],
                    env=env,
                    cwd=ROOT,
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
        prometheus = _Prometheus(tmp_path / "prom", api_port)
        deadline = time.monotonic() + 120
        while True:
            assert all(p.poll() is None for p in procs), f"a service process exited; logs in {tmp_path}"
            try:
                if httpx.get(f"{api}/readyz", timeout=2).json().get("workers", 0) >= 2:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "service not ready"
            time.sleep(0.5)

        # the workers' container health check sees their heartbeats (and not another deployment's)
        healthcheck = [sys.executable, str(ROOT / "docker" / "worker_healthcheck.py")]
        assert subprocess.run(healthcheck, env=env, cwd=ROOT, capture_output=True, timeout=60).returncode == 0
        elsewhere = {**env, "MOTIONGUARD_KEY_PREFIX": f"nobody-{tag}"}
        assert subprocess.run(healthcheck, env=elsewhere, cwd=ROOT, capture_output=True, timeout=60).returncode == 1

        # clean traffic: two jobs, one per worker, fill the window
        clean_jobs = _run_jobs(api, [_mixed_video(tmp_path / f"clean{i}.mp4", 10 + i, window // 2) for i in (0, 1)])
        assert all(job["status"] == "finished" for job in clean_jobs), clean_jobs
        from rq.job import Job
        from rq.serializers import JSONSerializer

        connection = redis.Redis.from_url(redis_url)
        ran_on = {
            Job.fetch(job["job_id"], connection=connection, serializer=JSONSerializer).worker_name for job in clean_jobs
        }
        assert len(ran_on) == 2, f"both jobs ran on {ran_on}"
        clean_values = [c["mc_loss_before"] for job in clean_jobs for c in job["result"]["clips"]]
        full = prometheus.wait_for(
            "motionguard:mc_loss_drift_window_clips:max", lambda r: r and float(r[0]["value"][1]) >= window
        )
        assert full[0]["metric"]["model"] == "random-test" and full[0]["metric"]["version"] == "0"
        prometheus.wait_for("motionguard:mc_loss_drift:max", lambda r: bool(r))
        prometheus.wait_evaluated_after(time.time() + 1)  # the recording rules have evaluated the full window
        clean_drift = float(prometheus.query("motionguard:mc_loss_drift:max")[0]["value"][1])
        assert prometheus.query(_alert_expr("MotionguardMCLossDrift")) == []
        assert prometheus.query(_alert_expr("MotionguardSuspectedAttackRate")) == []
        # both workers' figures reached the scrape: every finished job and every clip is counted
        prometheus.wait_for(
            'sum(motionguard_jobs_finished_total{status="finished"})', lambda r: r and float(r[0]["value"][1]) == 2
        )
        prometheus.wait_for(
            'sum(motionguard_mc_loss_count{phase="before"})', lambda r: r and float(r[0]["value"][1]) == window
        )

        # a burst of attacked clips
        attacked_jobs = _run_jobs(
            api, [_mixed_video(tmp_path / f"attacked{i}.mp4", 20 + i, window // 2, noise=0.3) for i in (0, 1)]
        )
        assert all(job["status"] == "finished" for job in attacked_jobs), attacked_jobs
        attacked_values = [c["mc_loss_before"] for job in attacked_jobs for c in job["result"]["clips"]]
        fired = prometheus.wait_for(_alert_expr("MotionguardMCLossDrift"), lambda r: bool(r))
        attacked_drift = float(fired[0]["value"][1])
        assert attacked_drift > DRIFT_ALERT_THRESHOLD
        share = float(prometheus.query("motionguard:mc_loss_suspected_share:max")[0]["value"][1])
        prometheus.wait_for(_alert_expr("MotionguardSuspectedAttackRate"), lambda r: bool(r))
        # queue time is its own stage, next to the compute stages, for every job
        stages = prometheus.wait_for(
            "max by (stage) (motionguard_job_seconds_count)",
            lambda r: len(r) >= 5 and all(x["value"][1] == "4" for x in r),
        )
        assert {"queue", "decode", "classify", "total"} <= {x["metric"]["stage"] for x in stages}
        deadline = time.monotonic() + 15
        while True:  # the alerting group evaluates on its own schedule: pending (for: 5m) soon after
            alerts = httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            if any(a["labels"]["alertname"] == "MotionguardMCLossDrift" for a in alerts):
                break
            assert time.monotonic() < deadline, f"MotionguardMCLossDrift not pending: {alerts}"
            time.sleep(0.5)

        # every dashboard query is valid PromQL against the live server
        for _title, expr in _dashboard_exprs(json.loads(DASHBOARD.read_text())):
            expr = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
            prometheus.query(expr)  # asserts status == success
        print(
            f"\nclean drift {clean_drift:.3f} (clips {min(clean_values):.4f}..{max(clean_values):.4f}, "
            f"calibration {min(clean_sample):.4f}..{max(clean_sample):.4f}); attacked drift {attacked_drift:.3f} "
            f"(clips {min(attacked_values):.4f}..{max(attacked_values):.4f}), suspected share {share:.2f}; "
            f"{time.monotonic() - t_start:.0f} s"
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
        if prometheus is not None:
            prometheus.stop()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"mgmon-{tag}*"):
            client.delete(key)
        for key in client.scan_iter(f"rq:*mgmon-{tag}*"):
            client.delete(key)
