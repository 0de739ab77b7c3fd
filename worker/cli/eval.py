"""``motionguard eval``: the robustness table (clean, attacks x undefended/defended/flagged, worst case).

Clips come from the synthetic benchmark's split (``--split test``) or from a folder of labelled
videos (``--videos DIR`` with one sub-folder per label, named as the bundle's labels), decoded and
cut exactly as the service does. Results go to JSON (``--json``: per-clip records and their summary;
the same command gives the same JSON on one machine), Markdown (same name, ``.md``), timings (same
name, ``.cost.json``: kept out of the JSON so it stays reproducible) and the MC-loss distribution
plot (``.png``). ``transfer`` rows are crafted on another bundle, ``--source-bundle`` (checked before
anything loads; its name, version and hashes go into the JSON and the state's identity). Interrupted
runs resume from ``--state``; ``--shard I/N`` and separate ``--attacks``
lists split the work across processes, and ``motionguard eval report *.json`` merges them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
DEFAULT_ATTACKS = "pgd:8,apgd-ce:8,bpda:8,through:8"


def _shard(text: str) -> tuple[int, int]:
    try:
        part, parts = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return part, parts


def configure(parser: argparse.ArgumentParser) -> None:
    from worker.cli import eval_report as eval_report_cmd

    sub = parser.add_subparsers(dest="eval_command", metavar="[report]")
    eval_report_cmd.configure(sub.add_parser("report", help=eval_report_cmd.HELP, description=eval_report_cmd.HELP))
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the demo bundle)")
    parser.add_argument(
        "--source-bundle",
        type=Path,
        default=None,
        metavar="PATH",
        help="the bundle transfer:EPS rows are crafted on (its undefended model; same labels and input)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=["train", "val", "test"], default="test", help="synthetic split")
    source.add_argument("--videos", type=Path, help="folder of labelled videos: DIR/<label>/<video>")
    parser.add_argument("--n", type=int, default=200, help="clips for clean and static attacks")
    parser.add_argument("--adaptive-n", type=int, default=50, help="clips for defence-aware attacks (a fixed subset)")
    parser.add_argument(
        "--attacks",
        default=DEFAULT_ATTACKS,
        help="comma-separated kind:eps[:key=value], e.g. pgd:8,through:8:unroll=4,bpda:8:detector=100"
        " (docs/robustness.md)",
    )
    parser.add_argument("--clean-n", type=int, default=None, help="clips for the clean row (default --n; 0: none)")
    parser.add_argument(
        "--random-n", type=int, default=None, help="clips for the uniform-noise row (default --n; 0: none)"
    )
    parser.add_argument(
        "--shard", type=_shard, default=(0, 1), help="I/N: this process takes clips with index %% N == I"
    )
    parser.add_argument(
        "--defend",
        choices=["always", "auto", "off"],
        default="always",
        help="defence mode judged (auto: flagged clips only; off: the undefended model, e.g. for gradient-free rows)",
    )
    parser.add_argument(
        "--defence",
        default=None,
        metavar="VARIANT",
        help="purification judged: a name of models.bundle.load.DEFENSE_VARIANTS (paper, converge, ...) or "
        "field=value,... over bundle.json's defense (default: the bundle's)",
    )
    parser.add_argument(
        "--flag",
        action="store_true",
        help="record the bundle's multi-signal attack flag on every row (implied by flag-aware attacks)",
    )
    parser.add_argument("--multi", action="store_true", help="evaluate the multi-constraint defence")
    parser.add_argument("--steps", type=int, default=None, help="defence steps (default: the bundle's)")
    parser.add_argument(
        "--batch", type=int, default=1, help="clips per batch (1: a clip's result does not depend on its batch)"
    )
    parser.add_argument("--json", type=Path, default=Path("eval.json"), help="report path (.md and .png beside it)")
    parser.add_argument(
        "--state", type=Path, default=None, help="resume file (default: the report path with .state.json)"
    )
    parser.add_argument(
        "--report-every", type=float, default=600.0, help="seconds between partial reports of a long run"
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
    if args.eval_command == "report":
        from worker.cli import eval_report as eval_report_cmd

        return eval_report_cmd.run(args)
    import torch
    from tqdm import tqdm

    from models.bundle.load import load_bundle
    from models.errors import UserError
    from models.robustness.evaluate import evaluate, plan_rows
    from models.robustness.spec import parse_attack

    if args.n < 1 or args.adaptive_n < 0 or args.batch < 1:
        raise UserError("--n and --batch must be >= 1, --adaptive-n >= 0")
    try:
        attacks = [parse_attack(a) for a in args.attacks.split(",") if a.strip()]
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    needs_source = [a.name for a in attacks if a.needs_source]
    if needs_source and args.source_bundle is None:
        raise UserError(
            f"attack {', '.join(needs_source)} is crafted on another bundle: name it with --source-bundle PATH"
            " (e.g. --source-bundle models/bundles/motionshapes-v1)"
        )
    torch.use_deterministic_algorithms(True, warn_only=True)
    bundle = load_bundle(args.bundle, device=args.device)
    pipeline = bundle.pipeline
    if args.defence:
        from models.bundle.load import defense_config, parse_variant, with_defense

        pipeline.defense = defense_config(with_defense(bundle.meta, parse_variant(args.defence)))
    pipeline.defense = pipeline.defense.with_overrides(steps=args.steps, multi=True if args.multi else None)
    meta = bundle.meta
    threshold = meta.calibration.threshold if meta.calibration else None
    if threshold is None and any(a.detector_aware for a in attacks):
        raise UserError("detector-aware attacks need a calibrated bundle (motionguard calibrate)")
    flag = meta.flag if args.flag or any(a.flag_aware for a in attacks) else None
    if flag is None and (args.flag or any(a.flag_aware for a in attacks)):
        raise UserError("--flag and the flag-aware attacks need a bundle with a flag (motionguard calibrate --flag)")
    source_pipeline, source_bundle = _load_source(args, meta) if needs_source else (None, None)
    if args.source_bundle is not None and not needs_source:
        log.warning("--source-bundle %s: no transfer row in --attacks uses it; not loaded", args.source_bundle)

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

    rows = plan_rows(
        indices,
        attacks,
        clean_n=args.clean_n,
        random_n=args.random_n,
        adaptive_n=args.adaptive_n,
        shard=args.shard,
    )
    log.info("evaluating %s on %d clips from %s: %s", meta.name, len(indices), origin, [r.name for r in rows])
    last_write = [time.monotonic()]

    def checkpoint(state) -> None:
        # A long run publishes partial reports (rows on the clips done so far) every few minutes.
        if time.monotonic() - last_write[0] >= args.report_every:
            _write_outputs(args, state, rows, meta, origin, threshold, source_bundle, quiet=True)
            last_write[0] = time.monotonic()

    state = evaluate(
        pipeline,
        source,
        rows,
        threshold=threshold,
        batch_size=args.batch,
        state_path=state_path,
        seed=args.seed,
        identity={
            "bundle": meta.sha256,
            "source": origin,
            **({"source_bundle": source_bundle["sha256"]} if source_bundle else {}),
        },
        progress=progress,
        on_checkpoint=checkpoint,
        defend=True if args.defend == "always" else args.defend,
        flag=flag,
        source_pipeline=source_pipeline,
    )
    _write_outputs(args, state, rows, meta, origin, threshold, source_bundle)
    return 0


def _load_source(args: argparse.Namespace, meta):
    """The pipeline transfer rows are crafted on and its record (name, version, file hashes)."""
    from models.bundle.load import load_bundle
    from models.errors import UserError

    source = load_bundle(args.source_bundle, device=args.device)
    other = source.meta
    if other.labels != meta.labels or other.input != meta.input:
        raise UserError(
            f"--source-bundle {args.source_bundle}: its labels and input ({other.input.frames} frames,"
            f" {other.input.height}x{other.input.width}) must be the evaluated bundle's"
            f" ({meta.input.frames} frames, {meta.input.height}x{meta.input.width})"
        )
    return source.pipeline, {"name": other.name, "version": other.version, "sha256": other.sha256}


def _unread_flag(record, field: str) -> bool:
    return field in ("flagged", "attack_score") and getattr(record, field) is None


def _write_outputs(
    args: argparse.Namespace,
    state,
    rows,
    meta,
    origin: str,
    threshold: float | None,
    source_bundle: dict | None = None,
    quiet: bool = False,
) -> None:
    """The run's JSON (reproducible: no timings), Markdown, cost file and Fig. 5."""
    from models.robustness.evaluate import RESULT_FIELDS, machine_info, plot_mc_distributions
    from models.robustness.report import SCHEMA, clips_to_json, summarise, to_markdown

    records = {row.name: state.records(row.name, row.indices) for row in rows}
    # The flag's fields appear only in runs that read it, so earlier runs' JSON stays byte-identical.
    clips = {
        name: {i: {f: getattr(r, f) for f in RESULT_FIELDS if not _unread_flag(r, f)} for i, r in recs.items()}
        for name, recs in records.items()
    }
    summary = summarise(clips, threshold)
    header = {
        "schema": SCHEMA,
        "signature": state.signature,
        "bundle": {"name": meta.name, "version": meta.version},
        **({"source_bundle": source_bundle} if source_bundle else {}),
        "source": origin,
        "threshold": threshold,
        "shard": f"{args.shard[0]}/{args.shard[1]}",
        "machine": machine_info(),
        "command": "motionguard " + " ".join(sys.argv[1:]),
    }
    report = {**header, **summary, "clips": clips_to_json(clips)}
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    markdown = to_markdown(header, summary)
    args.json.with_suffix(".md").write_text(markdown)
    cost = {
        name: {"clips": len(recs), "seconds": round(sum(r.seconds for r in recs.values()), 1)}
        for name, recs in records.items()
    }
    args.json.with_suffix(".cost.json").write_text(json.dumps({"rows": cost}, indent=1) + "\n")
    plotted = next((r.name for r in rows if r.name.startswith("pgd:8")), None)
    if plotted and records.get("clean") and records[plotted]:
        clean, attacked = records["clean"].values(), records[plotted].values()
        plot_mc_distributions(
            [r.mc_before for r in clean],
            [r.mc_before for r in attacked],
            [r.mc_after for r in attacked],
            plotted,
            args.json.with_suffix(".png"),
        )
    if not quiet:
        print(markdown)
