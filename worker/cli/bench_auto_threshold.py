"""``motionguard bench auto-threshold``: what ``defend=auto`` would have done on every evaluated row.

An evaluation's state file (``motionguard eval``, ``docs/eval/*.state.json``) keeps, per row and
clip, the undefended outcome (``standard``), the always-on defended outcome (``defended``) and the
MC loss before any defence (``mc_before``, inference flow). ``defend=auto`` purifies exactly the
clips whose ``mc_before`` is above its threshold and classifies the others as they are, and each
clip's outcome depends on that clip alone, so its outcome per clip is ``defended`` if ``mc_before >
threshold`` else ``standard``: exact for the inputs of the row. (The attack itself was computed
against the always-on defence or the undefended model, as the row says, not against auto.)

For each candidate threshold (a quantile of the bundle's clean calibration sample) this reports the
share of clean clips auto purifies (its cost relative to always-on: each purified clip costs what
always-on costs) and, per row, always vs auto accuracy and "correct or flagged".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_QUANTILES = "0.5,0.7,0.8,0.85,0.9,0.95,0.99"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("states", type=Path, nargs="+", help="motionguard eval state files (*.state.json)")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle whose calibration gives the thresholds")
    parser.add_argument("--quantiles", default=DEFAULT_QUANTILES, help="clean-calibration quantiles to try")
    parser.add_argument("--clean-row", default="clean", help="row whose clips are the clean traffic")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here (.md beside it)")


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (as ``torch.quantile``)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def row_outcomes(records: list[dict], threshold: float) -> dict:
    """Always vs auto on one row's per-clip records (percentages)."""
    n = len(records)
    flagged = [r["mc_before"] > threshold for r in records]
    auto = [r["defended"] if f else r["standard"] for r, f in zip(records, flagged, strict=True)]
    return {
        "n": n,
        "standard": round(100 * sum(r["standard"] for r in records) / n, 1),
        "always": round(100 * sum(r["defended"] for r in records) / n, 1),
        "auto": round(100 * sum(auto) / n, 1),
        "purified_by_auto": round(100 * sum(flagged) / n, 1),
    }


def sweep(rows: dict[str, list[dict]], sample: list[float], quantiles: list[float], clean_row: str) -> list[dict]:
    """One entry per threshold: clean cost, and per row always vs auto."""
    ordered = sorted(sample)
    out = []
    for q in quantiles:
        threshold = quantile(ordered, q)
        per_row = {name: row_outcomes(records, threshold) for name, records in rows.items()}
        gaps = {name: round(r["always"] - r["auto"], 1) for name, r in per_row.items()}
        worst = max(gaps, key=gaps.get)
        out.append(
            {
                "quantile": q,
                "threshold": round(threshold, 6),
                "clean_purified_pct": per_row[clean_row]["purified_by_auto"] if clean_row in per_row else None,
                "worst_gap": {"row": worst, "points": gaps[worst]},
                "rows": per_row,
            }
        )
    return out


def to_markdown(report: dict) -> str:
    """Rows down, thresholds across: always-on beside auto at each threshold (accuracy %)."""
    entries = report["sweep"]
    if not entries:
        return ""
    heads = [f"auto @p{e['quantile'] * 100:g} ({e['threshold']:.4f})" for e in entries]
    lines = [
        "| row | n | undefended | always | " + " | ".join(heads) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(entries),
        "| *clean clips purified by auto (its steps vs always)* | | | 100 % | "
        + " | ".join(f"{e['clean_purified_pct']:.1f} %" for e in entries)
        + " |",
    ]
    for name, first in entries[0]["rows"].items():
        cells = [f"{e['rows'][name]['auto']:.1f}" for e in entries]
        lines.append(
            f"| {name} | {first['n']} | {first['standard']:.1f} | {first['always']:.1f} | " + " | ".join(cells) + " |"
        )
    lines.append(
        "| *worst gap always - auto (row)* | | | | "
        + " | ".join(f"{e['worst_gap']['points']:.1f} ({e['worst_gap']['row']})" for e in entries)
        + " |"
    )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from models.bundle_meta import DEFAULT_BUNDLE_DIR, read_bundle_meta
    from models.errors import UserError

    meta = read_bundle_meta(args.bundle or DEFAULT_BUNDLE_DIR)
    if meta.calibration is None or not meta.calibration.sample:
        raise UserError("the bundle has no clean calibration sample to take thresholds from")
    try:
        quantiles = [float(q) for q in args.quantiles.split(",") if q.strip()]
    except ValueError:
        raise UserError("--quantiles: comma-separated numbers in (0, 1)") from None
    if not quantiles or not all(0 < q < 1 for q in quantiles):
        raise UserError("--quantiles: comma-separated numbers in (0, 1)")
    rows: dict[str, list[dict]] = {}
    for path in args.states:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable evaluation state ({exc})") from None
        for name, records in saved.get("rows", {}).items():
            usable = [r for r in records.values() if {"standard", "defended", "mc_before"} <= set(r)]
            if usable:
                rows[name if name not in rows else f"{path.stem}:{name}"] = usable
    if not rows:
        raise UserError("no rows with per-clip standard/defended/mc_before records in the state files")
    report = {
        "bundle": {"name": meta.name, "version": meta.version},
        "states": [str(p) for p in args.states],
        "sweep": sweep(rows, meta.calibration.sample, quantiles, args.clean_row),
        "command": "motionguard bench auto-threshold " + " ".join(sys.argv[3:]),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(to_markdown(report))
    sys.stdout.write(to_markdown(report))
    return 0
