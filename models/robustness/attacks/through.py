"""The through-defence (unrolled) attack, and the loop it shares with BPDA (``bpda``: unroll 0).

Both are one loop (``defended_pgd``). Each step runs the REAL defended prediction on the current
iterate (``Pipeline.predict(keep_iterates=True)``, 12-update classification), so the step
also tells, for free, whether this iterate already fools the defended prediction: ``FirstSuccess``
keeps the first one that does, per clip, and a clip stops once it has one. The gradient is then:

- ``unroll = 0`` (BPDA, Athalye et al. 2018): the purification is the identity backward; the
  classifier gradient at the purified clip is applied to the attacker's clip.
- ``unroll = U``: identity up to iterate ``chosen - U``, then the last U steps of the purification
  replayed differentiably (``descent_step(create_graph=True)``, second-order through RAFT, the warp
  and the MC loss) with the step sizes the defence recorded, so any schedule, best-iterate choice or
  early stop of the defence is followed. ``sign`` is exact in the forward and ``tanh(g / (tau *
  mean|g|))`` in the backward (a straight-through stand-in: the replayed iterate equals the real one).

Gradients through RAFT use 2 updates. A defence with randomness (a random start) gets ``eot``
samples per step (expectation over transformation); the deterministic paper defence needs one.
Several restarts of one prediction are followed as ``predict`` combines them (mean probability);
clips the defence skips (auto mode) or reverts to the input are classified as they are.

Detector-aware variant (``detector_lambda``): the service flags a clip whose MC loss before any
defence (inference flow, 12 updates) is over the bundle's threshold. The attack adds
``- lambda * L_MC(x_adv)`` (2-update flow, the differentiable stand-in) while the clip's real MC
loss is above ``DETECTOR_MARGIN * threshold``, and an iterate only counts as a success if its real
defended prediction is wrong AND its real MC loss is at or under the threshold: a wrong but flagged
answer reaches the operator as "suspected", so it is not the silent failure this variant hunts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.defense.pipeline import Pipeline, Prediction
from models.defense.purify import PurifyResult, clip_mc_loss, descent_step
from models.robustness.attacks.base import (
    GRAD_UPDATES,
    Attack,
    AttackCall,
    AttackResult,
    FirstSuccess,
    ce_loss,
    cosine_steps,
    defended_forward,
    project,
    success_mask,
    tracked,
)

DETECTOR_MARGIN = 0.9  # the MC-loss penalty switches on above this fraction of the threshold


def straight_through_tanh(tau: float) -> Callable[[Tensor], Tensor]:
    """sign(g) in the forward, d tanh(g / (tau * mean|g|)) in the backward (per clip scale)."""

    def sign(g: Tensor) -> Tensor:
        scale = g.detach().abs().flatten(1).mean(dim=1).clamp_min(1e-12).view((-1,) + (1,) * (g.dim() - 1))
        smooth = torch.tanh(g / (tau * scale))
        return torch.sign(g).detach() + smooth - smooth.detach()

    return sign


def replay(pipeline: Pipeline, x_adv: Tensor, result: PurifyResult, unroll: int, tau: float) -> Tensor:
    """One run's returned clip as a differentiable function of ``x_adv``: identity up to iterate chosen-U,
    then the last U recorded steps replayed with ``create_graph`` (value: the run's own returned iterate)."""
    iterates, chosen = result.iterates, result.chosen
    if iterates is None or chosen is None or result.step_sizes is None:
        raise ValueError("the replay needs the purification's iterates, step sizes and chosen iterate")
    rows = torch.arange(x_adv.shape[0], device=x_adv.device)
    stacked = torch.stack(iterates)  # (K + 1, B, ...)
    if unroll == 0:
        return x_adv + (stacked[chosen, rows] - x_adv).detach()
    first = (chosen - unroll).clamp_min(0)
    z = x_adv + (stacked[first, rows] - x_adv).detach()
    sign = straight_through_tanh(tau)
    zero = torch.zeros(x_adv.shape[0], dtype=x_adv.dtype, device=x_adv.device)
    for j in range(unroll):
        index = chosen - unroll + j  # (B,): the defence step replayed for each clip; < 0: none (stay)
        step = torch.where(index >= 0, result.step_sizes[index.clamp_min(0), rows], zero)
        z, _ = descent_step(z, x_adv, pipeline.flow_model, pipeline.defense, step, sign=sign, create_graph=True)
    return z


def defended_objective(
    pipeline: Pipeline, z: Tensor, y: Tensor, prediction: Prediction, unroll: int, tau: float
) -> Tensor:
    """CE (B,) of the defended prediction as ``predict`` forms it, differentiable w.r.t. ``z``: clips the
    defence purified go through the replay of each run (several runs: their mean probability, as
    ``predict`` averages restarts); skipped or reverted clips are classified as they are."""
    runs = prediction.runs or []
    purified = prediction.purified
    if purified is None or not runs:
        return ce_loss(pipeline.logits(z, GRAD_UPDATES), y)
    idx = purified.nonzero().squeeze(1)
    keep = purified.clone()
    if prediction.reverted is not None:
        keep &= ~prediction.reverted
    shape = (-1,) + (1,) * (z.dim() - 1)
    probs = []
    for run in runs:
        restored = z.index_copy(0, idx, replay(pipeline, z[idx], run, unroll, tau))
        restored = torch.where(keep.view(shape), restored, z)
        probs.append(pipeline.logits(restored, GRAD_UPDATES).softmax(dim=1))
    mean = torch.stack(probs).mean(0)
    return -mean.gather(1, y[:, None])[:, 0].clamp_min(1e-12).log()


def defended_pgd(
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    *,
    steps: int = 20,
    step_size: float | None = None,
    unroll: int = 0,
    tau: float = 1.0,
    eot: int = 1,
    detector_lambda: float | None = None,
    threshold: float | None = None,
    start: bool | None = None,
    defend: bool | str = True,
) -> FirstSuccess:
    """Sign-gradient ascent on CE of the defended prediction; returns the per-clip first success.

    The step size decays on a cosine schedule from ``step_size`` (default 5 eps / steps: the path
    sums to 2.5 eps) after a uniform random start (``start``; default on, off for detector-aware
    attacks: uniform noise of eps alone gets most clips flagged). Every iterate x_0 .. x_steps is
    judged by the real defended prediction (steps + 1 defences per clip at most).
    """
    if detector_lambda is not None and threshold is None:
        raise ValueError("a detector-aware attack needs the bundle's MC-loss threshold")
    config = pipeline.defense
    x = x.detach()
    if start is None:
        start = detector_lambda is None
    x_adv = project(x + (torch.rand_like(x) * 2 - 1) * epsilon, x, epsilon) if start else x.clone()
    tracker = FirstSuccess(x_adv)
    schedule = cosine_steps(5 * epsilon / steps if step_size is None else step_size, steps)
    detector = threshold if detector_lambda is not None else None
    for k in range(steps + 1):
        forward = defended_forward(pipeline, x_adv, defend)
        tracker.offer(k, x_adv, success_mask(forward.logits, y, forward.mc_before, detector))
        if k == steps or tracker.done:
            break
        grad = torch.zeros_like(x)
        for sample in range(eot):
            prediction = forward if sample == 0 else defended_forward(pipeline, x_adv, defend)
            with torch.enable_grad():
                z = x_adv.clone().requires_grad_(True)
                objective = defended_objective(pipeline, z, y, prediction, unroll, tau)
                if detector_lambda is not None:
                    near = (forward.mc_before > DETECTOR_MARGIN * threshold).to(x.dtype)
                    objective = objective - detector_lambda * near * clip_mc_loss(
                        z, pipeline.flow_model, config, GRAD_UPDATES
                    )
                (g,) = torch.autograd.grad(objective.sum(), z)
            grad += g
        x_adv = project(x_adv + schedule[k] * grad.sign(), x, epsilon).detach()
    return tracker


def runner(default_unroll: int):
    """The ``run`` of the defended loop; ``unroll=`` in the spec overrides ``default_unroll``."""

    def run(call: AttackCall) -> AttackResult:
        o = call.options
        tracker = defended_pgd(
            call.pipeline,
            call.x,
            call.y,
            call.epsilon,
            steps=call.steps,
            step_size=call.step_size,
            unroll=int(o.get("unroll", default_unroll)),
            tau=o.get("tau", 1.0),
            eot=int(o.get("eot", 1)),
            detector_lambda=o.get("detector"),
            threshold=call.threshold,
            start=bool(o["start"]) if "start" in o else None,
            defend=call.defend,
        )
        return tracked(call, tracker)

    return run


THROUGH = Attack(runner(4), steps=10, defense_aware=True, detector=True)
