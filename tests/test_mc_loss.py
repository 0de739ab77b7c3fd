"""MC loss pieces with known answers."""

from __future__ import annotations

import pytest
import torch

from models.defense.mc_loss import backward_warp, mc_loss, photometric_loss, smoothness_loss

from helpers_video import translating_clip


def _true_flows(clip: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    b, t, _, h, w = clip.shape
    flow = torch.zeros(b, t - 1, 2, h, w)
    flow[:, :, 0] = shift[0]
    flow[:, :, 1] = shift[1]
    return flow


@pytest.mark.parametrize("similarity", ["l1", "l2", "ssim"])
def test_true_flow_reconstructs_and_wrong_flow_does_not(similarity):
    shift = (3, -2)
    clip = translating_clip(4, 48, shift)
    right = photometric_loss(clip[:, :-1], clip[:, 1:], _true_flows(clip, shift), similarity)
    wrong = photometric_loss(clip[:, :-1], clip[:, 1:], _true_flows(clip, (-3, 2)), similarity)
    zero = photometric_loss(clip[:, :-1], clip[:, 1:], torch.zeros_like(_true_flows(clip, shift)), similarity)
    # SSIM windows straddle the border of the valid region, so it is near (not exactly) zero.
    assert right.item() < (2e-3 if similarity == "ssim" else 1e-5)
    assert wrong.item() > 20 * max(right.item(), 1e-4)
    assert zero.item() > 10 * max(right.item(), 1e-4)


def test_warp_marks_outside_samples_invalid():
    image = torch.rand(1, 3, 8, 8)
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 0] = 3.0
    warped, valid = backward_warp(image, flow)
    assert valid[0, 0, :, :5].all() and not valid[0, 0, :, 5:].any()
    assert torch.allclose(warped[..., :5], image[..., 3:])


def test_smoothness_zero_for_constant_and_linear_flow():
    images = torch.rand(1, 2, 3, 16, 16)
    constant = torch.full((1, 2, 2, 16, 16), 2.5)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    linear = torch.stack([0.3 * xs - 0.2 * ys + 1, 0.1 * xs + 0.5 * ys]).expand(1, 2, 2, 16, 16)
    assert smoothness_loss(images, constant).abs().item() < 1e-6
    assert smoothness_loss(images, linear).abs().item() < 1e-5
    bumpy = linear + 0.5 * torch.randn(1, 2, 2, 16, 16)
    assert smoothness_loss(torch.zeros_like(images), bumpy).item() > 0.1


def test_smoothness_is_edge_aware():
    flat = torch.zeros(1, 1, 3, 16, 16)
    edgy = torch.zeros(1, 1, 3, 16, 16)
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    edgy[...] = ((xs // 2 + ys // 2) % 2).float()
    bumpy = torch.randn(1, 1, 2, 16, 16)
    assert smoothness_loss(edgy, bumpy).item() < 0.01 * smoothness_loss(flat, bumpy).item()


def test_mc_loss_single_and_multi_constraint():
    shift = (2, 1)
    clip = translating_clip(4, 48, shift)
    forward = _true_flows(clip, shift)
    backward = -forward
    long = torch.zeros(1, 2, 2, 48, 48)
    long[:, :, 0], long[:, :, 1] = 2 * shift[0], 2 * shift[1]
    single = mc_loss(clip, {"forward": forward})
    multi = mc_loss(clip, {"forward": forward, "backward": backward, "long": long})
    assert single.shape == (1,) and single.item() < 1e-5
    assert multi.item() < 1e-4
    bad_long = mc_loss(clip, {"forward": forward, "backward": backward, "long": torch.zeros_like(long)})
    assert bad_long.item() > 100 * multi.item() + 1e-3
    with pytest.raises(ValueError):
        mc_loss(clip, {"backward": backward})
