"""worker.video: bounded decode, resize/crop, clip cutting and the three restored-video encodings."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import smooth_frames, write_video

from models.errors import VideoError
from worker.video import (
    VideoLimits,
    cut_clips,
    decode_video,
    encode_ffv1,
    encode_mp4,
    encode_npz,
    probe_video,
    read_frames,
    resize_plan,
    to_uint8,
)


@pytest.mark.parametrize("kind", ["mp4", "mkv", "avi"])
def test_decode_resizes_and_crops_every_container(tmp_path, kind):
    path = write_video(tmp_path / f"v.{kind}", count=10, height=80, width=96, kind=kind)
    info = probe_video(path)
    assert (info.width, info.height) == (96, 80)
    video = decode_video(path, 64, 64, "short_side")
    assert video.frames.shape == (10, 64, 64, 3) and video.frames.dtype == np.uint8
    assert not video.truncated


def test_resize_plan_short_side_and_stretch():
    assert resize_plan(320, 240, 112, 112, "short_side") == (150, 112)
    assert resize_plan(240, 320, 112, 112, "short_side") == (112, 150)
    assert resize_plan(320, 240, 64, 64, "stretch") == (64, 64)


def test_limits_refuse_before_decoding(tmp_path):
    path = write_video(tmp_path / "v.mp4", count=6, height=80, width=96)
    with pytest.raises(VideoError, match="pixels"):
        probe_video(path, VideoLimits(max_pixels=96 * 80 - 1))
    with pytest.raises(VideoError, match="lasts"):
        probe_video(path, VideoLimits(max_duration_s=0.1))
    video = decode_video(path, 64, 64, limits=VideoLimits(max_frames=4))
    assert video.frames.shape[0] == 4 and video.truncated


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"this is not a video at all" * 40, "not a readable video")],
)
def test_bad_bytes_are_video_errors(tmp_path, content, message):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=message):
        probe_video(path)
    with pytest.raises(VideoError):
        decode_video(path, 64, 64)


def test_truncated_mp4_and_single_frame(tmp_path):
    full = write_video(tmp_path / "v.mp4", count=12).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(VideoError):
        probe_video(cut)
    single = write_video(tmp_path / "one.mp4", count=1)
    with pytest.raises(VideoError, match="at least 2"):
        probe_video(single)
    with pytest.raises(VideoError, match="at least 2"):
        cut_clips(decode_video(single, 64, 64).frames, 4, 8)


def test_cut_clips_loops_partial_and_short_videos():
    frames = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    clips = cut_clips(frames, 4, 16)
    assert clips.clips.shape == (3, 4, 3, 2, 2)
    assert clips.spans == [(0, 3), (4, 7), (8, 9)]
    assert [round(v * 255) for v in clips.clips[2, :, 0, 0, 0]] == [8, 9, 8, 9]
    short = cut_clips(frames[:3], 4, 16)
    assert [round(v * 255) for v in short.clips[0, :, 0, 0, 0]] == [0, 1, 2, 0]
    capped = cut_clips(frames, 4, 2)
    assert capped.clips.shape[0] == 2 and capped.truncated
    # A single leftover frame would be motionless: the last clip re-uses the tail instead.
    tail = cut_clips(frames[:9], 4, 16)
    assert tail.spans[-1] == (5, 8)


def test_encodings_round_trip(tmp_path):
    frames = smooth_frames(6, 64, 64)
    lossless = io.BytesIO()
    encode_ffv1(frames, lossless)
    lossless.seek(0)
    assert np.array_equal(read_frames(lossless), frames)
    mp4 = tmp_path / "r.mp4"
    encode_mp4(frames, mp4)
    decoded = read_frames(mp4)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 6  # yuv420p chroma subsampling
    floats = frames.transpose(0, 3, 1, 2).astype(np.float32) / 255
    buffer = io.BytesIO()
    encode_npz(floats, buffer)
    buffer.seek(0)
    assert np.array_equal(np.load(buffer)["frames"], floats)
    assert np.array_equal(to_uint8(floats), frames)


def test_real_clips_decode(shared_data):
    for path in sorted(shared_data.glob("*.mp4")) + sorted(shared_data.glob("*.avi")):
        video = decode_video(path, 64, 64, limits=VideoLimits(), max_frames=40)
        assert video.frames.shape == (40, 64, 64, 3)
