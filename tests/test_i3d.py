"""I3D flow stream: port-compatible names, any input size 64..224, width multiplier."""

from __future__ import annotations

import pytest
import torch

from models.bundle_meta import FlowNormalisation
from models.nets.i3d import build_i3d, flow_to_classifier_input


@pytest.mark.parametrize(("frames", "size"), [(7, 64), (8, 112), (16, 224)])
def test_output_shape_for_sizes(frames, size):
    model = build_i3d(5, width=0.125).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 2, frames, size, size))
    assert logits.shape == (2, 5)


def test_port_parameter_names():
    keys = set(build_i3d(400).state_dict())
    for name in [
        "Conv3d_1a_7x7.conv3d.weight",
        "Conv3d_1a_7x7.bn.running_var",
        "Conv3d_2b_1x1.conv3d.weight",
        "Conv3d_2c_3x3.conv3d.weight",
        "Mixed_3b.b0.conv3d.weight",
        "Mixed_3b.b1b.conv3d.weight",
        "Mixed_4f.b2b.bn.weight",
        "Mixed_5c.b3b.conv3d.weight",
        "logits.conv3d.weight",
        "logits.conv3d.bias",
    ]:
        assert name in keys
    assert build_i3d(400).state_dict()["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 2, 7, 7, 7)
    assert build_i3d(400).state_dict()["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
    assert not any(k.startswith("logits.bn") for k in keys)


def test_batch_norm_eps_and_same_padding():
    model = build_i3d(3)
    assert model.Conv3d_1a_7x7.bn.eps == pytest.approx(1e-3)
    # TF SAME: a stride-2 conv halves (rounding up) every dimension
    out = model.Conv3d_1a_7x7(torch.randn(1, 2, 7, 65, 64))
    assert out.shape[2:] == (4, 33, 32)


def test_replace_logits():
    model = build_i3d(400, width=0.25)
    model.replace_logits(7)
    assert model.num_classes == 7
    assert model.eval()(torch.randn(1, 2, 7, 64, 64)).shape == (1, 7)


def test_flow_to_classifier_input():
    flows = torch.zeros(1, 3, 2, 4, 4)
    flows[:, :, 0] = 30.0
    flows[:, :, 1] = -10.0
    x = flow_to_classifier_input(flows, FlowNormalisation())
    assert x.shape == (1, 2, 3, 4, 4)
    assert torch.allclose(x[:, 0], torch.ones(1, 3, 4, 4))
    assert torch.allclose(x[:, 1], torch.full((1, 3, 4, 4), -0.5))
    swapped = flow_to_classifier_input(flows, FlowNormalisation(channel_order="yx"))
    assert torch.allclose(swapped[:, 0], torch.full((1, 3, 4, 4), -0.5))


def _port_clip_logits(model, x: torch.Tensor) -> torch.Tensor:
    """The PyTorch I3D port's head, written out from its definition (piergiaj/pytorch-i3d
    ``InceptionI3d``: ``avg_pool = nn.AvgPool3d(kernel_size=[2, 7, 7], stride=(1, 1, 1))``, then
    ``logits(dropout(avg_pool(x)))``, spatial squeeze), then the mean over time that clip-level
    Kinetics evaluation takes (the original TF I3D's ``reduce_mean(logits, axis=1)``)."""
    pooled = torch.nn.AvgPool3d(kernel_size=[2, 7, 7], stride=(1, 1, 1))(model.features(x))
    per_step = model.logits(model.dropout(pooled)).squeeze(3).squeeze(3)  # (B, classes, T)
    return per_step.mean(2)


@pytest.mark.parametrize("frames", [16, 24, 64])
def test_port_pooling_gives_the_ports_logits_at_224(frames):
    """With random weights, a checkpoint loaded with temporal_pool='port' gives the port's clip
    logits; the uniform mean ('mean', the only head before) differs wherever the last block has
    more than 2 time steps (24 and 64 frames)."""
    torch.manual_seed(frames)
    model = build_i3d(5, width=0.125, temporal_pool="port").eval()
    torch.nn.init.normal_(model.logits.conv3d.weight, std=1.0)  # logits of a visible size
    x = torch.randn(1, 2, frames, 224, 224)
    with torch.no_grad():
        features = model.features(x)
        ours, reference = model.head(features), _port_clip_logits(model, x)
        model.temporal_pool = "mean"
        uniform = model.head(features)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))
    if features.shape[2] > 2:
        assert (uniform - reference).abs().max() > 1e-3 * reference.abs().max()


def test_port_pooling_weights_time_steps_one_two_two_one():
    """At T' = 4 the port weights the steps 1, 2, 2, 1 (/6); the window is clipped to small maps
    (below 224 px the port itself cannot run: the whole map is averaged) and to T' = 1."""
    model = build_i3d(3, width=0.125, temporal_pool="port").eval()
    features = torch.randn(2, model.feature_channels, 4, 2, 2)
    weights = torch.tensor([1.0, 2.0, 2.0, 1.0]) / 6
    pooled = (features.mean(dim=(3, 4)) * weights).sum(2)[..., None, None, None]
    with torch.no_grad():
        expected = model.logits(pooled).flatten(1)
        assert torch.allclose(model.head(features), expected, atol=1e-6)
        one_step = features[:, :, :1]
        assert torch.allclose(model.head(one_step), model.logits(one_step.mean((3, 4), keepdim=True)).flatten(1))
        assert model(torch.randn(1, 2, 8, 64, 64)).shape == (1, 3)


def test_mean_pooling_is_the_uniform_average():
    model = build_i3d(3, width=0.125).eval()
    assert model.temporal_pool == "mean"
    features = torch.randn(2, model.feature_channels, 4, 3, 3)
    with torch.no_grad():
        expected = model.logits(features.mean(dim=(2, 3, 4), keepdim=True)).flatten(1)
        assert torch.allclose(model.head(features), expected, atol=1e-6)
    with pytest.raises(ValueError, match="temporal_pool"):
        build_i3d(3, temporal_pool="max")
