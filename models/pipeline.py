"""Flow model + flow-stream classifier + defence as one object: H(G(purify(X))).

The worker, ``motionguard classify`` and the evaluation all go through ``Pipeline`` so the
prediction path is the same everywhere (and the attacks differentiate the same functions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.bundle_meta import FlowNormalisation
from models.defense import DefenseConfig, PurifyResult, purify
from models.flow import VideoRAFT
from models.i3d import flow_to_classifier_input
from models.mc_loss import mc_loss


@dataclass
class Prediction:
    probs: Tensor  # (B, C) softmax of the clip logits
    logits: Tensor  # (B, C)
    restored: Tensor  # (B, T, 3, H, W): the purified clip (the input itself when not defended)
    mc_before: Tensor  # (B,) MC loss of the input, with the inference flow
    mc_after: Tensor  # (B,) MC loss of the restored clip (== mc_before when not defended)
    trajectory: Tensor  # (K + 1, B) MC loss over the defence steps (gradient-mode flow); (1, B) if not defended
    defended: bool
    flows_before: Tensor | None = None  # (B, T-1, 2, H, W), when keep_flows
    flows_after: Tensor | None = None


class Pipeline(nn.Module):
    """``predict(clip, defend=...)`` and the differentiable pieces the attacks need."""

    def __init__(
        self,
        flow_model: VideoRAFT,
        classifier: nn.Module,
        *,
        defense: DefenseConfig | None = None,
        flow_norm: FlowNormalisation | None = None,
        updates_infer: int = 12,
    ):
        super().__init__()
        self.flow_model = flow_model
        self.classifier = classifier
        self.defense = defense or DefenseConfig()
        self.flow_norm = flow_norm or FlowNormalisation()
        self.updates_infer = updates_infer
        self.eval()
        # Gradients are only ever taken with respect to pixels.
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def classify_flows(self, flows: Tensor) -> Tensor:
        """Clip logits (B, C) from forward flows (B, T-1, 2, H, W)."""
        return self.classifier(flow_to_classifier_input(flows, self.flow_norm))

    def logits(self, clip: Tensor, flow_updates: int | None = None) -> Tensor:
        """H(G(X)), differentiable w.r.t. the clip; attacks pass flow_updates=2 (paper, App. A.1)."""
        flows = self.flow_model(clip, flow_updates or self.updates_infer)["forward"]
        return self.classify_flows(flows)

    def mc_loss_of(self, clip: Tensor, flows: dict[str, Tensor], config: DefenseConfig | None = None) -> Tensor:
        config = config or self.defense
        return mc_loss(
            clip,
            flows,
            similarity=config.similarity,
            lambda_smooth=config.lambda_smooth,
            edge_lambda=config.edge_lambda,
        )

    @torch.no_grad()
    def _infer(self, clip: Tensor, config: DefenseConfig) -> tuple[Tensor, Tensor, Tensor]:
        """Inference flow (all constraints the config uses), MC loss and logits of a clip."""
        flows = self.flow_model(clip, self.updates_infer, config.directions)
        return flows["forward"], self.mc_loss_of(clip, flows, config), self.classify_flows(flows["forward"])

    def predict(
        self,
        clip: Tensor,
        defend: bool = True,
        *,
        steps: int | None = None,
        epsilon: float | None = None,
        multi: bool | None = None,
        keep_flows: bool = False,
        on_step=None,
    ) -> Prediction:
        """Classify a batch of clips (B, T, 3, H, W) in [0, 1], purifying them first if ``defend``."""
        if clip.dim() != 5 or clip.shape[2] != 3:
            raise ValueError(f"expected clips of shape (B, T, 3, H, W), got {tuple(clip.shape)}")
        clip = clip.to(self.device, torch.float32)
        config = self.defense.with_overrides(steps=steps, epsilon=epsilon, multi=multi)
        flows_before, mc_before, logits = self._infer(clip, config)
        if defend and config.steps > 0:
            result: PurifyResult = purify(clip, self.flow_model, config, on_step=on_step)
            restored = result.restored
            flows_after, mc_after, logits = self._infer(restored, config)
            trajectory = result.trajectory
        else:
            restored, flows_after, mc_after, trajectory = clip, flows_before, mc_before, mc_before.unsqueeze(0)
        return Prediction(
            probs=logits.softmax(dim=1),
            logits=logits,
            restored=restored,
            mc_before=mc_before,
            mc_after=mc_after,
            trajectory=trajectory,
            defended=bool(defend and config.steps > 0),
            flows_before=flows_before if keep_flows else None,
            flows_after=flows_after if keep_flows else None,
        )
