"""APGD (Croce & Hein 2020, as in AutoAttack) on CE or DLR, crafted on the undefended model and judged
through the defence (transfer)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from models.robustness.attacks.base import (
    AttackCall,
    FirstSuccess,
    LogitsFn,
    ce_loss,
    dlr_loss,
    input_grad,
    project,
    random_start,
    transfer,
)


def apgd(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    steps: int = 10,
    loss: str = "ce",
    rho: float = 0.75,
    tracker: FirstSuccess | None = None,
    check_every: int = 0,
) -> Tensor:
    """APGD: random start, momentum 0.75, step halving at checkpoints.

    Per sample: the step size starts at 2*eps and halves at a checkpoint when fewer than rho of the
    steps since the last checkpoint raised the loss (or the step size and best loss didn't change).
    Returns the best point found per sample. A ``tracker`` is offered every ``check_every``-th
    iterate before the last; open clips end with their best point.
    """
    loss_of = {"ce": ce_loss, "dlr": dlr_loss}[loss]
    x = x.detach()
    batch = x.shape[0]
    shape = (batch,) + (1,) * (x.dim() - 1)

    def objective(z: Tensor) -> Tensor:
        return loss_of(logits_fn(z), y)

    # Checkpoints w_j: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    fractions = [0.0, 0.22]
    while fractions[-1] < 1:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    checkpoints = sorted({math.ceil(f * steps) for f in fractions if 0 < f <= 1})

    step = torch.full((batch,), 2.0 * epsilon, device=x.device)
    x_cur = random_start(x, epsilon, "autoattack")
    loss_cur, grad = input_grad(objective, x_cur)
    best_x, best_loss = x_cur.clone(), loss_cur.clone()
    x_prev = x_cur.clone()
    improved_count = torch.zeros(batch, device=x.device)
    last_check, loss_at_check, step_at_check = 0, best_loss.clone(), step.clone()
    for k in range(steps):
        z = project(x_cur + step.view(shape) * grad.sign(), x, epsilon)
        momentum = 0.75 if k > 0 else 1.0
        x_next = project(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev), x, epsilon)
        loss_next, grad_next = input_grad(objective, x_next)
        improved_count += (loss_next > loss_cur).float()
        better = loss_next > best_loss
        best_x[better], best_loss[better] = x_next[better], loss_next[better]
        x_prev, x_cur, loss_cur, grad = x_cur, x_next, loss_next, grad_next
        if k + 1 in checkpoints:
            window = k + 1 - last_check
            stalled = improved_count < rho * window
            unchanged = (step_at_check == step) & (loss_at_check == best_loss)
            halve = stalled | unchanged
            step = torch.where(halve, step / 2, step)
            # restart halved samples from their best point
            x_cur[halve] = best_x[halve]
            loss_cur[halve] = best_loss[halve]
            if halve.any():
                _, grad_best = input_grad(objective, x_cur)
                grad[halve] = grad_best[halve]
            improved_count.zero_()
            last_check, loss_at_check, step_at_check = k + 1, best_loss.clone(), step.clone()
        if tracker is not None and check_every and (k + 1) % check_every == 0 and k + 1 < steps:
            tracker.offer(k + 1, x_cur)
            if tracker.done:
                return best_x.detach()
    if tracker is not None:
        tracker.finish(best_x)
    return best_x.detach()


def _crafter(loss: str) -> Callable[[AttackCall, FirstSuccess], None]:
    def craft(c: AttackCall, t: FirstSuccess) -> None:
        apgd(c.grad_logits, c.x, c.y, c.epsilon, c.steps, loss=loss, tracker=t, check_every=c.check)

    return craft


APGD_CE = transfer(_crafter("ce"), steps=10, check=5, gradient_path=True)
APGD_DLR = transfer(_crafter("dlr"), steps=10, check=5, gradient_path=True)
