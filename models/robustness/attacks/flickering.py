"""Flickering attack (Pony et al. 2021): one RGB shift per frame, uniform over the pixels (transfer,
last iterate scored)."""

from __future__ import annotations

import torch
from torch import Tensor

from models.robustness.attacks.base import Attack, AttackCall, AttackResult, LogitsFn


def flickering(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    epsilon: float = 32 / 255,
    steps: int = 300,
    lr: float = 1e-3,
    beta_thickness: float = 0.5,
    beta_roughness: float = 0.5,
    reg_weight: float = 1.0,
) -> Tensor:
    """Maximises a margin loss while penalising thickness (mean squared shift) and roughness (first and
    second temporal differences, cyclic), so the flicker stays faint and slow. Not an L-p attack in
    spirit; ``epsilon`` only caps the per-frame shift so clips stay valid images.
    """
    x = x.detach()
    delta = torch.zeros(x.shape[0], x.shape[1], 3, 1, 1, device=x.device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            logits = logits_fn((x + delta).clamp(0, 1))
            true = logits.gather(1, y[:, None])[:, 0]
            other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
            margin = (true - other).clamp_min(-0.05)  # stop pushing once fooled with a margin
            thickness = delta.pow(2).mean(dim=(1, 2, 3, 4))
            first = delta - delta.roll(1, dims=1)
            second = first - first.roll(1, dims=1)
            roughness = first.pow(2).mean(dim=(1, 2, 3, 4)) + second.pow(2).mean(dim=(1, 2, 3, 4))
            loss = margin + reg_weight * (beta_thickness * thickness + beta_roughness * roughness)
            optimiser.zero_grad()
            loss.sum().backward()
        optimiser.step()
        with torch.no_grad():
            delta.clamp_(-epsilon, epsilon)
    return (x + delta.detach()).clamp(0, 1)


def run(call: AttackCall) -> AttackResult:
    return AttackResult(flickering(call.grad_logits, call.x, call.y, call.epsilon, call.steps), None, call.steps)


FLICKER = Attack(run, steps=300, epsilon_255=32.0, gradient_path=True)
