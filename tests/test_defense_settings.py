"""The defence settings have one source each: ``DefenseConfig`` is built from the bundle's
``defense`` section by field name (no hand copy to fall out of step), and the defend mode and its
threshold are resolved by one function (``models.defense_mode.resolve_policy``) that the API and the
worker both use."""

from __future__ import annotations

import dataclasses

from models.bundle_meta import BundleMeta, Calibration, ClassifierSpec, DefenseSpec, FlowSpec, InputSpec


def _meta(**defense) -> BundleMeta:
    return BundleMeta(
        name="settings-test",
        version="1",
        labels=["a", "b"],
        input=InputSpec(frames=4, height=32, width=32),
        flow=FlowSpec(arch="raft_small", checkpoint="flow.pth", updates_grad=3),
        classifier=ClassifierSpec(checkpoint="classifier.pth", num_classes=2),
        defense=DefenseSpec(**defense),
        calibration=Calibration(
            n=10, quantiles={"p50": 0.2, "p99": 0.5}, mean=0.2, std=0.1, threshold=0.5, sample=[0.2] * 10
        ),
    )


def test_defense_config_carries_every_setting_of_the_section():
    from models.bundle.load import defense_config
    from models.defense.purify import DefenseConfig

    meta = _meta(
        steps=7, step_size=0.01, epsilon=0.03, lambda_smooth=0.2, edge_lambda=90.0, similarity="ssim", multi=True,
        keep_best=True, schedule="plateau", patience=3, stop_quantile="p50", random_start=0.01, restarts=2,
    )  # fmt: skip
    expected = DefenseConfig(  # the field-by-field copy load.py used to make
        steps=7, step_size=0.01, epsilon=0.03, lambda_smooth=0.2, edge_lambda=90.0, similarity="ssim", multi=True,
        flow_updates=3, keep_best=True, schedule="plateau", patience=3, stop_below=0.2, random_start=0.01, restarts=2,
    )  # fmt: skip
    assert defense_config(meta) == expected
    assert defense_config(_meta()) == DefenseConfig(flow_updates=3)  # the paper's defaults on both sides


def test_the_defense_section_and_the_config_name_the_same_purification_settings():
    """A purification setting added to one schema and not the other fails here, not at serving."""
    from models.bundle.load import RESOLVED_DEFENSE_FIELDS
    from models.defense.purify import DefenseConfig

    config_fields = {f.name for f in dataclasses.fields(DefenseConfig)} - set(RESOLVED_DEFENSE_FIELDS)
    spec_only = set(DefenseSpec.model_fields) - config_fields
    assert config_fields <= set(DefenseSpec.model_fields)
    assert spec_only == {"mode", "threshold", "stop_quantile", "evaluation"}  # when, not how, to purify


def _flagged(meta: BundleMeta, auto: float | None) -> BundleMeta:
    from models.bundle_meta import FlagCalibration, SignalCalibration

    signal = SignalCalibration(sample=[0.1, 0.2], tail_start=0.2, tail_scale=0.1)
    flag = FlagCalibration(
        n=10, signals={"mc": signal}, thresholds={"input": 2.0, "defended": 3.0}, auto_threshold=auto
    )
    return meta.model_copy(update={"flag": flag})


def test_the_policy_resolves_mode_and_threshold_in_one_order():
    from models.defense_mode import resolve_policy

    meta = _meta()
    assert resolve_policy(meta) == resolve_policy(meta, mode=None, threshold=None)
    policy = resolve_policy(meta)
    assert (policy.default_mode, policy.mc_threshold, policy.decided_on) == ("always", 0.5, "mc_loss")
    assert resolve_policy(_meta(threshold=0.4)).mc_threshold == 0.4  # the section's, over the calibration's
    assert resolve_policy(_meta(threshold=0.4), threshold=0.3).mc_threshold == 0.3  # the deployment's, over both
    assert resolve_policy(_meta(mode="auto")).default_mode == "auto"
    assert resolve_policy(_meta(mode="auto"), mode="off").default_mode == "off"
    assert meta.auto_threshold() == 0.5 and meta.auto_threshold(0.3) == 0.3  # the bundle's view is the same rule

    # the flag decides auto (threshold on its own scale) unless the deployment names an MC-loss threshold
    flagged = resolve_policy(_flagged(meta, 3.0))
    assert (flagged.decided_on, flagged.flag_threshold, flagged.auto_threshold) == ("attack_score", 1.5, 1.5)
    assert flagged.mc_threshold == 0.5
    assert resolve_policy(_flagged(meta, 3.0), threshold=0.3).decided_on == "mc_loss"
    assert resolve_policy(_flagged(meta, None)).decided_on == "mc_loss"


def test_a_request_mode_against_the_policy():
    import pytest

    from models.defense_mode import resolve_policy

    policy = resolve_policy(_meta(mode="auto"))
    assert [policy.mode(v) for v in (None, True, "false", "auto", "on")] == ["auto", "always", "off", "auto", "always"]
    uncalibrated = resolve_policy(_meta().model_copy(update={"calibration": None}))
    assert not uncalibrated.serves_auto and uncalibrated.mode(None) == "always"
    with pytest.raises(ValueError, match="no MC-loss threshold"):
        uncalibrated.mode("auto")
    with pytest.raises(ValueError, match="defend must be"):
        policy.mode("sometimes")


def test_the_api_and_the_worker_resolve_the_same_policy(tmp_path):
    """The worker's loaded bundle carries the policy the API computes from the same bundle.json and settings."""
    from models.bundle.load import load_bundle, make_random_bundle
    from models.bundle_meta import read_bundle_meta
    from models.defense_mode import resolve_policy
    from worker.settings import Settings

    bundle_dir = make_random_bundle(tmp_path / "b", frames=4, size=32)
    settings = Settings(defense_mode="auto", defense_threshold=0.25)
    loaded = load_bundle(bundle_dir, **settings.bundle_overrides)
    assert loaded.policy == resolve_policy(read_bundle_meta(bundle_dir), **settings.bundle_overrides)
    assert (loaded.policy.default_mode, loaded.policy.mc_threshold) == ("auto", 0.25)
    assert (loaded.pipeline.default_mode, loaded.pipeline.threshold) == ("auto", 0.25)
