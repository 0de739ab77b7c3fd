"""``motionguard classify VIDEO``: the service's analysis in-process, without Redis or HTTP.

Module-level imports stay light (no torch) so ``motionguard --help`` is fast; the bundle and the
analysis are imported in ``run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", type=Path, help="any container/codec PyAV reads")
    parser.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="model bundle directory (default: MOTIONGUARD_BUNDLE_DIR, the service's default model)",
    )
    defend = parser.add_mutually_exclusive_group()
    defend.add_argument(
        "--defend",
        choices=["true", "false", "auto"],
        default=None,
        help="true: purify every clip; false: none; auto: only clips whose MC loss is above the bundle's "
        "threshold (default: the bundle's defense.mode)",
    )
    defend.add_argument("--no-defend", dest="defend", action="store_const", const="false", help="= --defend false")
    parser.add_argument("--json", action="store_true", help="print one JSON object shaped like the service's result")
    parser.add_argument("--restored", type=Path, default=None, metavar="OUT.mp4", help="write the restored frames")
    parser.add_argument(
        "--figures",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each purified clip's flow strip and MC-loss plot (clip<i>.flow.png, clip<i>.mc_loss.png)",
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="defence steps (default: the bundle's)")
    parser.add_argument("--epsilon", type=float, default=None, help="purification radius eps_r (default: the bundle's)")
    parser.add_argument("--multi", action="store_true", default=None, help="multi-constraint MC loss")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--max-clips", type=int, default=None, help="clips analysed at most (default: settings)")


def format_human(result: dict) -> str:
    """Labels with scores, then one line per clip with its MC loss before/after purification."""
    mode = result.get("defense", {}).get("mode", "always" if result["defended"] else "off")
    lines = [
        f"model {result['model']['name']} v{result['model']['version']} (sha256 {result['model']['sha256'][:12]}), "
        f"defence: {mode}"
    ]
    for entry in result["labels"]:
        lines.append(f"  {entry['score']:7.3f}  {entry['label']}")
    lines.append("clips:")
    for clip in result["clips"]:
        top = clip["labels"][0]
        flag = "  SUSPECTED ATTACK" if clip["suspected_attack"] else ""
        if clip.get("attack_score") is not None:
            flag = f"  attack score {clip['attack_score']:.2f}{flag}"
        lines.append(
            f"  #{clip['index']} frames {clip['start_frame']}-{clip['end_frame']}: {top['label']} ({top['score']:.3f})"
            f"  MC loss {clip['mc_loss_before']:.4f} -> {clip['mc_loss_after']:.4f}"
            f"  {clip.get('decision', '')} ({clip.get('defence_steps', 0)} steps){flag}"
        )
    timings = ", ".join(f"{k} {v:.0f} ms" for k, v in result["timings_ms"].items())
    lines.append(f"timings: {timings}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from models.errors import UserError
    from worker.settings import get_settings
    from worker.video import VideoLimits, encode_mp4, to_uint8

    settings = get_settings()
    if args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    if args.steps is not None and args.steps < 0:
        raise UserError("--steps must be >= 0")
    if not args.video.is_file():
        raise UserError(f"{args.video}: no such file")

    from models.bundle.load import load_bundle
    from worker.repository import bundle_digest
    from worker.serving.inference import analyse_video

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    bundle = load_bundle(args.bundle or settings.bundle_dir, device=args.device, **settings.bundle_overrides)
    figures: dict[int, dict[str, bytes]] | None = {} if args.figures is not None else None
    result, frames = analyse_video(
        args.video,
        bundle,
        defend=args.defend,
        top_k=args.top_k,
        multi=args.multi,
        steps=args.steps,
        epsilon=args.epsilon,
        limits=VideoLimits.from_settings(settings),
        max_clips=args.max_clips or settings.max_clips,
        figures=figures,
    )
    result["model"]["sha256"] = bundle_digest(bundle.path)  # as the service's results: the bundle answering
    if figures is not None:
        if not figures:
            log.warning("--figures: no clip was purified, so there are no flow or MC-loss pictures")
        args.figures.mkdir(parents=True, exist_ok=True)
        for index, pictures in sorted(figures.items()):
            for name, data in pictures.items():
                (args.figures / f"clip{index}.{name}").write_bytes(data)
        log.info("figures of %d clip(s) written to %s", len(figures), args.figures)
    if args.restored is not None:
        from fractions import Fraction

        t0 = time.perf_counter()
        encode_mp4(to_uint8(frames), args.restored, fps=Fraction(result["video"]["fps"]).limit_denominator(1001))
        result["timings_ms"]["encode"] = round((time.perf_counter() - t0) * 1000, 2)
        result["timings_ms"]["total"] = round(result["timings_ms"]["total"] + result["timings_ms"]["encode"], 2)
        result["restored_url"] = str(args.restored)
        log.info("restored video written to %s", args.restored)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(format_human(result) + "\n")
    return 0
