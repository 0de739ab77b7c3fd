"""PGD (Madry et al. 2018): projected sign-gradient ascent in the L-inf ball, crafted on the undefended
model and judged through the defence (transfer)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.robustness.attacks.base import (
    AttackCall,
    FirstSuccess,
    LogitsFn,
    ce_loss,
    input_grad,
    project,
    transfer,
)


def pgd(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    mask: Tensor | None = None,
    loss_fn: Callable[[Tensor], Tensor] | None = None,
    tracker: FirstSuccess | None = None,
    check_every: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on CE (or on ``loss_fn(x_adv)`` per sample) within the L-inf ball.

    ``mask`` (broadcastable to x) restricts the perturbation, e.g. to one frame. With a ``tracker``,
    every ``check_every``-th iterate before the last is offered to it, the attack stops once every
    clip has succeeded, and the last iterate is what open clips end with. ``generator`` (CPU) draws
    the random start instead of the global RNG, for callers whose noise is a function of their step.
    """
    step_size = epsilon / 4 if step_size is None else step_size
    mask = torch.ones_like(x[:1]) if mask is None else mask
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand_like(x) if generator is None else torch.rand(x.shape, generator=generator).to(x.device)
        x_adv = project(x + (noise * 2 - 1) * epsilon * mask, x, epsilon)

    if loss_fn is None:

        def loss_fn(z: Tensor) -> Tensor:
            return ce_loss(logits_fn(z), y)

    for k in range(1, steps + 1):
        _, grad = input_grad(loss_fn, x_adv)
        x_adv = project(x_adv + step_size * grad.sign() * mask, x, epsilon)
        if tracker is not None and check_every and k % check_every == 0 and k < steps:
            tracker.offer(k, x_adv)
            if tracker.done:
                break
    if tracker is not None:
        tracker.finish(x_adv)
    return x_adv.detach()


def _craft(c: AttackCall, t: FirstSuccess) -> None:
    pgd(c.grad_logits, c.x, c.y, c.epsilon, c.steps, c.step_size, tracker=t, check_every=c.check)


PGD = transfer(_craft, steps=20, check=10, gradient_path=True)
