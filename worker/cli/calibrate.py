"""``motionguard calibrate``: measure a bundle's clean MC loss and store it in bundle.json.

Clean clips come either from a MotionShapes split (``--synthetic-split val``, the demo bundle's
reference) or from a folder of the user's own clean videos (``--clips DIR``, decoded and cut into
clips exactly as the service does, so the threshold matches what the worker will see).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the demo bundle)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--clips", type=Path, help="folder of clean videos (searched recursively)")
    source.add_argument(
        "--synthetic-split",
        choices=("train", "val", "test"),
        default=None,
        help="MotionShapes split (default: val when --clips is not given)",
    )
    parser.add_argument("--n", type=int, default=200, help="number of clean clips")
    parser.add_argument("--clips-per-video", type=int, default=4, help="with --clips: at most this many per video")
    parser.add_argument("--quantile", type=float, default=0.99, help="threshold quantile of the clean MC loss")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    flag = parser.add_argument_group("attack flag (issue 24)")
    flag.add_argument(
        "--flag",
        action="store_true",
        help="calibrate the multi-signal attack flag (bundle.json's 'flag' section) instead of the MC loss",
    )
    flag.add_argument("--fpr", type=float, default=0.01, help="--flag: clean false-flag rate of the threshold")
    flag.add_argument(
        "--auto-quantile",
        type=float,
        default=0.9,
        help="--flag: clean quantile of the score where defend=auto purifies",
    )
    flag.add_argument(
        "--defend", default="always", help="--flag/--check-flags: defence mode the signals are read under"
    )
    flag.add_argument(
        "--check-flags",
        type=Path,
        default=None,
        metavar="OUT.json",
        help="measure false flags of the bundle's flag on --n clean clips of --synthetic-split (default test), "
        "also with uniform noise of --noise (1/255), write JSON here; the bundle is not changed",
    )
    flag.add_argument("--noise", type=float, default=8.0, help="--check-flags: uniform noise in 1/255")
    flag.add_argument("--values-out", type=Path, default=None, help="--flag: also write every clip's signal values")
    flag.add_argument(
        "--from-values", type=Path, default=None, help="--flag: refit from a --values-out file (no model runs)"
    )


def video_clips(folder: Path, frames: int, height: int, width: int, resize: str, n: int, per_video: int):
    """(clip, None) from the videos under ``folder``, cut the way the service cuts uploads.

    Undecodable files are skipped with a warning."""
    import torch

    from models.errors import UserError, VideoError
    from worker.video import cut_clips, decode_video

    if not folder.is_dir():
        raise UserError(f"--clips {folder}: not a directory")
    videos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise UserError(f"--clips {folder}: no video files found")
    produced = 0
    for video in videos:
        try:
            decoded = decode_video(video, height, width, resize, max_frames=frames * per_video)
            clips = cut_clips(decoded.frames, frames, per_video).clips
        except VideoError as exc:
            log.warning("skipping %s: %s", video, exc)
            continue
        for clip in clips:
            yield torch.from_numpy(clip), None
            produced += 1
            if produced >= n:
                return
    if produced == 0:
        raise UserError(f"--clips {folder}: none of the videos could be decoded")


def run(args: argparse.Namespace) -> int:
    import torch

    from models.bundle_meta import DEFAULT_BUNDLE_DIR, read_bundle_meta
    from models.defense.calibrate import calibrate_bundle
    from models.errors import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 1:
        raise UserError("--n must be at least 1")
    bundle_dir = args.bundle or DEFAULT_BUNDLE_DIR
    meta = read_bundle_meta(bundle_dir)
    if args.flag or args.check_flags is not None:
        return _run_flag(args, bundle_dir, meta)
    clips = None
    if args.clips is not None:
        clips = video_clips(
            args.clips,
            meta.input.frames,
            meta.input.height,
            meta.input.width,
            meta.input.resize,
            args.n,
            args.clips_per_video,
        )
    calibration, report = calibrate_bundle(
        bundle_dir,
        clips,
        split=args.synthetic_split or "val",
        n=args.n,
        threshold_quantile=args.quantile,
        batch_size=args.batch,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        q = calibration.quantiles
        print(
            f"calibrated {bundle_dir} on {calibration.n} clean clips ({report['source']}): "
            f"threshold {calibration.threshold:.5f} (p{round(calibration.threshold_quantile * 100)}), "
            f"p50 {q['p50']:.5f} p90 {q['p90']:.5f} p95 {q['p95']:.5f} mean {calibration.mean:.5f}"
        )
        if "undefended_accuracy" in report:
            print(f"undefended accuracy on these clips: {report['undefended_accuracy']:.4f}")
    return 0


def _run_flag(args: argparse.Namespace, bundle_dir: Path, meta) -> int:
    """``--flag``: calibrate the attack flag on clean clips; ``--check-flags``: count its false flags."""
    import sys

    from models.defense.calibrate import synthetic_clips
    from models.defense.flag_calibrate import calibrate_flag_bundle, false_flags
    from models.defense_mode import parse_mode

    defend = parse_mode(args.defend)
    if args.check_flags is None:
        command = "motionguard " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
        flag = calibrate_flag_bundle(
            bundle_dir,
            split=args.synthetic_split or "val",
            n=args.n,
            fpr=args.fpr,
            auto_quantile=args.auto_quantile,
            defend=defend,
            batch_size=args.batch,
            device=args.device,
            command=command,
            values_out=args.values_out,
            values_in=args.from_values,
        )
        print(json.dumps({"n": flag.n, "thresholds": flag.thresholds, "auto_threshold": flag.auto_threshold}))
        return 0
    from models.bundle.load import load_bundle

    bundle = load_bundle(bundle_dir, args.device)
    split = args.synthetic_split or "test"
    legacy = meta.calibration.threshold if meta.calibration is not None else None
    report: dict = {"bundle": f"{meta.name}:{meta.version}", "split": split, "defend": defend}
    for key, noise in (("clean", 0.0), ("noisy", args.noise / 255)):
        clips = synthetic_clips(split, args.n, meta.input.frames, meta.input.height)
        report[key] = false_flags(
            bundle.pipeline,
            clips,
            meta.flag,
            defend=defend,
            noise_epsilon=noise,
            legacy_threshold=legacy,
            batch_size=args.batch,
        )
        log.info("%s: %s", key, report[key])
    args.check_flags.parent.mkdir(parents=True, exist_ok=True)
    args.check_flags.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0
