"""Worst case per clip over eval JSONs of *different* evaluations (e.g. the ``auto`` rows beside the
``off`` Square row), which ``motionguard eval report`` refuses to merge on purpose. Shards of one row
(``--shard``) merge.

A clip counts robust only if every row of that budget left it correct, and correct-or-flagged only if
every row left it correct or flagged; 95 % percentile bootstrap intervals as in the report. Rows are
taken on the clips they all ran (``--first`` caps the clip index: the first 100 test clips).

    python docs/eval/robust-v1.2/worst_case.py docs/eval/robust-v1.2/off-square.json \
        docs/eval/robust-v1.2/auto-{transfer,transfer50,transfer12,gradient,noise,transferflag,transferflag4}.json \
        docs/eval/robust-v1.2/auto-{defaware,transferflag-sweep,transferflag-signals}.json

(the command behind the 17-row worst case of docs/robust-model.md and docs/flag.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.robustness.report import worst_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="eval JSONs (motionguard eval --json)")
    parser.add_argument("--first", type=int, default=100, help="only clips 0 .. FIRST-1 (default 100)")
    parser.add_argument("--skip", nargs="*", default=["random"], help="row-name prefixes left out")
    args = parser.parse_args()
    clips: dict[str, dict[int, dict]] = {}
    modes: dict[str, str] = {}
    for path in args.reports:
        try:
            report = json.loads(path.read_text())
            mode = report["signature"]["defend"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"{path}: not a readable eval JSON ({exc!r})") from exc
        for row, records in report["clips"].items():
            if any(row.startswith(prefix) for prefix in args.skip):
                continue
            if modes.setdefault(row, mode) != mode:
                raise SystemExit(f"{path}: row {row} ran in another mode in an earlier file")
            merged = clips.setdefault(row, {})
            for i, record in records.items():
                if int(i) >= args.first:
                    continue
                if merged.get(int(i), record) != record:
                    raise SystemExit(f"{path}: row {row} clip {i} differs from an earlier file's record")
                merged[int(i)] = record
    for case in worst_case(clips, threshold=None):
        robust, safe = case["defended"], case["correct_or_flagged"]
        print(
            f"{case['name']}: n {case['n']}, {len(case['rows'])} rows: correct {robust['value']:.1f} {robust['ci95']},"
            f" correct or flagged {safe['value']:.1f} {safe['ci95']}"
        )
        for row in case["rows"]:
            print(f"  {row} (defend {modes[row]}, n {len(clips[row])})")


if __name__ == "__main__":
    main()
