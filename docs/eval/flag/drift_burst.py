"""The drift statistics on a clean burst and on a burst of flag-aware attacked clips, through ``serve``.

Issue 24 asks whether an attacker who keeps each clip's flag down still moves the monitoring: the
MC-loss drift (``motionguard_mc_loss_drift``) and the attack-score drift
(``motionguard_attack_score_drift``) are KS distances of the last ``drift_window`` clips against the
bundle's clean calibration (docs/monitoring.md), so a campaign of individually unflagged clips can
still raise them.

1. Craft: the first ``--n`` MotionShapes test clips attacked by ``--attack`` (default the flag-aware
   transfer attack on the default model, the ``auto-transferflag.json`` row of its records), one clip
   a batch, kept in ``--work`` (per bundle version and attack) so a rerun resumes.
2. Serve: ``motionguard serve --workers 1`` (embedded Redis, the default model only, drift window =
   ``--n``), upload the clean clips as lossless FFV1 (8-bit, as any real upload), wait for every job,
   read ``/metrics``; then the attacked clips, and read it again.

Usage (from the repo root): ``OMP_NUM_THREADS=1 .venv/bin/python docs/eval/flag/drift_burst.py --n 30``;
writes ``docs/eval/flag/drift-burst-robust-v<version>.json`` (the default model's version).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from models.bundle.load import load_bundle
from models.bundle_meta import BundleMeta, read_bundle_meta
from models.defense.calibrate import synthetic_clips
from models.robustness.spec import parse_attack, run_attack
from worker.video import encode_ffv1

log = logging.getLogger("drift_burst")
BUNDLE = "models/bundles/motionshapes-robust-v1"
SOURCE = "models/bundles/motionshapes-v1"
METRICS = ("motionguard_mc_loss_drift", "motionguard_attack_score_drift", "motionguard_mc_loss_suspected_share")


def craft(clips: list[tuple[torch.Tensor, int]], attack: str, work: Path, meta: BundleMeta) -> np.ndarray:
    """(n, T, 3, H, W) float32 attacked clips; resumes from ``work/attacked-<version>-<attack>.npz`` (one
    file per bundle version and attack spec: the attack reads the evaluated bundle's flag, so clips of
    another version or ``--attack`` must not mix)."""
    path = work / f"attacked-v{meta.version}-{re.sub(r'[^A-Za-z0-9.=-]+', '_', attack)}.npz"
    done = list(np.load(path)["clips"]) if path.exists() else []
    n = len(clips)
    if len(done) >= n:
        return np.stack(done[:n])
    bundle = load_bundle(BUNDLE)
    source = load_bundle(SOURCE).pipeline
    spec = parse_attack(attack)
    for i in range(len(done), n):
        torch.manual_seed(i)
        clip, label = clips[i]
        result = run_attack(
            spec, bundle.pipeline, clip[None], torch.tensor([label]), defend="auto", flag=meta.flag, source=source
        )
        done.append(result.x[0].numpy().astype(np.float32))
        np.savez(path, clips=np.stack(done))
        log.info("crafted %d/%d (attack's own success at step %s)", i + 1, n, result.fooled_at.tolist())
    return np.stack(done)


def ffv1(clip: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    frames = (np.clip(clip, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    encode_ffv1(frames, buffer)
    return buffer.getvalue()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _post(url: str, name: str, body: bytes) -> dict:
    boundary = "motionguard-drift-burst"
    data = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: video/x-matroska\r\n\r\n"
        ).encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _metrics(api: str) -> dict[str, float]:
    text = _get(f"{api}/metrics").decode()
    found = {}
    for name in METRICS:
        match = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.eE+-]+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def burst(api: str, clips: np.ndarray, labels: list[int], label_names: list[str], tag: str) -> dict:
    """Upload every clip, wait for all jobs (no deadline: the worker's pace is the machine's), summarise."""
    ids = [_post(f"{api}/classify", f"{tag}-{i}.mkv", ffv1(c))["job_id"] for i, c in enumerate(clips)]
    results = []
    for job_id in ids:
        while True:
            job = json.loads(_get(f"{api}/jobs/{job_id}"))
            if job["status"] in ("finished", "failed", "canceled"):
                break
            time.sleep(0.5)
        if job["status"] != "finished":
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        results.append(job["result"]["clips"][0])
    correct = [r["labels"][0]["label"] == label_names[y] for r, y in zip(results, labels, strict=True)]
    flagged = [bool(r["suspected_attack"]) for r in results]
    summary = {
        "clips": len(results),
        "correct": sum(correct),
        "flagged": sum(flagged),
        "correct_or_flagged": sum(c or f for c, f in zip(correct, flagged, strict=True)),
        "attack_score_mean": round(float(np.mean([r["attack_score"] for r in results])), 4),
        "metrics": _metrics(api),
    }
    log.info("%s burst: %s", tag, summary)
    return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, default=30, help="clips per burst (also the drift window; the alert needs >= 30)"
    )
    parser.add_argument("--attack", default="transfer-flagpen:8:steps=10")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "motionguard-drift-burst")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: docs/eval/flag/drift-burst-robust-v<version>.json"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    meta = read_bundle_meta(BUNDLE)
    clean_pairs = list(synthetic_clips("test", args.n, 8, 64))
    attacked = craft(clean_pairs, args.attack, args.work, meta)
    clean = np.stack([c.numpy() for c, _ in clean_pairs])
    labels = [y for _, y in clean_pairs]
    out = args.out or Path(f"docs/eval/flag/drift-burst-robust-v{meta.version}.json")
    port = _free_port()
    api = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        MOTIONGUARD_MODELS=meta.name,
        MOTIONGUARD_DRIFT_WINDOW=str(max(args.n, 10)),  # the settings' minimum
        MOTIONGUARD_DATA_DIR=str(args.work / "data"),
        MOTIONGUARD_MAX_QUEUED=str(2 * args.n),
        MOTIONGUARD_MAX_INFLIGHT_PER_KEY=str(2 * args.n),
    )
    env.pop("MOTIONGUARD_REDIS_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "1", "--no-access-log"],
        env=env,
        start_new_session=True,
    )
    try:
        while True:  # ready when a worker has the bundle loaded; the server's own log says why it is not
            if server.poll() is not None:
                raise RuntimeError(f"motionguard serve exited with {server.returncode}")
            try:
                _get(f"{api}/readyz")
                break
            except OSError:
                time.sleep(1)
        report = {
            "bundle": f"{meta.name} v{meta.version}",
            "attack": args.attack,
            "n": args.n,
            "drift_window": max(args.n, 10),
            "clean": burst(api, clean, labels, meta.labels, "clean"),
            "attacked": burst(api, attacked, labels, meta.labels, "attacked"),
            "command": f"OMP_NUM_THREADS=1 .venv/bin/python docs/eval/flag/drift_burst.py --n {args.n}"
            + (f" --attack {args.attack}" if args.attack != parser.get_default("attack") else ""),
        }
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
