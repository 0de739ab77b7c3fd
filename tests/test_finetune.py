"""``motionguard finetune``: a new bundle from generated videos that verifies and beats chance on
held-out videos; cached flows and checkpoints resume; bad folders get one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from models.bundle_meta import DEFAULT_BUNDLE_DIR
from models.errors import UserError
from models.training.classifier_fit import FitConfig, fit_classifier
from models.training.finetune import split_by_video
from service.cli import main
from worker.cli.synthetic_videos import write_motionshapes_videos

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLASSES = {"left": "translate_left", "right": "translate_right", "zoom": "zoom_in"}


def _finetune(videos: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "finetune",
            str(videos),
            "--out",
            str(out),
            "--clips-per-video",
            "1",
            "--val-fraction",
            "0.34",
            "--test-fraction",
            "0.34",
            "--epochs",
            "15",
            "--patience",
            "5",
            "--threads",
            "1",
            "--json",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The demo bundle fine-tuned on 3 new labels x 3 generated videos (1 train, 1 val, 1 test each)."""
    root = tmp_path_factory.mktemp("finetune")
    write_motionshapes_videos(root / "videos", per_class=3, classes=CLASSES, frames=8)
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert _finetune(root / "videos", root / "bundle") == 0
    return root, root / "bundle", json.loads(buffer.getvalue())


def test_finetuned_bundle_verifies_and_beats_chance_on_held_out_videos(tuned, capsys):
    root, bundle, report = tuned
    assert report["videos"] == {"train": 3, "val": 3, "test": 3}
    assert report["test"]["videos"] == 3 and report["test"]["video_accuracy"] > 1 / 3  # chance: 1/3
    assert main(["bundle", "verify", str(bundle)]) == 0
    assert "calibrated" in capsys.readouterr().out
    meta = json.loads((bundle / "bundle.json").read_text())
    source = json.loads((DEFAULT_BUNDLE_DIR / "bundle.json").read_text())
    assert meta["labels"] == ["left", "right", "zoom"] and meta["classifier"]["num_classes"] == 3
    assert meta["classifier"]["temporal_pool"] == source["classifier"]["temporal_pool"]
    assert meta["sha256"]["flow.pth"] == source["sha256"]["flow.pth"]  # the bundle's RAFT, unchanged
    assert meta["calibration"]["n"] == 3  # the clean validation clips
    recorded = meta["training"]["finetune"]
    assert recorded["command"].startswith("motionguard finetune ") and "--test-fraction" in recorded["command"]
    assert recorded["source_bundle"]["name"] == source["name"]


def test_held_out_accuracy_and_calibration_are_the_bundles_own(tuned, tmp_path):
    """The report's test accuracy and the calibration come from cached flows and MC losses: they
    equal what the written bundle computes from the videos afresh (decoded as the service does)."""
    import shutil

    from models.bundle.load import load_bundle
    from models.defense.calibrate import calibrate_bundle
    from worker.cli.finetune import decode_folder, scan_folder

    root, bundle, report = tuned
    loaded = load_bundle(bundle)
    run = json.loads((root / "bundle.run" / "finetune_run.json").read_text())
    videos = decode_folder(root / "videos", scan_folder(root / "videos"), loaded.meta, 1)
    split_of = {key: name for name, keys in run["videos"].items() for key in keys}
    test = [v for v in videos if split_of[v.key] == "test"]
    with torch.no_grad():
        right = sum(int(loaded.pipeline.predict(v.clips, defend=False).probs.mean(0).argmax()) == v.label for v in test)
    assert right / len(test) == report["test"]["video_accuracy"]
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    val = ((clip, v.label) for v in videos if split_of[v.key] == "val" for clip in v.clips)
    fresh, _ = calibrate_bundle(copy, val)
    assert fresh.threshold == pytest.approx(loaded.meta.calibration.threshold, rel=1e-5)


def test_rerun_resumes_from_cached_flows_and_checkpoint(tuned, caplog, capsys):
    root, bundle, report = tuned
    run_dir = root / "bundle.run"
    caches = {p: p.stat().st_mtime_ns for p in (run_dir / "flows").glob("*.pt")}
    assert len(caches) == 9  # one file per video
    with caplog.at_level(logging.INFO):
        assert _finetune(root / "videos", bundle, "--force") == 0
    again = json.loads(capsys.readouterr().out)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "flows").glob("*.pt")} == caches  # not recomputed
    assert "resuming finetune training" in caplog.text
    assert again["best_epoch"] == report["best_epoch"] and again["epochs"] == report["epochs"]
    # The run directory belongs to that split: another seed (another split) is refused.
    assert _finetune(root / "videos", root / "other", "--run-dir", str(run_dir), "--seed", "1") == 2
    assert "different" in capsys.readouterr().err


def test_full_finetune_trains_the_backbone_too(tuned, tmp_path, capsys):
    """--full: the whole I3D trains (on the same cached flows, copied: no RAFT pass here)."""
    import shutil

    root, bundle, _ = tuned
    run_dir = tmp_path / "run"
    shutil.copytree(root / "bundle.run" / "flows", run_dir / "flows")
    out = tmp_path / "full"
    assert _finetune(root / "videos", out, "--full", "--epochs", "2", "--run-dir", str(run_dir)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trained"] == "whole I3D" and report["epochs"] == 2
    first = "Conv3d_1a_7x7.conv3d.weight"
    tuned_head = torch.load(bundle / "classifier.pth", weights_only=True)
    full = torch.load(out / "classifier.pth", weights_only=True)
    source = torch.load(DEFAULT_BUNDLE_DIR / "classifier.pth", weights_only=True)
    assert torch.equal(tuned_head[first], source[first])  # head-only fine-tuning keeps the backbone
    assert not torch.equal(full[first], tuned_head[first])  # the backbone moved


def _one_line_error(capsys, *argv: str) -> str:
    assert main(["finetune", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
    assert err.startswith("motionguard: error:")
    return err


def test_bad_folders_get_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "not a directory" in _one_line_error(capsys, str(tmp_path / "missing"), "--out", out)
    one = tmp_path / "one"
    write_motionshapes_videos(one, per_class=1, classes={"left": "translate_left"}, frames=4)
    assert "at least 2 label folders" in _one_line_error(capsys, str(one), "--out", out)
    (one / "empty").mkdir()
    assert "class 'empty' has no videos" in _one_line_error(capsys, str(one), "--out", out)
    (one / "empty" / "clip.mp4").write_bytes(b"not a video at all")
    assert "none of its 1 file(s) is a decodable video" in _one_line_error(capsys, str(one), "--out", out)
    nested = tmp_path / "nested"
    write_motionshapes_videos(nested, per_class=1, classes={"left": "translate_left"}, frames=4)
    write_motionshapes_videos(nested / "right", per_class=1, classes={"fast": "translate_right"}, frames=4)
    assert "'right/fast' would contain a slash" in _one_line_error(capsys, str(nested), "--out", out)
    assert not (tmp_path / "out").exists()


def test_too_few_videos_for_the_split_is_refused():
    with pytest.raises(UserError, match="class 'b' has 1 video"):
        split_by_video([0, 0, 1], ["a", "b"], 0.2, 0.0, seed=0)


def test_split_is_by_video_per_class_and_deterministic():
    labels = [i % 3 for i in range(30)]
    names = ["a", "b", "c"]
    splits = split_by_video(labels, names, 0.2, 0.2, seed=0)
    assert splits == split_by_video(labels, names, 0.2, 0.2, seed=0)
    assert sorted(sum(splits.values(), [])) == list(range(30))  # every video in exactly one split
    for ids in splits.values():
        assert sorted({labels[i] for i in ids}) == [0, 1, 2]
    assert [len(ids) for ids in splits.values()] == [18, 6, 6]
    assert splits != split_by_video(labels, names, 0.2, 0.2, seed=1)


def test_early_stopping_on_validation_accuracy(tmp_path):
    """Validation labels unrelated to the inputs: accuracy stops improving, so training stops after
    ``patience`` epochs without a strictly better score, far before the epoch budget."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    x, y = torch.randn(64, 8), (torch.arange(64) % 2)
    val = (torch.randn(32, 8), torch.randint(0, 2, (32,)))
    cfg = FitConfig(epochs=200, max_minutes=5, lr=1e-2, batch_size=16, patience=3, desc="toy")
    state = fit_classifier(
        model, model, x, y, {"val_acc": val}, cfg, ckpt_path=tmp_path / "s.pt", best_path=tmp_path / "b.pt"
    )
    assert state.get("stopped_early") and state["epoch"] - state["improved_epoch"] == 3 and state["epoch"] < 200
    assert (tmp_path / "b.pt").is_file()
