"""The motion-consistency (MC) loss: how well a clip's own optical flow explains the clip.

Adversarial perturbations of the pixels corrupt the estimated flow, so frames warped with it no
longer reconstruct their neighbours and the flow loses its smoothness: the MC loss rises. The
defence lowers it again (``models.defense.purify``); the monitor watches it for drift.

Conventions: clips (B, T, 3, H, W) in [0, 1]; flow f_t (B, 2, H, W) in pixels, channel 0 = x, maps a
pixel p of the source frame to p + f_t(p) in the target frame.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.nets.flow import pair_indices

Similarity = Literal["l1", "l2", "ssim"]


def backward_warp(target: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
    """Sample ``target`` at p + flow(p): reconstructs the source frame from the target frame.

    Returns the warped image (N, C, H, W) and a validity mask (N, 1, H, W) that is 0 where the
    sampling point falls outside the target frame (content that entered the view: no evidence).
    """
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=flow.dtype),
        torch.arange(w, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)
    warped = F.grid_sample(target, grid, mode="bilinear", padding_mode="border", align_corners=True)
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return warped, inside.unsqueeze(1).to(target.dtype).detach()


def _ssim_distance(a: Tensor, b: Tensor) -> Tensor:
    """(1 - SSIM) / 2 per pixel with 3x3 windows (as in self-supervised depth/flow work)."""
    c1, c2 = 0.01**2, 0.03**2
    pool = lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a**2
    var_b = pool(b * b) - mu_b**2
    cov = pool(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ((1 - ssim) / 2).clamp(0, 1)


def similarity_distance(reconstructed: Tensor, original: Tensor, similarity: Similarity = "l1") -> Tensor:
    """Per-pixel dissimilarity (N, 1, H, W), averaged over colour channels."""
    if similarity == "l1":
        d = (reconstructed - original).abs()
    elif similarity == "l2":
        d = (reconstructed - original) ** 2
    elif similarity == "ssim":
        d = _ssim_distance(reconstructed, original)
    else:
        raise ValueError(f"unknown similarity {similarity!r}; expected l1, l2 or ssim")
    return d.mean(dim=1, keepdim=True)


def photometric_loss(sources: Tensor, targets: Tensor, flows: Tensor, similarity: Similarity = "l1") -> Tensor:
    """Eq. 1-2 per clip: mean over pairs and valid pixels of Lsim(w(target, flow), source).

    ``sources``, ``targets``: (B, P, 3, H, W) frames of each pair; ``flows``: (B, P, 2, H, W).
    Returns (B,).
    """
    batch, pairs = flows.shape[:2]
    warped, valid = backward_warp(targets.flatten(0, 1), flows.flatten(0, 1))
    dist = similarity_distance(warped, sources.flatten(0, 1), similarity) * valid
    dist = dist.reshape(batch, pairs, -1).sum(dim=(1, 2))
    count = valid.reshape(batch, pairs, -1).sum(dim=(1, 2)).clamp_min(1.0)
    return dist / count


def smoothness_loss(images: Tensor, flows: Tensor, edge_lambda: float = 150.0) -> Tensor:
    """Eq. 3 per clip: edge-aware second-order smoothness of the flow.

    exp(-lambda/3 * sum_c |dI_c/dx|) * |d2V/dx2| + the same in y, averaged over pixels, flow channels
    and pairs. ``images`` are the flows' source frames (B, P, 3, H, W). A constant or a linear
    (affine) flow field costs exactly 0. Returns (B,).
    """
    batch, pairs = flows.shape[:2]
    img = images.flatten(0, 1)
    flow = flows.flatten(0, 1)
    # Image gradients at the centre of each second-difference stencil.
    grad_x = (img[..., :, 2:] - img[..., :, :-2]).abs().sum(dim=1, keepdim=True) / 2
    grad_y = (img[..., 2:, :] - img[..., :-2, :]).abs().sum(dim=1, keepdim=True) / 2
    weight_x = torch.exp(-edge_lambda / 3 * grad_x)
    weight_y = torch.exp(-edge_lambda / 3 * grad_y)
    d2x = (flow[..., :, 2:] - 2 * flow[..., :, 1:-1] + flow[..., :, :-2]).abs()
    d2y = (flow[..., 2:, :] - 2 * flow[..., 1:-1, :] + flow[..., :-2, :]).abs()
    loss_x = (weight_x * d2x).reshape(batch, pairs, -1).mean(dim=(1, 2))
    loss_y = (weight_y * d2y).reshape(batch, pairs, -1).mean(dim=(1, 2))
    return (loss_x + loss_y) / 2


def _pair_frames(clip: Tensor, direction: str) -> tuple[Tensor, Tensor]:
    src, dst = pair_indices(clip.shape[1], direction)
    return clip[:, src], clip[:, dst]


def mc_loss(
    clip: Tensor,
    flows: dict[str, Tensor],
    *,
    similarity: Similarity = "l1",
    lambda_smooth: float = 0.1,
    edge_lambda: float = 150.0,
) -> Tensor:
    """Eq. 4 (``flows`` has only "forward") or Eq. 10 (also "backward" and "long"), per clip (B,).

    Multi-constraint: L_forward + L_backward + L_long + lambda_smooth * L_smooth, the smoothness taken
    over the forward flows as in Eq. 4.
    """
    if "forward" not in flows:
        raise ValueError("mc_loss needs the forward flows")
    total = clip.new_zeros(clip.shape[0])
    for direction, flow in flows.items():
        sources, targets = _pair_frames(clip, direction)
        total = total + photometric_loss(sources, targets, flow, similarity)
    if lambda_smooth:
        sources, _ = _pair_frames(clip, "forward")
        total = total + lambda_smooth * smoothness_loss(sources, flows["forward"], edge_lambda)
    return total
