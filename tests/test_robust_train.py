"""Adversarial fine-tune through RAFT (models.training.robust.py): on a tiny random bundle, the sequence
loss sees the iterates RAFT serves, validation's EPE is against the exact flow, an interrupted run
resumes at its stored step, and the written bundle loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models.training.robust as robust_train
from models.bundle.load import load_bundle, make_random_bundle
from models.data.synthetic import make_clip, split_seed
from models.training.robust import (
    STATE_FILE,
    Models,
    RobustConfig,
    StageConfig,
    epe_per_clip,
    flow_iterates,
    train_robust,
    val_set,
    validate,
    write_robust_bundle,
)

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "bundles" / "motionshapes-v1"


def _config(tmp_path, source, **stage_steps) -> RobustConfig:
    steps = {"flow": 2, "classifier": 1, "joint": 1, **stage_steps}
    return RobustConfig(
        work_dir=tmp_path / "work",
        source=source,
        stages={name: StageConfig(minutes=10.0, lr=1e-4, ramp=0.5, max_steps=n) for name, n in steps.items()},
        batch_size=2,
        frames=4,
        size=64,
        val_clips=2,
        val_batch=2,
        val_pgd_steps=1,
        val_minutes=0.0,  # validate (and checkpoint) after every step
        train_updates=2,
        classifier_flow_updates=2,
        infer_updates=3,
        threads=1,
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_random_bundle(tmp_path_factory.mktemp("src") / "bundle", frames=4, num_classes=3)


def test_iterates_end_at_the_served_flow_and_epe_is_against_exact_flow(source, tmp_path):
    cfg = _config(tmp_path, source)
    models = Models(load_bundle(source).pipeline)
    clips, gts, labels = val_set(2, 4, 64, 3)
    with torch.no_grad():
        its = flow_iterates(models.flow, clips, 3)
        served = models.flow(clips, 3)["forward"]
    assert len(its) == 3 and torch.allclose(its[-1], served, atol=1e-5)
    exact = make_clip(split_seed("val", 1), 1, 4, 64)[1]
    assert torch.equal(gts[1], exact)
    record = validate(models, cfg, (clips, gts, labels))
    assert record["clean_epe"] == pytest.approx(float(epe_per_clip(served, gts).mean()), rel=1e-4)
    assert record["clean_epe"] != pytest.approx(float(epe_per_clip(served, torch.zeros_like(gts)).mean()), rel=1e-3)
    assert record["pgd10_epe"] > 0 and record["n"] == 2


def test_interrupted_run_resumes_at_its_stored_step_and_bundle_loads(source, tmp_path, monkeypatch):
    cfg = _config(tmp_path, source)
    real_step = robust_train._train_step
    seen: list[tuple[str, int]] = []

    def crash_on_third(models, optimizers, stage, step, *args, **kwargs):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append((stage, step))
        return real_step(models, optimizers, stage, step, *args, **kwargs)

    monkeypatch.setattr(robust_train, "_train_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train_robust(cfg)
    saved = torch.load(cfg.work_dir / STATE_FILE, map_location="cpu", weights_only=False)
    assert saved["state"]["global_step"] == 2 and saved["state"]["stage_index"] == 1  # flow's 2 steps stored
    with pytest.raises(Exception, match="--resume"):
        train_robust(cfg)

    resumed: list[tuple[str, int]] = []

    def record(models, optimizers, stage, step, *args, **kwargs):
        resumed.append((stage, step))
        return real_step(models, optimizers, stage, step, *args, **kwargs)

    monkeypatch.setattr(robust_train, "_train_step", record)
    summary = train_robust(cfg, resume=True)
    assert seen == [("flow", 0), ("flow", 1)]
    assert resumed == [("classifier", 2), ("joint", 3)]
    assert summary["global_steps"] == 4
    stages = [r["stage"] for r in summary["curves"]]
    assert stages[0] == "start" and stages.count("flow") == 2 and "joint" in stages
    assert all(r["pgd10_epe"] > 0 and r["clean_epe"] > 0 for r in summary["curves"])

    out = write_robust_bundle(
        cfg, tmp_path / "robust", name="robust-test", version="0.1", command="test", calib_clips=4
    )
    bundle = load_bundle(out)
    assert (bundle.meta.name, bundle.meta.version) == ("robust-test", "0.1")
    assert bundle.meta.calibration is not None and bundle.meta.calibration.n == 4
    assert bundle.meta.flag is None  # the source's flag was measured on other models
    assert bundle.meta.training["curves"] == json.loads((cfg.work_dir / "curves.json").read_text())
    best = torch.load(cfg.work_dir / robust_train.BEST_FILE, map_location="cpu", weights_only=True)
    for name, value in bundle.pipeline.classifier.state_dict().items():
        assert torch.equal(value, best["classifier"][name])


def test_transferred_perturbations_come_from_the_transfer_source_within_budget(source, tmp_path):
    """A run continued from a trained bundle crafts its transferred perturbations on ``transfer_source``
    (PGD-k there, inside the eps ball, raising the source's loss), not on the bundle it starts from."""
    other = make_random_bundle(tmp_path / "other", frames=4, num_classes=3, seed=7)
    cfg = _config(tmp_path, source)
    cfg.transfer_source, cfg.source_attack_steps = other, 3
    loaded = robust_train._load_source(cfg, torch.device("cpu"), transfer=True)
    assert loaded.path.resolve() == other.resolve()
    assert robust_train._load_source(cfg, torch.device("cpu")).path.resolve() == source.resolve()
    attacker = Models(loaded.pipeline)
    clips, _, labels = val_set(2, 4, 64, 3)
    eps = 8 / 255
    adv = robust_train._source_pgd(attacker, clips, labels, eps, cfg, torch.Generator().manual_seed(0))
    assert float((adv - clips).abs().max()) <= eps + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        loss = [torch.nn.functional.cross_entropy(attacker.logits(x, cfg.grad_updates), labels) for x in (clips, adv)]
    assert loss[1] > loss[0]
    cfg.source_attack_steps = 0
    with pytest.raises(robust_train.UserError, match="source_attack_steps"):
        train_robust(cfg)


def test_flow_space_attack_stays_in_its_ball_and_the_classifier_still_trains(source, tmp_path):
    """The classifier stage's flow-space PGD keeps every flow within ``flow_eps`` px, raises the
    classifier's loss, and leaves the classifier's weights trainable (one step changes them)."""
    cfg = _config(tmp_path, source, flow=0, joint=0)
    cfg.flow_eps, cfg.flow_steps, cfg.source_attack_frac = 0.2, 3, 0.0
    models = Models(load_bundle(source).pipeline)
    clips, _, labels = val_set(2, 4, 64, 3)
    with torch.no_grad():
        flows = models.flow(clips, 2)["forward"]
    attacked = robust_train._flow_space_pgd(models, flows, labels, cfg, torch.Generator().manual_seed(0))
    assert float((attacked - flows).abs().max()) <= 0.2 + 1e-6
    with torch.no_grad():
        loss = [torch.nn.functional.cross_entropy(models.classify(f), labels) for f in (flows, attacked)]
    assert loss[1] > loss[0]
    before = [p.detach().clone() for p in models.classifier.parameters()]
    optimizers = robust_train._optimizers(models, cfg)
    out = robust_train._train_step(models, optimizers, "classifier", 0, 8 / 255, 1e-3, cfg, torch.device("cpu"))
    assert out["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, models.classifier.parameters(), strict=True))


def test_random_stop_varies_the_source_attacks_length_and_start(source, tmp_path, monkeypatch):
    """With ``source_attack_random_stop`` each batch's source PGD runs k in 1..steps steps of 2.5 eps / k,
    about half without random start (the harness's early first-success iterates), and stays in the ball."""
    import models.robustness.attacks.pgd as pgd_module

    calls: list[tuple[int, float, bool]] = []
    real = pgd_module.pgd

    def spy(logits_fn, x, y, epsilon, steps=20, step_size=None, random_start=True, **kwargs):
        calls.append((steps, step_size, random_start))
        return real(logits_fn, x, y, epsilon, steps, step_size, random_start, **kwargs)

    monkeypatch.setattr(pgd_module, "pgd", spy)
    cfg = _config(tmp_path, source)
    cfg.source_attack_steps, cfg.source_attack_random_stop = 4, True
    attacker = Models(load_bundle(source).pipeline)
    clips, _, labels = val_set(2, 4, 64, 3)
    eps = 8 / 255
    for seed in range(16):
        adv = robust_train._source_pgd(attacker, clips, labels, eps, cfg, torch.Generator().manual_seed(seed))
        assert float((adv - clips).abs().max()) <= eps + 1e-6
    steps = {k for k, _, _ in calls}
    assert steps <= {1, 2, 3, 4} and len(steps) >= 3
    assert all(size == pytest.approx(2.5 * eps / k) for k, size, _ in calls)
    assert {start for _, _, start in calls} == {True, False}


def test_transfer_accuracy_counts_a_clip_right_only_on_every_iterate(source, tmp_path):
    """Validation's transfer row judges each stored iterate of the source attack: a clip that one earlier
    iterate fools counts as fooled although the last iterate is classified right (shipped demo bundle:
    the random one predicts one class for every input)."""
    cfg = _config(tmp_path, source)
    cfg.val_pgd_steps, cfg.val_transfer_iterates = 3, (1, 2)
    iterates = robust_train.transfer_examples(Models(load_bundle(source).pipeline), cfg, val_set(2, 4, 64, 3))
    assert iterates.shape[:2] == (3, 2)  # steps 1, 2 and the last

    cfg.frames, cfg.infer_updates, cfg.val_pgd_steps = 8, 12, 1  # validate's own white-box PGD: 1 step
    models = Models(load_bundle(DEMO_BUNDLE).pipeline)
    clips, gts, _ = data = val_set(3, 8, 64, models.num_classes)
    with torch.no_grad():
        labels = models.logits(clips, cfg.infer_updates).argmax(1)
        other = torch.roll(clips, 1, dims=0)  # another class's clip in place of iterate 1
        fooled = models.logits(other, cfg.infer_updates).argmax(1) != labels
    assert bool(fooled.any())
    data = (clips, gts, labels)  # the clean clips are right by construction
    same = clips.unsqueeze(0).repeat(2, 1, 1, 1, 1, 1)
    assert validate(models, cfg, data, same)["transfer_acc"] == 1.0
    mixed = torch.stack([other, clips])
    assert validate(models, cfg, data, mixed)["transfer_acc"] == float((~fooled).float().mean())
