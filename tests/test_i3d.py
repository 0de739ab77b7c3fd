"""I3D flow stream: port-compatible names, any input size 64..224, width multiplier."""

from __future__ import annotations

import pytest
import torch

from models.bundle_meta import FlowNormalisation
from models.i3d import build_i3d, flow_to_classifier_input


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
