"""Video RAFT: optical flow for every frame pair of a clip, with the feature encoder run once per frame.

torchvision's ``RAFT.forward(image1, image2)`` encodes both images of a pair. For a clip of T frames
the adjacent pairs share frames, so the pairwise call encodes 2(T-1) images where T suffice, and the
multi-constraint defence (forward, backward and long-range pairs) would encode them 6(T-1)+T times.
``VideoRAFT`` runs the feature encoder once per frame and the context encoder once per source frame,
then runs torchvision's own correlation block and update block on all requested pairs in one batch
(paper, Appendix B.1). The modules are torchvision's, so its checkpoints load unchanged and the
outputs equal its pairwise forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.optical_flow import raft_large, raft_small
from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow
from torchvision.models.optical_flow.raft import RAFT, CorrBlock

DIRECTIONS = ("forward", "backward", "long")

_DEFAULT_ARCH = {
    "raft_small": {"builder": raft_small, "corr_levels": 4, "corr_radius": 3},
    "raft_large": {"builder": raft_large, "corr_levels": 4, "corr_radius": 4},
}


def build_raft(arch: str = "raft_small", *, corr_levels: int | None = None, corr_radius: int | None = None) -> RAFT:
    """A torchvision RAFT with random weights (``weights=None``: nothing is downloaded).

    ``corr_levels=3`` lets RAFT take 64x64 inputs (the pyramid's coarsest level still has 2 cells);
    torchvision's pretrained checkpoints assume the default 4 levels.
    """
    if arch not in _DEFAULT_ARCH:
        raise ValueError(f"unknown flow arch {arch!r}; expected one of {sorted(_DEFAULT_ARCH)}")
    spec = _DEFAULT_ARCH[arch]
    levels = corr_levels or spec["corr_levels"]
    radius = corr_radius or spec["corr_radius"]
    return spec["builder"](weights=None, progress=False, corr_block=CorrBlock(num_levels=levels, radius=radius))


def pair_indices(num_frames: int, direction: str) -> tuple[list[int], list[int]]:
    """Source and target frame indices of each pair: flow is estimated from source to target."""
    if num_frames < 2:
        raise ValueError(f"a clip needs at least 2 frames for optical flow, got {num_frames}")
    if direction == "forward":
        return list(range(num_frames - 1)), list(range(1, num_frames))
    if direction == "backward":
        return list(range(1, num_frames)), list(range(num_frames - 1))
    if direction == "long":
        half = num_frames // 2
        return list(range(half)), list(range(half, 2 * half))
    raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


@dataclass(frozen=True)
class _Geometry:
    """How a (H, W) input is brought to a size RAFT accepts, and how flow is mapped back."""

    height: int
    width: int
    scaled_height: int
    scaled_width: int
    pad: tuple[int, int, int, int]  # (left, right, top, bottom), F.pad's order

    @classmethod
    def centred(cls, height: int, width: int, scaled_height: int, scaled_width: int) -> _Geometry:
        """Pad to a multiple of 8 as the RAFT release's ``InputPadder`` (Sintel mode) does: centred,
        the odd pixel at the bottom/right. Flow near the borders depends on where the padding goes,
        so a checkpoint only reproduces its own evaluation numbers with its own padding."""
        pad_h, pad_w = (-scaled_height) % 8, (-scaled_width) % 8
        pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        return cls(height, width, scaled_height, scaled_width, pad)

    @property
    def resized(self) -> bool:
        return (self.scaled_height, self.scaled_width) != (self.height, self.width)


class VideoRAFT(nn.Module):
    """Flow for every (source, target) pair of a clip, sharing per-frame encoder work.

    Input clips are in [0, 1] with shape (B, T, 3, H, W); flows come back in pixels of the input,
    shape (B, P, 2, H, W), channel 0 horizontal. Inputs smaller than RAFT's minimum are resized up
    (and the flow scaled back down); sizes not divisible by 8 are padded by edge replication,
    centred like the RAFT release's ``InputPadder`` (Sintel mode), and the padding cut off again.
    """

    def __init__(self, raft: RAFT):
        super().__init__()
        self.raft = raft
        # The coarsest correlation level needs >= 2 cells: 8 px per cell, halved (levels - 1) times.
        self.min_size = 8 * 2 * 2 ** (raft.corr_block.num_levels - 1)

    def _geometry(self, height: int, width: int) -> _Geometry:
        scale = max(1.0, self.min_size / height, self.min_size / width)
        sh, sw = (math.ceil(height * scale), math.ceil(width * scale)) if scale > 1 else (height, width)
        return _Geometry.centred(height, width, sh, sw)

    def _prepare(self, frames: Tensor, geo: _Geometry) -> Tensor:
        """[0,1] frames (N,3,H,W) -> RAFT's [-1,1] input at a size it accepts."""
        x = frames * 2.0 - 1.0
        if geo.resized:
            x = F.interpolate(x, size=(geo.scaled_height, geo.scaled_width), mode="bilinear", align_corners=False)
        if any(geo.pad):
            x = F.pad(x, geo.pad, mode="replicate")
        return x

    @staticmethod
    def _restore(flow: Tensor, geo: _Geometry) -> Tensor:
        left, _, top, _ = geo.pad
        flow = flow[..., top : top + geo.scaled_height, left : left + geo.scaled_width]
        if geo.resized:
            flow = F.interpolate(flow, size=(geo.height, geo.width), mode="bilinear", align_corners=False)
            factor = flow.new_tensor([geo.width / geo.scaled_width, geo.height / geo.scaled_height])
            flow = flow * factor.view(1, 2, 1, 1)
        return flow

    def encode(self, clip: Tensor) -> tuple[Tensor, _Geometry]:
        """Feature maps of every frame, (B, T, C, h, w): the encoder work shared by all pairs."""
        batch, frames, _, height, width = clip.shape
        geo = self._geometry(height, width)
        images = self._prepare(clip.reshape(batch * frames, *clip.shape[2:]), geo)
        fmaps = self.raft.feature_encoder(images)
        return fmaps.reshape(batch, frames, *fmaps.shape[1:]), geo

    def forward(
        self,
        clip: Tensor,
        num_flow_updates: int = 12,
        directions: Sequence[str] = ("forward",),
    ) -> dict[str, Tensor]:
        """Flows for each requested direction: ``{"forward": (B, T-1, 2, H, W), ...}``."""
        if clip.dim() != 5 or clip.shape[2] != 3:
            raise ValueError(f"expected a clip of shape (B, T, 3, H, W), got {tuple(clip.shape)}")
        batch, frames = clip.shape[:2]
        fmaps, geo = self.encode(clip)
        pairs = {d: pair_indices(frames, d) for d in directions}
        sources = sorted({s for src, _ in pairs.values() for s in src})
        context_of = self._context(clip, sources, geo)

        src_all = [s for d in directions for s in pairs[d][0]]
        dst_all = [t for d in directions for t in pairs[d][1]]
        fmap1 = fmaps[:, src_all].flatten(0, 1)
        fmap2 = fmaps[:, dst_all].flatten(0, 1)
        slot = {s: i for i, s in enumerate(sources)}
        hidden, context = (part[:, [slot[s] for s in src_all]].flatten(0, 1) for part in context_of)
        flow = self._iterate(fmap1, fmap2, hidden, context, num_flow_updates)
        flow = self._restore(flow, geo).reshape(batch, len(src_all), 2, geo.height, geo.width)

        out: dict[str, Tensor] = {}
        start = 0
        for d in directions:
            count = len(pairs[d][0])
            out[d] = flow[:, start : start + count]
            start += count
        return out

    def _context(self, clip: Tensor, sources: list[int], geo: _Geometry) -> tuple[Tensor, Tensor]:
        """Initial hidden state and context of each source frame, (B, S, C, h, w) each."""
        batch = clip.shape[0]
        images = self._prepare(clip[:, sources].flatten(0, 1), geo)
        context_out = self.raft.context_encoder(images)
        hidden_size = self.raft.update_block.hidden_state_size
        hidden, context = torch.split(context_out, [hidden_size, context_out.shape[1] - hidden_size], dim=1)
        hidden = torch.tanh(hidden).reshape(batch, len(sources), *hidden.shape[1:])
        context = F.relu(context).reshape(batch, len(sources), *context.shape[1:])
        return hidden, context

    def _iterate(self, fmap1: Tensor, fmap2: Tensor, hidden: Tensor, context: Tensor, updates: int) -> Tensor:
        """torchvision's RAFT update loop on a batch of pairs; returns the last upsampled flow."""
        if updates < 1:
            raise ValueError("num_flow_updates must be >= 1")
        raft = self.raft
        raft.corr_block.build_pyramid(fmap1, fmap2)
        n, _, h, w = fmap1.shape
        coords0 = make_coords_grid(n, h, w).to(fmap1.device)
        coords1 = coords0.clone()
        for _ in range(updates):
            coords1 = coords1.detach()  # as torchvision and the original RAFT: no gradient along coords
            corr = raft.corr_block.index_pyramid(centroids_coords=coords1)
            hidden, delta = raft.update_block(hidden, context, corr, coords1 - coords0)
            coords1 = coords1 + delta
        up_mask = None if raft.mask_predictor is None else raft.mask_predictor(hidden)
        return upsample_flow(flow=coords1 - coords0, up_mask=up_mask)


def build_video_raft(
    arch: str = "raft_small", *, corr_levels: int | None = None, corr_radius: int | None = None
) -> VideoRAFT:
    """A ``VideoRAFT`` around a randomly initialised torchvision RAFT; load weights afterwards."""
    return VideoRAFT(build_raft(arch, corr_levels=corr_levels, corr_radius=corr_radius))


def pairwise_flows(raft: RAFT, clip: Tensor, num_flow_updates: int = 12, direction: str = "forward") -> Tensor:
    """The reference: torchvision's own pairwise call on every pair (encoders run on both frames).

    Same input convention and output shape as ``VideoRAFT``; used by the equivalence tests and
    as the baseline of ``motionguard bench flow``. Needs H, W that RAFT accepts as they are.
    """
    batch, frames = clip.shape[:2]
    src, dst = pair_indices(frames, direction)
    image1 = clip[:, src].flatten(0, 1) * 2.0 - 1.0
    image2 = clip[:, dst].flatten(0, 1) * 2.0 - 1.0
    flow = raft(image1, image2, num_flow_updates=num_flow_updates)[-1]
    return flow.reshape(batch, len(src), *flow.shape[1:])
