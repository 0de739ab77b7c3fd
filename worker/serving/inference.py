"""One video through a loaded bundle: decode -> clips -> purify -> classify -> a result dict.

Shared by the RQ job, the batching worker and ``motionguard classify`` so they can never disagree.
The analysis is three stages so that a worker can run the middle one over the clips of several
jobs at once (``worker.serving.batching``):

1. ``prepare_video`` (per job): decode and cut into clips of the bundle's geometry;
2. ``compute_clips`` (per batch of clips sharing one ``DefenseRequest``, from one job or many):
   ``Pipeline.predict`` with the request's mode, which decides per clip (``defend=auto``: purify
   only clips above the threshold) and times the inference passes and the purification apart;
3. ``assemble_result`` (per job): that job's clip outputs -> the design's ``result``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.defense.purify import DefenseConfig
from models.defense_mode import DefendMode, parse_mode
from models.errors import UserError
from worker.serving.flagging import ClipFlag, flag_clips, legacy_threshold
from worker.video import VideoInfo, VideoLimits, cut_clips, decode_video

log = logging.getLogger(__name__)


class JobCanceled(Exception):
    """Raised inside the analysis when the job was canceled; stops work at the next step."""


def _top(probs: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probs)[: max(1, min(k, len(labels)))]
    return [{"label": labels[i], "index": int(i), "score": round(float(probs[i]), 6)} for i in order]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


@dataclass
class PreparedVideo:
    """Stage 1's output: a job's video decoded and cut into clips at the bundle's geometry."""

    clips: np.ndarray  # (K, T, 3, H, W) float32 in [0, 1]
    spans: list[tuple[int, int]]
    info: VideoInfo
    frames_decoded: int
    truncated: bool
    decode_s: float


def prepare_video(path: str | Path, bundle, limits: VideoLimits | None = None, max_clips: int = 16) -> PreparedVideo:
    """Decode (bounded by ``limits``) and cut; raises ``VideoError`` for input that cannot be used."""
    t0 = time.perf_counter()
    spec = bundle.meta.input
    video = decode_video(
        path, spec.height, spec.width, spec.resize, limits or VideoLimits(), max_frames=max_clips * spec.frames
    )
    cut = cut_clips(video.frames, spec.frames, max_clips)
    return PreparedVideo(
        clips=cut.clips,
        spans=cut.spans,
        info=video.info,
        frames_decoded=int(video.frames.shape[0]),
        truncated=bool(video.truncated or cut.truncated),
        decode_s=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class DefenseRequest:
    """What clips must share to be computed in one batch: the defence mode and settings actually
    used and whether pictures are drawn. Hashable, so a batching worker groups clips by it."""

    mode: DefendMode
    config: DefenseConfig
    figures: bool = False
    threshold: float | None = None  # defend=auto: clips above this MC loss (or attack score) are purified
    decided_on: str = "mc_loss"  # defend=auto decides on the MC loss, or on the flag's "attack_score"

    @property
    def defended(self) -> bool:
        return self.mode != "off"


def defense_request(
    bundle,
    *,
    defend: bool | str | None = None,
    steps: int | None = None,
    epsilon: float | None = None,
    multi: bool | None = None,
    figures: bool = False,
) -> DefenseRequest:
    """A job's parameters resolved against the bundle's defaults (``defend`` None: the bundle's mode,
    ``bundle.policy``, resolved once at load; true/false/auto otherwise). Raises ``UserError`` for
    ``auto`` on a bundle with no threshold to decide with."""
    policy = bundle.policy
    config = bundle.pipeline.defense.with_overrides(steps=steps, epsilon=epsilon, multi=multi)
    try:
        mode = parse_mode(defend, policy.default_mode)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if config.steps <= 0:
        mode = "off"
    if mode == "auto" and not policy.serves_auto:
        raise UserError("defend=auto needs a calibrated bundle (no MC-loss threshold to decide with)")
    auto = mode == "auto"
    return DefenseRequest(
        mode=mode,
        config=config,
        figures=bool(figures and mode != "off"),
        threshold=policy.auto_threshold if auto else None,
        decided_on=policy.decided_on if auto else "mc_loss",
    )


@dataclass
class ClipOutput:
    """Stage 2's output for one clip (numpy, on the CPU)."""

    probs: np.ndarray  # (C,)
    mc_before: float
    mc_after: float
    trajectory: np.ndarray  # (K + 1,) MC loss over the defence steps; (1,) when not defended
    restored: np.ndarray  # (T, 3, H, W) float32
    figures: dict[str, bytes] | None = None
    decision: str = "off"  # purified / stopped_early / skipped (defend=auto, under the threshold) / off
    defence_steps: int = 0  # gradient evaluations (forward + backward) the purification spent on it
    flag: ClipFlag = field(default_factory=ClipFlag)  # the suspected-attack flag (worker.serving.flagging)


@dataclass
class BatchTimings:
    """Wall time of one ``compute_clips`` call, per stage (every clip of the batch shared it)."""

    defense_s: float = 0.0
    classify_s: float = 0.0
    figures_s: float = 0.0
    clips: int = 0


def compute_clips(
    bundle,
    clips: np.ndarray,
    request: DefenseRequest,
    *,
    figure_index: Sequence[int] | None = None,
    check: Callable[[], None] | None = None,
    gone: Callable[[], Sequence[bool]] | None = None,
) -> tuple[list[ClipOutput], BatchTimings]:
    """Classify a batch of clips (B, T, 3, H, W), purifying those ``request.mode`` selects.

    The clips may come from several jobs; each clip's outputs depend on that clip alone.
    ``check()`` is called at every defence step (it raises to stop the batch: cancellation,
    timeout); then ``gone()`` says, per clip, whether its job has ended: those clips leave the
    purification (what comes back for them is not to be used). ``figure_index`` names each clip
    in its pictures (its index within its own job).
    """
    pipeline, config = bundle.pipeline, request.config
    threshold = legacy_threshold(bundle.meta)
    timings = BatchTimings(clips=int(clips.shape[0]))
    x = torch.from_numpy(np.ascontiguousarray(clips)).to(pipeline.device)
    on_flag = request.decided_on == "attack_score"  # Pipeline.decide_auto decides
    pred = pipeline.predict(  # auto: the pipeline holds the bundle's policy (load_bundle), as the request does
        x,
        defend=request.mode,
        config=config,
        keep_flows=True,  # the flag reads the inference flows
        on_step=(lambda k, loss: check()) if check else None,
        leave=(lambda: torch.tensor(list(gone()), dtype=torch.bool)) if gone else None,
    )
    timings.classify_s += pred.seconds["classify"]
    timings.defense_s += pred.seconds["defense"]
    probs = pred.probs.cpu().numpy()
    mc_before, mc_after = pred.mc_before.cpu().numpy(), pred.mc_after.cpu().numpy()
    restored = pred.restored.detach().cpu().numpy().astype(np.float32, copy=False)
    steps = pred.defence_steps.cpu().numpy()
    t0 = time.perf_counter()
    flags = flag_clips(bundle, x, pred, decided=on_flag and request.mode == "auto")
    timings.classify_s += time.perf_counter() - t0
    outputs = [
        ClipOutput(
            probs=probs[j],
            mc_before=float(mc_before[j]),
            mc_after=float(mc_after[j]),
            trajectory=np.asarray(pred.trajectory_of(j), dtype=np.float32),
            restored=restored[j],
            decision=pred.decisions[j],
            defence_steps=int(steps[j]),
            flag=flags[j],
        )
        for j in range(x.shape[0])
    ]
    if request.figures:
        from worker.serving.figures import clip_figures

        t0 = time.perf_counter()
        for j, output in enumerate(outputs):
            if output.decision in ("skipped", "off"):  # nothing was purified: no before/after to show
                continue
            output.figures = clip_figures(
                x[j],
                pred.flows_before[j],
                pred.flows_after[j],  # the restored clip's inference flow
                output.trajectory,
                threshold=threshold,
                mc_before=output.mc_before,
                mc_after=output.mc_after,
                index=figure_index[j] if figure_index is not None else j,
            )
        timings.figures_s += time.perf_counter() - t0
    return outputs, timings


@dataclass
class JobCompute:
    """A job's share of stage 2: its clip outputs, and the batches they were computed in."""

    outputs: list[ClipOutput | None]
    defense_s: float = 0.0
    classify_s: float = 0.0
    figures_s: float = 0.0
    batch_clips: int = 0  # clips of the largest batch this job's clips ran in
    batch_jobs: set[str] = field(default_factory=set)  # ids of the jobs that shared those batches

    @classmethod
    def empty(cls, clips: int) -> JobCompute:
        return cls(outputs=[None] * clips)

    def add(self, index: int, output: ClipOutput) -> None:
        self.outputs[index] = output

    def add_batch(self, timings: BatchTimings, jobs: set[str]) -> None:
        """Count a batch this job took part in (its wall time is this job's time too)."""
        self.defense_s += timings.defense_s
        self.classify_s += timings.classify_s
        self.figures_s += timings.figures_s
        self.batch_clips = max(self.batch_clips, timings.clips)
        self.batch_jobs |= jobs

    @property
    def complete(self) -> bool:
        return all(output is not None for output in self.outputs)


def assemble_result(
    bundle, video: PreparedVideo, request: DefenseRequest, compute: JobCompute, top_k: int, started: float
) -> tuple[dict[str, Any], np.ndarray]:
    """Stage 3: the design's ``result`` (without ``restored_url``; ``timings_ms.encode`` is added by
    the caller that encodes) and the restored frames, (K*T, 3, H, W) float32, clip after clip.
    ``started`` is the ``time.perf_counter()`` at which this job's analysis began."""
    meta, spec = bundle.meta, bundle.meta.input
    threshold = legacy_threshold(meta)
    outputs = [o for o in compute.outputs if o is not None]
    if len(outputs) != len(video.spans):
        raise RuntimeError(f"{len(video.spans) - len(outputs)} clip(s) of the job were not computed")
    probs_all = np.stack([o.probs for o in outputs])
    clip_results = []
    for i, ((start, end), output) in enumerate(zip(video.spans, outputs, strict=True)):
        clip_results.append(
            {
                "index": i,
                "start_frame": start,
                "end_frame": end,
                "labels": _top(output.probs, meta.labels, top_k),
                "mc_loss_before": round(output.mc_before, 6),
                "mc_loss_after": round(output.mc_after, 6),
                "suspected_attack": output.flag.suspected,
                "attack_score": output.flag.score,
                "signals": output.flag.signals,
                "mc_trajectory": [round(float(v), 6) for v in output.trajectory],
                "decision": output.decision,
                "defence_steps": output.defence_steps,
            }
        )
    frames = np.concatenate([o.restored for o in outputs]).reshape(-1, 3, spec.height, spec.width)
    config = request.config
    result = {
        "model": {"name": meta.name, "version": meta.version},
        "defended": request.defended,
        "defense": {
            "mode": request.mode,
            "steps": config.steps if request.defended else 0,
            "epsilon": config.epsilon,
            "multi": config.multi,
            **({"threshold": request.threshold, "decided_on": request.decided_on} if request.mode == "auto" else {}),
        },
        "labels": _top(probs_all.mean(axis=0), meta.labels, top_k),
        "clips": clip_results,
        "video": {
            "width": video.info.width,
            "height": video.info.height,
            "fps": float(video.info.fps),
            "codec": video.info.codec,
            "frames_decoded": video.frames_decoded,
            "truncated": video.truncated,
            "restored_frames": int(frames.shape[0]),
        },
        "calibration_threshold": threshold,
        "timings_ms": {
            "decode": _ms(video.decode_s),
            "defense": _ms(compute.defense_s),
            "classify": _ms(compute.classify_s),
            "encode": 0.0,
            **({"figures": _ms(compute.figures_s)} if request.figures else {}),
            "total": _ms(time.perf_counter() - started),
        },
        "batch": {"clips": compute.batch_clips, "jobs": max(1, len(compute.batch_jobs))},
        "restored_url": None,
    }
    return result, frames


def figures_of(compute: JobCompute) -> dict[int, dict[str, bytes]]:
    """``{clip index: {"flow.png": PNG, "mc_loss.png": PNG}}`` of a defended job."""
    return {i: o.figures for i, o in enumerate(compute.outputs) if o is not None and o.figures}


def analyse_video(
    path: str | Path,
    bundle,
    *,
    defend: bool | str | None = None,
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
    """Analyse one video file with a ``LoadedBundle``: the three stages, batches of ``batch_size``
    clips of this video alone.

    Returns the design's ``result`` (without ``restored_url``; ``timings_ms.encode`` is added by the
    caller that encodes) and the restored frames, (K*T, 3, H, W) float32 in [0, 1], clip after clip.
    Raises ``VideoError`` for input that cannot be used and ``JobCanceled`` when ``should_stop()``.
    When a ``figures`` dict is given and the video is defended, it is filled with each clip's
    pictures (``worker.serving.figures``): ``{clip index: {"flow.png": PNG, "mc_loss.png": PNG}}``.
    """
    started = time.perf_counter()

    def check() -> None:
        if should_stop is not None and should_stop():
            raise JobCanceled("the job was canceled")

    video = prepare_video(path, bundle, limits, max_clips)
    request = defense_request(
        bundle, defend=defend, steps=steps, epsilon=epsilon, multi=multi, figures=figures is not None
    )
    compute = JobCompute.empty(len(video.spans))
    for first in range(0, len(video.spans), batch_size):
        check()
        indices = list(range(first, min(first + batch_size, len(video.spans))))
        outputs, timings = compute_clips(bundle, video.clips[indices], request, figure_index=indices, check=check)
        for index, output in zip(indices, outputs, strict=True):
            compute.add(index, output)
        compute.add_batch(timings, set())
    result, frames = assemble_result(bundle, video, request, compute, top_k, started)
    if figures is not None:
        figures.update(figures_of(compute))
    return result, frames
