"""Video in and out with PyAV: bounded probing/decoding, clip cutting, H.264 / FFV1 / npz encoding.

numpy only (no torch) so the API process can use the same probe as the workers. Hostile input is
refused from what the container declares *before* frames are allocated, every decoded frame is
re-checked (streams may change size mid-way), and frames are resized to the bundle's geometry as
they are decoded, so memory is bounded by clips x T x H x W whatever the source resolution.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

from models.errors import VideoError

log = logging.getLogger(__name__)

DEFAULT_FPS = Fraction(25)


class VideoTooLarge(VideoError):
    """The video is readable but beyond the configured size, duration or frame limits."""


class VideoTooShort(VideoError):
    """The video has fewer frames than motion needs (at least 2)."""


@dataclass(frozen=True)
class VideoLimits:
    """Bounds applied to every input video (defaults match ``worker.settings.Settings``)."""

    max_pixels: int = 1920 * 1088
    max_frames: int = 3000
    max_duration_s: float = 600.0
    probe_size: int = 5_000_000
    probe_duration_us: int = 5_000_000

    @classmethod
    def from_settings(cls, settings) -> VideoLimits:
        return cls(
            max_pixels=settings.max_pixels,
            max_frames=settings.max_frames,
            max_duration_s=settings.max_duration_s,
            probe_size=settings.probe_size,
            probe_duration_us=settings.probe_duration_us,
        )


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int  # declared frame count, 0 when the container does not say
    duration_s: float | None
    fps: Fraction
    codec: str
    container: str


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (N, H, W, 3) uint8, already at the bundle's geometry
    info: VideoInfo
    truncated: bool  # more frames were available than were decoded


def _open(path: str | Path, limits: VideoLimits):
    """Open with bounded probing; any FFmpeg failure becomes a one-line VideoError."""
    path = Path(path)
    if not path.is_file():
        raise VideoError("the video file is missing (expired upload?)")  # no server path in client messages
    if path.stat().st_size == 0:
        raise VideoError("the file is empty")
    options = {"probesize": str(max(32, limits.probe_size)), "analyzeduration": str(limits.probe_duration_us)}
    try:
        container = av.open(str(path), mode="r", options=options, timeout=30)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError(f"not a readable video ({_short(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise VideoError("the file contains no video stream")
    return container


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _info(container) -> VideoInfo:
    stream = container.streams.video[0]
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    return VideoInfo(
        width=width,
        height=height,
        frames=int(stream.frames or 0),
        duration_s=duration,
        fps=Fraction(fps),
        codec=ctx.name or "unknown",
        container=container.format.name,
    )


def _check_declared(info: VideoInfo, limits: VideoLimits) -> None:
    if info.width <= 0 or info.height <= 0:
        raise VideoError("the video stream declares no frame size")
    if info.width * info.height > limits.max_pixels:
        raise VideoTooLarge(
            f"video is {info.width}x{info.height}; at most {limits.max_pixels} pixels per frame are accepted"
        )
    if info.duration_s is not None and info.duration_s > limits.max_duration_s:
        raise VideoTooLarge(f"video lasts {info.duration_s:.0f} s; at most {limits.max_duration_s:.0f} s are accepted")


def probe_video(path: str | Path, limits: VideoLimits | None = None, min_frames: int = 2) -> VideoInfo:
    """Declared properties within limits, and at least ``min_frames`` frames that really decode."""
    limits = limits or VideoLimits()
    container = _open(path, limits)
    try:
        info = _info(container)
        _check_declared(info, limits)
        decoded = 0
        try:
            for frame in container.decode(video=0):
                _check_frame(frame, limits)
                decoded += 1
                if decoded >= min_frames:
                    break
        except av.error.FFmpegError as exc:
            if decoded == 0:
                raise VideoError(f"no frame could be decoded ({_short(exc)})") from exc
        if decoded == 0:
            raise VideoError("no frame could be decoded")
        if decoded < min_frames:
            raise VideoTooShort(f"the video has {decoded} frame(s); at least {min_frames} are needed to see motion")
        return info
    finally:
        container.close()


def _check_frame(frame, limits: VideoLimits) -> None:
    if frame.width * frame.height > limits.max_pixels:
        raise VideoTooLarge(f"a frame is {frame.width}x{frame.height}; at most {limits.max_pixels} pixels are accepted")


def resize_plan(width: int, height: int, target_h: int, target_w: int, mode: str) -> tuple[int, int]:
    """Size (w, h) to scale a frame to before the centre crop ('short_side') or as is ('stretch')."""
    if mode == "stretch":
        return target_w, target_h
    scale = max(target_h / height, target_w / width)
    return max(target_w, math.ceil(width * scale - 1e-6)), max(target_h, math.ceil(height * scale - 1e-6))


def _to_target(frame, target_h: int, target_w: int, mode: str) -> np.ndarray:
    scaled_w, scaled_h = resize_plan(frame.width, frame.height, target_h, target_w, mode)
    rgb = frame.reformat(width=scaled_w, height=scaled_h, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (scaled_h - target_h) // 2, (scaled_w - target_w) // 2
    return np.ascontiguousarray(rgb[top : top + target_h, left : left + target_w])


def decode_video(
    path: str | Path,
    height: int,
    width: int,
    resize: Literal["short_side", "stretch"] = "short_side",
    limits: VideoLimits | None = None,
    max_frames: int | None = None,
) -> DecodedVideo:
    """Decode up to ``max_frames`` (and ``limits.max_frames``) frames resized to (height, width)."""
    limits = limits or VideoLimits()
    cap = min(limits.max_frames, max_frames or limits.max_frames)
    container = _open(path, limits)
    frames: list[np.ndarray] = []
    truncated = False
    try:
        info = _info(container)
        _check_declared(info, limits)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if len(frames) >= cap:
                    truncated = True
                    break
                _check_frame(frame, limits)
                frames.append(_to_target(frame, height, width, resize))
        except av.error.FFmpegError as exc:
            # A damaged tail still leaves the frames before it usable; nothing decodable is an error.
            if not frames:
                raise VideoError(f"no frame could be decoded ({_short(exc)})") from exc
            log.warning("decoding stopped after %d frames: %s", len(frames), _short(exc))
    finally:
        container.close()
    if not frames:
        raise VideoError("no frame could be decoded")
    return DecodedVideo(frames=np.stack(frames), info=info, truncated=truncated)


@dataclass
class Clips:
    clips: np.ndarray  # (K, T, 3, H, W) float32 in [0, 1]
    spans: list[tuple[int, int]]  # first and last source frame of each clip (inclusive)
    truncated: bool  # clips beyond the cap were dropped


def cut_clips(frames: np.ndarray, length: int, max_clips: int) -> Clips:
    """Non-overlapping clips of ``length`` frames; a final partial clip (or a short video) loops.

    Fewer than 2 frames carry no motion, so such a "video" is refused rather than classified.
    """
    n = int(frames.shape[0])
    if n < 2:
        raise VideoTooShort(f"the video has {n} frame(s); at least 2 are needed to see motion")
    count = math.ceil(n / length)
    truncated = count > max_clips
    count = min(count, max_clips)
    indices, spans = [], []
    for k in range(count):
        start = k * length
        available = min(length, n - start)
        if available < 2 and k > 0:
            # One leftover frame would make a motionless clip: loop over the previous clip's tail instead.
            start, available = n - min(n, length), min(n, length)
        indices.append([start + (j % available) for j in range(length)])
        spans.append((start, start + available - 1))
    selected = frames[np.asarray(indices)]  # (K, T, H, W, 3) uint8
    clips = selected.transpose(0, 1, 4, 2, 3).astype(np.float32) / 255.0
    return Clips(clips=clips, spans=spans, truncated=truncated)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) or (N, H, W, 3) floats in [0, 1] -> (N, H, W, 3) uint8 (rounded, not truncated)."""
    if frames.ndim != 4:
        raise ValueError(f"expected 4-d frames, got shape {frames.shape}")
    if frames.shape[1] == 3 and frames.shape[-1] != 3:
        frames = frames.transpose(0, 2, 3, 1)
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def _encode(frames: np.ndarray, out, fmt: str, codec: str, pix_fmt: str, fps: Fraction, options: dict) -> None:
    n, h, w, _ = frames.shape
    with av.open(out, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = options
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def encode_mp4(frames: np.ndarray, out: str | Path | io.BytesIO, fps: Fraction = DEFAULT_FPS, crf: int = 15) -> None:
    """H.264 (yuv420p, so any player shows it) of (N, H, W, 3) uint8 frames; H and W must be even."""
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise VideoError(f"H.264 yuv420p needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")
    _encode(frames, out, "mp4", "libx264", "yuv420p", fps, {"crf": str(crf), "preset": "veryfast"})


def encode_ffv1(frames: np.ndarray, out: str | Path | io.BytesIO, fps: Fraction = DEFAULT_FPS) -> None:
    """Lossless FFV1 in Matroska, RGB (bgr0): decodes to exactly the uint8 frames given."""
    _encode(frames, out, "matroska", "ffv1", "bgr0", fps, {})


def encode_npz(frames: np.ndarray, out: str | Path | io.BytesIO) -> None:
    """The float frames themselves, (N, 3, H, W) float32 in [0, 1], for users who need exact pixels."""
    np.savez_compressed(out, frames=np.asarray(frames, dtype=np.float32))


def read_frames(source: str | Path | io.BytesIO) -> np.ndarray:
    """All frames of a (small, trusted) video as (N, H, W, 3) uint8: for tests and round trips."""
    with av.open(source) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
