"""Clean MC-loss calibration of a bundle: the reference the attack detector and drift monitor use.

Attacked clips have a much higher motion-consistency loss than clean ones (paper, Fig. 5), but the
absolute scale depends on the flow model and on the kind of video, so the threshold must be measured
per bundle on clean clips of the deployment's kind. We record quantiles, mean/std, the threshold
(a high quantile, p99 by default: ~1 % false alarms on clean input) and a sample of clean values that
the drift statistics compare a recent window against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from models.bundle_meta import Calibration, read_bundle_meta, write_bundle_meta
from models.errors import UserError

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.95, 0.99)
SAMPLE_SIZE = 256


def quantile_name(q: float) -> str:
    return f"p{round(q * 100):d}"


def summarise(values: Iterable[float], threshold_quantile: float = 0.99, sample_size: int = SAMPLE_SIZE) -> Calibration:
    """Calibration record from clean MC-loss values (quantiles by linear interpolation)."""
    data = torch.tensor([float(v) for v in values if math.isfinite(float(v))], dtype=torch.float64)
    if data.numel() == 0:
        raise UserError("no finite MC-loss values to calibrate on")
    if not 0 < threshold_quantile < 1:
        raise UserError(f"threshold quantile must be in (0, 1), got {threshold_quantile}")
    quantiles = {quantile_name(q): float(torch.quantile(data, q)) for q in QUANTILES}
    threshold = float(torch.quantile(data, threshold_quantile))
    # An evenly spaced subsample of the sorted values keeps the distribution's shape in <= sample_size numbers.
    ordered = data.sort().values
    if ordered.numel() > sample_size:
        idx = torch.linspace(0, ordered.numel() - 1, sample_size).round().long()
        ordered = ordered[idx]
    return Calibration(
        n=int(data.numel()),
        quantiles=quantiles,
        mean=float(data.mean()),
        std=float(data.std(unbiased=True)) if data.numel() > 1 else 0.0,
        threshold=threshold,
        threshold_quantile=threshold_quantile,
        sample=[float(v) for v in ordered],
    )


def synthetic_clips(split: str, n: int, frames: int, size: int) -> Iterator[tuple[Tensor, int]]:
    """(clip, label) of the first ``n`` items of a MotionShapes split."""
    from models.data.synthetic import CLASSES, make_clip, split_seed

    for i in range(n):
        clip, _ = make_clip(split_seed(split, i), i % len(CLASSES), frames, size)
        yield clip, i % len(CLASSES)


@torch.no_grad()
def clean_mc_losses(
    pipeline, clips: Iterable[tuple[Tensor, int | None]], batch_size: int = 8
) -> tuple[list[float], int, int]:
    """MC loss before defence of each clip, plus (correct, labelled) counts of the undefended prediction.

    The accuracy comes for free (the same inference pass classifies) and is a sanity check that the
    calibration clips are ones the model understands."""
    losses: list[float] = []
    correct = labelled = 0
    buffer: list[tuple[Tensor, int | None]] = []

    def flush() -> None:
        nonlocal correct, labelled
        clip = torch.stack([torch.as_tensor(c, dtype=torch.float32) for c, _ in buffer])
        pred = pipeline.predict(clip, defend=False)
        losses.extend(float(v) for v in pred.mc_before.cpu())
        top = pred.probs.argmax(1).cpu()
        for (_, label), guess in zip(buffer, top, strict=True):
            if label is not None:
                labelled += 1
                correct += int(int(guess) == label)
        buffer.clear()

    for item in clips:
        buffer.append(item)
        if len(buffer) == batch_size:
            flush()
            log.info("calibration: %d clips", len(losses))
    if buffer:
        flush()
    return losses, correct, labelled


def store_calibration(bundle_dir: str | Path, calibration: Calibration) -> None:
    """Write ``calibration`` into the bundle's bundle.json, re-read first so only that field changes."""
    fresh = read_bundle_meta(bundle_dir)
    write_bundle_meta(bundle_dir, fresh.model_copy(update={"calibration": calibration}))


def calibrate_bundle(
    bundle_dir: str | Path,
    clips: Iterable[tuple[Tensor, int | None]] | None = None,
    *,
    split: str = "val",
    n: int = 200,
    threshold_quantile: float = 0.99,
    batch_size: int = 8,
    device: str = "cpu",
) -> tuple[Calibration, dict]:
    """Measure the clean MC loss of ``clips`` (default: ``n`` clips of a MotionShapes split) with the
    bundle's own models and write the calibration into its bundle.json (weights and sha256 untouched).

    Returns the calibration and a small report (clip count, source, undefended accuracy if labelled)."""
    from models.bundle.load import load_bundle

    bundle = load_bundle(bundle_dir, device)
    meta = bundle.meta
    source = "clips"
    if clips is None:
        clips = synthetic_clips(split, n, meta.input.frames, meta.input.height)
        source = f"motionshapes:{split}"
    losses, correct, labelled = clean_mc_losses(bundle.pipeline, clips, batch_size)
    calibration = summarise(losses, threshold_quantile)
    store_calibration(bundle_dir, calibration)
    report = {
        "n": calibration.n,
        "source": source,
        "threshold": calibration.threshold,
        "quantiles": calibration.quantiles,
    }
    if labelled:
        report["undefended_accuracy"] = correct / labelled
    log.info(
        "calibrated %s on %d clean clips (%s): threshold %.5f, p50 %.5f",
        bundle_dir,
        calibration.n,
        source,
        calibration.threshold,
        calibration.quantiles["p50"],
    )
    return calibration, report
