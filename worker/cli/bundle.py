"""``motionguard bundle create|verify|test``: package checkpoints a user brings, check a bundle, or
measure it on a MotionShapes split.

``create`` accepts torchvision or original-release RAFT state dicts and PyTorch-port I3D state dicts;
the bundle is only written if the weights load into the declared architectures (sha256 recorded per
weight file). ``verify`` re-checks hashes, loads the weights and runs one clip through the models, so
a tampered or mismatched bundle is refused before a worker ever serves it. ``test`` measures flow
end-point error against the exact flow and top-1 accuracy with and without the defence. Every failure is a
``UserError``/``BundleError`` (one clear line, non-zero exit).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bundle_action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="build a bundle from RAFT + I3D checkpoints")
    create.add_argument("--raft", type=Path, required=True, help="RAFT checkpoint (state dict)")
    create.add_argument("--raft-format", choices=("torchvision", "original"), default="torchvision")
    create.add_argument("--raft-arch", choices=("raft_small", "raft_large"), default="raft_small")
    create.add_argument("--corr-levels", type=int, default=None, help="RAFT correlation levels (3 for 64 px input)")
    create.add_argument("--corr-radius", type=int, default=None)
    create.add_argument("--i3d", type=Path, required=True, help="flow-stream I3D checkpoint (PyTorch-port keys)")
    create.add_argument(
        "--i3d-width", type=float, default=None, help="I3D width multiplier (default: inferred from the checkpoint)"
    )
    create.add_argument(
        "--temporal-pool",
        choices=("port", "mean"),
        default="port",
        help="I3D head: 'port' = the PyTorch port's AvgPool3d([2,7,7]) then mean (what its checkpoints "
        "were trained with), 'mean' = uniform average (motionguard's own training)",
    )
    create.add_argument("--flow-clamp", type=float, default=20.0, help="classifier input: flow clamped to +-this (px)")
    create.add_argument("--flow-scale", type=float, default=20.0, help="classifier input: clamped flow / this")
    create.add_argument(
        "--flow-channel-order", choices=("xy", "yx"), default="xy", help="classifier channel 0 = horizontal (xy)"
    )
    create.add_argument("--updates-infer", type=int, default=12, help="RAFT updates for the final prediction")
    create.add_argument("--updates-grad", type=int, default=2, help="RAFT updates where a gradient is taken")
    create.add_argument("--labels", type=Path, required=True, help="text file, one class name per line")
    create.add_argument("--frames", type=int, required=True, help="frames per clip")
    create.add_argument("--size", type=int, required=True, help="clip height = width in pixels")
    create.add_argument("--resize", choices=("short_side", "stretch"), default="short_side")
    create.add_argument("--name", required=True)
    create.add_argument("--version", required=True)
    create.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    create.add_argument("--force", action="store_true", help="overwrite an existing bundle.json in --out")
    verify = sub.add_parser("verify", help="check a bundle's hashes, shapes and one forward pass")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--json", action="store_true")
    test = sub.add_parser("test", help="flow EPE and top-1 (undefended, defended) on a MotionShapes split")
    test.add_argument("bundle", type=Path)
    test.add_argument("--split", choices=("test", "val"), default="test")
    test.add_argument("--n", type=int, default=200, help="clips for EPE and undefended accuracy")
    test.add_argument("--defended-n", type=int, default=200, help="of those, how many also run defended")


def read_labels(path: Path) -> list[str]:
    from models.errors import UserError

    if not path.is_file():
        raise UserError(f"labels file not found: {path}")
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(labels) < 2:
        raise UserError(f"{path}: needs at least 2 labels (one per line), found {len(labels)}")
    if len(set(labels)) != len(labels):
        raise UserError(f"{path}: duplicate labels")
    return labels


def infer_i3d_width(state: dict) -> float | None:
    """The port's first conv has 64 output channels at width 1: the ratio gives the multiplier."""
    weight = state.get("Conv3d_1a_7x7.conv3d.weight")
    if weight is None:
        return None
    return min(1.0, round(weight.shape[0] / 64, 4))


def _create(args: argparse.Namespace) -> Path:
    from models.bundle.load import create_bundle
    from models.bundle_meta import BUNDLE_FILE, BundleMeta, ClassifierSpec, FlowNormalisation, FlowSpec, InputSpec
    from models.errors import BundleError, UserError
    from models.nets.checkpoints import read_state_dict, strip_prefix

    labels = read_labels(args.labels)
    for flag, path in (("--raft", args.raft), ("--i3d", args.i3d)):
        if not path.is_file():
            raise UserError(f"{flag} {path}: file not found")
    if (args.out / BUNDLE_FILE).exists() and not args.force:
        raise UserError(f"{args.out} already holds a bundle (use --force to overwrite)")
    i3d_state = strip_prefix(read_state_dict(args.i3d))
    width = args.i3d_width or infer_i3d_width(i3d_state) or 1.0
    logits = i3d_state.get("logits.conv3d.weight")
    if logits is not None and logits.shape[0] != len(labels):
        raise BundleError(
            f"{args.i3d} has {logits.shape[0]} output classes but {args.labels} lists {len(labels)} labels"
        )
    try:
        meta = BundleMeta(
            name=args.name,
            version=args.version,
            labels=labels,
            input=InputSpec(frames=args.frames, height=args.size, width=args.size, resize=args.resize),
            flow=FlowSpec(
                arch=args.raft_arch,
                checkpoint="flow.pth",
                format=args.raft_format,
                corr_levels=args.corr_levels,
                corr_radius=args.corr_radius,
                updates_grad=args.updates_grad,
                updates_infer=args.updates_infer,
            ),
            classifier=ClassifierSpec(
                checkpoint="classifier.pth", width=width, num_classes=len(labels), temporal_pool=args.temporal_pool
            ),
            flow_normalisation=FlowNormalisation(
                clamp=args.flow_clamp, scale=args.flow_scale, channel_order=args.flow_channel_order
            ),
            training={
                "note": "created by motionguard bundle create from user checkpoints",
                "sources": {"raft": str(args.raft), "i3d": str(args.i3d)},
            },
        )
    except ValueError as exc:  # pydantic validation of the options
        raise UserError(f"invalid bundle options: {exc}") from exc
    return create_bundle(args.out, meta, args.raft, args.i3d)


def _verify(args: argparse.Namespace) -> dict:
    import torch

    from models.bundle.load import load_bundle

    bundle = load_bundle(args.bundle)
    meta = bundle.meta
    clip = torch.rand(
        1, meta.input.frames, 3, meta.input.height, meta.input.width, generator=torch.Generator().manual_seed(0)
    )
    pred = bundle.pipeline.predict(clip, defend=False)
    return {
        "bundle": str(args.bundle),
        "name": meta.name,
        "version": meta.version,
        "labels": len(meta.labels),
        "input": meta.input.model_dump(),
        "sha256": "ok",
        "forward": {"probs_shape": list(pred.probs.shape), "mc_loss": float(pred.mc_before[0])},
        "calibrated": meta.calibration is not None,
    }


def run(args: argparse.Namespace) -> int:
    if args.bundle_action == "create":
        out = _create(args)
        print(f"bundle written to {out} (run 'motionguard calibrate --bundle {out} --clips DIR' to calibrate it)")
        return 0
    if args.bundle_action == "test":
        from models.bundle.split_eval import evaluate_split
        from models.errors import UserError

        if not 0 < args.n or not 0 <= args.defended_n <= args.n:
            raise UserError("need 0 < --n and 0 <= --defended-n <= --n")
        print(json.dumps(evaluate_split(args.bundle, args.split, args.n, args.defended_n), indent=2))
        return 0
    report = _verify(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        calib = "calibrated" if report["calibrated"] else "NOT calibrated"
        print(
            f"ok: {report['name']} v{report['version']} ({report['labels']} labels, "
            f"{report['input']['frames']}x{report['input']['height']}x{report['input']['width']}), "
            f"sha256 verified, forward pass ok, {calib}"
        )
    return 0
