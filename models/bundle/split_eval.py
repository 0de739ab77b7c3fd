"""``motionguard bundle test``: a bundle's flow end-point error against MotionShapes' exact flow and
its top-1 accuracy, undefended and defended, on a synthetic split, through the deployment's pipeline.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from models.data.synthetic import CLASSES, make_clip, split_seed

log = logging.getLogger(__name__)


@torch.no_grad()
def _evaluate_batch(pipeline, clips: Tensor, defend: bool) -> tuple[Tensor, Tensor]:
    pred = pipeline.predict(clips, defend=defend, keep_flows=True)
    return pred.probs.argmax(1), pred.flows_before


MOVING_PX = 0.5


def evaluate_split(bundle_dir: Path, split: str = "test", n: int = 200, defended_n: int = 0, batch: int = 8) -> dict:
    """Flow EPE (the bundle's inference updates) vs exact flow, and top-1 accuracy, on a MotionShapes split.

    Undefended accuracy and EPE use ``n`` clips; the defence is ~40x the cost of a plain prediction
    on CPU, so its accuracy is measured on the first ``defended_n`` of them."""
    from models.bundle.load import load_bundle

    bundle = load_bundle(bundle_dir)
    meta = bundle.meta
    frames, size = meta.input.frames, meta.input.height
    epe_sum, zero_sum, correct, correct_def, correct_sub, t0 = 0.0, 0.0, 0, 0, 0, time.perf_counter()
    moving_err, moving_mag, moving_px = 0.0, 0.0, 0
    for start in tqdm(range(0, n, batch), desc=f"evaluate {split}", mininterval=10, dynamic_ncols=True):
        idx = range(start, min(n, start + batch))
        items = [make_clip(split_seed(split, i), i % len(CLASSES), frames, size) for i in idx]
        clips = torch.stack([c for c, _ in items])
        gt = torch.stack([f for _, f in items])
        labels = torch.tensor([i % len(CLASSES) for i in idx])
        guess, flows = _evaluate_batch(bundle.pipeline, clips, defend=False)
        error, magnitude = (flows - gt).norm(dim=2), gt.norm(dim=2)
        epe_sum += float(error.flatten(1).mean(1).sum())
        zero_sum += float(magnitude.flatten(1).mean(1).sum())  # EPE of predicting no motion
        moving = magnitude > MOVING_PX  # most pixels are static background: EPE there says little
        moving_err += float(error[moving].sum())
        moving_mag += float(magnitude[moving].sum())
        moving_px += int(moving.sum())
        correct += int((guess == labels).sum())
        if start < defended_n:
            keep = min(len(idx), defended_n - start)
            guess_def, _ = _evaluate_batch(bundle.pipeline, clips[:keep], defend=True)
            correct_def += int((guess_def == labels[:keep]).sum())
            correct_sub += int((guess[:keep] == labels[:keep]).sum())
    result = {
        "split": split,
        "n": n,
        "flow_epe": round(epe_sum / n, 4),
        "flow_updates": meta.flow.updates_infer,
        "zero_flow_epe": round(zero_sum / n, 4),
        "moving_threshold_px": MOVING_PX,
        "moving_flow_epe": round(moving_err / max(moving_px, 1), 4),
        "moving_zero_flow_epe": round(moving_mag / max(moving_px, 1), 4),
        "top1_undefended": round(correct / n, 4),
        "minutes": round((time.perf_counter() - t0) / 60, 2),
    }
    if defended_n:
        result["defended_n"] = defended_n
        result["top1_defended"] = round(correct_def / defended_n, 4)
        result["top1_undefended_same_clips"] = round(correct_sub / defended_n, 4)
        result["defense_steps"] = meta.defense.steps
    log.info("evaluation on %s: %s", split, result)
    return result
