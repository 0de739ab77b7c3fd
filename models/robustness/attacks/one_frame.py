"""One-frame attack: PGD on the single most damaging frame of each clip (transfer)."""

from __future__ import annotations

import torch
from torch import Tensor

from models.robustness.attacks.base import (
    AttackCall,
    FirstSuccess,
    LogitsFn,
    ce_loss,
    input_grad,
    transfer,
)
from models.robustness.attacks.pgd import pgd


def one_frame(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
    tracker: FirstSuccess | None = None,
    check_every: int = 0,
) -> Tensor:
    """PGD on the frame with the largest CE gradient mass at the input, the other frames untouched."""
    _, grad = input_grad(lambda z: ce_loss(logits_fn(z), y), x)
    frame = grad.abs().flatten(2).sum(dim=2).argmax(dim=1)  # (B,)
    mask = torch.zeros_like(x)
    mask[torch.arange(x.shape[0]), frame] = 1.0
    return pgd(logits_fn, x, y, epsilon, steps, step_size, mask=mask, tracker=tracker, check_every=check_every)


def _craft(c: AttackCall, t: FirstSuccess) -> None:
    one_frame(c.grad_logits, c.x, c.y, c.epsilon, c.steps, c.step_size, tracker=t, check_every=c.check)


ONE_FRAME = transfer(_craft, steps=20, check=10, gradient_path=True)
