"""Demo stage 3: the bundle of a finished demo run (RAFT + I3D stages), calibrated on clean val
clips, optionally tested, with both stages' summaries recorded as its provenance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from models.bundle.split_eval import evaluate_split
from models.data.synthetic import CLASSES, SPLIT_BASE
from models.training.i3d import I3D_FINAL
from models.training.raft import RAFT_CORR_LEVELS, RAFT_CORR_RADIUS, RAFT_FINAL

log = logging.getLogger(__name__)


def bundle_demo(
    run_dir: Path,
    out: Path,
    *,
    name: str = "motionshapes",
    version: str = "1",
    frames: int = 8,
    size: int = 64,
    width: float = 0.25,
    command: str = "",
    calib_clips: int = 200,
    test_clips: int = 0,
    defended_test_clips: int = 0,
) -> Path:
    """Build the demo bundle from a finished run, calibrate it on clean val clips, optionally test it.

    How it was trained (both stages' summaries, the command, the seed ranges) goes into
    ``meta.training`` so a shipped bundle documents its own provenance."""
    from models.bundle.load import create_bundle
    from models.bundle_meta import BundleMeta, ClassifierSpec, FlowSpec, InputSpec, read_bundle_meta, write_bundle_meta
    from models.data.synthetic import labels
    from models.defense.calibrate import calibrate_bundle

    run_dir = Path(run_dir)
    training: dict = {
        "dataset": "MotionShapes (models/data/synthetic.py)",
        "split_seed_base": dict(SPLIT_BASE),
        "command": command,
        "machine": f"CPU, {torch.get_num_threads()} torch thread(s)",
    }
    for stage in ("raft", "i3d"):
        path = run_dir / f"{stage}_summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            summary.pop("history", None)
            training[stage] = summary
    meta = BundleMeta(
        name=name,
        version=version,
        labels=labels(),
        input=InputSpec(frames=frames, height=size, width=size, resize="short_side", crop="center"),
        flow=FlowSpec(
            arch="raft_small",
            checkpoint="flow.pth",
            format="torchvision",
            corr_levels=RAFT_CORR_LEVELS,
            corr_radius=RAFT_CORR_RADIUS,
        ),
        classifier=ClassifierSpec(
            checkpoint="classifier.pth", width=width, num_classes=len(CLASSES), temporal_pool="mean"
        ),
        training=training,
    )
    out = create_bundle(out, meta, run_dir / RAFT_FINAL, run_dir / I3D_FINAL)
    log.info("bundle written to %s", out)
    if calib_clips:
        _, report = calibrate_bundle(out, split="val", n=calib_clips)
        training["calibration"] = {k: report[k] for k in ("n", "source", "undefended_accuracy") if k in report}
    if test_clips:
        training["test"] = evaluate_split(out, "test", test_clips, defended_test_clips)
    current = read_bundle_meta(out)
    write_bundle_meta(out, current.model_copy(update={"training": training}))
    return out
