"""Attacks on the undefended model (clips in [0, 1], L-inf unless said), for the robustness evaluation.

Every attack takes a batch of clips (B, T, 3, H, W) with their true labels and returns the
adversarial clips. Gradients through RAFT use 2 flow updates (``Pipeline.logits(x, 2)``: with 12 the
recurrence obfuscates gradients, paper App. A.1); accuracies are always measured with 12.

PGD, APGD-CE/DLR, one-frame and flickering target the undefended model and are then judged through
the defence (transfer). Adaptive I (CE - lambda * L_MC) and II (CE - lambda * |G(x+d) - G(x)|) know
the defence's loss but still take undefended gradients. The attacks that differentiate through the
purification (BPDA, through-defence) are in ``models.robustness.through``.

The purified prediction is chaotic per clip (one iterate fools it, the next does not), so an attack
that returns its last iterate understates itself. ``FirstSuccess`` keeps, per clip, the first
iterate a judge (the real defended prediction) accepts; PGD and APGD offer it an iterate every
``check_every`` steps, since for a transfer attack each check costs one defended prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.defense.pipeline import Pipeline
from models.defense.purify import DefenseConfig, project

LogitsFn = Callable[[Tensor], Tensor]
# (open clips (b, ...), open mask (B,)) -> (b,) bool: does each clip count as the attack's success
Judge = Callable[[Tensor, Tensor], Tensor]

GRAD_UPDATES = 2


class FirstSuccess:
    """Per clip, the first iterate the judge accepts; for clips it never accepts, the last one offered.

    ``at[b]`` is the attack step of the kept iterate (-1: never accepted). Only clips still open are
    judged, so a batch whose clips have all succeeded can stop early (``done``).
    """

    def __init__(self, x: Tensor, judge: Judge | None = None):
        self.kept = x.detach().clone()
        self.at = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        self.judge = judge

    @property
    def open(self) -> Tensor:
        return self.at < 0

    @property
    def done(self) -> bool:
        return not bool(self.open.any())

    def offer(self, step: int, x: Tensor, success: Tensor | None = None) -> None:
        """Record iterate ``x`` of step ``step``; ``success`` (B,) if already known, else the judge decides."""
        open_ = self.open
        if not open_.any():
            return
        if success is None:
            if self.judge is None:
                raise ValueError("FirstSuccess.offer needs a success mask or a judge")
            success = torch.zeros_like(open_)
            success[open_] = self.judge(x[open_].detach(), open_).to(open_.device)
        self.kept[open_] = x[open_].detach()
        self.at[open_ & success] = step

    def finish(self, x: Tensor) -> None:
        """The attack's last iterate becomes the result of every clip still open (not judged here: the
        evaluation's own defended prediction of the result judges it, so no defence runs twice)."""
        open_ = self.open
        self.kept[open_] = x[open_].detach()


def random_start(x: Tensor, epsilon: float, kind: str = "uniform") -> Tensor:
    """A start inside the ball: ``uniform`` per pixel, or ``autoattack`` (APGD's: a uniform draw rescaled
    so its largest pixel is exactly eps, then clipped to [0, 1])."""
    t = torch.rand_like(x) * 2 - 1
    if kind == "autoattack":
        scale = t.abs().flatten(1).amax(dim=1).clamp_min(1e-12).view((-1,) + (1,) * (x.dim() - 1))
        return (x + epsilon * t / scale).clamp(0.0, 1.0)
    return project(x + t * epsilon, x, epsilon)


def _input_grad(loss_fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample losses (B,) and the gradient of their sum w.r.t. ``x``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): scale-invariant margin; needs >= 3 classes."""
    sorted_logits, _ = logits.sort(dim=1)
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    best_other = others.max(dim=1).values
    denom = sorted_logits[:, -1] - sorted_logits[:, -3] + 1e-12
    return -(true - best_other) / denom


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
) -> Tensor:
    """Projected gradient ascent on CE (or on ``loss_fn(x_adv)`` per sample) within the L-inf ball.

    ``mask`` (broadcastable to x) restricts the perturbation, e.g. to one frame. With a ``tracker``,
    every ``check_every``-th iterate before the last is offered to it, the attack stops once every
    clip has succeeded, and the last iterate is what open clips end with.
    """
    step_size = epsilon / 4 if step_size is None else step_size
    mask = torch.ones_like(x[:1]) if mask is None else mask
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = project(x + (torch.rand_like(x) * 2 - 1) * epsilon * mask, x, epsilon)

    if loss_fn is None:

        def loss_fn(z: Tensor) -> Tensor:
            return ce_loss(logits_fn(z), y)

    for k in range(1, steps + 1):
        _, grad = _input_grad(loss_fn, x_adv)
        x_adv = project(x_adv + step_size * grad.sign() * mask, x, epsilon)
        if tracker is not None and check_every and k % check_every == 0 and k < steps:
            tracker.offer(k, x_adv)
            if tracker.done:
                break
    if tracker is not None:
        tracker.finish(x_adv)
    return x_adv.detach()


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
    """APGD (Croce & Hein 2020, as in AutoAttack): random start, momentum 0.75, step halving at checkpoints.

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
    loss_cur, grad = _input_grad(objective, x_cur)
    best_x, best_loss = x_cur.clone(), loss_cur.clone()
    x_prev = x_cur.clone()
    improved_count = torch.zeros(batch, device=x.device)
    last_check, loss_at_check, step_at_check = 0, best_loss.clone(), step.clone()
    for k in range(steps):
        z = project(x_cur + step.view(shape) * grad.sign(), x, epsilon)
        momentum = 0.75 if k > 0 else 1.0
        x_next = project(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev), x, epsilon)
        loss_next, grad_next = _input_grad(objective, x_next)
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
                _, grad_best = _input_grad(objective, x_cur)
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
    """PGD on the single most damaging frame of each clip (largest CE gradient mass at the input)."""
    _, grad = _input_grad(lambda z: ce_loss(logits_fn(z), y), x)
    frame = grad.abs().flatten(2).sum(dim=2).argmax(dim=1)  # (B,)
    mask = torch.zeros_like(x)
    mask[torch.arange(x.shape[0]), frame] = 1.0
    return pgd(logits_fn, x, y, epsilon, steps, step_size, mask=mask, tracker=tracker, check_every=check_every)


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
    """Flickering attack (Pony et al. 2021): one RGB shift per frame, uniform over the pixels.

    Maximises a margin loss while penalising thickness (mean squared shift) and roughness (first and
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


def adaptive_mc(
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    lam: float,
    defense: DefenseConfig | None = None,
    steps: int = 20,
    tracker: FirstSuccess | None = None,
    check_every: int = 0,
) -> Tensor:
    """Adaptive I: maximise CE - lambda * L_MC, so the result also looks motion-consistent."""
    config = defense or pipeline.defense

    def objective(z: Tensor) -> Tensor:
        flows = pipeline.flow_model(z, GRAD_UPDATES, config.directions)
        logits = pipeline.classify_flows(flows["forward"])
        return ce_loss(logits, y) - lam * pipeline.mc_loss_of(z, flows, config)

    return pgd(pipeline.logits, x, y, epsilon, steps, loss_fn=objective, tracker=tracker, check_every=check_every)


def adaptive_flow(
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    lam: float,
    steps: int = 20,
    tracker: FirstSuccess | None = None,
    check_every: int = 0,
) -> Tensor:
    """Adaptive II (FlowReg): maximise CE - lambda * mean |G(x+d) - G(x)|, a "stealthy" flow change."""
    with torch.no_grad():
        clean_flow = pipeline.flow_model(x, GRAD_UPDATES)["forward"]

    def objective(z: Tensor) -> Tensor:
        flow = pipeline.flow_model(z, GRAD_UPDATES)["forward"]
        change = (flow - clean_flow).abs().mean(dim=(1, 2, 3, 4))
        return ce_loss(pipeline.classify_flows(flow), y) - lam * change

    return pgd(pipeline.logits, x, y, epsilon, steps, loss_fn=objective, tracker=tracker, check_every=check_every)
