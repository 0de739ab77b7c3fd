"""worker.serving.inference + ``motionguard classify`` on a tiny random bundle (no Redis)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_video

from service.cli import main
from worker.video import decode_video, read_frames


@pytest.fixture(scope="module")
def bundle(random_bundle):
    from models.bundle.load import load_bundle

    return load_bundle(random_bundle)


def test_analyse_video_defended(tmp_path, bundle):
    from worker.serving.inference import analyse_video

    path = write_video(tmp_path / "v.mp4", count=10, height=80, width=96)
    result, frames = analyse_video(path, bundle, defend=True, top_k=2, steps=2)
    assert result["defended"] and len(result["labels"]) == 2
    assert [c["start_frame"] for c in result["clips"]] == [0, 4, 8]
    for clip in result["clips"]:
        assert clip["mc_loss_before"] > 0 and clip["mc_loss_after"] > 0
        assert len(clip["mc_trajectory"]) == 3
        assert clip["suspected_attack"] is False  # the random bundle has no calibration
    assert set(result["timings_ms"]) == {"decode", "defense", "classify", "encode", "total"}
    assert frames.shape == (12, 3, 64, 64)
    # Purification stays within eps_r of the resized input.
    resized = decode_video(path, 64, 64).frames.transpose(0, 3, 1, 2) / 255.0
    eps = result["defense"]["epsilon"]
    assert np.abs(frames[:8] - resized[:8]).max() <= eps + 1e-5
    scores = np.array([[e["score"] for e in sorted(c["labels"], key=lambda e: e["index"])] for c in result["clips"]])
    assert scores.shape == (3, 2)


def test_analyse_video_undefended_is_identity(tmp_path, bundle):
    from worker.serving.inference import analyse_video

    path = write_video(tmp_path / "v.mp4", count=4, height=64, width=64)
    result, frames = analyse_video(path, bundle, defend=False)
    assert not result["defended"]
    clip = result["clips"][0]
    assert clip["mc_loss_before"] == clip["mc_loss_after"]
    resized = decode_video(path, 64, 64).frames.transpose(0, 3, 1, 2) / 255.0
    assert np.allclose(frames, resized, atol=1e-6)


def test_classify_cli_json_and_restored(tmp_path, random_bundle, capsys):
    path = write_video(tmp_path / "v.avi", count=6, kind="avi")
    out = tmp_path / "restored.mp4"
    code = main(
        ["classify", str(path), "--bundle", str(random_bundle), "--json", "--restored", str(out), "--steps", "1"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"]["name"] == "random-test" and len(result["clips"]) == 2
    assert read_frames(out).shape == (8, 64, 64, 3)


def test_classify_cli_human_and_errors(tmp_path, random_bundle, capsys):
    path = write_video(tmp_path / "v.mp4", count=4)
    assert main(["classify", str(path), "--bundle", str(random_bundle), "--no-defend"]) == 0
    out = capsys.readouterr().out
    assert "defence: off" in out and "MC loss" in out
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    assert main(["classify", str(bad), "--bundle", str(random_bundle)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("motionguard: error:")
