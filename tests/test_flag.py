"""The multi-signal attack flag (issue 24): its calibration, its score and the flag-aware success rule."""

from __future__ import annotations

import math

import pytest
import torch

from models.bundle.load import load_bundle
from models.bundle_meta import BundleMeta, FlagCalibration, read_bundle_meta, write_bundle_meta
from models.defense.flag import (
    INPUT_SIGNALS,
    calibrate_flag,
    combine,
    fit_signal,
    read_flag_of,
    surprises,
    survival,
)
from models.defense.flag_calibrate import clean_signal_values, wilson_interval
from models.robustness.evaluate import evaluate, plan_rows
from models.robustness.report import summarise
from models.robustness.spec import parse_attack


def _clean_values(n: int = 400, seed: int = 0) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.rand(n, generator=g) * (i + 1)).tolist() for i, name in enumerate(INPUT_SIGNALS)}


def test_survival_is_one_below_the_sample_decreasing_and_continuous_into_the_tail():
    cal = fit_signal([float(v) for v in range(1, 101)])
    values = torch.linspace(-5, 200, 2000, dtype=torch.float64)
    s = survival(values, cal)
    assert float(s[0]) == 1.0
    assert bool((s[1:] <= s[:-1] + 1e-12).all()), "tail probability must not rise with the signal"
    at = torch.tensor([cal.tail_start - 1e-9, cal.tail_start + 1e-9], dtype=torch.float64)
    below, above = survival(at, cal).tolist()
    assert below == pytest.approx(cal.tail_share, rel=1e-3) and above == pytest.approx(cal.tail_share, rel=1e-3)
    # Beyond the largest clean value the tail keeps falling (a score that saturates cannot rank attacks).
    far = survival(torch.tensor([150.0, 200.0], dtype=torch.float64), cal)
    assert float(far[1]) < float(far[0]) < 1 / 101


def test_threshold_holds_the_stated_false_flag_rate_on_the_calibration_and_fresh_clean_values():
    clean = _clean_values(2000, seed=1)
    flag = calibrate_flag(clean, fpr=0.01, auto_quantile=0.9)
    calib_scores = combine(surprises({k: torch.tensor(v, dtype=torch.float64) for k, v in clean.items()}, flag))
    assert float((calib_scores > flag.thresholds["input"]).double().mean()) <= 0.011
    fresh = _clean_values(4000, seed=2)
    scores = combine(surprises({k: torch.tensor(v, dtype=torch.float64) for k, v in fresh.items()}, flag))
    rate = float((scores > flag.thresholds["input"]).double().mean())
    assert 0.003 < rate < 0.02, rate  # the same distribution: about 1 %
    assert flag.auto_threshold < flag.thresholds["input"]
    # Without purification values the defended threshold is the input one.
    assert flag.thresholds["defended"] == flag.thresholds["input"]


def test_one_signal_out_of_its_clean_range_is_enough_to_flag():
    """The score is the largest surprise: an attacker must keep every signal clean-looking at once."""
    flag = calibrate_flag(_clean_values(), fpr=0.01)
    typical = {
        name: torch.tensor([flag.signals[name].sample[len(flag.signals[name].sample) // 2]]) for name in flag.signals
    }
    assert float(combine(surprises(typical, flag))) < flag.thresholds["input"]
    for name in flag.signals:
        odd = dict(typical)
        odd[name] = torch.tensor([max(flag.signals[name].sample) * 3])
        assert float(combine(surprises(odd, flag))) > flag.thresholds["input"], name


def test_wilson_interval_is_sound_at_zero():
    low, high = wilson_interval(0, 200)
    assert low == 0.0 and 1.0 < high < 2.5
    assert wilson_interval(0, 0) is None


def test_bundle_without_flag_section_still_reads_and_keeps_the_mc_flag(random_bundle):
    meta = read_bundle_meta(random_bundle)
    assert isinstance(meta, BundleMeta) and meta.flag is None
    pipeline = load_bundle(random_bundle).pipeline
    clip = torch.rand(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = pipeline.predict(clip, defend=False, keep_flows=True)
    threshold = float(plain.mc_before.mean())
    reading = read_flag_of(pipeline, clip, plain, None, legacy_threshold=threshold)
    assert reading.flagged.tolist() == (plain.mc_before > threshold).tolist()
    assert reading.score.tolist() == pytest.approx((plain.mc_before / threshold).tolist())
    assert set(reading.signals) == {"mc"}


@pytest.fixture(scope="module")
def flagged_bundle(random_bundle, tmp_path_factory):
    """The random bundle with a flag calibrated on a few random clips (signals measured for real)."""
    import shutil

    target = tmp_path_factory.mktemp("flag") / "bundle"
    shutil.copytree(random_bundle, target)
    pipeline = load_bundle(target).pipeline
    clips = [(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(100 + i)), 0) for i in range(6)]
    values = clean_signal_values(pipeline, clips, defend=True, batch_size=3)
    assert set(values) == set(INPUT_SIGNALS) | {"purify_change"}
    flag = calibrate_flag(values, fpr=0.2)
    meta = read_bundle_meta(target)
    write_bundle_meta(target, meta.model_copy(update={"flag": flag}))
    assert read_bundle_meta(target).flag == flag
    return target


def _with_thresholds(flag: FlagCalibration, value: float) -> FlagCalibration:
    return flag.model_copy(update={"thresholds": {"input": value, "defended": value}})


@pytest.mark.parametrize(
    "kind",
    [
        "flagpen:8:steps=1",
        "orthogonal:8:steps=1",
        "square-flag:8:queries=2",
        "transfer-flagpen:8:steps=1",
    ],
)
def test_flag_aware_success_needs_a_wrong_and_unflagged_answer(flagged_bundle, kind):
    """Everything flagged: no success whatever the answer; nothing flagged: success iff wrong."""
    pipeline = load_bundle(flagged_bundle).pipeline
    other = load_bundle(flagged_bundle).pipeline if kind.startswith("transfer-") else None
    flag = read_bundle_meta(flagged_bundle).flag
    clips = [torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def source(i: int):
        return clips[i], i % 3

    rows = plan_rows(range(2), [parse_attack(kind)], random_n=0, adaptive_n=2)
    always = evaluate(pipeline, source, rows, threshold=None, flag=_with_thresholds(flag, 1e-9), source_pipeline=other)
    for record in always.records(rows[1].name).values():
        assert record.flagged is True and record.attack_score > 1
        assert record.fooled_at is None  # a flagged answer is never the attack's success
    summary = summarise(
        {name: {i: vars(r) for i, r in always.records(name).items()} for name in always.rows}, threshold=None
    )
    assert all(r["correct_or_flagged"]["value"] == 100.0 for r in summary["rows"])
    never = evaluate(pipeline, source, rows, threshold=None, flag=_with_thresholds(flag, 1e9), source_pipeline=other)
    for record in never.records(rows[1].name).values():
        assert record.flagged is False and record.attack_score < 1
        assert (record.fooled_at is not None) == (not record.defended)
        assert set(record.signals) >= set(INPUT_SIGNALS)
        assert all(math.isfinite(v) for v in record.signals.values())


def test_transfer_flagpen_steps_along_the_source_models_gradient(flagged_bundle, other_random_bundle):
    """With the flag term off (lambda 0), the first step is the sign of the SOURCE model's CE gradient
    at 2 updates, not the evaluated model's: the classifier term really comes from the source."""
    from models.defense.purify import project
    from models.robustness.attacks.base import ce_loss, input_grad
    from models.robustness.attacks.flag import flag_aware_pgd

    pipeline = load_bundle(flagged_bundle).pipeline
    source = load_bundle(other_random_bundle).pipeline
    flag = _with_thresholds(read_bundle_meta(flagged_bundle).flag, 1e9)  # never flagged
    x = torch.rand(3, 4, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 1, 2])
    eps, step = 8 / 255, 2 / 255
    tracker = flag_aware_pgd(pipeline, x, y, eps, flag, lam=0.0, steps=1, step_size=step, source=source)
    _, g_source = input_grad(lambda z: ce_loss(source.logits(z, 2), y), x)
    _, g_own = input_grad(lambda z: ce_loss(pipeline.logits(z, 2), y), x)
    expected = project(x + step * g_source.sign(), x, eps)
    moved = tracker.at != 0  # clips already wrong at the start keep the clip itself
    assert bool(moved.any())
    assert torch.allclose(tracker.kept[moved], expected[moved], atol=1e-6)
    assert not torch.equal(g_source.sign(), g_own.sign())


def test_the_api_side_names_the_same_signals():
    """worker.monitoring.flag_metrics is torch-free, so it keeps its own copy of the signal names."""
    from models.defense.flag import SIGNALS
    from worker.monitoring.flag_metrics import SIGNAL_NAMES

    assert SIGNAL_NAMES == SIGNALS
