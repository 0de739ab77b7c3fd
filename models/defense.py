"""Motion-consistency purification (paper, Algorithm 1).

Starting from the (possibly attacked) clip X, take K signed-gradient steps that lower the MC loss
of X' and project X' back into the L-inf ball of radius eps_r around X and into [0, 1]. The bound
keeps the restored clip close to what was uploaded: without it, a constant clip (zero MC loss)
would be the trivial "restoration".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from models.flow import VideoRAFT
from models.mc_loss import Similarity, mc_loss


@dataclass(frozen=True)
class DefenseConfig:
    """Paper defaults: K=20, eta=2/255, eps_r=12/255; gradients through 2 RAFT updates."""

    steps: int = 20
    step_size: float = 2 / 255
    epsilon: float = 12 / 255
    lambda_smooth: float = 0.1
    edge_lambda: float = 150.0
    similarity: Similarity = "l1"
    multi: bool = False
    flow_updates: int = 2

    def with_overrides(self, **overrides: object) -> DefenseConfig:
        """A copy with the given fields replaced; ``None`` values keep the current setting."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def directions(self) -> tuple[str, ...]:
        return ("forward", "backward", "long") if self.multi else ("forward",)


@dataclass
class PurifyResult:
    """What the purification did, per clip; ``iterates``/``step_sizes``/``chosen`` let an attack
    replay the last steps differentiably (``models.attacks``) whatever schedule produced them."""

    restored: Tensor  # (B, T, 3, H, W), within epsilon of the input and inside [0, 1]
    trajectory: Tensor  # (K + 1, B): MC loss (gradient-mode flow) at each step, the last after step K
    step_sizes: Tensor | None = None  # (K, B): the step each clip took at step k (0: it did not move)
    chosen: Tensor | None = None  # (B,) long: index k of the iterate returned (K: the last)
    iterates: list[Tensor] | None = None  # x_0 .. x_K (x_0: the start), only with keep_iterates


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


def purify(
    clip: Tensor,
    flow_model: VideoRAFT,
    config: DefenseConfig = DefenseConfig(),
    on_step: Callable[[int, Tensor], None] | None = None,
    keep_iterates: bool = False,
) -> PurifyResult:
    """Algorithm 1 on a batch of clips (B, T, 3, H, W) in [0, 1].

    Each clip's gradient depends only on that clip (the models run in eval mode), so a batch is K
    steps for all clips at once. ``on_step(k, loss)`` reports progress on long runs.
    """
    origin = clip.detach()
    x = origin.clone()
    step = torch.full((x.shape[0],), config.step_size, device=x.device)
    losses: list[Tensor] = []
    iterates = [x] if keep_iterates else None
    for k in range(config.steps):
        x, loss = descent_step(x, origin, flow_model, config, step)
        losses.append(loss)
        if on_step is not None:
            on_step(k, loss)
        if iterates is not None:
            iterates.append(x)
    with torch.no_grad():
        losses.append(clip_mc_loss(x, flow_model, config, config.flow_updates))
    steps = config.steps
    return PurifyResult(
        restored=x,
        trajectory=torch.stack(losses),
        step_sizes=step.expand(steps, -1).clone(),
        chosen=torch.full((x.shape[0],), steps, dtype=torch.long, device=x.device),
        iterates=iterates,
    )
