"""Calibrating the attack flag on clean clips, and measuring its false-flag rate on others.

The flag's threshold is only as good as the clean clips it was measured on, so calibration and the
check are separate: calibrate on the validation split (``calibrate_flag_bundle`` writes the
``flag`` section of bundle.json, nothing else), then count flags on clean test clips and on clean
clips plus uniform noise (a camera's noise should not page anyone) with ``false_flags``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from models.bundle_meta import FlagCalibration, read_bundle_meta, write_bundle_meta
from models.defense.flag import DEFAULT_NOISE, FlagReading, calibrate_flag, read_flag_of

log = logging.getLogger(__name__)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """95 % Wilson score interval of a proportion, in % (sound at 0 or n successes, unlike a bootstrap)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(100 * max(0.0, centre - half), 1), round(100 * min(1.0, centre + half), 1)]


@torch.no_grad()
def read_batch(
    pipeline,
    clip: Tensor,
    flag: FlagCalibration | None,
    *,
    defend: bool | str = True,
    legacy_threshold: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[FlagReading, Tensor]:
    """The flag of a batch of clips as the service reads it, and the final (defended) probabilities."""
    plain = pipeline.predict(clip, defend=False, keep_flows=True)
    defended = pipeline.predict(clip, defend=defend) if defend not in (False, "off") else None
    reading = read_flag_of(
        pipeline, clip, plain, flag, defended=defended, legacy_threshold=legacy_threshold, generator=generator
    )
    probs_after = plain.probs if defended is None else defended.probs
    return reading, probs_after


def _batches(clips: Iterable[tuple[Tensor, int]], size: int) -> Iterable[tuple[Tensor, Tensor]]:
    buffer: list[tuple[Tensor, int]] = []
    for item in clips:
        buffer.append(item)
        if len(buffer) == size:
            yield torch.stack([c for c, _ in buffer]), torch.tensor([y for _, y in buffer])
            buffer.clear()
    if buffer:
        yield torch.stack([c for c, _ in buffer]), torch.tensor([y for _, y in buffer])


def clean_signal_values(
    pipeline,
    clips: Iterable[tuple[Tensor, int]],
    *,
    defend: bool | str = True,
    batch_size: int = 8,
    noise_epsilon: float = DEFAULT_NOISE,
) -> dict[str, list[float]]:
    """Every signal's value on each clip (``purify_change`` only with a defence), for the calibration."""
    from models.bundle_meta import SignalCalibration

    # A stand-in calibration that makes read_flag compute every signal (its scores are not used).
    stub = FlagCalibration(
        n=1,
        noise_epsilon=noise_epsilon,
        signals={"mc": SignalCalibration(sample=[0.0, 1.0], tail_start=1.0, tail_scale=1.0)},
        thresholds={"input": 1.0, "defended": 1.0},
    )
    values: dict[str, list[float]] = {}
    for done, (x, _) in enumerate(_batches(clips, batch_size), start=1):
        x = x.to(pipeline.device)
        reading, _ = read_batch(pipeline, x, stub, defend=defend)
        for name, v in reading.signals.items():
            values.setdefault(name, []).extend(float(a) for a in v.cpu())
        log.info("flag calibration: %d batches", done)
    return values


def calibrate_flag_bundle(
    bundle_dir: str | Path,
    *,
    split: str = "val",
    n: int = 200,
    fpr: float = 0.01,
    auto_quantile: float | None = 0.9,
    defend: bool | str = True,
    batch_size: int = 8,
    device: str = "cpu",
    command: str | None = None,
    values_out: Path | None = None,
    values_in: Path | None = None,
) -> FlagCalibration:
    """Measure every signal on ``n`` clean clips of a MotionShapes split with the bundle's own models
    and write the ``flag`` section of its bundle.json (re-read first, so only that field changes).
    ``values_out`` keeps each clip's values; ``values_in`` refits such a file without running a model."""
    import json

    if values_in is not None:
        stored = json.loads(Path(values_in).read_text())
        return _store_flag(bundle_dir, stored["values"], stored["split"], fpr, auto_quantile, command)
    from models.bundle.load import load_bundle
    from models.defense.calibrate import synthetic_clips

    bundle = load_bundle(bundle_dir, device)
    meta = bundle.meta
    values = clean_signal_values(
        bundle.pipeline,
        synthetic_clips(split, n, meta.input.frames, meta.input.height),
        defend=defend,
        batch_size=batch_size,
    )
    if values_out is not None:
        Path(values_out).parent.mkdir(parents=True, exist_ok=True)
        Path(values_out).write_text(json.dumps({"split": split, "n": n, "defend": defend, "values": values}) + "\n")
    return _store_flag(bundle_dir, values, split, fpr, auto_quantile, command)


def _store_flag(
    bundle_dir: str | Path,
    values: dict[str, list[float]],
    split: str,
    fpr: float,
    auto_quantile: float | None,
    command: str | None,
) -> FlagCalibration:
    # purify_change is only defined where the purification ran (defend=auto: a few clips).
    values = {k: [v for v in vs if math.isfinite(v)] for k, vs in values.items()}
    flag = calibrate_flag(values, fpr=fpr, auto_quantile=auto_quantile, source=f"motionshapes:{split}", command=command)
    fresh = read_bundle_meta(bundle_dir)
    write_bundle_meta(bundle_dir, fresh.model_copy(update={"flag": flag}))
    log.info("flag calibrated on %d clean clips: thresholds %s", flag.n, flag.thresholds)
    return flag


def false_flags(
    pipeline,
    clips: Iterable[tuple[Tensor, int]],
    flag: FlagCalibration | None,
    *,
    defend: bool | str = True,
    noise_epsilon: float = 0.0,
    legacy_threshold: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Flagged share of clean clips (plus uniform noise of ``noise_epsilon`` when > 0), with a 95 %
    Wilson interval and, per signal, how often it was the one over the threshold's line."""
    generator = torch.Generator().manual_seed(seed)
    flagged = total = correct = 0
    scores: list[float] = []
    for x, y in _batches(clips, batch_size):
        if noise_epsilon > 0:
            x = (x + (torch.rand(x.shape, generator=generator) * 2 - 1) * noise_epsilon).clamp(0, 1)
        reading, probs = read_batch(
            pipeline, x.to(pipeline.device), flag, defend=defend, legacy_threshold=legacy_threshold
        )
        flagged += int(reading.flagged.sum())
        total += x.shape[0]
        correct += int((probs.argmax(1).cpu() == y).sum())
        if reading.score is not None:
            scores.extend(float(s) for s in reading.score.cpu())
    ordered = sorted(scores)
    return {
        "n": total,
        "flagged": flagged,
        "rate_percent": round(100 * flagged / total, 2) if total else None,
        "ci95": wilson_interval(flagged, total),
        "accuracy_percent": round(100 * correct / total, 1) if total else None,
        "noise_epsilon_255": round(noise_epsilon * 255, 3),
        "score_p50": ordered[len(ordered) // 2] if ordered else None,
        "score_max": ordered[-1] if ordered else None,
    }
