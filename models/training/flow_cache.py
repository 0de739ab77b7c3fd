"""Flows computed once and kept on disk: a classifier then trains for many epochs on them without
another RAFT pass (RAFT is ~100x the classifier's cost per clip on a CPU).

Files are float16 (half the disk and memory; far below RAFT's own error), written atomically, and
named by everything that changes their content (the caller builds the name), so an interrupted
caching run resumes at the first missing file and a changed setting never reads a stale one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from models.defense.purify import DefenseConfig, purify
from models.nets.flow import VideoRAFT
from models.training.common import atomic_save


@torch.no_grad()
def flows_of(
    video_raft: VideoRAFT, clips: Tensor, *, updates: int, batch: int, defense: DefenseConfig | None = None
) -> Tensor:
    """Forward flows (N, T-1, 2, H, W), float16 on the CPU, of clips (N, T, 3, H, W) in [0, 1], run in
    batches of ``batch`` clips; with ``defense`` each clip is purified first (the defended path)."""
    device = next(video_raft.parameters()).device
    out = []
    for b in range(0, len(clips), batch):
        part = clips[b : b + batch].to(device, torch.float32)
        if defense is not None:
            part = purify(part, video_raft, defense).restored  # takes its own pixel gradients
        out.append(video_raft(part, num_flow_updates=updates)["forward"].half().cpu())
    return torch.cat(out)


def load_or_compute(path: Path, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors saved at ``path``, or ``compute()``'s, saved there first."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = compute()
    atomic_save(saved, path)
    return saved
