"""Algorithm 1: the bound, the loss going down, K=0, and the pipeline around it."""

from __future__ import annotations

import pytest
import torch

from models.defense.purify import DefenseConfig, purify
from models.nets.flow import build_video_raft

from helpers_video import translating_clip


@pytest.fixture(scope="module")
def flow_model():
    torch.manual_seed(0)
    return build_video_raft("raft_small", corr_levels=3).eval().requires_grad_(False)


def test_restored_clip_within_bound_and_range(flow_model):
    clip = torch.rand(2, 3, 3, 64, 64)
    config = DefenseConfig(steps=3, step_size=4 / 255, epsilon=6 / 255)
    result = purify(clip, flow_model, config)
    assert (result.restored - clip).abs().max().item() <= 6 / 255 + 1e-6
    assert result.restored.min().item() >= 0.0 and result.restored.max().item() <= 1.0
    assert result.trajectory.shape == (4, 2)
    assert (result.restored != clip).any()


@pytest.mark.parametrize("multi", [False, True])
def test_purification_lowers_mc_loss_of_noisy_clip(flow_model, multi):
    torch.manual_seed(1)
    clean = translating_clip(4, 64, (2, 1))
    noisy = (clean + (torch.rand_like(clean) * 2 - 1) * 8 / 255).clamp(0, 1)
    result = purify(noisy, flow_model, DefenseConfig(steps=5, multi=multi))
    before, after = result.trajectory[0].item(), result.trajectory[-1].item()
    assert after < before


def test_zero_steps_returns_input_unchanged(flow_model):
    clip = torch.rand(1, 3, 3, 64, 64)
    result = purify(clip, flow_model, DefenseConfig(steps=0))
    assert torch.equal(result.restored, clip)
    assert result.trajectory.shape == (1, 1)


def test_overrides_keep_unset_fields():
    config = DefenseConfig().with_overrides(steps=5, epsilon=None)
    assert config.steps == 5 and config.epsilon == DefenseConfig().epsilon


def test_pipeline_predict(random_bundle):
    from models.bundle.load import load_bundle

    pipeline = load_bundle(random_bundle).pipeline
    clip = torch.rand(2, 4, 3, 64, 64)
    two_steps = pipeline.defense.with_overrides(steps=2)
    defended = pipeline.predict(clip, defend=True, config=two_steps, keep_flows=True)
    assert defended.probs.shape == (2, 3)
    assert torch.allclose(defended.probs.sum(1), torch.ones(2))
    assert defended.trajectory.shape == (3, 2)
    assert defended.flows_before.shape == (2, 3, 2, 64, 64)
    assert (defended.restored - clip).abs().max() <= pipeline.defense.epsilon + 1e-6
    plain = pipeline.predict(clip, defend=False)
    assert torch.equal(plain.restored, clip)
    assert torch.equal(plain.mc_before, plain.mc_after)
    assert torch.allclose(plain.mc_before, defended.mc_before)
    # batch members are independent: predicting one alone gives the same answer
    single = pipeline.predict(clip[:1], defend=True, config=two_steps)
    assert torch.allclose(single.probs, defended.probs[:1], atol=1e-5)
