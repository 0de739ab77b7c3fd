"""Demo training, bundling and calibration at toy sizes: they run, checkpoint, resume and validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.bundle import demo as demo_bundle
from models.data import CLASSES, make_clip
from models.errors import UserError
from models.training import common as train_common
from models.training import i3d as train_i3d
from models.training import raft as train_raft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def raft_run(tmp_path_factory) -> Path:
    """A 2-step RAFT run (tiny batch, 3-frame clips): shared by the tests that need a trained RAFT."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run")
    cfg = train_raft.RaftTrainConfig(
        run_dir=run_dir, max_steps=2, batch_size=2, frames=3, eval_clips=1, checkpoint_every=1
    )
    summary = train_raft.train_raft(cfg)
    assert summary["steps"] == 2
    return run_dir


def test_one_cycle_schedule():
    assert train_common.one_cycle_lr(1.0, 0.0) == pytest.approx(0.1)
    assert train_common.one_cycle_lr(1.0, 0.05) == pytest.approx(1.0)
    assert train_common.one_cycle_lr(1.0, 1.0) == pytest.approx(0.05)
    assert train_common.one_cycle_lr(1.0, 0.5) > train_common.one_cycle_lr(1.0, 0.9)


def test_sequence_loss_weights_later_iterates_more():
    target = torch.zeros(1, 2, 4, 4)
    early_bad = [torch.ones_like(target), torch.zeros_like(target)]
    late_bad = [torch.zeros_like(target), torch.ones_like(target)]
    assert train_raft.sequence_loss(early_bad, target, 0.8) == pytest.approx(0.8)
    assert train_raft.sequence_loss(late_bad, target, 0.8) == pytest.approx(1.0)


def test_raft_training_checkpoints_and_resumes(raft_run: Path):
    state = torch.load(raft_run / train_raft.RAFT_CKPT, map_location="cpu", weights_only=False)
    assert state["state"]["step"] == 2 and "optimizer" in state
    final = torch.load(raft_run / train_raft.RAFT_FINAL, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in final.values())  # a bare torchvision state dict
    summary = json.loads((raft_run / "raft_summary.json").read_text())
    assert summary["val_epe_before"] > 0 and summary["val_epe_after"] > 0

    # Re-running with a larger budget continues from step 2 instead of starting over.
    cfg = train_raft.RaftTrainConfig(run_dir=raft_run, max_steps=3, batch_size=2, frames=3, eval_clips=1)
    assert train_raft.train_raft(cfg)["steps"] == 3
    resumed = torch.load(raft_run / train_raft.RAFT_CKPT, map_location="cpu", weights_only=False)
    assert resumed["state"]["step"] == 3
    assert resumed["state"]["epe_before"] == state["state"]["epe_before"]  # measured once, kept


def test_pair_batches_are_a_function_of_the_step(tmp_path: Path):
    cfg = train_raft.RaftTrainConfig(run_dir=tmp_path, batch_size=2, frames=3)
    a, b = train_raft._pair_batch(5, cfg), train_raft._pair_batch(5, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], train_raft._pair_batch(6, cfg)[0])


def test_loader_workers_render_the_same_stream(tmp_path: Path):
    """Batches rendered ahead by worker processes are the in-process stream, in order: a GPU run
    with --loader-workers trains on exactly the data a CPU run would."""
    cfg = train_raft.RaftTrainConfig(run_dir=tmp_path, batch_size=2, frames=3, max_steps=7)
    ahead = list(train_common.ordered_loader(train_raft._PairBatches(cfg, first_step=4), workers=2))
    assert len(ahead) == 3
    for step, batch in zip(range(4, 7), ahead, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(batch, train_raft._pair_batch(step, cfg), strict=True))


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="CUDA is not available"):
        train_raft.train_raft(train_raft.RaftTrainConfig(run_dir=tmp_path, max_steps=1, device="cuda"))


def test_flip_flows_maps_labels():
    _, flows = make_clip(3, CLASSES.index("translate_right"))
    labels = torch.tensor([CLASSES.index("translate_right")])
    yes, no = torch.tensor([True]), torch.tensor([False])
    mirrored, new = train_i3d.flip_flows(flows.unsqueeze(0), labels, yes, no)
    assert CLASSES[int(new)] == "translate_left"
    assert float(mirrored[..., 0, :, :].sum()) == pytest.approx(-float(flows[:, 0].sum()), rel=1e-5)
    _, vert = train_i3d.flip_flows(flows.unsqueeze(0), torch.tensor([CLASSES.index("rotate_cw")]), no, yes)
    assert CLASSES[int(vert)] == "rotate_ccw"
    _, same = train_i3d.flip_flows(flows.unsqueeze(0), torch.tensor([CLASSES.index("zoom_in")]), yes, yes)
    assert CLASSES[int(same)] == "zoom_in"


def test_i3d_loss_decreases_on_a_tiny_batch():
    from models.nets.i3d import build_i3d, flow_to_classifier_input

    torch.manual_seed(0)
    model = build_i3d(len(CLASSES), width=0.125)
    flows = torch.stack([make_clip(i, i % 4, frames=4)[1] for i in range(4)])
    labels = torch.arange(4)
    x = flow_to_classifier_input(flows)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def _i3d_cfg(run_dir: Path, epochs: int) -> train_i3d.I3DTrainConfig:
    return train_i3d.I3DTrainConfig(
        run_dir=run_dir,
        epochs=epochs,
        width=0.125,
        train_clips=2,
        val_clips=2,
        noisy_fraction=0.5,
        gt_clips=2,
        batch_size=4,
        frames=3,
        chunk=2,
        flow_updates=2,
    )


def test_i3d_training_caches_flows_checkpoints_and_resumes(raft_run: Path):
    summary = train_i3d.train_i3d(_i3d_cfg(raft_run, 1))
    assert summary["epochs"] == 1 and 0.0 <= summary["val_acc"] <= 1.0
    assert (raft_run / train_i3d.I3D_FINAL).is_file()
    assert sorted(p.name.split("_")[1] for p in (raft_run / "flows").glob("train_*.pt")) == ["clean", "noisy"]
    summary = train_i3d.train_i3d(_i3d_cfg(raft_run, 2))
    assert summary["epochs"] == 2 and len(summary["history"]) == 2


def test_defended_flows_are_the_purified_clips_flows(raft_run: Path, tmp_path: Path):
    """The "defended" cache holds RAFT's flow of each clip after the default purification: the same
    as running purify then RAFT by hand, and not the clean clip's flow."""
    from models.defense.purify import DefenseConfig, purify

    cfg = train_i3d.I3DTrainConfig(run_dir=tmp_path, frames=3, chunk=2, flow_batch=1, flow_updates=2, loader_workers=1)
    video_raft = train_i3d.load_trained_raft(raft_run)
    flows, labels = train_i3d.cache_flows(video_raft, tmp_path, "train", 0, 2, kind="defended", cfg=cfg)
    clean, _ = train_i3d.cache_flows(video_raft, tmp_path, "train", 0, 2, kind="clean", cfg=cfg)
    clips = torch.stack([make_clip(i, i % len(CLASSES), frames=3)[0] for i in range(2)])
    with torch.no_grad():
        expected = video_raft(purify(clips, video_raft, DefenseConfig()).restored, num_flow_updates=2)["forward"]
    assert labels.tolist() == [0, 1]
    assert torch.allclose(flows.float(), expected, atol=1e-2)
    assert not torch.allclose(flows, clean)
    with pytest.raises(ValueError, match="kind"):
        train_i3d.cache_flows(video_raft, tmp_path, "train", 0, 2, kind="attacked", cfg=cfg)


def test_bundle_demo_calibrates_and_records_training(raft_run: Path, tmp_path: Path):
    from models.bundle.load import load_bundle

    train_i3d.train_i3d(_i3d_cfg(raft_run, 1))
    out = demo_bundle.bundle_demo(
        raft_run, tmp_path / "b", frames=3, width=0.125, command="test", calib_clips=2, test_clips=2
    )
    bundle = load_bundle(out)
    meta = bundle.meta
    assert meta.labels == list(CLASSES) and meta.input.frames == 3
    assert meta.calibration is not None and meta.calibration.n == 2 and len(meta.calibration.sample) == 2
    assert meta.training["raft"]["steps"] >= 2 and meta.training["command"] == "test"
    assert "flow_epe" in meta.training["test"] and "top1_undefended" in meta.training["test"]


def test_summarise_quantiles_and_threshold():
    from models.defense.calibrate import summarise

    cal = summarise([float(i) for i in range(101)] + [float("nan")], threshold_quantile=0.95, sample_size=11)
    assert cal.n == 101 and cal.quantiles["p50"] == pytest.approx(50) and cal.quantiles["p99"] == pytest.approx(99)
    assert cal.threshold == pytest.approx(95) and cal.mean == pytest.approx(50)
    assert cal.sample == [float(v) for v in range(0, 101, 10)]
    with pytest.raises(UserError):
        summarise([])


def _cli(*argv: str) -> int:
    from service.cli import main

    return main(list(argv))


def test_bundle_cli_create_verify_and_refusals(tmp_path: Path, capsys):
    from models.bundle.load import make_random_bundle

    src = make_random_bundle(tmp_path / "src", frames=3, num_classes=3, i3d_width=0.125)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    out = tmp_path / "made"
    common = [
        "--raft",
        str(src / "flow.pth"),
        "--i3d",
        str(src / "classifier.pth"),
        "--frames",
        "3",
        "--size",
        "64",
        "--corr-levels",
        "3",
        "--name",
        "mine",
        "--version",
        "2",
    ]
    assert _cli("bundle", "create", *common, "--labels", str(labels), "--out", str(out)) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["classifier"]["width"] == 0.125 and set(meta["sha256"]) == {"flow.pth", "classifier.pth"}
    assert _cli("bundle", "verify", str(out)) == 0
    assert "ok: mine v2" in capsys.readouterr().out

    wrong = tmp_path / "wrong.txt"
    wrong.write_text("a\nb\n")
    assert _cli("bundle", "create", *common, "--labels", str(wrong), "--out", str(tmp_path / "x")) == 2
    assert "output classes" in capsys.readouterr().err
    missing = ["--raft", str(tmp_path / "nope.pth")] + common[2:]
    assert _cli("bundle", "create", *missing, "--labels", str(labels), "--out", str(tmp_path / "y")) == 2
    assert "not found" in capsys.readouterr().err
    # A bundle whose RAFT has a different pyramid than declared: refused, nothing left behind.
    bad_levels = [*common[:-6], "--corr-levels", "4", *common[-4:]]
    assert _cli("bundle", "create", *bad_levels, "--labels", str(labels), "--out", str(tmp_path / "z")) == 2
    capsys.readouterr()
    # Tampered weights: verify refuses with the sha256 message.
    with open(out / "classifier.pth", "ab") as handle:
        handle.write(b"\0")
    assert _cli("bundle", "verify", str(out)) == 2
    assert "sha256" in capsys.readouterr().err


def test_bundle_test_cli_measures_epe_and_accuracy(tmp_path: Path, capsys):
    from models.bundle.load import make_random_bundle

    bundle = make_random_bundle(tmp_path / "b", frames=3, num_classes=len(CLASSES), i3d_width=0.125, steps=1)
    assert _cli("bundle", "test", str(bundle), "--split", "val", "--n", "3", "--defended-n", "2") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 3 and report["defended_n"] == 2
    assert 0 <= report["top1_undefended"] <= 1 and 0 <= report["top1_defended"] <= 1
    assert report["moving_flow_epe"] > 0 and report["moving_zero_flow_epe"] > report["zero_flow_epe"]
    assert _cli("bundle", "test", str(bundle), "--n", "2", "--defended-n", "3") == 2
    assert "--defended-n" in capsys.readouterr().err


def test_calibrate_cli_on_synthetic_split(tmp_path: Path, capsys):
    from models.bundle.load import make_random_bundle
    from models.bundle_meta import read_bundle_meta

    bundle = make_random_bundle(tmp_path / "b", frames=3, num_classes=len(CLASSES), i3d_width=0.125)
    assert _cli("calibrate", "--bundle", str(bundle), "--synthetic-split", "val", "--n", "3", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 3 and "undefended_accuracy" in report
    cal = read_bundle_meta(bundle).calibration
    assert cal is not None and cal.n == 3 and cal.threshold == pytest.approx(cal.quantiles["p99"])
    assert _cli("calibrate", "--bundle", str(bundle), "--clips", str(tmp_path / "none"), "--n", "2") == 2
