"""One video through a loaded bundle: decode -> clips -> purify -> classify -> a result dict.

Shared by the RQ job and ``motionguard classify`` so the service and the command line can never
disagree. The stages are run as separate calls (inference flow, purification, inference flow on the
restored clip: exactly what ``Pipeline.predict`` does) so each one can be timed on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.defense import purify
from worker.video import VideoLimits, cut_clips, decode_video

log = logging.getLogger(__name__)


class JobCanceled(Exception):
    """Raised inside the analysis when the job was canceled; stops work at the next step."""


def _top(probs: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probs)[: max(1, min(k, len(labels)))]
    return [{"label": labels[i], "index": int(i), "score": round(float(probs[i]), 6)} for i in order]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


def analyse_video(
    path: str | Path,
    bundle,
    *,
    defend: bool = True,
    top_k: int = 5,
    multi: bool | None = None,
    steps: int | None = None,
    epsilon: float | None = None,
    limits: VideoLimits | None = None,
    max_clips: int = 16,
    batch_size: int = 4,
    should_stop: Callable[[], bool] | None = None,
    figures: dict[int, dict[str, bytes]] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Analyse a video file with a ``LoadedBundle``.

    Returns the design's ``result`` (without ``restored_url``; ``timings_ms.encode`` is added by the
    caller that encodes) and the restored frames, (K*T, 3, H, W) float32 in [0, 1], clip after clip.
    Raises ``VideoError`` for input that cannot be used and ``JobCanceled`` when ``should_stop()``.
    When a ``figures`` dict is given and the video is defended, it is filled with each clip's
    pictures (``worker.figures``): ``{clip index: {"flow.png": PNG, "mc_loss.png": PNG}}``.
    """
    t_start = time.perf_counter()
    limits = limits or VideoLimits()
    meta, pipeline = bundle.meta, bundle.pipeline
    spec = meta.input

    def check() -> None:
        if should_stop is not None and should_stop():
            raise JobCanceled("the job was canceled")

    video = decode_video(path, spec.height, spec.width, spec.resize, limits, max_frames=max_clips * spec.frames)
    cut = cut_clips(video.frames, spec.frames, max_clips)
    t_decoded = time.perf_counter()

    config = pipeline.defense.with_overrides(steps=steps, epsilon=epsilon, multi=multi)
    defended = bool(defend and config.steps > 0)
    threshold = meta.calibration.threshold if meta.calibration is not None else None
    probs, mc_before, mc_after, trajectories, restored = [], [], [], [], []
    t_defense = t_classify = t_figures = 0.0
    want_figures = figures is not None and defended
    for first in range(0, len(cut.clips), batch_size):
        check()
        clips = torch.from_numpy(cut.clips[first : first + batch_size]).to(pipeline.device)
        t0 = time.perf_counter()
        before = pipeline.predict(clips, defend=False, multi=config.multi, keep_flows=want_figures)
        t_classify += time.perf_counter() - t0
        if defended:
            t0 = time.perf_counter()
            purified = purify(clips, pipeline.flow_model, config, on_step=lambda k, loss: check())
            t_defense += time.perf_counter() - t0
            t0 = time.perf_counter()
            after = pipeline.predict(purified.restored, defend=False, multi=config.multi, keep_flows=want_figures)
            t_classify += time.perf_counter() - t0
            trajectories.append(purified.trajectory.T.cpu().numpy())
            if want_figures:
                from worker.figures import clip_figures

                t0 = time.perf_counter()
                for j in range(clips.shape[0]):
                    figures[first + j] = clip_figures(
                        clips[j],
                        before.flows_before[j],
                        after.flows_before[j],  # the restored clip's inference flow
                        trajectories[-1][j],
                        threshold=threshold,
                        mc_before=float(before.mc_before[j]),
                        mc_after=float(after.mc_before[j]),
                        index=first + j,
                    )
                t_figures += time.perf_counter() - t0
        else:
            after = before
            trajectories.append(before.mc_before[:, None].cpu().numpy())
        probs.append(after.probs.cpu().numpy())
        mc_before.append(before.mc_before.cpu().numpy())
        mc_after.append(after.mc_before.cpu().numpy())
        restored.append(after.restored.detach().cpu().numpy())

    probs_all = np.concatenate(probs)
    before_all, after_all = np.concatenate(mc_before), np.concatenate(mc_after)
    traj_all = np.concatenate(trajectories)
    clip_results = []
    for i, (start, end) in enumerate(cut.spans):
        clip_results.append(
            {
                "index": i,
                "start_frame": start,
                "end_frame": end,
                "labels": _top(probs_all[i], meta.labels, top_k),
                "mc_loss_before": round(float(before_all[i]), 6),
                "mc_loss_after": round(float(after_all[i]), 6),
                "suspected_attack": bool(threshold is not None and before_all[i] > threshold),
                "mc_trajectory": [round(float(v), 6) for v in traj_all[i]],
            }
        )
    frames = np.concatenate(restored).reshape(-1, 3, spec.height, spec.width).astype(np.float32)
    t_end = time.perf_counter()
    result = {
        "model": {"name": meta.name, "version": meta.version},
        "defended": defended,
        "defense": {"steps": config.steps if defended else 0, "epsilon": config.epsilon, "multi": config.multi},
        "labels": _top(probs_all.mean(axis=0), meta.labels, top_k),
        "clips": clip_results,
        "video": {
            "width": video.info.width,
            "height": video.info.height,
            "fps": float(video.info.fps),
            "codec": video.info.codec,
            "frames_decoded": int(video.frames.shape[0]),
            "truncated": bool(video.truncated or cut.truncated),
            "restored_frames": int(frames.shape[0]),
        },
        "calibration_threshold": threshold,
        "timings_ms": {
            "decode": _ms(t_decoded - t_start),
            "defense": _ms(t_defense),
            "classify": _ms(t_classify),
            "encode": 0.0,
            **({"figures": _ms(t_figures)} if want_figures else {}),
            "total": _ms(t_end - t_start),
        },
        "restored_url": None,
    }
    return result, frames
