"""Synthetic test clips made in code (no files): smooth textures moved by known shifts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_texture(height: int, width: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """A random texture with structure at several scales, values in [0, 1], shape (C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    tex = torch.zeros(channels, height, width)
    for cells in (4, 8, 16):
        noise = torch.rand(1, channels, cells, cells, generator=g)
        tex += F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)[0]
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    return tex.clamp(0, 1)


def translating_clip(frames: int, size: int, shift: tuple[int, int] = (2, 1), seed: int = 0) -> torch.Tensor:
    """(1, T, 3, size, size): a texture whose content moves by ``shift`` = (dx, dy) pixels per frame."""
    dx, dy = shift
    margin = (abs(dx) + abs(dy)) * frames + 4
    big = smooth_texture(size + 2 * margin, size + 2 * margin, seed)
    out = []
    for t in range(frames):
        # Content moving by +dx means the window into the big texture moves by -dx.
        top, left = margin - dy * t, margin - dx * t
        out.append(big[:, top : top + size, left : left + size])
    return torch.stack(out)[None]
