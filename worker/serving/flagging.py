"""The suspected-attack flag of served clips (issue 24): what a result, the metrics and the drift carry.

The worker reads the flag from the prediction it already made: the inference pass's forward flows
and MC loss, the classifier's probabilities before and after the purification, plus the flag's own
cheap passes (``models.defense.flag``: a 2-update RAFT pass over three pair sets and one over a
noised copy, two classifier passes). A bundle without a ``flag`` calibration keeps the old flag, the
MC loss over the calibration threshold, with ``attack_score`` = MC loss / threshold and the MC loss
as its only signal, so a result's fields mean the same whichever bundle produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.defense.flag import read_flag


@dataclass
class ClipFlag:
    """One clip's flag: ``score`` is the combined score over its threshold (> 1: ``suspected``)."""

    suspected: bool = False
    score: float | None = None
    signals: dict[str, float] = field(default_factory=dict)


def legacy_threshold(meta) -> float | None:
    """The calibration's MC-loss threshold: the suspected-attack flag of a bundle without a ``flag``
    section, and the line drawn in a clip's pictures."""
    return meta.calibration.threshold if meta.calibration is not None else None


@torch.no_grad()
def flag_clips(bundle, clip: Tensor, prediction, decided: bool = False) -> list[ClipFlag]:
    """The flag of each clip of a batch after ``Pipeline.predict(..., keep_flows=True)``; ``decided``:
    ``defend=auto`` decided on the flag (``Pipeline.decide_auto``), whose input signals are reused."""
    meta, pipeline = bundle.meta, bundle.pipeline
    probs_after = prediction.probs
    purified = prediction.purified
    probs_before = probs_after
    if meta.flag is not None:
        if prediction.flows_before is None:
            raise ValueError("the flag needs the inference flows: predict with keep_flows=True")
        if purified is not None and bool(purified.any()):
            # The probabilities before the purification, from the flow the inference pass kept (one
            # classifier pass; the prediction itself only keeps the final probabilities).
            probs_before = probs_after.clone()
            probs_before[purified] = pipeline.classify_flows(prediction.flows_before[purified]).softmax(dim=1)
    reading = read_flag(
        pipeline,
        clip,
        probs_before=probs_before,
        flows_before=prediction.flows_before,
        mc_before=prediction.mc_before,
        flag=meta.flag,
        legacy_threshold=legacy_threshold(meta),
        probs_after=probs_after if purified is not None else None,
        purified=purified,
        input_values=pipeline.decide_auto.take(clip.shape[0]) if decided and pipeline.decide_auto else None,
    )
    flags = []
    for i in range(clip.shape[0]):
        signals, score, suspected = reading.of(i)
        flags.append(
            ClipFlag(
                suspected=suspected,
                score=None if score is None else round(score, 6),
                signals={k: round(v, 6) for k, v in signals.items()},
            )
        )
    return flags
