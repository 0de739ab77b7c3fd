"""Attack specifications (``pgd:8``, ``through:8:unroll=4``, ``bpda:8:detector=100``, ``square:8:queries=100``)
and their dispatch.

A spec names the attack kind (a key of ``ATTACKS``), the L-inf budget in 1/255 and options;
``run_attack`` hands it to the attack's module (``models.robustness.attacks``) and gets back an
``AttackResult``: the clips to score and, for attacks that look for their first success, where they
found it. ``transfer`` rows are crafted on another bundle (``source``: ``motionguard eval
--source-bundle``); ``square`` rows only query the real prediction. Defaults are the ones the
evaluation's tables use (documented in docs/robustness.md, whose tables ``motionguard eval report``
writes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from models.bundle_meta import FlagCalibration
from models.defense.pipeline import Pipeline
from models.robustness.attacks import (
    adaptive,
    apgd,
    bpda,
    cross_model,
    flickering,
    noise,
    one_frame,
    pgd,
    square,
    through,
)
from models.robustness.attacks.base import Attack, AttackCall, AttackResult
from models.robustness.attacks.flag import FLAG_ATTACKS

__all__ = ["ATTACKS", "AttackResult", "AttackSpec", "parse_attack", "run_attack"]

#: kind -> attack: one line per attack (its module holds the attack and its defaults).
ATTACKS: dict[str, Attack] = {
    "pgd": pgd.PGD,
    "transfer": cross_model.TRANSFER,
    "apgd-ce": apgd.APGD_CE,
    "apgd-dlr": apgd.APGD_DLR,
    "oneframe": one_frame.ONE_FRAME,
    "flicker": flickering.FLICKER,
    "adaptive1": adaptive.ADAPTIVE_MC,
    "adaptive2": adaptive.ADAPTIVE_FLOW,
    "bpda": bpda.BPDA,
    "through": through.THROUGH,
    "square": square.SQUARE,
    "square-flag": square.SQUARE_FLAG,
    "random": noise.RANDOM,
    **FLAG_ATTACKS,
}
ATTACK_KINDS = tuple(ATTACKS)
DEFENSE_AWARE = tuple(kind for kind, attack in ATTACKS.items() if attack.defense_aware)
THROUGH_DEFENSE = tuple(kind for kind, attack in ATTACKS.items() if attack.detector)  # the detector option applies
GRADIENT_PATH = tuple(kind for kind, attack in ATTACKS.items() if attack.gradient_path)  # updates=
QUERY_BASED = tuple(kind for kind, attack in ATTACKS.items() if attack.query_based)  # queries= and p=
OPTIONS = {
    "steps": "attack steps",
    "step": "first step size in 1/255 (PGD: fixed, default eps/4; bpda/through: cosine-decayed, default 5 eps/steps)",
    "n": "run this row on the first n clips only",
    "check": "transfer attacks: judge the defended prediction every this many steps (0: last iterate only)",
    "unroll": "through: defence steps replayed differentiably (default 4; bpda is unroll 0)",
    "tau": "through: temperature of the tanh stand-in for sign in the backward (x mean |g|)",
    "eot": "bpda/through: purifications averaged per step (for a defence with randomness)",
    "detector": "bpda/through: lambda of the MC-loss penalty that keeps the clip under the detector threshold",
    "lambda": "adaptive1/adaptive2: weight of the MC-loss or flow-change penalty; flagpen*, transfer-flagpen and"
    " square-flag: of the flag-score penalty",
    "start": "bpda/through: 1 uniform random start, 0 start at the clip (default 1; detector-aware: 0)",
    "queries": "square/square-flag: predictions of the real system after the clip's own (default 100)",
    "updates": f"RAFT updates on the gradient path of {', '.join(GRADIENT_PATH)} (default 2, the paper's; the model is"
    " always judged at 12: a model that masks the 2-update gradient may not mask this one)",
    "p": "square/square-flag: first share of the frame a square covers, halved on the paper's schedule (default 0.05)",
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
        return ATTACKS[self.kind].defense_aware

    @property
    def detector_aware(self) -> bool:
        return "detector" in self.options

    @property
    def flag_aware(self) -> bool:
        """Attacks on the multi-signal flag: a success is wrong AND not flagged by the combined score."""
        return ATTACKS[self.kind].flag_aware

    @property
    def needs_source(self) -> bool:
        """Crafted on another bundle: the evaluation needs ``--source-bundle``."""
        return ATTACKS[self.kind].needs_source

    @property
    def judges_every_iterate(self) -> bool:
        """The attack judges each iterate by the real prediction, so a clip it never accepted is one the
        final scoring must not find fooled (through-defence, flag-aware and query-based attacks)."""
        attack = ATTACKS[self.kind]
        return attack.detector or attack.flag_aware or attack.query_based

    @property
    def steps(self) -> int:
        """Attack steps; for query-based attacks the query budget (``queries=``)."""
        key = "queries" if ATTACKS[self.kind].query_based else "steps"
        return int(self.options.get(key, ATTACKS[self.kind].steps))


def parse_attack(text: str) -> AttackSpec:
    """``kind:eps[:key=value...]`` with eps in 1/255 units; raises ValueError with the allowed forms."""
    parts = [p.strip() for p in text.strip().split(":") if p.strip()]
    if not parts or parts[0] not in ATTACK_KINDS:
        raise ValueError(f"unknown attack {text!r}; kinds: {', '.join(ATTACK_KINDS)} (e.g. pgd:8, through:8)")
    kind = parts[0]
    default_eps = ATTACKS[kind].epsilon_255
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
    if any(options.get(k, 1) < 1 for k in ("steps", "n", "eot", "queries")) or options.get("unroll", 0) < 0:
        raise ValueError(f"attack {text!r}: steps, n, eot and queries must be >= 1, unroll >= 0")
    if kind in QUERY_BASED and "steps" in options:
        raise ValueError(f"attack {text!r}: {kind} counts queries, not steps (e.g. {kind}:8:queries=100)")
    if kind not in QUERY_BASED and {"queries", "p"} & set(options):
        raise ValueError(f"attack {text!r}: queries= and p= apply to {' and '.join(QUERY_BASED)} only")
    if "updates" in options and (kind not in GRADIENT_PATH or options["updates"] < 1):
        raise ValueError(f"attack {text!r}: updates= (>= 1) applies to {', '.join(GRADIENT_PATH)} only")
    if not 0 < options.get("p", 0.5) <= 1:
        raise ValueError(f"attack {text!r}: p must be in (0, 1]")
    for key, value in ATTACKS[kind].defaults.items():
        options.setdefault(key, value)
    return AttackSpec(kind, eps, options)


def run_attack(
    spec: AttackSpec,
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    threshold: float | None = None,
    defend: bool | str = True,
    flag: FlagCalibration | None = None,
    source: Pipeline | None = None,
) -> AttackResult:
    """Adversarial (or randomly perturbed) clips for one spec; ``threshold``: the bundle's MC-loss
    threshold (needed by detector-aware specs); ``defend``: the defence mode judged (``predict``'s);
    ``flag``: the bundle's flag calibration (needed by flag-aware specs); ``source``: the pipeline
    of the bundle that ``transfer`` specs are crafted on."""
    attack = ATTACKS[spec.kind]
    call = AttackCall(
        pipeline,
        x,
        y,
        spec.epsilon,
        spec.steps,
        spec.options,
        check=int(spec.options.get("check", attack.check)),
        threshold=threshold,
        defend=defend,
        flag=flag,
        source=source,
    )
    return attack.run(call)
