"""The one ``motionguard`` command line.

Each sub-command lives in its own module, named here as ``"package.module"``. A command module
defines ``configure(parser)`` (adds its arguments; module-level imports must stay light: no torch,
so ``motionguard --help`` and the API process start fast) and ``run(args) -> int`` (does the work,
importing heavy libraries inside). ``bench`` takes a second word naming the benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pydantic import ValidationError

from models.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.serve", "run the API, N workers and (without MOTIONGUARD_REDIS_URL) an embedded Redis"),
    "worker": ("worker.cli.worker", "run one long-lived model worker"),
    "classify": ("worker.cli.classify", "classify a video in-process (no Redis)"),
    "eval": ("worker.cli.eval", "robustness evaluation: attacks x defence table"),
    "calibrate": ("worker.cli.calibrate", "clean MC-loss calibration of a bundle"),
    "bundle": ("worker.cli.bundle", "create or verify a model bundle"),
    "train-demo": ("worker.cli.train_demo", "train the demo RAFT-small + I3D pair on synthetic motion"),
    "train-robust": ("worker.cli.train_robust", "adversarial training through RAFT into a new bundle"),
    "finetune": ("worker.cli.finetune", "fine-tune a bundle's classifier on a folder of labelled videos"),
}

BENCHMARKS: dict[str, tuple[str, str]] = {
    "flow": ("worker.cli.bench_flow", "video RAFT vs torchvision's pairwise calls"),
    "defence": ("worker.cli.bench_defense", "defence variants x modes on clean clips: steps, s/clip, MC loss, top-1"),
    "auto-threshold": ("worker.cli.bench_auto_threshold", "defend=auto vs always on stored eval rows, per threshold"),
    "service": ("service.bench.service", "end-to-end latency and service overhead"),
    "load": ("service.bench.load", "upload/poll load against a running service"),
    "throughput": ("service.bench.throughput", "clips/s and latency of the batching worker at several batch limits"),
    "autoscale": ("service.bench.autoscale", "queue-driven autoscaling (KEDA's rule) vs fixed fleets, simulated"),
}


def _add_commands(subparsers: argparse._SubParsersAction, table: dict[str, tuple[str, str]]) -> None:
    for name, (module_name, help_text) in table.items():
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            parser.set_defaults(_unavailable=f"'{name}' is not available in this build ({module_name} missing)")
            continue
        module.configure(parser)
        parser.set_defaults(_module=module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="motionguard", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub, COMMANDS)
    bench = sub.add_parser("bench", help="benchmarks that print measured ratios as JSON")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _add_commands(bench_sub, BENCHMARKS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what commands record as their command line
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if getattr(args, "_unavailable", None):
        print(f"motionguard: error: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        return int(args._module.run(args) or 0)
    except UserError as exc:
        print(f"motionguard: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        first = exc.errors()[0]  # a MOTIONGUARD_* environment variable out of its bounds
        name = "MOTIONGUARD_" + str(first["loc"][0]).upper() if first.get("loc") else "a setting"
        print(f"motionguard: error: {name}: {first['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("motionguard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
