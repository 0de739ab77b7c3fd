"""Motion-consistency purification (paper, Algorithm 1).

Starting from the (possibly attacked) clip X, take K signed-gradient steps that lower the MC loss
of X' and project X' back into the L-inf ball of radius eps_r around X and into [0, 1]. The bound
keeps the restored clip close to what was uploaded: without it, a constant clip (zero MC loss)
would be the trivial "restoration".

Near its minimum the fixed sign step oscillates, so its last iterate sits on a noise floor that is
above a clean clip's own MC loss (issue 18). ``DefenseConfig`` can therefore also keep the best
iterate, shrink the step, stop each clip at a target and start at random; ``PurifyResult``
records what each clip did so an attack can replay it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from models.defense.mc_loss import Similarity, mc_loss
from models.nets.flow import VideoRAFT

Schedule = Literal["constant", "plateau", "cosine"]


@dataclass(frozen=True)
class DefenseConfig:
    """Paper defaults: K=20, eta=2/255, eps_r=12/255; gradients through 2 RAFT updates.

    The fields after ``flow_updates`` switch on the converging purification (issue 18); their
    defaults are the paper's Algorithm 1, so a bundle that does not name them is unchanged:

    - ``keep_best``: return each clip's lowest-MC-loss iterate, not the last one (the fixed sign
      step oscillates around the minimum: its last iterate sits on a noise floor above it);
    - ``schedule``: the step size per clip, ``constant`` (paper), ``plateau`` (halved when the
      clip's best loss has not improved for ``patience`` steps, as APGD does) or ``cosine``
      (eta * (1 + cos(pi k / K)) / 2); eps_r stays the bound whatever the step;
    - ``stop_below``: a clip stops once its MC loss is at or under this target (a clean quantile
      of the calibration, resolved by the bundle); clips of one batch stop independently;
    - ``random_start``: x_0 drawn uniformly within this L-inf radius (<= eps_r) of the input, and
      ``restarts`` such runs whose predictions are averaged (``models.defense.pipeline``): randomness an
      attacker cannot fix.
    """

    steps: int = 20
    step_size: float = 2 / 255
    epsilon: float = 12 / 255
    lambda_smooth: float = 0.1
    edge_lambda: float = 150.0
    similarity: Similarity = "l1"
    multi: bool = False
    flow_updates: int = 2
    keep_best: bool = False
    schedule: Schedule = "constant"
    patience: int = 2
    stop_below: float | None = None
    random_start: float = 0.0
    restarts: int = 1

    def with_overrides(self, **overrides: object) -> DefenseConfig:
        """A copy with the given fields replaced; ``None`` values keep the current setting."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def directions(self) -> tuple[str, ...]:
        return ("forward", "backward", "long") if self.multi else ("forward",)

    @property
    def paper(self) -> bool:
        """Algorithm 1 as published (every converging part switched off)."""
        return (
            not self.keep_best
            and self.schedule == "constant"
            and self.stop_below is None
            and self.random_start == 0
            and self.restarts == 1
        )


@dataclass
class PurifyResult:
    """What the purification did, per clip; ``start``/``iterates``/``step_sizes``/``chosen`` let an
    attack replay the steps differentiably (``models.robustness.attacks.through``) whatever schedule produced them:
    x_0 = ``start`` and x_{k+1} = ``descent_step(x_k, origin, ..., step_sizes[k])`` exactly (a clip
    whose step is 0 stays where it is), and ``restored`` = x_{chosen}."""

    restored: Tensor  # (B, T, 3, H, W), within epsilon of the input and inside [0, 1]
    trajectory: Tensor  # (K + 1, B): MC loss (gradient-mode flow) at x_0 .. x_K (constant once a clip stopped)
    step_sizes: Tensor | None = None  # (K, B): the step each clip took at step k (0: it did not move)
    chosen: Tensor | None = None  # (B,) long: index k of the iterate returned (K: the last)
    iterates: list[Tensor] | None = None  # x_0 .. x_K (x_0: the start), only with keep_iterates
    start: Tensor | None = None  # (B, T, 3, H, W): x_0 (a copy of the input unless random_start)
    steps_taken: Tensor | None = None  # (B,) long: gradient evaluations (forward + backward) spent per clip
    stopped: Tensor | None = None  # (B,) bool: the clip reached stop_below before K steps


def clip_mc_loss(clip: Tensor, flow_model: VideoRAFT, config: DefenseConfig, flow_updates: int) -> Tensor:
    """MC loss (B,) of a clip under the config's loss settings, with its own flow."""
    flows = flow_model(clip, flow_updates, config.directions)
    return mc_loss(
        clip, flows, similarity=config.similarity, lambda_smooth=config.lambda_smooth, edge_lambda=config.edge_lambda
    )


def project(x: Tensor, center: Tensor, epsilon: float) -> Tensor:
    """Into the L-inf ball around ``center`` and into [0, 1]."""
    return torch.minimum(torch.maximum(x, center - epsilon), center + epsilon).clamp(0.0, 1.0)


def descent_step(
    x: Tensor,
    origin: Tensor,
    flow_model: VideoRAFT,
    config: DefenseConfig,
    step_size: Tensor,
    *,
    sign: Callable[[Tensor], Tensor] = torch.sign,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """One step of Algorithm 1: ``proj(x - step_size * sign(grad L_MC(x)))``; returns (x', L_MC(x)).

    ``step_size`` is (B,) so clips of one batch can follow their own schedules (0 keeps a clip in
    place). The purification calls it with ``torch.sign`` and no graph; an attack differentiating
    through the defence calls it with ``create_graph=True`` and a smooth ``sign`` stand-in.
    """
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        loss = clip_mc_loss(x, flow_model, config, config.flow_updates)
        (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    if not create_graph:
        x, grad, loss = x.detach(), grad.detach(), loss.detach()
    shape = (-1,) + (1,) * (x.dim() - 1)
    return project(x - step_size.view(shape) * sign(grad), origin, config.epsilon), loss


def random_start(clip: Tensor, config: DefenseConfig) -> Tensor:
    """x_0: the clip plus uniform noise within ``config.random_start`` (capped at eps_r), drawn from
    torch's global generator (seeded by the evaluation; unseeded, so unpredictable, in the service)."""
    radius = min(config.random_start, config.epsilon)
    if radius <= 0:
        return clip.detach().clone()
    noise = torch.rand(clip.shape, device=clip.device, dtype=clip.dtype) * 2 - 1
    return project(clip.detach() + radius * noise, clip.detach(), config.epsilon)


def _next_step_sizes(config: DefenseConfig, k: int, step: Tensor, since_best: Tensor) -> Tensor:
    """The step each clip takes after step ``k``. ``since_best`` (steps since each clip's best loss
    improved) is reset in place for the clips the plateau rule halves."""
    if config.schedule == "cosine":
        return torch.full_like(step, config.step_size * 0.5 * (1 + math.cos(math.pi * (k + 1) / config.steps)))
    if config.schedule == "plateau":
        halve = since_best >= config.patience
        since_best[halve] = 0
        return torch.where(halve, step / 2, step)
    return step


def purify(
    clip: Tensor,
    flow_model: VideoRAFT,
    config: DefenseConfig = DefenseConfig(),
    on_step: Callable[[int, Tensor], Tensor | None] | None = None,
    keep_iterates: bool = False,
    *,
    start: Tensor | None = None,
    start_loss: Tensor | None = None,
) -> PurifyResult:
    """Algorithm 1 on a batch of clips (B, T, 3, H, W) in [0, 1], with the config's converging parts.

    Each clip's gradient depends only on that clip (the models run in eval mode), so a batch is at
    most K steps for all clips at once; clips that reached ``stop_below`` leave the batch (their
    gradients are no longer computed) and the loop ends when none is left. ``on_step(k, loss)``
    is called after every step with the (B,) losses at x_k: progress, and the cancellation point;
    when it returns a (B,) bool tensor, the clips marked True leave the batch too (a batching
    worker's clips whose job was canceled or timed out: what they come back with is not used).
    ``start`` overrides x_0 (default: the clip, or a random start); ``start_loss`` is x_0's MC
    loss when the caller already has it (the inference pass): a clip already under
    ``stop_below`` then costs no gradient at all.
    """
    origin = clip.detach()
    x = (random_start(origin, config) if start is None else start.detach()).clone()
    batch, steps, device = x.shape[0], config.steps, x.device
    step = torch.full((batch,), config.step_size, device=device)
    step_sizes = torch.zeros((steps, batch), device=device)
    losses = torch.zeros((steps + 1, batch), device=device)
    current = torch.zeros(batch, device=device)  # each clip's latest loss
    taken = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    best_loss = torch.full((batch,), math.inf, device=device)
    since_best = torch.zeros(batch, dtype=torch.long, device=device)
    chosen = torch.full((batch,), steps, dtype=torch.long, device=device)
    x_0 = x.clone()
    best = x.clone() if config.keep_best else None
    iterates = [x_0] if keep_iterates else None
    if start_loss is not None and start is None and config.random_start <= 0 and config.stop_below is not None:
        current = start_loss.to(device, torch.float32).clone()
        done = current <= config.stop_below
        best_loss[done], chosen[done], stopped[done], active[done] = current[done], 0, True, False
    k_end = steps
    for k in range(steps):
        if not bool(active.any()):
            k_end = k
            break
        idx = active.nonzero().squeeze(1)
        moved, loss = descent_step(x[idx], origin[idx], flow_model, config, step[idx])
        taken[idx] += 1
        current[idx] = loss
        losses[k] = current
        improved = loss < best_loss[idx]
        since_best[idx] = torch.where(improved, 0, since_best[idx] + 1)
        best_loss[idx] = torch.where(improved, loss, best_loss[idx])
        if best is not None:
            best[idx[improved]] = x[idx[improved]]
            chosen[idx[improved]] = k
        done = loss <= config.stop_below if config.stop_below is not None else torch.zeros_like(improved)
        if best is None:
            chosen[idx[done]] = k
        stopped[idx[done]], active[idx[done]] = True, False
        go = idx[~done]
        step_sizes[k, go] = step[go]
        x[go] = moved[~done]
        step = _next_step_sizes(config, k, step, since_best)
        if on_step is not None:
            gone = on_step(k, current.clone())
            if gone is not None:
                active &= ~gone.to(device=device, dtype=torch.bool)
        if iterates is not None:
            iterates.append(x.clone())
    idx = active.nonzero().squeeze(1)
    if idx.numel():  # the loss at x_K of the clips that ran every step (a forward, no gradient)
        with torch.no_grad():
            final = clip_mc_loss(x[idx], flow_model, config, config.flow_updates)
        current[idx] = final
        if best is not None:
            better = final < best_loss[idx]
            best[idx[better]] = x[idx[better]]
            chosen[idx[better]] = steps
    losses[k_end:] = current
    if iterates is not None:
        iterates.extend(x.clone() for _ in range(steps + 1 - len(iterates)))
    restored = best if best is not None else x
    return PurifyResult(
        restored=restored,
        trajectory=losses,
        step_sizes=step_sizes,
        chosen=chosen,
        iterates=iterates,
        start=x_0,
        steps_taken=taken,
        stopped=stopped,
    )
