"""``motionguard train-demo``: train the demo RAFT-small + I3D pair on MotionShapes and bundle it.

Stages run in order (raft -> i3d -> bundle, which ends with the clean MC-loss calibration); each is
resumable, so re-running the same command after an interruption continues where it stopped. Torch is
imported inside ``run`` only, so ``motionguard --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = ("raft", "i3d", "bundle", "all")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="checkpoints, caches, logs")
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (T)")
    parser.add_argument("--size", type=int, default=64, help="clip height = width in pixels")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (all cores of a quiet machine; use 1 where other work shares the cores: "
        "OpenMP barriers stall under contention)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n] for the RAFT and I3D stages")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="processes rendering training data ahead of the model (0: in-process; worth it on a GPU)",
    )
    g = parser.add_argument_group("RAFT stage")
    g.add_argument("--raft-steps", type=int, default=100_000, help="step budget (whichever budget ends first)")
    g.add_argument("--raft-minutes", type=float, default=40.0, help="wall-clock budget of the RAFT stage")
    g.add_argument("--raft-batch", type=int, default=16)
    g.add_argument("--raft-lr", type=float, default=4e-4)
    g.add_argument(
        "--raft-dense-prob",
        type=float,
        default=0.9,
        help="share of dense-motion pairs (the rest: pairs of class clips, the deployment's small motions)",
    )
    g.add_argument("--raft-eval-clips", type=int, default=24)
    g.add_argument("--raft-init", type=Path, default=None, help="warm-start weights for a fresh RAFT run")
    g = parser.add_argument_group("I3D stage")
    g.add_argument("--i3d-epochs", type=int, default=12)
    g.add_argument("--i3d-minutes", type=float, default=20.0, help="wall-clock budget of the I3D stage")
    g.add_argument("--i3d-width", type=float, default=0.25, help="I3D channel width multiplier")
    g.add_argument("--i3d-train-clips", type=int, default=600, help="training clips through RAFT (flows cached once)")
    g.add_argument("--i3d-gt-clips", type=int, default=1500, help="extra training clips with exact flow (cheap)")
    g.add_argument("--i3d-val-clips", type=int, default=150)
    g.add_argument(
        "--i3d-noisy-fraction",
        type=float,
        default=0.5,
        help="fraction of training clips also cached with +-12/255 uniform noise",
    )
    g.add_argument(
        "--i3d-defended-fraction",
        type=float,
        default=0.0,
        help="fraction of training clips also cached purified by the default defence (~40x a flow "
        "pass each: meant for --device cuda)",
    )
    g.add_argument("--i3d-chunk", type=int, default=50, help="clips per cached flow file")
    g.add_argument("--i3d-flow-batch", type=int, default=10, help="clips per RAFT call while caching flows")
    g.add_argument("--i3d-lr", type=float, default=3e-3)
    g.add_argument("--i3d-batch", type=int, default=32)
    g = parser.add_argument_group("bundle stage")
    g.add_argument("--out", type=Path, default=Path("models/bundles/motionshapes-v1"))
    g.add_argument("--name", default="motionshapes")
    g.add_argument("--version", default="1")
    g.add_argument("--calib-clips", type=int, default=200, help="clean val clips for the MC-loss calibration")
    g.add_argument("--test-clips", type=int, default=200, help="test clips for EPE and undefended accuracy")
    g.add_argument("--defended-test-clips", type=int, default=0, help="of those, how many also run defended")
    g.add_argument("--no-calibrate", action="store_true")


def _record_command(run_dir: Path, stage: str, command: str, device: str) -> None:
    """Add the command line, thread count and machine to a stage's summary: the bundle copies the
    summaries into ``training``, so a shipped bundle says exactly how and where each stage ran."""
    import torch

    path = Path(run_dir) / f"{stage}_summary.json"
    summary = json.loads(path.read_text())
    summary.update(command=command, torch_threads=torch.get_num_threads(), torch_version=torch.__version__)
    if torch.device(device).type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(torch.device(device))
    path.write_text(json.dumps(summary, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    import torch

    from models.bundle import demo as demo_bundle
    from models.training import i3d as train_i3d
    from models.training import raft as train_raft

    torch.set_num_threads(args.threads)
    command = "motionguard " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stages = ("raft", "i3d", "bundle") if args.stage == "all" else (args.stage,)
    common = {
        "run_dir": args.run_dir,
        "frames": args.frames,
        "size": args.size,
        "seed": args.seed,
        "device": args.device,
        "loader_workers": args.loader_workers,
    }
    if "raft" in stages:
        summary = train_raft.train_raft(
            train_raft.RaftTrainConfig(
                max_steps=args.raft_steps,
                max_minutes=args.raft_minutes,
                batch_size=args.raft_batch,
                lr=args.raft_lr,
                eval_clips=args.raft_eval_clips,
                dense_prob=args.raft_dense_prob,
                init=args.raft_init,
                **common,
            )
        )
        _record_command(args.run_dir, "raft", command, args.device)
        log.info("RAFT stage done: %s", summary)
    if "i3d" in stages:
        summary = train_i3d.train_i3d(
            train_i3d.I3DTrainConfig(
                epochs=args.i3d_epochs,
                max_minutes=args.i3d_minutes,
                width=args.i3d_width,
                train_clips=args.i3d_train_clips,
                val_clips=args.i3d_val_clips,
                noisy_fraction=args.i3d_noisy_fraction,
                gt_clips=args.i3d_gt_clips,
                defended_fraction=args.i3d_defended_fraction,
                lr=args.i3d_lr,
                batch_size=args.i3d_batch,
                chunk=args.i3d_chunk,
                flow_batch=args.i3d_flow_batch,
                **common,
            )
        )
        _record_command(args.run_dir, "i3d", command, args.device)
        log.info("I3D stage done: %s", summary)
    if "bundle" in stages:
        out = demo_bundle.bundle_demo(
            args.run_dir,
            args.out,
            name=args.name,
            version=args.version,
            frames=args.frames,
            size=args.size,
            width=args.i3d_width,
            command=command,
            calib_clips=0 if args.no_calibrate else args.calib_clips,
            test_clips=args.test_clips,
            defended_test_clips=args.defended_test_clips,
        )
        print(out)
    return 0
