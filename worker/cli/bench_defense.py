"""``motionguard bench defence``: what each defence variant and mode costs and does on clean clips.

For every (variant, mode) row, on the same clean clips of a MotionShapes split: top-1 accuracy,
defence steps (gradient evaluations, forward + backward, per clip), seconds per clip, MC loss
before/after the defence (inference flow) at p5/p50/p95, how often the defence left a clip with a
higher MC loss than it came with, and the per-clip decisions. Every row runs through
``Pipeline.predict``, the path the worker and the evaluation use. Cost ratios are against the
``paper/always`` row measured in the same run. Per-clip records go to a state file, so an
interrupted run resumes (rows whose settings changed are recomputed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.5, 0.95)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the demo bundle)")
    parser.add_argument("--split", choices=["train", "val", "test"], default="test")
    parser.add_argument("--n", type=int, default=200, help="clean clips (the first n of the split)")
    parser.add_argument(
        "--rows",
        default="paper/off;paper/always;paper/auto;converge/always;converge/auto",
        help="';'-separated VARIANT/MODE[@N]: VARIANT a name of models.bundle.load.DEFENSE_VARIANTS or "
        "field=value,... over bundle.json's defense; MODE always, auto or off; @N: only the first N clips",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=Path("defence-bench.json"), help="report (state file beside it)")
    parser.add_argument("--device", default="cpu")


def _quantiles(values: list[float]) -> dict[str, float]:
    import torch

    data = torch.tensor(values, dtype=torch.float64)
    return {f"p{round(q * 100)}": round(float(torch.quantile(data, q)), 6) for q in QUANTILES}


def summarise(records: list[dict]) -> dict:
    """One row's figures from its per-clip records."""
    n = len(records)
    before = [r["mc_before"] for r in records]
    after = [r["mc_after"] for r in records]
    decisions: dict[str, int] = {}
    for r in records:
        decisions[r["decision"]] = decisions.get(r["decision"], 0) + 1
    return {
        "n": n,
        "accuracy": round(100.0 * sum(r["correct"] for r in records) / n, 2),
        "mean_steps": round(sum(r["steps"] for r in records) / n, 3),
        "seconds_per_clip": round(sum(r["seconds"] for r in records) / n, 4),
        "mc_before": _quantiles(before),
        "mc_after": _quantiles(after),
        "worse_after": sum(a > b + 1e-9 for a, b in zip(after, before, strict=True)),
        "reverted": sum(r["reverted"] for r in records),
        "decisions": decisions,
    }


def to_markdown(report: dict) -> str:
    lines = [
        "| variant | mode | n | clean top-1 % | steps/clip | steps vs paper always | s/clip | "
        "MC before p5/p50/p95 | MC after p5/p50/p95 | after > before | decisions |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for row in report["rows"]:
        b, a = row["mc_before"], row["mc_after"]
        ratio = row.get("steps_vs_paper_always")
        lines.append(
            f"| {row['variant']} | {row['mode']} | {row['n']} | {row['accuracy']:.1f} | {row['mean_steps']:.2f} | "
            f"{'' if ratio is None else f'{100 * ratio:.1f} %'} | {row['seconds_per_clip']:.2f} | "
            f"{b['p5']:.4f} / {b['p50']:.4f} / {b['p95']:.4f} | {a['p5']:.4f} / {a['p50']:.4f} / {a['p95']:.4f} | "
            f"{row['worse_after']} | {', '.join(f'{k} {v}' for k, v in sorted(row['decisions'].items()))} |"
        )
    return "\n".join(lines) + "\n"


def parse_rows(text: str, n: int) -> list[tuple[str, str, int]]:
    """``VARIANT/MODE[@N];...`` -> [(variant, mode, clips)]."""
    from models.defense_mode import MODES
    from models.errors import UserError

    rows = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        spec, _, count = part.partition("@")
        variant, _, mode = spec.rpartition("/")
        if not variant or mode not in MODES:
            raise UserError(f"--rows: {part!r} is not VARIANT/MODE[@N] with MODE one of {', '.join(MODES)}")
        try:
            clips = min(n, int(count)) if count else n
        except ValueError:
            raise UserError(f"--rows: {part!r}: @N must be a number") from None
        rows.append((variant, mode, clips))
    if not rows:
        raise UserError("--rows: no rows")
    return rows


def run_rows(bundle, dataset, rows: list[tuple[str, str, int]], batch: int, state_path: Path) -> dict:
    """Every row on the first clips of ``dataset``; returns the report (without ``command``)."""
    import torch

    from models.bundle.load import defense_config, parse_variant, with_defense

    meta, pipeline = bundle.meta, bundle.pipeline
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("bundle") != meta.sha256 or state.get("split") != dataset.split:
        state = {"bundle": meta.sha256, "split": dataset.split, "rows": {}}
    rows_out = []
    paper_steps = defense_config(with_defense(meta, parse_variant("paper"))).steps
    for variant, mode, n in rows:
        variant_meta = with_defense(meta, parse_variant(variant))
        config = defense_config(variant_meta)
        threshold = variant_meta.auto_threshold()
        name = f"{variant}/{mode}"
        settings = {"config": repr(config), **({"threshold": threshold} if mode == "auto" else {})}
        saved = state["rows"].get(name)
        if saved is None or saved["settings"] != settings:
            saved = state["rows"][name] = {"settings": settings, "clips": {}}
        todo = [i for i in range(n) if str(i) not in saved["clips"]]
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            clips, labels = zip(*(dataset[i] for i in chunk), strict=True)
            x = torch.stack(clips)
            t0 = time.perf_counter()
            pred = pipeline.predict(x, defend=mode, config=config, threshold=threshold)
            seconds = (time.perf_counter() - t0) / len(chunk)
            top = pred.probs.argmax(1).tolist()
            for j, i in enumerate(chunk):
                saved["clips"][str(i)] = {
                    "correct": bool(top[j] == labels[j]),
                    "mc_before": float(pred.mc_before[j]),
                    "mc_after": float(pred.mc_after[j]),
                    "steps": int(pred.defence_steps[j]),
                    "decision": pred.decisions[j],
                    "reverted": bool(pred.reverted[j]),
                    "seconds": seconds,
                }
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(state_path)
            log.info("%s: %d/%d clips", name, len(saved["clips"]), n)
        records = [saved["clips"][str(i)] for i in range(n)]
        rows_out.append({"variant": variant, "mode": mode, "config": settings, **summarise(records)})
    for row in rows_out:  # the always-on paper defence spends exactly K steps on every clip
        row["steps_vs_paper_always"] = round(row["mean_steps"] / paper_steps, 4) if paper_steps else None
    return {"rows": rows_out, "bundle": {"name": meta.name, "version": meta.version}, "split": dataset.split}


def _cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> int:
    import torch

    from models.bundle.load import load_bundle
    from models.data import MotionShapes
    from models.errors import UserError

    rows = parse_rows(args.rows, args.n)
    if args.n < 1 or args.batch < 1:
        raise UserError("--n and --batch must be >= 1")
    bundle = load_bundle(args.bundle, device=args.device)
    if bundle.meta.labels != MotionShapes.labels():
        raise UserError("bench defence needs a bundle trained on the synthetic labels")
    dataset = MotionShapes(args.split, args.n, frames=bundle.meta.input.frames, size=bundle.meta.input.height)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = run_rows(bundle, dataset, rows, args.batch, args.json.with_suffix(".state.json"))
    report["machine"] = {"cpu": _cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    report["command"] = "motionguard bench defence " + " ".join(sys.argv[3:] if len(sys.argv) > 2 else [])
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(to_markdown(report))
    sys.stdout.write(to_markdown(report))
    return 0
