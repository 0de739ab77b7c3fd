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
