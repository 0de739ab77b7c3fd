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
    restored: Tensor  # (B, T, 3, H, W), within epsilon of the input and inside [0, 1]
    trajectory: Tensor  # (K + 1, B): MC loss (gradient-mode flow) at each step, the last after step K


def clip_mc_loss(clip: Tensor, flow_model: VideoRAFT, config: DefenseConfig, flow_updates: int) -> Tensor:
    """MC loss (B,) of a clip under the config's loss settings, with its own flow."""
    flows = flow_model(clip, flow_updates, config.directions)
    return mc_loss(
        clip, flows, similarity=config.similarity, lambda_smooth=config.lambda_smooth, edge_lambda=config.edge_lambda
    )


def project(x: Tensor, center: Tensor, epsilon: float) -> Tensor:
    """Into the L-inf ball around ``center`` and into [0, 1]."""
    return torch.minimum(torch.maximum(x, center - epsilon), center + epsilon).clamp(0.0, 1.0)


def purify(
    clip: Tensor,
    flow_model: VideoRAFT,
    config: DefenseConfig = DefenseConfig(),
    on_step: Callable[[int, Tensor], None] | None = None,
) -> PurifyResult:
    """Algorithm 1 on a batch of clips (B, T, 3, H, W) in [0, 1].

    Each clip's gradient depends only on that clip (the models run in eval mode), so a batch is K
    steps for all clips at once. ``on_step(k, loss)`` reports progress on long runs.
    """
    origin = clip.detach()
    x = origin.clone()
    losses: list[Tensor] = []
    for k in range(config.steps):
        with torch.enable_grad():
            x.requires_grad_(True)
            loss = clip_mc_loss(x, flow_model, config, config.flow_updates)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        losses.append(loss.detach())
        if on_step is not None:
            on_step(k, loss.detach())
        x = project(x.detach() - config.step_size * grad.sign(), origin, config.epsilon)
    with torch.no_grad():
        losses.append(clip_mc_loss(x, flow_model, config, config.flow_updates))
    return PurifyResult(restored=x, trajectory=torch.stack(losses))
