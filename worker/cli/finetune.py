"""``motionguard finetune``: a new bundle from a bundle and a folder of labelled videos.

The folder is ``DIR/<label>/<video>``: one sub-folder per class, named as the label, holding videos
in any container PyAV reads (files that do not decode are skipped with a warning). Videos are
decoded and cut into clips exactly as the service does (``worker.video``), so the classifier trains
on the frames a deployment will feed it; the training itself is ``models.training.finetune``. Every folder
problem is one line before any model is loaded. Re-running the same command resumes the run in
``--run-dir`` (cached flows, last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", type=Path, help="folder of labelled videos: DIR/<label>/<video>")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to start from (default: the demo bundle)")
    parser.add_argument("--out", type=Path, required=True, help="directory of the new bundle")
    parser.add_argument("--name", default=None, help="new bundle's name (default: the --out folder's name)")
    parser.add_argument("--version", default="1")
    parser.add_argument("--run-dir", type=Path, default=None, help="flow cache + checkpoints (default: OUT.run)")
    parser.add_argument("--full", action="store_true", help="train the whole I3D, not only a new head")
    parser.add_argument("--clips-per-video", type=int, default=2, help="at most this many clips of each video")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="videos of each class for validation")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="videos of each class held out for a test")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=8, help="stop after this many epochs without better val")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget (flow caching not included)")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-2 (head) or 1e-3 (--full)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="overwrite an existing bundle in --out")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def scan_folder(folder: Path) -> dict[str, list[Path]]:
    """Label -> candidate video files, checked for the layout; raises ``UserError`` with one line."""
    from models.errors import UserError

    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory (expected DIR/<label>/<video>)")
    classes: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            log.warning("ignoring %s: videos go in DIR/<label>/", entry)
            continue
        nested = sorted(p for p in entry.iterdir() if p.is_dir() and not p.name.startswith("."))
        if nested:
            raise UserError(
                f"{nested[0]}: label '{entry.name}/{nested[0].name}' would contain a slash; "
                f"put the videos directly in {folder}/<label>/"
            )
        if "\\" in entry.name or not entry.name.strip():
            raise UserError(f"{entry}: '{entry.name}' is not a usable label (no backslashes or blank names)")
        classes[entry.name] = sorted(p for p in entry.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(classes) < 2:
        found = ", ".join(classes) or "none"
        raise UserError(f"{folder}: fine-tuning needs at least 2 label folders, found {len(classes)} ({found})")
    empty = [label for label, files in classes.items() if not files]
    if empty:
        raise UserError(f"{folder}/{empty[0]}: class '{empty[0]}' has no videos")
    return classes


def decode_folder(folder: Path, classes: dict[str, list[Path]], meta, clips_per_video: int):
    """Every decodable video as a ``LabelledVideo`` (clips cut as the service cuts them)."""
    import torch
    from tqdm import tqdm

    from models.bundle.load import sha256_of
    from models.errors import UserError, VideoError
    from models.training.finetune import LabelledVideo
    from worker.video import cut_clips, decode_video

    frames = meta.input.frames
    labels = list(classes)
    videos = []
    todo = [(label, path) for label, files in classes.items() for path in files]
    reasons: dict[str, str] = {}
    for label, path in tqdm(todo, desc="decode", mininterval=10, dynamic_ncols=True):
        try:
            decoded = decode_video(
                path, meta.input.height, meta.input.width, meta.input.resize, max_frames=frames * clips_per_video
            )
            clips = cut_clips(decoded.frames, frames, clips_per_video).clips
        except VideoError as exc:
            log.warning("skipping %s: %s", path, exc)
            reasons.setdefault(label, f"{path.name}: {exc}")
            continue
        name = str(path.relative_to(folder))
        videos.append(LabelledVideo(name, sha256_of(path), labels.index(label), torch.from_numpy(clips)))
    for index, label in enumerate(labels):
        if not any(v.label == index for v in videos):
            raise UserError(
                f"{folder}/{label}: none of its {len(classes[label])} file(s) is a decodable video ({reasons[label]})"
            )
    return videos


def run(args: argparse.Namespace) -> int:
    from models.bundle_meta import BUNDLE_FILE, DEFAULT_BUNDLE_DIR, read_bundle_meta
    from models.errors import UserError

    if args.clips_per_video < 1 or args.epochs < 1 or args.batch < 1 or args.patience < 1:
        raise UserError("--clips-per-video, --epochs, --batch and --patience must be at least 1")
    if (args.out / BUNDLE_FILE).exists() and not args.force:
        raise UserError(f"{args.out} already holds a bundle (use --force to overwrite)")
    classes = scan_folder(args.videos)
    meta = read_bundle_meta(args.bundle or DEFAULT_BUNDLE_DIR)

    import torch

    from models.training.finetune import FinetuneConfig, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    videos = decode_folder(args.videos, classes, meta, args.clips_per_video)
    log.info("%d videos of %d classes decoded from %s", len(videos), len(classes), args.videos)
    cfg = FinetuneConfig(
        run_dir=args.run_dir or args.out.with_name(args.out.name + ".run"),
        out=args.out,
        name=args.name or args.out.name,
        version=args.version,
        full=args.full,
        epochs=args.epochs,
        patience=args.patience,
        max_minutes=args.minutes,
        lr=args.lr,
        batch_size=args.batch,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        device=args.device,
        command="motionguard " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
        extra={"videos": str(args.videos), "clips_per_video": args.clips_per_video},
    )
    report = finetune(args.bundle, list(classes), videos, cfg)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        test = report.get("test")
        held_out = f", test {test['video_accuracy']:.3f} on {test['videos']} held-out videos" if test else ""
        print(
            f"bundle written to {args.out}: {len(classes)} labels, best epoch {report['best_epoch']}/"
            f"{report['epochs']}, val clip accuracy {report['val_clip_accuracy']:.3f}{held_out}, "
            f"{report['minutes']:.1f} min"
        )
    return 0
