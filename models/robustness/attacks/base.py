"""What every attack shares: the losses, the projection, the first-success tracker and its judges, and
the ``Attack`` record a module registers in ``models.robustness.spec``.

Every attack takes a batch of clips (B, T, 3, H, W) in [0, 1] with their true labels and returns
adversarial clips (L-inf unless said). Gradients through RAFT use ``GRAD_UPDATES`` = 2 flow updates
(``Pipeline.logits(x, 2)``: with 12 the recurrence obfuscates gradients, paper App. A.1); accuracies
are always measured with 12.

The purified prediction is chaotic per clip (one iterate fools it, the next does not), so an attack
that returns its last iterate understates itself. ``FirstSuccess`` keeps, per clip, the first
iterate a judge (the real defended prediction) accepts; transfer attacks offer it an iterate every
``check`` steps, since for them each check costs one defended prediction.

Adding an attack: a module in this package with its function and an ``Attack`` whose ``run`` turns
an ``AttackCall`` into an ``AttackResult`` (``transfer`` builds it for an attack on the undefended
model), and one line in ``models.robustness.spec.ATTACKS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from models.bundle_meta import FlagCalibration
from models.defense.pipeline import Pipeline, Prediction
from models.defense.purify import project

__all__ = [
    "GRAD_UPDATES",
    "Attack",
    "AttackCall",
    "AttackResult",
    "FirstSuccess",
    "Judge",
    "LogitsFn",
    "ce_loss",
    "cosine_steps",
    "defended_forward",
    "defended_judge",
    "dlr_loss",
    "margin",
    "input_grad",
    "project",
    "random_start",
    "success_mask",
    "tracked",
    "transfer",
]

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


def input_grad(loss_fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample losses (B,) and the gradient of their sum w.r.t. ``x``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """logit(true) - max logit(other), per clip: below 0 the prediction is wrong."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): scale-invariant margin; needs >= 3 classes."""
    sorted_logits, _ = logits.sort(dim=1)
    denom = sorted_logits[:, -1] - sorted_logits[:, -3] + 1e-12
    return -margin(logits, y) / denom


def cosine_steps(first: float, steps: int) -> list[float]:
    """Step sizes first * (1 + cos(pi k / steps)) / 2 for k = 0 .. steps-1 (APGD-like decay to ~0)."""
    return [first * (1 + math.cos(math.pi * k / steps)) / 2 for k in range(steps)]


# ---------------------------------------------------------------------------------------------
# judging an iterate by the real defended prediction


def defended_forward(pipeline: Pipeline, x: Tensor, defend: bool | str = True) -> Prediction:
    """The real defended prediction (``predict``, whatever the defence does: restarts, best iterate,
    auto mode), with each purification run's iterates kept for the replay."""
    with torch.no_grad():
        return pipeline.predict(x, defend=defend, keep_iterates=True)


def success_mask(logits: Tensor, y: Tensor, mc_before: Tensor, threshold: float | None) -> Tensor:
    """Fooled (wrong class); with a detector threshold, also not flagged (MC loss at or under it)."""
    fooled = logits.argmax(1) != y
    return fooled if threshold is None else fooled & (mc_before <= threshold)


def defended_judge(pipeline: Pipeline, y: Tensor, threshold: float | None = None, defend: bool | str = True) -> Judge:
    """A ``FirstSuccess`` judge over batch ``y`` from the real ``predict(defend=True)`` (one defended
    prediction per open clip and check: what a transfer attack pays to keep its first success)."""

    def judge(z: Tensor, open_: Tensor) -> Tensor:
        prediction = pipeline.predict(z, defend=defend)
        return success_mask(prediction.logits, y[open_], prediction.mc_before, threshold)

    return judge


# ---------------------------------------------------------------------------------------------
# the registry record


@dataclass
class AttackResult:
    """The clips to score; ``fooled_at[b]`` is the step at which the attack's own check accepted clip b
    (-1: never; the clip is then its last iterate); ``None`` for attacks that do not check."""

    x: Tensor
    fooled_at: Tensor | None
    last_step: int


@dataclass(frozen=True)
class AttackCall:
    """One run of one spec on one batch: what every attack's ``run`` receives.

    ``threshold``: the bundle's MC-loss threshold (detector-aware specs); ``defend``: the defence mode
    judged (``predict``'s); ``flag``: the bundle's flag calibration (flag-aware specs); ``check``: judge
    the defended prediction every this many steps (transfer attacks; 0: the last iterate only);
    ``source``: another bundle's pipeline that attacks crafted on a different model differentiate
    (``motionguard eval --source-bundle``; the evaluated ``pipeline`` still judges every iterate).
    """

    pipeline: Pipeline
    x: Tensor
    y: Tensor
    epsilon: float
    steps: int
    options: Mapping[str, float]
    check: int = 0
    threshold: float | None = None
    defend: bool | str = True
    flag: FlagCalibration | None = None
    source: Pipeline | None = None

    @property
    def step_size(self) -> float | None:
        """The spec's ``step`` option in pixel units; None: the attack's own default."""
        return self.options["step"] / 255 if "step" in self.options else None

    @property
    def grad_updates(self) -> int:
        """RAFT updates on the gradient path: the spec's ``updates`` option, else ``GRAD_UPDATES``."""
        return int(self.options.get("updates", GRAD_UPDATES))

    def grad_logits(self, z: Tensor) -> Tensor:
        """The undefended logits at ``grad_updates`` flow updates: what transfer attacks differentiate."""
        return self.pipeline.logits(z, self.grad_updates)

    def transfer_tracker(self) -> FirstSuccess:
        """A tracker judged by the real defended prediction, for attacks crafted on the undefended model."""
        return FirstSuccess(self.x, defended_judge(self.pipeline, self.y, defend=self.defend))


@dataclass(frozen=True)
class Attack:
    """A registered attack kind: how it runs and what a spec naming it gets by default.

    ``defaults`` are options a spec gets when it names none (they appear in the row's name, e.g. the
    adaptive attacks' lambda); ``defense_aware`` rows run on the adaptive clip count; ``detector``:
    the attack differentiates through the purification and takes ``detector=``; ``flag_aware``: a
    success is a wrong answer the multi-signal flag does not raise; ``needs_source``: the attack is
    crafted on another bundle (``AttackCall.source``), so a run without one is refused before it
    starts; ``query_based``: a gradient-free attack that judges every query with the real prediction
    (its budget is the spec's ``queries=``, not ``steps=``); ``gradient_path``: the attack differentiates
    ``AttackCall.grad_logits`` (or the source's logits), so the spec's ``updates=`` applies.
    """

    run: Callable[[AttackCall], AttackResult]
    steps: int = 0
    check: int = 0
    epsilon_255: float = 8.0
    defaults: Mapping[str, float] = field(default_factory=dict)
    defense_aware: bool = False
    detector: bool = False
    flag_aware: bool = False
    needs_source: bool = False
    query_based: bool = False
    gradient_path: bool = False


def tracked(call: AttackCall, tracker: FirstSuccess) -> AttackResult:
    """The result of an attack that kept its first success per clip."""
    return AttackResult(tracker.kept, tracker.at, call.steps)


def transfer(craft: Callable[[AttackCall, FirstSuccess], object], **record) -> Attack:
    """An attack crafted on the undefended model (``craft(call, tracker)``) whose iterates the real
    defended prediction judges every ``call.check`` steps, the first success per clip kept;
    ``record``: the ``Attack`` fields (steps, check, defaults, ...)."""

    def run(call: AttackCall) -> AttackResult:
        tracker = call.transfer_tracker()
        craft(call, tracker)
        return tracked(call, tracker)

    return Attack(run, **record)
