"""Which flag signal an attack had to dodge: on each row's silent successes (wrong and unflagged), each
signal's surprise over the flag's threshold (median) and how often it is the signal nearest the
threshold. Reads the eval state files (they keep every clip's signal values) and the bundle's flag.

    python docs/eval/flag/dodged.py models/bundles/motionshapes-robust-v1 \
        docs/eval/robust-v1.2/auto-transferflag*.state.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from models.bundle_meta import read_bundle_meta
from models.defense.flag import surprises


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the evaluated bundle (its flag calibration)")
    parser.add_argument("states", nargs="+", type=Path, help="eval state files (motionguard eval --state)")
    parser.add_argument("--first", type=int, default=100, help="only clips 0 .. FIRST-1 (default 100)")
    args = parser.parse_args()
    flag = read_bundle_meta(args.bundle).flag
    if flag is None:
        raise SystemExit(f"{args.bundle}: no flag calibration")
    threshold = flag.thresholds["input"]
    rows: dict[str, dict[int, dict]] = {}
    for path in args.states:
        try:
            state = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"{path}: not a readable eval state file ({exc!r})") from exc
        for row, records in state.items():
            rows.setdefault(row, {}).update({int(i): r for i, r in records.items() if int(i) < args.first})
    for row, records in rows.items():
        silent = {i: r for i, r in records.items() if not r["defended"] and not r.get("flagged") and r.get("signals")}
        if not silent:
            print(f"{row}: n {len(records)}, no silent success")
            continue
        values: dict[str, list[float]] = {}
        nearest: Counter[str] = Counter()
        for record in silent.values():
            signal = {name: torch.tensor([v], dtype=torch.float64) for name, v in record["signals"].items()}
            relative = {name: float(s) / threshold for name, s in surprises(signal, flag).items()}
            for name, v in relative.items():
                values.setdefault(name, []).append(v)
            nearest[max(relative, key=relative.__getitem__)] += 1
        medians = ", ".join(f"{n} {torch.tensor(v).median():.2f}" for n, v in values.items())
        print(f"{row}: n {len(records)}, {len(silent)} silent successes (clips {sorted(silent)})")
        print(f"  median surprise / threshold: {medians}")
        print(f"  nearest the threshold: {dict(nearest.most_common())}")


if __name__ == "__main__":
    main()
