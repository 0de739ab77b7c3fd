"""``motionguard train-robust``: adversarial fine-tune through RAFT (flow -> classifier -> joint)
from a bundle, then a new calibrated bundle of the best weights (by PGD-10 accuracy on val clips).

Resumable: re-run the same command with ``--resume`` after an interruption. Torch is imported inside
``run`` only, so ``motionguard --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("models/bundles/motionshapes-robust-v1"), help="bundle to write"
    )
    parser.add_argument(
        "--from", dest="source", type=Path, default=None, help="bundle to start from (default: shipped)"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/robust"), help="checkpoints, curves, logs")
    parser.add_argument("--resume", action="store_true", help="continue the run in --work")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="total wall-clock budget, shared 45/20/35 %% by the flow, classifier and joint stages "
        "(overrides the per-stage budgets)",
    )
    parser.add_argument("--flow-minutes", type=float, default=28.0)
    parser.add_argument("--classifier-minutes", type=float, default=12.0)
    parser.add_argument("--joint-minutes", type=float, default=22.0)
    parser.add_argument("--flow-lr", type=float, default=1e-4)
    parser.add_argument("--classifier-lr", type=float, default=3e-4)
    parser.add_argument("--joint-lr", type=float, default=5e-5)
    parser.add_argument("--ramp", type=float, default=0.4, help="flow stage: fraction of its budget ramping eps up")
    parser.add_argument("--max-steps", type=int, default=1_000_000, help="step cap of every stage (tests)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eps", type=float, default=8.0, help="attack radius in /255")
    parser.add_argument("--attack", choices=("fgsm_rs", "nfgsm"), default="fgsm_rs")
    parser.add_argument("--ce-attack-frac", type=float, default=0.5, help="attacks on CE (rest: on flow EPE)")
    parser.add_argument(
        "--source-attack-frac",
        type=float,
        default=0.34,
        help="attacked clips whose perturbation is crafted on the frozen source bundle (0: none; the "
        "validation then has no transfer row)",
    )
    parser.add_argument(
        "--transfer-source",
        type=Path,
        default=None,
        help="bundle the transferred perturbations are crafted on (default: the --from bundle)",
    )
    parser.add_argument(
        "--source-attack-steps", type=int, default=1, help="1: FGSM with random start on the source; k: PGD-k"
    )
    parser.add_argument(
        "--source-attack-random-stop",
        action="store_true",
        help="stop each batch's source PGD after a random k in 1..--source-attack-steps steps of 2.5 eps / k, "
        "half without random start: the early iterates the harness's first-success attacks keep",
    )
    parser.add_argument(
        "--flow-eps", type=float, default=0.0, help="classifier stage: flow-space PGD radius in px (0: off)"
    )
    parser.add_argument("--flow-steps", type=int, default=5, help="classifier stage: flow-space PGD steps")
    parser.add_argument("--reset-best", action="store_true", help="with --resume: forget the best record")
    parser.add_argument("--clean-frac", type=float, default=0.25, help="share of each batch trained clean")
    parser.add_argument("--train-updates", type=int, default=4, help="RAFT iterates in the sequence loss")
    parser.add_argument("--ce-weight", type=float, default=0.5, help="joint stage: CE weight")
    parser.add_argument("--val-clips", type=int, default=32)
    parser.add_argument("--val-minutes", type=float, default=6.0, help="validate every this many minutes")
    parser.add_argument("--val-pgd-steps", type=int, default=10)
    parser.add_argument("--min-clean", type=float, default=0.75, help="clean accuracy floor of the best checkpoint")
    parser.add_argument("--patience", type=int, default=4, help="validations without a new best that end a stage")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--name", default="motionshapes-robust")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--calib-clips", type=int, default=200)
    parser.add_argument(
        "--flag-clips",
        type=int,
        default=0,
        help="also calibrate the attack flag on this many clean val clips (defend=always: ~20 purification steps each)",
    )
    parser.add_argument("--no-bundle", action="store_true", help="train only")
    parser.add_argument("--bundle-only", action="store_true", help="only write the bundle of a finished run in --work")


def build_config(args: argparse.Namespace):
    from models.training.robust import RobustConfig, StageConfig

    minutes = {"flow": args.flow_minutes, "classifier": args.classifier_minutes, "joint": args.joint_minutes}
    if args.minutes is not None:
        minutes = {"flow": 0.45 * args.minutes, "classifier": 0.20 * args.minutes, "joint": 0.35 * args.minutes}
    return RobustConfig(
        work_dir=args.work,
        source=args.source,
        stages={
            "flow": StageConfig(minutes["flow"], args.flow_lr, args.ramp, args.max_steps),
            "classifier": StageConfig(minutes["classifier"], args.classifier_lr, 0.0, args.max_steps),
            "joint": StageConfig(minutes["joint"], args.joint_lr, 0.0, args.max_steps),
        },
        batch_size=args.batch,
        epsilon=args.eps / 255,
        attack=args.attack,
        fgsm_step=1.0 if args.attack == "nfgsm" else 1.25,
        ce_attack_frac=args.ce_attack_frac,
        clean_frac=args.clean_frac,
        source_attack_frac=args.source_attack_frac,
        transfer_source=args.transfer_source,
        source_attack_steps=args.source_attack_steps,
        source_attack_random_stop=args.source_attack_random_stop,
        flow_eps=args.flow_eps,
        flow_steps=args.flow_steps,
        reset_best=args.reset_best,
        train_updates=args.train_updates,
        ce_weight=args.ce_weight,
        val_clips=args.val_clips,
        val_minutes=args.val_minutes,
        val_pgd_steps=args.val_pgd_steps,
        min_clean=args.min_clean,
        patience=args.patience,
        seed=args.seed,
        frames=args.frames,
        size=args.size,
        threads=args.threads,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from models.training.robust import train_robust, write_robust_bundle

    torch.set_num_threads(args.threads)
    argv = getattr(args, "argv", sys.argv[1:])
    command = "motionguard " + " ".join(shlex.quote(a) for a in argv)
    cfg = build_config(args)
    if not args.bundle_only:
        summary = train_robust(cfg, resume=args.resume)
        log.info("training done: best %s", summary["best"])
    if not args.no_bundle:
        out = write_robust_bundle(
            cfg,
            args.out,
            name=args.name,
            version=args.version,
            command=command,
            calib_clips=args.calib_clips,
            flag_clips=args.flag_clips,
        )
        print(out)
    return 0
