"""Plumbing shared by the training stages (demo RAFT, demo I3D, fine-tuning): atomic checkpoints,
the budget-following learning-rate schedule, device checks and in-order batch loaders.

Each stage checkpoints model + optimizer + progress and resumes from it, so an interrupted save must
never leave a truncated file, and the schedule follows the *fraction of the budget used* so a
minutes-budgeted run still anneals properly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from models.errors import UserError


def atomic_save(obj: object, path: Path) -> None:
    """Write then rename: an interrupted save never leaves a truncated checkpoint behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def one_cycle_lr(base_lr: float, progress: float, warmup: float = 0.05, final: float = 0.05) -> float:
    """Linear warm-up to ``base_lr`` then linear decay to ``final * base_lr``, on progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base_lr * (0.1 + 0.9 * progress / warmup)
    return base_lr * (1.0 - (1.0 - final) * (progress - warmup) / (1.0 - warmup))


def training_device(name: str) -> torch.device:
    """The device a stage trains on; CUDA is an option, never a requirement, so asking for it on a
    machine without it is an error up front rather than a crash at the first batch."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda":
        # Full fp32: cached flows and the selection of the best epoch must not depend on TF32 rounding.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict on the CPU: final checkpoints load anywhere, whatever device trained them."""
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-8)


def ordered_loader(dataset: Dataset, workers: int) -> DataLoader:
    """Items in order (``batch_size=None``: each item already is a batch), rendered by ``workers``
    processes when > 0; renders are CPU-bound numpy-free torch code, one thread per worker."""
    extra = {"prefetch_factor": 2} if workers > 0 else {}
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, **extra)
