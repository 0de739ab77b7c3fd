"""Attacks stay in their budget and do raise the classifier's loss (tiny random model, few steps)."""

from __future__ import annotations

import pytest
import torch

from models import attacks
from models.bundle import load_bundle


@pytest.fixture(scope="module")
def setup(random_bundle):
    torch.manual_seed(0)
    pipeline = load_bundle(random_bundle).pipeline
    x = torch.rand(3, 4, 3, 64, 64)
    with torch.no_grad():
        y = pipeline.logits(x, 2).argmax(1)  # attack the model's own predictions
    return pipeline, x, y


def _ce(pipeline, x, y):
    with torch.no_grad():
        return attacks.ce_loss(pipeline.logits(x, 2), y)


@pytest.mark.parametrize("kind", ["pgd", "apgd-ce", "apgd-dlr"])
def test_dense_attacks_respect_budget_and_raise_loss(setup, kind):
    pipeline, x, y = setup
    spec = attacks.parse_attack(f"{kind}:8:steps=4")
    x_adv = attacks.run_attack(spec, pipeline, x, y)
    assert (x_adv - x).abs().max().item() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert _ce(pipeline, x_adv, y).mean() > _ce(pipeline, x, y).mean()


def test_one_frame_touches_one_frame(setup):
    pipeline, x, y = setup
    x_adv = attacks.run_attack(attacks.parse_attack("oneframe:16:steps=3"), pipeline, x, y)
    changed = (x_adv - x).abs().flatten(2).amax(dim=2) > 0  # (B, T)
    assert (changed.sum(dim=1) == 1).all()
    assert (x_adv - x).abs().max().item() <= 16 / 255 + 1e-6


def test_flicker_is_a_uniform_colour_shift_per_frame(setup):
    pipeline, x, y = setup
    x_mid = x * 0.5 + 0.25  # away from the clamp so the shift is visible everywhere
    x_adv = attacks.run_attack(attacks.parse_attack("flicker:32:steps=5"), pipeline, x_mid, y)
    delta = x_adv - x_mid
    per_frame = delta.flatten(3)
    assert torch.allclose(per_frame, per_frame[..., :1].expand_as(per_frame), atol=1e-6)
    assert delta.abs().max() > 0 and delta.abs().max() <= 32 / 255 + 1e-6


@pytest.mark.parametrize("spec", ["adaptive1:8:steps=2", "adaptive2:8:steps=2", "bpda:8:steps=2"])
def test_defence_aware_attacks_respect_budget(setup, spec):
    pipeline, x, y = setup
    x_adv = attacks.run_attack(attacks.parse_attack(spec), pipeline, x[:1], y[:1])
    assert (x_adv - x[:1]).abs().max().item() <= 8 / 255 + 1e-6
    assert not torch.equal(x_adv, x[:1])


def test_dlr_loss_is_negative_margin_ratio():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    assert attacks.dlr_loss(logits, torch.tensor([0])).item() == pytest.approx(-(3 - 1) / (3 - 0))
    assert attacks.dlr_loss(logits, torch.tensor([1])).item() == pytest.approx((3 - 1) / (3 - 0))


def test_parse_attack():
    spec = attacks.parse_attack("adaptive1:8")
    assert spec.kind == "adaptive1" and spec.epsilon == pytest.approx(8 / 255) and spec.options["lambda"] == 300
    assert spec.defense_aware and spec.name == "adaptive1:8:lambda=300"
    assert attacks.parse_attack("pgd:4:steps=40").options == {"steps": 40.0}
    assert attacks.parse_attack("pgd:8").name == "pgd:8"
    for bad in ["", "fgsm:8", "pgd:x", "pgd:0", "pgd:8:steps=abc"]:
        with pytest.raises(ValueError):
            attacks.parse_attack(bad)
