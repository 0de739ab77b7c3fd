"""``motionguard eval``: the robustness table (clean, noise, attacks x standard/random/defended).

Clips come from the synthetic benchmark's split (``--split test``) or from a folder of labelled
videos (``--videos DIR`` with one sub-folder per label, named as the bundle's labels), decoded and
cut exactly as the service does. Results go to JSON (``--json``), Markdown (same name, ``.md``) and
the MC-loss distribution plot (same name, ``.png``). Interrupted runs resume from ``--state``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
DEFAULT_ATTACKS = "pgd:4,pgd:8,pgd:16"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the demo bundle)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=["train", "val", "test"], default="test", help="synthetic split")
    source.add_argument("--videos", type=Path, help="folder of labelled videos: DIR/<label>/<video>")
    parser.add_argument("--n", type=int, default=200, help="clips for clean and static attacks")
    parser.add_argument("--adaptive-n", type=int, default=50, help="clips for defence-aware attacks (a fixed subset)")
    parser.add_argument("--attacks", default=DEFAULT_ATTACKS, help="comma-separated, e.g. pgd:8,apgd-ce:8,bpda:8")
    parser.add_argument("--random-n", type=int, default=None, help="clips for the uniform-noise row (default --n)")
    parser.add_argument("--multi", action="store_true", help="evaluate the multi-constraint defence")
    parser.add_argument("--steps", type=int, default=None, help="defence steps (default: the bundle's)")
    parser.add_argument("--batch", type=int, default=8, help="clips per batch")
    parser.add_argument("--json", type=Path, default=Path("eval.json"), help="report path (.md and .png beside it)")
    parser.add_argument(
        "--state", type=Path, default=None, help="resume file (default: the report path with .state.json)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def _video_source(folder: Path, meta, limit: int):
    """(clip, label) pairs from DIR/<label>/<video>: the first clip of each video, as the service cuts it."""
    from models.errors import UserError, VideoError
    from worker.video import cut_clips, decode_video

    if not folder.is_dir():
        raise UserError(f"--videos {folder}: not a directory")
    items = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if label_dir.name not in meta.labels:
            raise UserError(f"{label_dir}: '{label_dir.name}' is not a label of the bundle ({', '.join(meta.labels)})")
        for video in sorted(label_dir.iterdir()):
            if video.suffix.lower() in VIDEO_SUFFIXES:
                items.append((video, meta.labels.index(label_dir.name)))
    if not items:
        raise UserError(f"--videos {folder}: no videos found in its label sub-folders")
    items = items[:limit]
    clips = []
    for video, label in items:
        try:
            decoded = decode_video(
                video, meta.input.height, meta.input.width, meta.input.resize, max_frames=meta.input.frames
            )
            clips.append((cut_clips(decoded.frames, meta.input.frames, 1).clips[0], label))
        except VideoError as exc:
            log.warning("skipping %s: %s", video, exc)
    if not clips:
        raise UserError(f"--videos {folder}: none of the videos could be decoded")
    return clips


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from models.attacks import parse_attack
    from models.bundle import load_bundle
    from models.errors import UserError
    from models.evaluate import EvaluationState, evaluate, plot_mc_distributions, to_markdown

    if args.n < 1 or args.adaptive_n < 0 or args.batch < 1:
        raise UserError("--n and --batch must be >= 1, --adaptive-n >= 0")
    try:
        attacks = [parse_attack(a) for a in args.attacks.split(",") if a.strip()]
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    bundle = load_bundle(args.bundle, device=args.device)
    pipeline = bundle.pipeline
    pipeline.defense = pipeline.defense.with_overrides(steps=args.steps, multi=True if args.multi else None)
    meta = bundle.meta

    if args.videos:
        clips = _video_source(args.videos, meta, args.n)

        def source(i: int):
            clip, label = clips[i]
            return torch.from_numpy(clip), label

        indices = list(range(len(clips)))
        origin = str(args.videos)
    else:
        from models.data import MotionShapes

        if meta.labels != MotionShapes.labels():
            raise UserError("--split needs a bundle trained on the synthetic labels; use --videos for others")
        dataset = MotionShapes(args.split, args.n, frames=meta.input.frames, size=meta.input.height)

        def source(i: int):
            return dataset[i]

        indices = list(range(args.n))
        origin = f"synthetic:{args.split}"

    args.json.parent.mkdir(parents=True, exist_ok=True)
    state_path = args.state or args.json.with_suffix(".state.json")
    bars: dict[str, tqdm] = {}

    def progress(row: str, done: int, total: int) -> None:
        bar = bars.get(row)
        if bar is None:
            bar = bars[row] = tqdm(total=total, desc=row, unit="clip", leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    log.info("evaluating %s on %d clips from %s: %s", meta.name, len(indices), origin, [a.name for a in attacks])
    report = evaluate(
        pipeline,
        source,
        indices,
        attacks,
        adaptive_n=args.adaptive_n,
        random_n=args.random_n,
        batch_size=args.batch,
        state_path=state_path,
        seed=args.seed,
        identity={"bundle": meta.sha256, "source": origin},
        progress=progress,
    )
    report.update(
        {
            "bundle": {"name": meta.name, "version": meta.version},
            "source": origin,
            "defense": {"steps": pipeline.defense.steps, "multi": pipeline.defense.multi},
            "command": "motionguard " + " ".join(sys.argv[1:]),
        }
    )
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(report)
    args.json.with_suffix(".md").write_text(markdown)
    plotted = next((a.name for a in attacks if a.name.startswith("pgd:8")), attacks[0].name if attacks else None)
    if plotted:
        saved = EvaluationState(state_path, json.loads(state_path.read_text())["signature"])
        rows = {"clean": saved.records("clean"), plotted: saved.records(plotted)}
        plot_mc_distributions(rows, plotted, args.json.with_suffix(".png"))
    print(markdown)
    return 0
