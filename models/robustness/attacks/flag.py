"""Attacks against the multi-signal flag (issue 24): a success is a wrong answer the flag does NOT raise.

A wrong but flagged answer reaches the operator as "suspected"; what these attacks hunt is the
silent failure. All three share one loop over the real defended prediction (BPDA through the
purification: its output's gradient applied to the attacker's clip, Athalye et al. 2018), and every
iterate is judged by the real service path: the defended prediction (12 RAFT updates) and the flag
read exactly as the worker reads it (``models.defense.flag.read_flag``). ``FirstSuccess`` keeps the
first iterate that is wrong AND unflagged.

- ``penalty`` (Carlini & Wagner 2017's recipe): ascend CE - lambda * relu(score - margin), the
  score being the differentiable stand-in of the combined score (``surrogate_signals``: every flow
  at 2 updates, fresh noise for the noise signal, ``purify_change`` through the BPDA output),
  normalised so 1 is the threshold. ``lambda`` is swept by the rows.
- ``orthogonal`` (orthogonal PGD, Bryniarski et al. 2021, arXiv 2106.15023): per clip, while the
  real flag is up, step to lower the score along the part of its gradient orthogonal to the
  classifier's; otherwise step to raise the classifier loss along the part of its gradient
  orthogonal to the score's, so neither step undoes the other.
- ``only=<signal>``: the penalty on a single signal's surprise: an attacker who knows one signal
  (the other signals are what must catch it).
- ``transfer-flagpen`` / ``transfer-orthogonal`` / ``transfer-flagpen-<signal>``: the same methods with
  the classifier term taken from a *source* bundle's undefended model (``--source-bundle``), the flag
  term still the evaluated bundle's. Why: an adversarially trained bundle masks its own classifier
  gradient (its ``flagpen`` rows leave every clip at its clean answer), while PGD crafted on another
  model fools it; an attacker who knows the flag crafts there and keeps the evaluated bundle's flag
  down at the same time.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from models.bundle_meta import FlagCalibration
from models.defense.flag import (
    DEFENDED_SIGNALS,
    SIGNALS,
    FlagReading,
    combine,
    read_flag_of,
    surprises,
    surrogate_signals,
    total_variation,
)
from models.defense.pipeline import Pipeline
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
    tracked,
)

Method = Literal["penalty", "orthogonal"]
SCORE_MARGIN = 0.8  # the penalty switches on above this fraction of the threshold (the stand-in is not exact)


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1)


def orthogonal_part(g: Tensor, h: Tensor) -> Tensor:
    """g minus its projection on h, per clip (the Bryniarski et al. step direction)."""
    coef = _flat_dot(g, h) / _flat_dot(h, h).clamp_min(1e-30)
    return g - coef.view((-1,) + (1,) * (g.dim() - 1)) * h


def judge_flag(
    pipeline: Pipeline, x: Tensor, y: Tensor, flag: FlagCalibration, defend: bool | str = True
) -> tuple[Tensor, FlagReading, object, object]:
    """(success (B,), the flag's reading (``flagged``, ``score``), defended prediction, plain prediction)
    of the real service path."""
    with torch.no_grad():
        plain = pipeline.predict(x, defend=False, keep_flows=True)
        forward = defended_forward(pipeline, x, defend) if defend not in (False, "off") else plain
        reading = read_flag_of(pipeline, x, plain, flag, defended=forward if forward is not plain else None)
    wrong = forward.probs.argmax(1) != y
    return wrong & ~reading.flagged, reading, forward, plain


def surrogate_score(
    pipeline: Pipeline, z: Tensor, restored: Tensor, flag: FlagCalibration, probs_infer: Tensor, only: str | None
) -> tuple[Tensor, Tensor]:
    """(CE of the BPDA defended prediction (B,), differentiable score (B,), 1 = the threshold)."""
    signals = surrogate_signals(pipeline, z, noise_epsilon=flag.noise_epsilon, probs_infer=probs_infer)
    probs_plain = pipeline.classify_flows(pipeline.flow_model(z, GRAD_UPDATES)["forward"]).softmax(1)
    bpda = z + (restored - z).detach()  # the purification's output, identity backward
    probs_def = pipeline.logits(bpda, GRAD_UPDATES).softmax(1)
    signals["purify_change"] = total_variation(probs_def, probs_plain)
    surprise = surprises(signals, flag)
    if only is not None:
        if only not in surprise:
            raise ValueError(f"signal {only!r} is not in the bundle's flag calibration")
        threshold = flag.thresholds["defended" if only in DEFENDED_SIGNALS else "input"]
        score = surprise[only] / threshold
    else:
        score = combine(surprise) / flag.thresholds["defended"]
    return probs_def, score


def flag_aware_pgd(
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    flag: FlagCalibration,
    *,
    method: Method = "penalty",
    lam: float = 10.0,
    only: str | None = None,
    steps: int = 10,
    step_size: float | None = None,
    defend: bool | str = True,
    source: Pipeline | None = None,
    grad_updates: int = GRAD_UPDATES,
) -> FirstSuccess:
    """Sign-gradient attack on the defended prediction that also keeps the flag down; per clip the
    first iterate that is wrong and unflagged (x_0 .. x_steps all judged). Starts at the clip: uniform
    noise of eps alone raises the noise-sensitive signals. ``source``: take the classifier's CE from
    this pipeline's undefended model at ``grad_updates`` (a transfer attack that also knows the flag)."""
    if only is not None and only not in SIGNALS:
        raise ValueError(f"unknown flag signal {only!r}; signals: {', '.join(SIGNALS)}")
    x = x.detach()
    x_adv = x.clone()
    tracker = FirstSuccess(x_adv)
    schedule = cosine_steps(5 * epsilon / steps if step_size is None else step_size, steps)
    for k in range(steps + 1):
        success, reading, forward, plain = judge_flag(pipeline, x_adv, y, flag, defend)
        flagged = reading.flagged
        tracker.offer(k, x_adv, success)
        if k == steps or tracker.done:
            break
        with torch.enable_grad():
            z = x_adv.clone().requires_grad_(True)
            probs_def, score = surrogate_score(pipeline, z, forward.restored, flag, plain.probs, only)
            if source is None:
                ce = -probs_def.gather(1, y[:, None])[:, 0].clamp_min(1e-12).log()
            else:
                ce = ce_loss(source.logits(z, grad_updates), y)
            if method == "penalty":
                # lambda 0 is the plain attack (0 * an infinite surprise's gradient would be NaN)
                objective = ce - lam * (score - SCORE_MARGIN).clamp_min(0) if lam else ce
                (direction,) = torch.autograd.grad(objective.sum(), z)
            else:
                (g_ce,) = torch.autograd.grad(ce.sum(), z, retain_graph=True)
                (g_score,) = torch.autograd.grad(score.sum(), z)
                lower = orthogonal_part(-g_score, g_ce)
                raise_ = orthogonal_part(g_ce, g_score)
                up = flagged.view((-1,) + (1,) * (x.dim() - 1))
                direction = torch.where(up, lower, raise_)
        x_adv = project(x_adv + schedule[k] * direction.sign(), x, epsilon).detach()
    return tracker


DEFAULT_LAMBDA = 10.0
DEFAULT_STEPS = 10
TRANSFER_STEPS = 20  # the transfer row's PGD-20


def flag_attack(kind: str, method: Method, only: str | None, from_source: bool = False) -> Attack:
    """The registry record of one flag-aware kind (options steps, step, lambda; ``updates`` where the
    classifier term comes from the source bundle)."""

    def run(call: AttackCall) -> AttackResult:
        if call.flag is None:
            raise ValueError(f"attack {kind!r} needs a bundle with a flag calibration (motionguard calibrate --flag)")
        if from_source and call.source is None:
            raise ValueError(f"attack {kind!r} needs a source bundle (motionguard eval --source-bundle PATH)")
        tracker = flag_aware_pgd(
            call.pipeline,
            call.x,
            call.y,
            call.epsilon,
            call.flag,
            method=method,
            lam=float(call.options.get("lambda", DEFAULT_LAMBDA)),
            only=only,
            steps=call.steps,
            step_size=call.step_size,
            defend=call.defend,
            source=call.source if from_source else None,
            grad_updates=call.grad_updates,
        )
        return tracked(call, tracker)

    return Attack(
        run,
        steps=TRANSFER_STEPS if from_source else DEFAULT_STEPS,
        defense_aware=True,
        flag_aware=True,
        needs_source=from_source,
        gradient_path=from_source,
    )


_INPUT_SIGNALS = [name for name in SIGNALS if name not in DEFENDED_SIGNALS]
#: The spec kinds: the combined penalty, orthogonal PGD, the penalty on each input signal alone
#: (``flagpen-mc``, ``flagpen-noise``, ...), and all of them with the classifier term from the source
#: bundle (``transfer-flagpen``, ``transfer-flagpen-mc``, ...): kind -> (method, signal alone or None,
#: classifier term from the source).
FLAG_KINDS: dict[str, tuple[Method, str | None, bool]] = {
    "flagpen": ("penalty", None, False),
    "orthogonal": ("orthogonal", None, False),
    **{f"flagpen-{name}": ("penalty", name, False) for name in _INPUT_SIGNALS},
    "transfer-flagpen": ("penalty", None, True),
    "transfer-orthogonal": ("orthogonal", None, True),
    **{f"transfer-flagpen-{name}": ("penalty", name, True) for name in _INPUT_SIGNALS},
}
#: Their records, as ``models.robustness.spec.ATTACKS`` registers them.
FLAG_ATTACKS: dict[str, Attack] = {kind: flag_attack(kind, *how) for kind, how in FLAG_KINDS.items()}
