"""The suspected-attack flag (issue 24): several cheap signals an attacker must keep clean at once.

One signal (the MC loss over its clean p99) is cheap to dodge: a penalty on it keeps an attacked
clip under the threshold. So the flag looks at signals that disagree about *what* an attacker must
do, each costing at most a 2-update RAFT pass and a classifier pass:

- ``mc``: the MC loss of the input (forward pairs, the 12-update inference flow: the old flag);
- ``mc_multi``: the multi-constraint MC loss (forward + backward + long range, Eq. 10) with a
  2-update flow: a perturbation tuned to keep the forward pairs consistent must also keep the
  reversed and the long-range pairs consistent;
- ``updates``: total-variation distance between the classifier's probabilities on the 2-update and
  the 12-update flow (attacks take gradients through 2 updates; clean flow barely changes between
  them);
- ``noise``: total-variation distance between the 2-update prediction of the clip and of the clip
  plus fresh uniform noise (``noise_epsilon``): adversarial inputs sit close to a decision boundary
  that random noise crosses, and the attacker cannot know the draw;
- ``margin``: 1 - (top-1 - top-2 probability) of the 12-update prediction: the first iterate that
  fools a model is rarely a confident one;
- ``purify_change`` (only where the purification ran): total-variation distance between the
  predictions before and after it: the defence moving the answer is evidence of an attack.

Each value becomes its clean tail probability S(v) (the bundle's calibration: an empirical survival
function with an exponential tail beyond the clean 90th percentile), its *surprise* -log10 S(v),
and ``attack_score`` = the largest surprise: the attacker must keep *every* signal clean-looking.
The threshold is the clean (1 - fpr) quantile of the score, so the false-flag rate is stated, not
hoped for. All of it is differentiable (``surprises``), which is what the flag-aware attacks in
``models.robustness.attacks.flag`` optimise against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.bundle_meta import FlagCalibration, SignalCalibration
from models.defense.mc_loss import mc_loss

INPUT_SIGNALS = ("mc", "mc_multi", "updates", "noise", "margin")
DEFENDED_SIGNALS = ("purify_change",)
SIGNALS = INPUT_SIGNALS + DEFENDED_SIGNALS
SIGNAL_SETS = {"input": INPUT_SIGNALS, "defended": SIGNALS}
GRAD_UPDATES = 2  # RAFT updates of the cheap signals (and of every gradient: paper App. A.1)
DEFAULT_NOISE = 4 / 255
DEFAULT_TAIL_SHARE = 0.1
SAMPLE_SIZE = 256
MIN_SURVIVAL = 1e-12  # surprise is capped at 12: beyond that the number means nothing


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """Half the L1 distance between two rows of probabilities (B, C) -> (B,), in [0, 1]."""
    return 0.5 * (p - q).abs().sum(dim=1)


def low_margin(probs: Tensor) -> Tensor:
    """1 - (top-1 - top-2 probability): 0 for a certain prediction, 1 for a tie."""
    top = probs.topk(2, dim=1).values
    return 1.0 - (top[:, 0] - top[:, 1])


def noised(clip: Tensor, epsilon: float, generator: torch.Generator | None = None) -> Tensor:
    """The clip plus uniform noise in [-eps, eps], kept in [0, 1]."""
    if generator is None:
        u = torch.rand_like(clip)
    else:
        u = torch.rand(clip.shape, generator=generator, dtype=clip.dtype).to(clip.device)
    return (clip + (u * 2 - 1) * epsilon).clamp(0.0, 1.0)


def input_signals(
    pipeline,
    clip: Tensor,
    probs: Tensor,
    flows_forward: Tensor,
    *,
    noise_epsilon: float = DEFAULT_NOISE,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The pre-defence signals of clips (B, T, 3, H, W) whose 12-update probabilities ``probs`` (B, C)
    and forward flows ``flows_forward`` the inference pass already computed. Differentiable w.r.t.
    ``clip`` through every 2-update branch (the 12-update inputs are what they are)."""
    config = pipeline.defense
    loss = {"similarity": config.similarity, "lambda_smooth": config.lambda_smooth, "edge_lambda": config.edge_lambda}
    flows2 = pipeline.flow_model(clip, GRAD_UPDATES, ("forward", "backward", "long"))
    probs2 = pipeline.classify_flows(flows2["forward"]).softmax(dim=1)
    shaken = pipeline.flow_model(noised(clip, noise_epsilon, generator), GRAD_UPDATES)["forward"]
    probs_noise = pipeline.classify_flows(shaken).softmax(dim=1)
    return {
        "mc": mc_loss(clip, {"forward": flows_forward}, **loss),
        "mc_multi": mc_loss(clip, flows2, **loss),
        "updates": total_variation(probs2, probs),
        "noise": total_variation(probs_noise, probs2),
        "margin": low_margin(probs),
    }


def surrogate_signals(
    pipeline, clip: Tensor, *, noise_epsilon: float = DEFAULT_NOISE, probs_infer: Tensor | None = None
) -> dict[str, Tensor]:
    """``input_signals`` as an attacker differentiates them: every flow at 2 updates (12 obfuscates
    the gradient), the 12-update probabilities (``probs_infer``, detached) taken as given."""
    flows2 = pipeline.flow_model(clip, GRAD_UPDATES, ("forward", "backward", "long"))
    probs2 = pipeline.classify_flows(flows2["forward"]).softmax(dim=1)
    probs_infer = probs2 if probs_infer is None else probs_infer.detach()
    config = pipeline.defense
    loss = {"similarity": config.similarity, "lambda_smooth": config.lambda_smooth, "edge_lambda": config.edge_lambda}
    shaken = pipeline.flow_model(noised(clip, noise_epsilon), GRAD_UPDATES)["forward"]
    probs_noise = pipeline.classify_flows(shaken).softmax(dim=1)
    return {
        "mc": mc_loss(clip, {"forward": flows2["forward"]}, **loss),
        "mc_multi": mc_loss(clip, flows2, **loss),
        "updates": total_variation(probs2, probs_infer),
        "noise": total_variation(probs_noise, probs2),
        "margin": low_margin(probs2),
    }


def purification_signals(probs_before: Tensor, probs_after: Tensor) -> dict[str, Tensor]:
    """Signals of clips that went through the purification: how far it moved the answer."""
    return {"purify_change": total_variation(probs_after, probs_before)}


# ---------------------------------------------------------------------------------------------
# Calibration: clean values -> tail probabilities -> score
# ---------------------------------------------------------------------------------------------


def fit_signal(values: Iterable[float], tail_share: float = DEFAULT_TAIL_SHARE) -> SignalCalibration:
    """A signal's clean calibration: the sorted (thinned) sample and an exponential tail fitted to the
    values above the clean (1 - tail_share) quantile (the mean excess is the exponential's MLE)."""
    data = torch.tensor([float(v) for v in values if math.isfinite(float(v))], dtype=torch.float64).sort().values
    if data.numel() < 2:
        raise ValueError("a flag signal needs at least two finite clean values")
    sample = data
    if sample.numel() > SAMPLE_SIZE:
        sample = sample[torch.linspace(0, sample.numel() - 1, SAMPLE_SIZE).round().long()]
    # Where the body (``survival``'s interpolation of the stored sample) reaches tail_share: the tail
    # joins it there, so the tail probability is continuous.
    m = sample.numel()
    position = min(max((1 - tail_share) * (m + 1), 1.0), float(m))  # 1-based, between sample values
    low = int(math.floor(position))
    high = min(low + 1, m)
    start = float(sample[low - 1] + (sample[high - 1] - sample[low - 1]) * (position - low))
    excess = data[data > start] - start
    spread = float(data[-1] - data[0])
    scale = float(excess.mean()) if excess.numel() else 0.0
    scale = max(scale, 1e-3 * spread, 1e-9)
    return SignalCalibration(
        sample=[float(v) for v in sample],
        tail_start=start,
        tail_scale=scale,
        tail_share=tail_share,
        p99=float(torch.quantile(data, 0.99)),
    )


def survival(values: Tensor, calibration: SignalCalibration) -> Tensor:
    """Clean tail probability P(clean >= v), piecewise: the empirical survival function (linear between
    the sample's plotting positions) up to ``tail_start``, exponential beyond. Differentiable."""
    sample = torch.tensor(calibration.sample, dtype=values.dtype, device=values.device)
    m = sample.numel()
    levels = torch.arange(1, m + 1, dtype=values.dtype, device=values.device) / (m + 1)  # F at each sample value
    v = values.clamp(min=float(sample[0]), max=calibration.tail_start)
    j = torch.searchsorted(sample, v.detach().contiguous(), right=True).clamp(1, m - 1)
    x0, x1 = sample[j - 1], sample[j]
    f0, f1 = levels[j - 1], levels[j]
    span = (x1 - x0).clamp_min(1e-12)
    body = 1 - (f0 + (f1 - f0) * (v - x0) / span)
    body = body.clamp(min=calibration.tail_share)  # the tail starts where the body reaches tail_share
    tail = calibration.tail_share * torch.exp(-(values - calibration.tail_start) / calibration.tail_scale)
    out = torch.where(values > calibration.tail_start, tail, body)
    return torch.where(values < sample[0], torch.ones_like(out), out).clamp(min=MIN_SURVIVAL, max=1.0)


def surprises(signals: Mapping[str, Tensor], flag: FlagCalibration) -> dict[str, Tensor]:
    """-log10 of each calibrated signal's clean tail probability (0: typical of clean clips)."""
    return {
        name: -torch.log10(survival(value, flag.signals[name]))
        for name, value in signals.items()
        if name in flag.signals
    }


def combine(surprise: Mapping[str, Tensor]) -> Tensor:
    """``attack_score``: the largest surprise (B,): every signal must look clean for a low score."""
    if not surprise:
        raise ValueError("no calibrated signal to score")
    return torch.stack(list(surprise.values())).amax(dim=0)


def signal_set(names: Iterable[str]) -> str:
    """The threshold a set of available signals is judged by (any purification signal: ``defended``)."""
    return "defended" if any(name in DEFENDED_SIGNALS for name in names) else "input"


def attack_score(signals: Mapping[str, Tensor], flag: FlagCalibration) -> tuple[Tensor, float]:
    """(score (B,), the threshold of this signal set)."""
    surprise = surprises(signals, flag)
    return combine(surprise), flag.thresholds[signal_set(surprise)]


def calibrate_flag(
    clean: Mapping[str, Sequence[float]],
    *,
    fpr: float = 0.01,
    auto_quantile: float | None = 0.9,
    tail_share: float = DEFAULT_TAIL_SHARE,
    noise_epsilon: float = DEFAULT_NOISE,
    source: str = "",
    command: str | None = None,
) -> FlagCalibration:
    """The flag's calibration from clean values per signal (every list over the same clips, in order;
    ``purify_change`` may be absent: the ``defended`` threshold then equals the ``input`` one).

    Each threshold is the clean (1 - fpr) quantile of the score over its signal set, computed on the
    calibration clips themselves; the test-split false-flag rate is what says whether it holds."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    fitted = {name: fit_signal(values, tail_share) for name, values in clean.items()}
    draft = FlagCalibration(
        n=min(len(v) for v in clean.values()),
        source=source,
        fpr=fpr,
        noise_epsilon=noise_epsilon,
        signals=fitted,
        thresholds={},
        command=command,
    )
    thresholds: dict[str, float] = {}
    auto = None
    score_sample: list[float] = []
    for set_name, names in SIGNAL_SETS.items():
        present = {n: torch.tensor(list(clean[n]), dtype=torch.float64) for n in names if n in clean}
        if not present:
            continue
        scores = combine(surprises(present, draft))
        thresholds[set_name] = float(torch.quantile(scores, 1 - fpr))
        if set_name == "input":
            if auto_quantile is not None:
                auto = float(torch.quantile(scores, auto_quantile))
            ordered = (scores / thresholds[set_name]).sort().values
            if ordered.numel() > SAMPLE_SIZE:
                ordered = ordered[torch.linspace(0, ordered.numel() - 1, SAMPLE_SIZE).round().long()]
            score_sample = [round(float(v), 6) for v in ordered]
    if "defended" not in thresholds:
        thresholds["defended"] = thresholds["input"]
    return draft.model_copy(
        update={
            "thresholds": thresholds,
            "auto_threshold": auto,
            "auto_quantile": auto_quantile,
            "score_sample": score_sample,
        }
    )


# ---------------------------------------------------------------------------------------------
# One reading per clip: what the result, the metrics and the evaluation report
# ---------------------------------------------------------------------------------------------


@dataclass
class FlagReading:
    """Per clip (B,): the signal values, ``score`` = the combined score over its threshold (> 1:
    suspected, the same scale for every signal set and for the MC-only flag of an old bundle) and
    ``flagged``. ``score`` is None when the bundle has no calibration at all."""

    signals: dict[str, Tensor]
    score: Tensor | None
    flagged: Tensor

    def of(self, i: int) -> tuple[dict[str, float], float | None, bool]:
        """Clip i's (signals, score, flagged) as plain Python values."""
        values = {name: float(v[i]) for name, v in self.signals.items() if math.isfinite(float(v[i]))}
        return values, None if self.score is None else float(self.score[i]), bool(self.flagged[i])


@torch.no_grad()
def read_flag(
    pipeline,
    clip: Tensor,
    *,
    probs_before: Tensor,
    flows_before: Tensor,
    mc_before: Tensor,
    flag: FlagCalibration | None,
    legacy_threshold: float | None = None,
    probs_after: Tensor | None = None,
    purified: Tensor | None = None,
    generator: torch.Generator | None = None,
    input_values: Mapping[str, Tensor] | None = None,
) -> FlagReading:
    """The flag of clips after an inference pass (``probs_before``/``flows_before``/``mc_before``: the
    undefended 12-update figures) and, where the purification ran (``purified``), its output
    probabilities. Without a flag calibration: the old rule, ``mc_before`` over ``legacy_threshold``.
    ``input_values``: the input signals when already computed (``defend=auto`` decided on them)."""
    batch = clip.shape[0]
    if flag is None:
        signals = {"mc": mc_before}
        if legacy_threshold is None:
            return FlagReading(signals, None, torch.zeros(batch, dtype=torch.bool, device=clip.device))
        score = mc_before / legacy_threshold
        return FlagReading(signals, score, mc_before > legacy_threshold)
    if input_values is not None:
        signals = dict(input_values)
    else:
        signals = input_signals(
            pipeline, clip, probs_before, flows_before, noise_epsilon=flag.noise_epsilon, generator=generator
        )
    score_in = combine(surprises(signals, flag)) / flag.thresholds["input"]
    score = score_in
    if purified is not None and probs_after is not None and bool(purified.any()):
        change = purification_signals(probs_before, probs_after)["purify_change"]
        signals["purify_change"] = torch.where(purified, change, torch.full_like(change, math.nan))
        both = combine(surprises({**signals, "purify_change": change}, flag)) / flag.thresholds["defended"]
        score = torch.where(purified, both, score_in)
    return FlagReading(signals, score, score > 1.0)


def read_flag_of(
    pipeline,
    clip: Tensor,
    plain,
    flag: FlagCalibration | None,
    *,
    defended=None,
    legacy_threshold: float | None = None,
    generator: torch.Generator | None = None,
) -> FlagReading:
    """``read_flag`` after an undefended prediction ``plain`` (``predict(defend=False,
    keep_flows=True)``) and, where the purification ran, the ``defended`` one: what calibration,
    the evaluation and the flag-aware attacks read (the worker reuses one prediction instead:
    ``worker.serving.flagging``)."""
    return read_flag(
        pipeline,
        clip,
        probs_before=plain.probs,
        flows_before=plain.flows_before,
        mc_before=plain.mc_before,
        flag=flag,
        legacy_threshold=legacy_threshold,
        probs_after=None if defended is None else defended.probs,
        purified=None if defended is None else defended.purified,
        generator=generator,
    )


class FlagDecision:
    """``defend=auto`` on the flag: purify the clips whose input score (1 = the flag's threshold) is over
    ``threshold`` (the bundle's ``auto_threshold`` on that scale). ``Pipeline`` calls it in place of the
    MC-loss threshold; it keeps the last batch's signals (``signals``), so the flag of the same clips
    reads them instead of computing them twice (one worker process decides one batch at a time)."""

    def __init__(self, pipeline, flag: FlagCalibration, threshold: float | None = None):
        if threshold is None:
            if flag.auto_threshold is None:
                raise ValueError("the flag calibration has no auto threshold")
            threshold = flag.auto_threshold / flag.thresholds["input"]
        self.pipeline, self.flag, self.threshold = pipeline, flag, threshold
        self.signals: dict[str, Tensor] | None = None

    @torch.no_grad()
    def __call__(self, clip: Tensor, flows_forward: Tensor, mc_before: Tensor, logits: Tensor) -> Tensor:
        self.signals = input_signals(
            self.pipeline, clip, logits.softmax(dim=1), flows_forward, noise_epsilon=self.flag.noise_epsilon
        )
        return combine(surprises(self.signals, self.flag)) / self.flag.thresholds["input"] > self.threshold

    def take(self, batch: int) -> dict[str, Tensor] | None:
        """The signals of the batch just decided (None if they are not this batch's), then forget them."""
        signals, self.signals = self.signals, None
        if signals is None or any(v.shape[0] != batch for v in signals.values()):
            return None
        return signals
