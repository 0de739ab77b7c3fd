"""Clean cost of ``defend=auto`` (deciding on the attack flag, and on the MC threshold) against ``always``.

The flag is read in every mode (the service reads it for every clip), so the ratio is what a
deployment pays. CPU process time, not wall time: the machine is shared. Usage (from the repo root):
``OMP_NUM_THREADS=1 .venv/bin/python docs/eval/flag/auto_cost.py 48``.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from models.bundle.load import load_bundle
from models.defense.calibrate import synthetic_clips
from worker.serving.flagging import flag_clips

BATCH = 8


def main(n: int) -> dict:
    torch.set_num_threads(1)
    bundle = load_bundle("models/bundles/motionshapes-v1")
    pipeline = bundle.pipeline
    clips = list(synthetic_clips("test", n, 8, 64))
    spent = {"always": [0.0, 0], "auto_flag": [0.0, 0], "auto_mc": [0.0, 0]}
    for start in range(0, n, BATCH):
        x = torch.stack([c for c, _ in clips[start : start + BATCH]])
        for mode in ("auto_flag", "always", "auto_mc"):
            t0 = time.process_time()
            with torch.no_grad():
                if mode == "always":
                    pred = pipeline.predict(x, defend=True, keep_flows=True)
                elif mode == "auto_flag":
                    pred = pipeline.predict(x, defend="auto", keep_flows=True)
                else:
                    pred = pipeline.predict(x, defend="auto", threshold=pipeline.threshold, keep_flows=True)
                flag_clips(bundle, x, pred, decided=mode == "auto_flag")
            spent[mode][0] += time.process_time() - t0
            spent[mode][1] += int(pred.purified.sum())
    result: dict = {k: {"cpu_s": round(v[0], 2), "purified": v[1]} for k, v in spent.items()}
    result["n"] = n
    result["auto_flag_over_always"] = round(spent["auto_flag"][0] / spent["always"][0], 3)
    result["auto_mc_over_always"] = round(spent["auto_mc"][0] / spent["always"][0], 3)
    result["command"] = f"OMP_NUM_THREADS=1 .venv/bin/python docs/eval/flag/auto_cost.py {n}"
    return result


if __name__ == "__main__":
    report = main(int(sys.argv[1]) if len(sys.argv) > 1 else 48)
    print(json.dumps(report))
    with open("docs/eval/flag/auto-cost-v1.1.json", "w") as handle:
        handle.write(json.dumps(report, indent=1) + "\n")
