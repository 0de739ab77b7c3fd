"""Square Attack (Andriushchenko et al. 2020, L-inf; ``square:8``, ``square-flag:8``): gradient-free
random search on the real system's output, the check against gradient masking.

Every query is the prediction the evaluation judges, ``pipeline.predict(z, defend=call.defend)``
(whatever the defence mode does: purification, auto decision, restarts), never a gradient, so a
defence that only hides its gradients does not stop it. The loss is the margin of that prediction,
logit(true) - max logit(other) (below 0: fooled). The search, as in the paper:

- query 0 is the clip itself (a clip already misclassified is a success at query 0);
- query 1 proposes the paper's start: vertical stripes of +-eps (a sign per column and channel);
- every further query proposes one square of side ``round(sqrt(p * H * W))`` at a uniform random
  place, set to +-eps (a sign per channel), over the current perturbation; ``p`` starts at ``p=``
  (default 0.05, the paper's L-inf value) and halves on the paper's schedule (after 10, 50, 200,
  500, 1000, 2000, 4000, 6000 and 8000 of 10000 queries, rescaled to ``queries=``);
- a proposal is kept when it lowers the clip's loss (or is already a success: the flag-aware loss
  need not be lowest where the goal is met); the first success per clip is kept and that clip
  stops querying.

Frames: each frame draws its own signs in the square (``per_frame=True``, the default). The model
classifies optical flow, so a pattern that is the same in all T frames is a static overlay the
flow mostly looks through (its frame differences are zero where the content under it does not
move), while independent signs per frame change the brightness between frames inside the square,
which is what the flow, and so the classifier, responds to. Measured (8/255, defence off, same
seed, first test clips): motionshapes-robust-v1, 8 clips x 40 queries: per frame fooled 3 of the 7
clips the model had right and lowered the margin by 3.4 on average, one pattern for all frames
fooled 2 and lowered it by 1.5; motionshapes-v1 v1.1, 6 clips x 30 queries: 1 fooled each, margin
down 2.2 vs 1.9.

``square-flag``: the flag-aware variant (a success is wrong AND not flagged, as for ``flagpen``):
each query also reads the multi-signal flag exactly as the worker does (``flag.judge_flag``) and the
loss adds ``lambda`` x relu(score - 0.8), the score being the combined score over its threshold.

Batches: each clip has its own square, signs and accept/reject. Randomness: the proposals come from
a ``torch.Generator`` seeded from the global generator, which the evaluation seeds per (seed, row,
clip), so a resumed or sharded run proposes the same squares whatever the defence's own random
draws (the flag's noise signal, restarts) consume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from models.bundle_meta import FlagCalibration
from models.defense.pipeline import Pipeline
from models.robustness.attacks.base import Attack, AttackCall, AttackResult, FirstSuccess, margin, project, tracked
from models.robustness.attacks.flag import DEFAULT_LAMBDA, SCORE_MARGIN, judge_flag

__all__ = ["SQUARE", "SQUARE_FLAG", "QueryFn", "SquareRun", "margin", "square_attack", "square_side"]

# (open clips (b, T, 3, H, W), open mask (B,)) -> (loss (b,), success (b,)) of the real prediction
QueryFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

DEFAULT_QUERIES = 100
DEFAULT_P = 0.05
# The paper's schedule on 10000 queries: up to this query p is p_init / this divisor.
P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))
RESAMPLES = 10  # redraws of a proposal that would change nothing (its square already holds those signs)


def square_fraction(p_init: float, query: int, queries: int) -> float:
    """The share of the frame a square covers at proposal ``query`` of ``queries`` (paper's schedule)."""
    at = int(query / queries * 10000)
    for bound, divisor in P_SCHEDULE:
        if at <= bound:
            return p_init / divisor
    return p_init / 512


def square_side(p: float, height: int, width: int) -> int:
    return min(max(int(round(math.sqrt(p * height * width))), 1), height, width)


@dataclass
class SquareRun:
    """The tracker (kept clip and first-success query per clip) and ``losses`` (queries + 1, B): each
    clip's current loss after every query (a clip that succeeded keeps its last value)."""

    tracker: FirstSuccess
    losses: Tensor


def _signs(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).float().to(device)


def _stripes(x: Tensor, epsilon: float, generator: torch.Generator, per_frame: bool) -> Tensor:
    b, t, c, _, w = x.shape
    signs = _signs((b, t if per_frame else 1, c, 1, w), generator, x.device)
    return project(x + epsilon * signs, x, epsilon)


def _square(
    x: Tensor, current: Tensor, epsilon: float, side: int, generator: torch.Generator, per_frame: bool
) -> Tensor:
    """``current`` with one square per clip set to +-eps around ``x`` (redrawn where that changes nothing)."""
    b, t, c, h, w = x.shape
    proposal = current.clone()
    todo = torch.arange(b)
    for _ in range(RESAMPLES):
        n = len(todo)
        top = torch.randint(0, h - side + 1, (n,), generator=generator)
        left = torch.randint(0, w - side + 1, (n,), generator=generator)
        rows = torch.arange(h)[None, :]
        cols = torch.arange(w)[None, :]
        inside_r = (rows >= top[:, None]) & (rows < top[:, None] + side)
        inside_c = (cols >= left[:, None]) & (cols < left[:, None] + side)
        window = (inside_r[:, :, None] & inside_c[:, None, :]).view(n, 1, 1, h, w).to(x.device)
        signs = _signs((n, t if per_frame else 1, c, 1, 1), generator, x.device)
        todo_dev = todo.to(x.device)
        base = x[todo_dev]
        proposed = torch.where(window, project(base + epsilon * signs, base, epsilon), current[todo_dev])
        proposal[todo_dev] = proposed
        unchanged = ~(proposed != current[todo_dev]).flatten(1).any(1).cpu()
        todo = todo[unchanged]
        if not len(todo):
            break
    return proposal


def square_attack(
    query: QueryFn,
    x: Tensor,
    epsilon: float,
    *,
    queries: int = DEFAULT_QUERIES,
    p_init: float = DEFAULT_P,
    generator: torch.Generator | None = None,
    per_frame: bool = True,
) -> SquareRun:
    """Square Attack on clips (B, T, 3, H, W) in [0, 1]: ``queries`` proposals after the clip itself,
    each judged by ``query`` (the real prediction's loss and success); see the module docstring."""
    generator = generator or torch.Generator().manual_seed(0)
    x = x.detach()
    batch, _, _, height, width = x.shape
    everyone = torch.ones(batch, dtype=torch.bool, device=x.device)
    loss, success = query(x, everyone)
    loss = loss.detach().clone()
    tracker = FirstSuccess(x)
    tracker.offer(0, x, success)
    current = x.clone()
    history = [loss.clone()]
    for k in range(1, queries + 1):
        open_ = tracker.open
        if not open_.any():
            history.append(loss.clone())
            continue
        idx = open_.nonzero().squeeze(1)
        if k == 1:
            candidate = _stripes(x[idx], epsilon, generator, per_frame)
        else:
            side = square_side(square_fraction(p_init, k - 2, queries), height, width)
            candidate = _square(x[idx], current[idx], epsilon, side, generator, per_frame)
        new_loss, new_success = query(candidate, open_)
        accept = (new_loss < loss[idx]) | new_success
        current[idx[accept]] = candidate[accept]
        loss[idx[accept]] = new_loss[accept].detach()
        succeeded = torch.zeros_like(open_)
        succeeded[idx] = new_success & accept
        tracker.offer(k, current, succeeded)
        history.append(loss.clone())
    tracker.finish(current)
    return SquareRun(tracker, torch.stack(history))


def prediction_query(pipeline: Pipeline, y: Tensor, defend: bool | str = True) -> QueryFn:
    """The margin and the wrong answer of the prediction the evaluation judges."""

    def query(z: Tensor, open_: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = pipeline.predict(z, defend=defend).logits
        labels = y[open_]
        return margin(logits, labels), logits.argmax(1) != labels

    return query


def flag_query(pipeline: Pipeline, y: Tensor, flag: FlagCalibration, defend: bool | str, lam: float) -> QueryFn:
    """The margin plus ``lam`` x relu(flag score - 0.8), and wrong-AND-unflagged, as the worker reads the flag."""

    def query(z: Tensor, open_: Tensor) -> tuple[Tensor, Tensor]:
        labels = y[open_]
        success, reading, forward, _ = judge_flag(pipeline, z, labels, flag, defend)
        penalty = (reading.score - SCORE_MARGIN).clamp_min(0)
        return margin(forward.logits, labels) + lam * penalty, success

    return query


def _generator() -> torch.Generator:
    """A CPU generator (the same squares on every device) seeded from the global generator, which the
    evaluation seeds per (seed, row, clip)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


def _run(call: AttackCall, query: QueryFn) -> AttackResult:
    run = square_attack(
        query,
        call.x,
        call.epsilon,
        queries=call.steps,
        p_init=float(call.options.get("p", DEFAULT_P)),
        generator=_generator(),
    )
    return tracked(call, run.tracker)


def run_square(call: AttackCall) -> AttackResult:
    return _run(call, prediction_query(call.pipeline, call.y, call.defend))


def run_square_flag(call: AttackCall) -> AttackResult:
    if call.flag is None:
        raise ValueError("attack 'square-flag' needs a bundle with a flag calibration (motionguard calibrate --flag)")
    lam = float(call.options.get("lambda", DEFAULT_LAMBDA))
    return _run(call, flag_query(call.pipeline, call.y, call.flag, call.defend, lam))


SQUARE = Attack(run_square, steps=DEFAULT_QUERIES, defense_aware=True, query_based=True)
SQUARE_FLAG = Attack(run_square_flag, steps=DEFAULT_QUERIES, defense_aware=True, flag_aware=True, query_based=True)
