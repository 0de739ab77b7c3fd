"""Shared fixtures. Keep torch on one thread in tests: the machine has 2 cores shared with workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # the API-only parts of the suite need no torch
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real clips folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory) -> Path:
    """A tiny randomly initialised bundle: 4 frames, 64x64, 3 classes, 2 defence steps."""
    from models.bundle import make_random_bundle

    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "random")


def smooth_frames(count: int, height: int, width: int, shift: tuple[int, int] = (2, 1), seed: int = 0):
    """(count, height, width, 3) uint8: a smooth random texture translated by ``shift`` px per frame.

    Smooth so that H.264's chroma subsampling stays close to lossless and the codec error tests stay
    meaningful; numpy only, so the API-side tests need no torch.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(0.05, 0.2, 3), rng.uniform(0.05, 0.2, 3), rng.uniform(0, 6.3, 6)
    frames = []
    for t in range(count):
        x, y = xx - shift[0] * t, yy - shift[1] * t
        image = np.zeros((height, width, 3), np.float32)
        for c in range(3):
            image[..., c] = 0.5 + 0.25 * np.sin(fx[c] * x + phase[c]) * np.cos(fy[c] * y + phase[c + 3])
            image[..., c] += 0.2 * np.sin(0.5 * fx[c] * (x + y) + phase[c])
        frames.append(np.clip(image * 255, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_video(path: Path, count: int = 12, height: int = 80, width: int = 96, kind: str = "mp4", **kwargs) -> Path:
    """A synthetic test video made with PyAV (mp4 = H.264, mkv = FFV1, avi = MPEG-4 part 2)."""
    import av

    frames = smooth_frames(count, height, width, **kwargs)
    codec, fmt, pix = {
        "mp4": ("libx264", "mp4", "yuv420p"),
        "mkv": ("ffv1", "matroska", "bgr0"),
        "avi": ("mpeg4", "avi", "yuv420p"),
    }[kind]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
