"""Clean cost of defend=auto (on the flag; and on the MC threshold) vs always, the flag read in every mode."""
import json, sys, time, torch
torch.set_num_threads(1)
from models.bundle.load import load_bundle
from models.defense.calibrate import synthetic_clips
from worker.serving.flagging import flag_clips
b = load_bundle("models/bundles/motionshapes-v1"); p = b.pipeline
n = int(sys.argv[1]); bs = 8
clips = list(synthetic_clips("test", n, 8, 64))
out = {"always": [0.0, 0], "auto_flag": [0.0, 0], "auto_mc": [0.0, 0]}
for start in range(0, n, bs):
    x = torch.stack([c for c, _ in clips[start:start + bs]])
    for mode in ("auto_flag", "always", "auto_mc"):
        t = time.process_time()
        with torch.no_grad():
            if mode == "always":
                pred = p.predict(x, defend=True, keep_flows=True); flag_clips(b, x, pred)
            elif mode == "auto_flag":
                pred = p.predict(x, defend="auto", keep_flows=True); flag_clips(b, x, pred, decided=True)
            else:
                pred = p.predict(x, defend="auto", threshold=p.threshold, keep_flows=True); flag_clips(b, x, pred)
        out[mode][0] += time.process_time() - t
        out[mode][1] += int(pred.purified.sum())
    print(start + bs, {k: (round(v[0], 1), v[1]) for k, v in out.items()}, flush=True)
res = {k: {"cpu_s": round(v[0], 2), "purified": v[1]} for k, v in out.items()}
res["n"] = n
res["auto_flag_over_always"] = round(out["auto_flag"][0] / out["always"][0], 3)
res["auto_mc_over_always"] = round(out["auto_mc"][0] / out["always"][0], 3)
res["command"] = "OMP_NUM_THREADS=1 python docs/eval/flag/auto_cost.py %d (CPU process time, batches of 8, flag read in every mode)" % n
print(json.dumps(res))
open("docs/eval/flag/auto-cost-v1.1.json", "w").write(json.dumps(res, indent=1) + "\n")
