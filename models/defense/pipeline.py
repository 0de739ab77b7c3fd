"""Flow model + flow-stream classifier + defence as one object: H(G(purify(X))).

The worker, ``motionguard classify`` and the evaluation all go through ``Pipeline`` so the
prediction path is the same everywhere (and the attacks differentiate the same functions).
``predict`` also decides per clip whether to purify (``defend="auto"``: only clips whose MC loss
before the defence is above the bundle's threshold) and reports what it did with each clip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from models.bundle_meta import FlowNormalisation
from models.defense.mc_loss import mc_loss
from models.defense.purify import DefenseConfig, PurifyResult, purify
from models.defense_mode import DefendMode, parse_mode
from models.nets.flow import VideoRAFT
from models.nets.i3d import flow_to_classifier_input

Decision = Literal["purified", "stopped_early", "skipped", "off"]


@dataclass
class Prediction:
    probs: Tensor  # (B, C) softmax of the clip logits
    logits: Tensor  # (B, C)
    restored: Tensor  # (B, T, 3, H, W): the purified clip (the input itself when not defended)
    mc_before: Tensor  # (B,) MC loss of the input, with the inference flow
    mc_after: Tensor  # (B,) MC loss of the restored clip (== mc_before when not defended)
    trajectory: Tensor  # (K + 1, B) MC loss over the defence steps (gradient-mode flow); (1, B) if not defended
    defended: bool  # the mode was not "off"
    flows_before: Tensor | None = None  # (B, T-1, 2, H, W), when keep_flows
    flows_after: Tensor | None = None
    decisions: list[Decision] = field(default_factory=list)  # per clip: what the defence did
    defence_steps: Tensor | None = None  # (B,) long: gradient evaluations spent (all restarts)
    reverted: Tensor | None = None  # (B,) bool: purified, but the input came back (keep_best's final check)
    purified: Tensor | None = None  # (B,) bool: the clips that went through the purification
    runs: list[PurifyResult] = field(default_factory=list)  # one per restart, over clip[purified]

    trajectory_len: Tensor | None = None  # (B,) long: how many of the trajectory's values clip i reached
    seconds: dict[str, float] = field(default_factory=dict)  # wall time: "classify" (inference passes), "defense"

    def trajectory_of(self, i: int) -> list[float]:
        """Clip ``i``'s MC loss at x_0 .. the last iterate it reached (one value when not purified)."""
        length = int(self.trajectory_len[i]) if self.trajectory_len is not None else self.trajectory.shape[0]
        return [float(v) for v in self.trajectory[:length, i]]


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
        threshold: float | None = None,
        default_mode: DefendMode = "always",
        decide_auto: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.flow_model = flow_model
        self.classifier = classifier
        self.defense = defense or DefenseConfig()
        self.flow_norm = flow_norm or FlowNormalisation()
        self.updates_infer = updates_infer
        self.threshold = threshold  # the MC loss above which defend="auto" purifies a clip
        self.default_mode: DefendMode = default_mode
        # defend="auto" without an explicit threshold: (clip, flows, mc, logits) -> (B,) bool of clips to
        # purify; the bundle's attack flag (models.defense.flag.FlagDecision) when it has one
        self.decide_auto = decide_auto
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

    def _infer_moved(
        self, clip: Tensor, restored: Tensor, config: DefenseConfig, flows: Tensor, mc: Tensor, logits: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``_infer`` of the restored clips, reusing the input's figures for the ones that did not move
        (a clip stopped before its first step, or kept its start as its best iterate)."""
        moved = (restored != clip).flatten(1).any(1)
        flows, mc, logits = flows.clone(), mc.clone(), logits.clone()
        if moved.any():
            flows[moved], mc[moved], logits[moved] = self._infer(restored[moved], config)
        return restored, flows, mc, logits

    def predict(
        self,
        clip: Tensor,
        defend: bool | DefendMode = True,
        *,
        config: DefenseConfig | None = None,
        threshold: float | None = None,
        keep_flows: bool = False,
        keep_iterates: bool = False,
        on_step: Callable[[int, Tensor], None] | None = None,
        leave: Callable[[], Tensor | None] | None = None,
    ) -> Prediction:
        """Classify a batch of clips (B, T, 3, H, W) in [0, 1], deciding per clip whether to purify.

        Three steps: ``decide`` which clips to purify (``defend``), ``_purify_restarts`` those clips
        (``config.restarts`` runs), ``_merge`` the runs into the prediction of the input.
        ``config`` replaces the pipeline's defence (``self.defense``) for this call: a caller that
        changes the steps, the bound or the constraints builds it (``self.defense.with_overrides``).
        ``threshold``: see ``decide``. ``keep_flows`` keeps the inference flows before and after;
        ``keep_iterates`` keeps each run's iterates (``runs``): the through-defence attacks replay the
        last steps from them (``models.robustness.attacks.through``). ``on_step(k, loss)`` is called
        after every defence step; ``leave()``, asked after every defence step, may return a (B,) bool
        tensor: the clips marked True leave the purification (a batching worker's clips whose job
        ended; their outputs are not meaningful).
        """
        if clip.dim() != 5 or clip.shape[2] != 3:
            raise ValueError(f"expected clips of shape (B, T, 3, H, W), got {tuple(clip.shape)}")
        mode = parse_mode(defend)
        clip = clip.to(self.device, torch.float32)
        config = config or self.defense
        t0 = time.perf_counter()
        flows_before, mc_before, logits = self._infer(clip, config)
        seconds = {"classify": time.perf_counter() - t0, "defense": 0.0}
        purified = self.decide(mode, clip, flows_before, mc_before, logits, config, threshold)
        batch, device = clip.shape[0], clip.device
        prediction = Prediction(  # the input's own answer; the purified clips are merged in below
            probs=logits.softmax(dim=1),
            logits=logits,
            restored=clip,
            mc_before=mc_before,
            mc_after=mc_before,
            trajectory=mc_before.unsqueeze(0),
            defended=mode != "off" and config.steps > 0,
            flows_before=flows_before,
            flows_after=flows_before,
            decisions=["off" if mode == "off" else "skipped"] * batch,
            defence_steps=torch.zeros(batch, dtype=torch.long, device=device),
            reverted=torch.zeros(batch, dtype=torch.bool, device=device),
            purified=purified,
            trajectory_len=torch.ones(batch, dtype=torch.long, device=device),
            seconds=seconds,
        )
        idx = purified.nonzero().squeeze(1)
        if idx.numel():
            runs = self._purify_restarts(clip, idx, prediction, config, keep_iterates, on_step, leave)
            self._merge(prediction, idx, runs, config)
        if not keep_flows:
            prediction.flows_before = prediction.flows_after = None
        return prediction

    def decide(
        self,
        mode: DefendMode,
        clip: Tensor,
        flows: Tensor,
        mc: Tensor,
        logits: Tensor,
        config: DefenseConfig,
        threshold: float | None = None,
    ) -> Tensor:
        """(B,) bool: the clips to purify. "always" every clip (none when ``config.steps`` is 0), "off"
        none, "auto" those whose MC loss before the defence (inference flow) is above ``threshold``
        (default: ``self.threshold``; without an explicit ``threshold``, ``self.decide_auto`` decides
        when set: the bundle's attack flag)."""
        if mode == "auto" and threshold is None and self.decide_auto is not None:
            return self.decide_auto(clip, flows, mc, logits).to(clip.device)
        if mode == "auto":
            threshold = self.threshold if threshold is None else threshold
            if threshold is None:
                raise ValueError("defend=auto needs an MC-loss threshold: calibrate the bundle or set one")
            return mc > threshold
        return torch.full((clip.shape[0],), mode == "always" and config.steps > 0, device=clip.device)

    def _purify_restarts(
        self,
        clip: Tensor,
        idx: Tensor,
        prediction: Prediction,
        config: DefenseConfig,
        keep_iterates: bool,
        on_step: Callable[[int, Tensor], None] | None,
        leave: Callable[[], Tensor | None] | None,
    ) -> list[tuple[PurifyResult, tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """Purify the clips ``idx`` ``config.restarts`` times; per run, what ``purify`` did and the
        inference pass of its restored clips (restored, flows, MC loss, logits). Times go to
        ``prediction.seconds`` ("defense": the purification, "classify": the inference passes)."""
        sub, sub_before = clip[idx], prediction.mc_before[idx]
        sub_flows, sub_logits = prediction.flows_before[idx], prediction.logits[idx]
        step_hook = on_step
        if leave is not None:

            def step_hook(k: int, loss: Tensor, _idx: Tensor = idx) -> Tensor | None:
                if on_step is not None:
                    on_step(k, loss)
                gone = leave()
                return None if gone is None else gone.to(_idx.device)[_idx]

        runs = []
        for _ in range(max(1, config.restarts)):
            t0 = time.perf_counter()
            run = purify(
                sub, self.flow_model, config, on_step=step_hook, start_loss=sub_before, keep_iterates=keep_iterates
            )
            t1 = time.perf_counter()
            runs.append((run, self._infer_moved(sub, run.restored, config, sub_flows, sub_before, sub_logits)))
            prediction.seconds["defense"] += t1 - t0
            prediction.seconds["classify"] += time.perf_counter() - t1
        return runs

    @staticmethod
    def _merge(
        prediction: Prediction,
        idx: Tensor,
        runs: list[tuple[PurifyResult, tuple[Tensor, Tensor, Tensor, Tensor]]],
        config: DefenseConfig,
    ) -> None:
        """Fold the runs into the prediction of the clips ``idx``: per clip the restored clip, flow and
        MC loss of the run with the lowest final MC loss, the mean of the runs' probabilities, and
        with ``keep_best`` the input back (``reverted``) where that MC loss is above the input's, so
        ``mc_after <= mc_before`` always."""
        results = [run for run, _ in runs]
        restored_r, flows_r, mc_r, logits_r = (torch.stack(parts) for parts in zip(*(o for _, o in runs), strict=True))
        clip, flows_before, mc_before = prediction.restored, prediction.flows_before, prediction.mc_before
        pick = mc_r.argmin(0)  # per clip, the restart with the lowest final MC loss
        take = torch.arange(idx.numel(), device=clip.device)
        sub_before = mc_before[idx]
        sub_mc = mc_r[pick, take]
        sub_probs = logits_r.softmax(dim=2).mean(0)
        sub_logits = logits_r[0] if len(results) == 1 else sub_probs.log()
        back = sub_mc > sub_before if config.keep_best else torch.zeros_like(sub_mc, dtype=torch.bool)
        keep = idx[~back]
        restored, flows_after, mc_after = clip.clone(), flows_before.clone(), mc_before.clone()
        restored[keep] = restored_r[pick, take][~back]
        flows_after[keep] = flows_r[pick, take][~back]
        mc_after[keep] = sub_mc[~back]
        prediction.probs[keep], prediction.logits[keep] = sub_probs[~back], sub_logits[~back]
        prediction.reverted[idx] = back
        trajectory = mc_before.unsqueeze(0).repeat(config.steps + 1, 1)
        trajectory[:, idx] = torch.stack([r.trajectory for r in results])[pick, :, take].T
        runs_taken = torch.stack([r.steps_taken for r in results])
        prediction.defence_steps[idx] = runs_taken.sum(0)
        runs_stopped = torch.stack([r.stopped for r in results])
        taken, stopped = runs_taken[pick, take], runs_stopped[pick, take]
        prediction.trajectory_len[idx] = torch.where(stopped, taken.clamp(min=1), taken + 1)
        all_stopped = runs_stopped.all(0)
        for j, i in enumerate(idx.tolist()):
            prediction.decisions[i] = "stopped_early" if bool(all_stopped[j]) else "purified"
        prediction.restored, prediction.flows_after, prediction.mc_after = restored, flows_after, mc_after
        prediction.trajectory, prediction.runs = trajectory, results
