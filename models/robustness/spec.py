"""Attack specifications (``pgd:8``, ``through:8:unroll=4``, ``bpda:8:detector=100``) and their dispatch.

A spec names the attack kind, the L-inf budget in 1/255 and options; ``run_attack`` turns it into an
``AttackResult``: the clips to score and, for attacks that look for their first success, where they
found it. Defaults are the ones the evaluation's tables use (documented in docs/robustness.md,
whose tables ``motionguard eval report`` writes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.defense.pipeline import Pipeline
from models.defense.purify import project
from models.robustness.attacks import (
    GRAD_UPDATES,
    FirstSuccess,
    adaptive_flow,
    adaptive_mc,
    apgd,
    flickering,
    one_frame,
    pgd,
)
from models.robustness.flag_attacks import DEFAULT_STEPS as FLAG_STEPS
from models.robustness.flag_attacks import FLAG_KINDS, run_flag_attack
from models.robustness.through import defended_judge, defended_pgd

ATTACK_KINDS = (
    "pgd",
    "apgd-ce",
    "apgd-dlr",
    "oneframe",
    "flicker",
    "adaptive1",
    "adaptive2",
    "bpda",
    "through",
    "random",
    *FLAG_KINDS,
)
DEFENSE_AWARE = ("adaptive1", "adaptive2", "bpda", "through", *FLAG_KINDS)
THROUGH_DEFENSE = ("bpda", "through")  # gradients through the purification; the detector option applies
_DEFAULT_LAMBDA = {"adaptive1": 300.0, "adaptive2": 105.0}  # the paper's strongest (Fig. 8)
DEFAULT_STEPS = {
    "pgd": 20,
    "apgd-ce": 10,
    "apgd-dlr": 10,
    "oneframe": 20,
    "flicker": 300,
    "adaptive1": 20,
    "adaptive2": 20,
    "bpda": 20,
    "through": 10,
    **{kind: FLAG_STEPS for kind in FLAG_KINDS},
}
# Transfer attacks check the real defended prediction every this many steps (each check is one
# defended prediction per clip still open, ~16x an undefended one; the last iterate is always scored).
DEFAULT_CHECK = {"pgd": 10, "apgd-ce": 5, "apgd-dlr": 5, "oneframe": 10, "adaptive1": 10, "adaptive2": 10}
OPTIONS = {
    "steps": "attack steps",
    "step": "first step size in 1/255 (PGD: fixed, default eps/4; bpda/through: cosine-decayed, default 5 eps/steps)",
    "n": "run this row on the first n clips only",
    "check": "transfer attacks: judge the defended prediction every this many steps (0: last iterate only)",
    "unroll": "through: defence steps replayed differentiably (default 4; bpda is unroll 0)",
    "tau": "through: temperature of the tanh stand-in for sign in the backward (x mean |g|)",
    "eot": "bpda/through: purifications averaged per step (for a defence with randomness)",
    "detector": "bpda/through: lambda of the MC-loss penalty that keeps the clip under the detector threshold",
    "lambda": "adaptive1/adaptive2: weight of the MC-loss or flow-change penalty; flagpen*: of the flag-score penalty",
    "start": "bpda/through: 1 uniform random start, 0 start at the clip (default 1; detector-aware: 0)",
}


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation, parsed from ``kind:eps[:key=value...]`` (see ``OPTIONS``)."""

    kind: str
    epsilon_255: float
    options: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = "".join(f":{k}={v:g}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.epsilon_255:g}{extra}"

    @property
    def epsilon(self) -> float:
        return self.epsilon_255 / 255

    @property
    def defense_aware(self) -> bool:
        return self.kind in DEFENSE_AWARE

    @property
    def detector_aware(self) -> bool:
        return "detector" in self.options

    @property
    def flag_aware(self) -> bool:
        """Attacks on the multi-signal flag: a success is wrong AND not flagged by the combined score."""
        return self.kind in FLAG_KINDS

    @property
    def steps(self) -> int:
        return int(self.options.get("steps", DEFAULT_STEPS.get(self.kind, 0)))


def parse_attack(text: str) -> AttackSpec:
    """``kind:eps[:key=value...]`` with eps in 1/255 units; raises ValueError with the allowed forms."""
    parts = [p.strip() for p in text.strip().split(":") if p.strip()]
    if not parts or parts[0] not in ATTACK_KINDS:
        raise ValueError(f"unknown attack {text!r}; kinds: {', '.join(ATTACK_KINDS)} (e.g. pgd:8, through:8)")
    kind = parts[0]
    default_eps = 32.0 if kind == "flicker" else 8.0
    try:
        eps = float(parts[1]) if len(parts) > 1 and "=" not in parts[1] else default_eps
        options = dict((k, float(v)) for k, v in (p.split("=", 1) for p in parts[1:] if "=" in p))
    except ValueError as exc:
        raise ValueError(f"bad attack spec {text!r}: numbers expected, e.g. pgd:8:steps=40 ({exc})") from exc
    if not 0 < eps <= 255:
        raise ValueError(f"attack {text!r}: eps must be in (0, 255] (units of 1/255)")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"attack {text!r}: unknown option(s) {', '.join(unknown)}; options: {', '.join(OPTIONS)}")
    if "detector" in options and kind not in THROUGH_DEFENSE:
        raise ValueError(f"attack {text!r}: detector= applies to {' and '.join(THROUGH_DEFENSE)} only")
    if any(options.get(k, 1) < 1 for k in ("steps", "n", "eot")) or options.get("unroll", 0) < 0:
        raise ValueError(f"attack {text!r}: steps, n and eot must be >= 1, unroll >= 0")
    if kind in _DEFAULT_LAMBDA:
        options.setdefault("lambda", _DEFAULT_LAMBDA[kind])
    return AttackSpec(kind, eps, options)


@dataclass
class AttackResult:
    """The clips to score; ``fooled_at[b]`` is the step at which the attack's own check accepted clip b
    (-1: never; the clip is then its last iterate); ``None`` for attacks that do not check."""

    x: Tensor
    fooled_at: Tensor | None
    last_step: int


def run_attack(
    spec: AttackSpec,
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    threshold: float | None = None,
    defend: bool | str = True,
    flag=None,
) -> AttackResult:
    """Adversarial (or randomly perturbed) clips for one spec; ``threshold``: the bundle's MC-loss
    threshold (needed by detector-aware specs); ``defend``: the defence mode judged (``predict``'s);
    ``flag``: the bundle's flag calibration (needed by flag-aware specs)."""
    o, eps, steps = spec.options, spec.epsilon, spec.steps
    if spec.flag_aware:
        tracker = run_flag_attack(spec.kind, o, pipeline, x, y, eps, flag, defend)
        return AttackResult(tracker.kept, tracker.at, steps)
    if spec.kind == "random":
        return AttackResult(project(x + (torch.rand_like(x) * 2 - 1) * eps, x, eps), None, 0)
    if spec.kind in THROUGH_DEFENSE:
        tracker = defended_pgd(
            pipeline,
            x,
            y,
            eps,
            steps=steps,
            step_size=o["step"] / 255 if "step" in o else None,
            unroll=int(o.get("unroll", 4 if spec.kind == "through" else 0)),
            tau=o.get("tau", 1.0),
            eot=int(o.get("eot", 1)),
            detector_lambda=o.get("detector"),
            threshold=threshold,
            start=bool(o["start"]) if "start" in o else None,
            defend=defend,
        )
        return AttackResult(tracker.kept, tracker.at, steps)
    if spec.kind == "flicker":
        return AttackResult(flickering(lambda z: pipeline.logits(z, GRAD_UPDATES), x, y, eps, steps), None, steps)

    def grad_logits(z: Tensor) -> Tensor:
        return pipeline.logits(z, GRAD_UPDATES)

    tracker = FirstSuccess(x, defended_judge(pipeline, y, defend=defend))
    check = int(o.get("check", DEFAULT_CHECK[spec.kind]))
    step = o["step"] / 255 if "step" in o else None
    if spec.kind == "pgd":
        pgd(grad_logits, x, y, eps, steps, step, tracker=tracker, check_every=check)
    elif spec.kind in ("apgd-ce", "apgd-dlr"):
        apgd(grad_logits, x, y, eps, steps, loss=spec.kind.split("-")[1], tracker=tracker, check_every=check)
    elif spec.kind == "oneframe":
        one_frame(grad_logits, x, y, eps, steps, step, tracker=tracker, check_every=check)
    elif spec.kind == "adaptive1":
        adaptive_mc(pipeline, x, y, eps, o["lambda"], steps=steps, tracker=tracker, check_every=check)
    elif spec.kind == "adaptive2":
        adaptive_flow(pipeline, x, y, eps, o["lambda"], steps=steps, tracker=tracker, check_every=check)
    else:
        raise ValueError(f"unknown attack kind {spec.kind!r}")
    return AttackResult(tracker.kept, tracker.at, steps)
