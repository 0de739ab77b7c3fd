"""The adaptive defence (issue 18): keep-best, step schedules, early stop, random restarts, the
per-clip decision of ``defend=auto``, and the exact replay of what the purification did."""

from __future__ import annotations

import pytest
import torch

from models.defense.purify import DefenseConfig, descent_step, purify
from models.defense_mode import parse_mode
from models.nets.flow import build_video_raft

from helpers_video import translating_clip


@pytest.fixture(scope="module")
def flow_model():
    torch.manual_seed(0)
    return build_video_raft("raft_small", corr_levels=3).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pipeline(random_bundle):
    from models.bundle.load import load_bundle

    return load_bundle(random_bundle).pipeline


def _clips(n: int = 3, noise: float = 8 / 255) -> torch.Tensor:
    torch.manual_seed(3)
    clean = torch.cat([translating_clip(3, 64, (2, 1), seed=i) for i in range(n)])
    return (clean + (torch.rand_like(clean) * 2 - 1) * noise).clamp(0, 1)


def _replay(result, clip, flow_model, config) -> list[torch.Tensor]:
    xs = [result.iterates[0]]
    for k in range(config.steps):
        xs.append(descent_step(xs[-1], clip, flow_model, config, result.step_sizes[k])[0])
    return xs


@pytest.mark.parametrize(
    "config",
    [
        DefenseConfig(steps=4, keep_best=True, schedule="plateau", patience=1),
        DefenseConfig(steps=4, keep_best=True, schedule="cosine", random_start=3 / 255),
    ],
    ids=["plateau", "cosine-random-start"],
)
def test_iterates_replay_exactly_and_best_is_chosen(flow_model, config):
    clip = _clips(2)
    result = purify(clip, flow_model, config, keep_iterates=True)
    assert len(result.iterates) == config.steps + 1 and result.step_sizes.shape == (config.steps, 2)
    for mine, replayed in zip(result.iterates, _replay(result, clip, flow_model, config), strict=True):
        assert torch.equal(mine, replayed)
    assert torch.equal(result.chosen, result.trajectory.argmin(0))
    for i, k in enumerate(result.chosen.tolist()):
        assert torch.equal(result.restored[i], result.iterates[k][i])
    assert (result.restored - clip).abs().max() <= config.epsilon + 1e-6
    if config.schedule == "cosine":
        assert result.step_sizes[-1, 0] < result.step_sizes[0, 0]
        assert not torch.equal(result.start, clip) and (result.start - clip).abs().max() <= 3 / 255 + 1e-6


def test_schedules():
    from models.defense.purify import _next_step_sizes

    step = torch.full((2,), 2 / 255)
    since_best = torch.tensor([2, 1])  # clip 0: no improvement for `patience` steps, clip 1: one step
    halved = _next_step_sizes(DefenseConfig(schedule="plateau", patience=2), 3, step, since_best)
    assert halved.tolist() == pytest.approx([1 / 255, 2 / 255]) and since_best.tolist() == [0, 1]
    cosine = DefenseConfig(steps=4, schedule="cosine")
    sizes = [_next_step_sizes(cosine, k, step, since_best)[0].item() for k in range(3)]
    assert sizes == pytest.approx([2 / 255 * 0.5 * (1 + c) for c in (2**-0.5, 0.0, -(2**-0.5))])
    assert torch.equal(_next_step_sizes(DefenseConfig(), 0, step, since_best), step)


def test_early_stop_per_clip_and_start_loss_costs_nothing(flow_model):
    clip = _clips(3)
    plain = purify(clip, flow_model, DefenseConfig(steps=3))
    losses = plain.trajectory
    # a target between the clips' starting losses: clip 0 is already under it, the others are not
    order = losses[0].argsort()
    target = float((losses[0, order[0]] + losses[0, order[1]]) / 2)
    config = DefenseConfig(steps=3, stop_below=target)
    calls = []
    result = purify(clip, flow_model, config, on_step=lambda k, loss: calls.append(k), start_loss=losses[0])
    first = int(order[0])
    assert result.steps_taken[first] == 0 and bool(result.stopped[first]) and result.chosen[first] == 0
    assert torch.equal(result.restored[first], clip[first])
    assert result.trajectory[:, first].eq(losses[0, first]).all()
    others = [i for i in range(3) if i != first]
    for i in others:  # the other clips run as they would have alone, until they reach the target
        ran = int(result.steps_taken[i])
        assert 1 <= ran <= 3
        assert torch.allclose(result.trajectory[:ran, i], losses[:ran, i], atol=1e-6)
        assert bool(result.stopped[i]) == bool(losses[:3, i].le(target).any())
    assert calls == list(range(max(int(result.steps_taken.max()), 0)))


def test_cancellation_at_a_step(flow_model):
    class Stop(Exception):
        pass

    def on_step(k, loss):
        if k == 1:
            raise Stop

    with pytest.raises(Stop):
        purify(_clips(1), flow_model, DefenseConfig(steps=5, keep_best=True, schedule="plateau"), on_step=on_step)


def test_paper_defaults_unchanged(flow_model):
    clip = _clips(2)
    config = DefenseConfig(steps=3)
    assert config.paper
    result = purify(clip, flow_model, config, keep_iterates=True)
    assert result.chosen.tolist() == [3, 3] and torch.equal(result.restored, result.iterates[-1])
    assert torch.all(result.step_sizes == config.step_size) and result.steps_taken.tolist() == [3, 3]


def test_parse_mode_keeps_the_boolean_spellings():
    for text in ("true", "True", "1", "yes", "on", True, "always"):
        assert parse_mode(text) == "always"
    for text in ("false", "0", "no", "off", False):
        assert parse_mode(text) == "off"
    assert parse_mode("auto") == "auto" and parse_mode(None, "auto") == "auto"
    with pytest.raises(ValueError, match="true, false or auto"):
        parse_mode("sometimes")


def test_auto_skips_clips_under_the_threshold_and_purifies_the_others(pipeline):
    clip = _clips(3)
    config = pipeline.defense.with_overrides(steps=2)
    plain = pipeline.predict(clip, defend=False, config=config)
    always = pipeline.predict(clip, defend=True, config=config)
    threshold = float(plain.mc_before.median())
    auto = pipeline.predict(clip, defend="auto", config=config, threshold=threshold)
    assert torch.equal(auto.mc_before, plain.mc_before)
    for i in range(3):
        if plain.mc_before[i] <= threshold:
            assert auto.decisions[i] == "skipped" and auto.defence_steps[i] == 0
            assert torch.equal(auto.restored[i], clip[i]) and torch.allclose(auto.probs[i], plain.probs[i])
            assert auto.trajectory_of(i) == [pytest.approx(float(plain.mc_before[i]))]
        else:  # the same purification as always-on (each clip's outcome depends on it alone)
            assert auto.decisions[i] == "purified" and auto.defence_steps[i] == 2
            assert torch.allclose(auto.probs[i], always.probs[i], atol=1e-5)
            assert torch.allclose(auto.mc_after[i], always.mc_after[i], atol=1e-6)
            assert len(auto.trajectory_of(i)) == 3
    assert always.decisions == ["purified"] * 3 and plain.decisions == ["off"] * 3
    assert pipeline.threshold is None  # the random bundle is not calibrated: auto cannot decide
    with pytest.raises(ValueError, match="threshold"):
        pipeline.predict(clip, defend="auto", config=config)


def test_keep_best_never_reports_a_higher_mc_loss():
    """On the demo bundle's clean clips the paper's fixed sign step raises the MC loss (issue 18's
    finding); the best iterate plus the final check with the inference flow never does."""
    from models.bundle.load import load_bundle
    from models.data import MotionShapes

    pipeline = load_bundle().pipeline
    clip = MotionShapes("test", 1)[0][0][None]
    paper = pipeline.predict(clip, defend=True, config=DefenseConfig(steps=1))
    assert paper.mc_after[0] > paper.mc_before[0]
    best = pipeline.predict(clip, defend=True, config=DefenseConfig(steps=1, keep_best=True))
    assert best.decisions == ["purified"] and best.defence_steps.tolist() == [1]
    # x_0 (the input) was the best iterate: it comes back unchanged, with its own MC loss
    assert torch.equal(best.restored, clip) and best.mc_after[0] == best.mc_before[0]


def test_restarts_vote_and_count_their_steps(pipeline):
    clip = _clips(2)
    config = DefenseConfig(steps=2, keep_best=True, random_start=2 / 255, restarts=2)
    torch.manual_seed(0)
    pred = pipeline.predict(clip, defend=True, config=config)
    assert len(pred.runs) == 2 and pred.defence_steps.tolist() == [4, 4]
    assert torch.allclose(pred.probs.sum(1), torch.ones(2))
    assert not torch.equal(pred.runs[0].start, pred.runs[1].start)  # two random starts
    assert (pred.mc_after <= pred.mc_before).all()
    assert (pred.restored - clip).abs().max() <= config.epsilon + 1e-6


def test_bundle_defense_section(random_bundle, tmp_path):
    import shutil

    from models.bundle.load import defense_config, load_bundle, parse_variant, with_defense
    from models.bundle_meta import Calibration, read_bundle_meta, write_bundle_meta
    from models.errors import BundleError

    bundle_dir = tmp_path / "b"
    shutil.copytree(random_bundle, bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    assert meta.defense.mode == "always" and defense_config(meta).paper  # defaults: the paper's defence
    with pytest.raises(BundleError, match="stop_quantile"):
        with_defense(meta, {"stop_quantile": "p50"})  # no calibration to take the target from
    meta.calibration = Calibration(n=3, quantiles={"p50": 0.2, "p99": 0.4}, mean=0.2, std=0.1, threshold=0.4)
    write_bundle_meta(bundle_dir, meta)
    converge = with_defense(read_bundle_meta(bundle_dir), parse_variant("converge"))
    config = defense_config(converge)
    assert config.keep_best and config.schedule == "plateau" and config.stop_below == 0.2
    assert parse_variant("keep_best=true,schedule=cosine") == {"keep_best": True, "schedule": "cosine"}
    with pytest.raises(BundleError, match="unknown defence variant"):
        parse_variant("fastest")
    assert converge.auto_threshold() == 0.4 and converge.auto_threshold(0.3) == 0.3
    loaded = load_bundle(bundle_dir)
    assert loaded.pipeline.threshold == 0.4 and loaded.pipeline.default_mode == "always"
    overridden = load_bundle(bundle_dir, mode="auto", threshold=0.25)
    assert overridden.pipeline.threshold == 0.25 and overridden.pipeline.default_mode == "auto"


def test_classify_defend_auto_end_to_end(tmp_path, random_bundle, capsys):
    """``motionguard classify --defend auto``: a clear error without a threshold; with one, the
    clips above it are purified and the others skipped, and the result says which."""
    import json
    import shutil

    from conftest import write_video

    from models.bundle_meta import Calibration, read_bundle_meta, write_bundle_meta
    from service.cli import main

    video = write_video(tmp_path / "v.mp4", count=8)
    assert main(["classify", str(video), "--bundle", str(random_bundle), "--defend", "auto"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a calibrated bundle" in err[0]

    assert main(["classify", str(video), "--bundle", str(random_bundle), "--json", "--steps", "1"]) == 0
    always = json.loads(capsys.readouterr().out)
    assert always["defense"]["mode"] == "always"
    assert [c["decision"] for c in always["clips"]] == ["purified"] * 2
    assert [c["defence_steps"] for c in always["clips"]] == [1, 1]
    losses = sorted(c["mc_loss_before"] for c in always["clips"])

    bundle_dir = tmp_path / "calibrated"
    shutil.copytree(random_bundle, bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    threshold = (losses[0] + losses[1]) / 2
    meta.calibration = Calibration(n=2, quantiles={"p50": threshold}, mean=threshold, std=0.0, threshold=threshold)
    write_bundle_meta(bundle_dir, meta)
    command = ["classify", str(video), "--bundle", str(bundle_dir), "--json", "--defend", "auto", "--steps", "1"]
    assert main(command) == 0
    auto = json.loads(capsys.readouterr().out)
    assert auto["defended"] and auto["defense"]["mode"] == "auto" and auto["defense"]["threshold"] == threshold
    by_decision = {c["decision"]: c for c in auto["clips"]}
    assert set(by_decision) == {"skipped", "purified"}
    skipped = by_decision["skipped"]
    assert skipped["defence_steps"] == 0 and skipped["mc_loss_after"] == skipped["mc_loss_before"] < threshold
    assert len(skipped["mc_trajectory"]) == 1
    assert by_decision["purified"]["defence_steps"] == 1 and by_decision["purified"]["mc_loss_before"] > threshold


def test_auto_threshold_derivation(tmp_path, capsys):
    """defend=auto's outcome per clip from an evaluation's records: defended above the threshold,
    undefended at or under it; the clean row gives auto's cost."""
    import json

    from service.cli import main
    from worker.cli.bench_auto_threshold import quantile, row_outcomes

    records = [
        {"standard": True, "defended": False, "mc_before": 0.01},  # clean-looking: auto keeps it as it is
        {"standard": False, "defended": True, "mc_before": 0.05},  # flagged: auto purifies it
        {"standard": False, "defended": False, "mc_before": 0.02},
        {"standard": False, "defended": True, "mc_before": 0.02},  # stealthy: auto misses what always catches
    ]
    out = row_outcomes(records, threshold=0.03)
    assert out == {"n": 4, "standard": 25.0, "always": 50.0, "auto": 50.0, "purified_by_auto": 25.0}
    assert row_outcomes(records, threshold=0.015)["auto"] == 75.0 and quantile([1.0, 2.0, 3.0], 0.25) == 1.5
    state = tmp_path / "e.state.json"
    state.write_text(json.dumps({"rows": {"clean": {"0": records[0]}, "pgd:8": dict(enumerate(records))}}))
    assert main(["bench", "auto-threshold", str(state), "--quantiles", "0.5,0.99"]) == 0
    table = capsys.readouterr().out
    assert "| pgd:8 | 4 | 25.0 | 50.0 |" in table and "worst gap" in table
    assert main(["bench", "auto-threshold", str(state), "--quantiles", "2"]) != 0
    assert "--quantiles" in capsys.readouterr().err
