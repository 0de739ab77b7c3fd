"""Attacks stay in their budget, raise the loss, keep their first success, and the through-defence
machinery matches the real defence (tiny random model, few steps)."""

from __future__ import annotations

import pytest
import torch

from models.bundle.load import load_bundle
from models.robustness.attacks import base as attacks
from models.robustness.attacks.base import defended_forward
from models.robustness.attacks.square import margin, prediction_query, square_attack, square_fraction, square_side
from models.robustness.attacks.through import defended_objective, defended_pgd, replay
from models.robustness.spec import ATTACKS, AttackSpec, parse_attack, run_attack


@pytest.fixture(scope="module")
def setup(random_bundle):
    torch.manual_seed(0)
    pipeline = load_bundle(random_bundle).pipeline
    x = torch.rand(3, 4, 3, 64, 64)
    with torch.no_grad():
        y = pipeline.logits(x, 2).argmax(1)  # attack the model's own predictions
    return pipeline, x, y


def _ce(pipeline, x, y, loss=attacks.ce_loss):
    with torch.no_grad():
        return loss(pipeline.logits(x, 2), y)


@pytest.mark.parametrize("kind", ["pgd", "apgd-ce", "apgd-dlr"])
def test_dense_attacks_respect_budget_and_raise_loss(setup, kind):
    pipeline, x, y = setup
    x_adv = run_attack(parse_attack(f"{kind}:8:steps=4:check=0"), pipeline, x, y).x
    assert (x_adv - x).abs().max().item() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    loss = attacks.dlr_loss if kind == "apgd-dlr" else attacks.ce_loss  # the loss each attack ascends
    assert _ce(pipeline, x_adv, y, loss).mean() > _ce(pipeline, x, y, loss).mean()


def test_one_frame_touches_one_frame(setup):
    pipeline, x, y = setup
    x_adv = run_attack(parse_attack("oneframe:16:steps=3"), pipeline, x, y).x
    changed = (x_adv - x).abs().flatten(2).amax(dim=2) > 0  # (B, T)
    assert (changed.sum(dim=1) == 1).all()
    assert (x_adv - x).abs().max().item() <= 16 / 255 + 1e-6


def test_flicker_is_a_uniform_colour_shift_per_frame(setup):
    pipeline, x, y = setup
    x_mid = x * 0.5 + 0.25  # away from the clamp so the shift is visible everywhere
    x_adv = run_attack(parse_attack("flicker:32:steps=5"), pipeline, x_mid, y).x
    delta = x_adv - x_mid
    per_frame = delta.flatten(3)
    assert torch.allclose(per_frame, per_frame[..., :1].expand_as(per_frame), atol=1e-6)
    assert delta.abs().max() > 0 and delta.abs().max() <= 32 / 255 + 1e-6


@pytest.mark.parametrize("spec", ["adaptive1:8:steps=2", "adaptive2:8:steps=2", "bpda:8:steps=1"])
def test_defense_aware_attacks_respect_budget(setup, spec):
    pipeline, x, y = setup
    x_adv = run_attack(parse_attack(spec), pipeline, x[:1], y[:1]).x
    assert (x_adv - x[:1]).abs().max().item() <= 8 / 255 + 1e-6
    assert not torch.equal(x_adv, x[:1])


def test_first_success_keeps_the_first_accepted_iterate():
    x = torch.zeros(3, 2)
    tracker = attacks.FirstSuccess(x)
    tracker.offer(1, x + 1, torch.tensor([True, False, False]))
    tracker.offer(2, x + 2, torch.tensor([True, True, False]))
    assert tracker.at.tolist() == [1, 2, -1] and not tracker.done
    tracker.finish(x + 3)
    assert tracker.kept[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_apgd_random_start_is_autoattacks():
    x = torch.full((2, 4, 3, 8, 8), 0.5)
    start = attacks.random_start(x, 8 / 255, "autoattack")
    assert (start - x).abs().flatten(1).amax(1).tolist() == pytest.approx([8 / 255] * 2)


def test_defended_forward_is_the_real_prediction_and_replay_is_exact(setup):
    """The attack's forward is ``predict`` itself; the unrolled replay reproduces the returned clip and
    differentiates through the purification (a different gradient from BPDA's identity)."""
    pipeline, x, y = setup
    forward = defended_forward(pipeline, x[:1])
    assert torch.equal(forward.logits, pipeline.predict(x[:1], defend=True).logits)
    z = x[:1].clone().requires_grad_(True)
    replayed = replay(pipeline, z, forward.runs[0], unroll=2, tau=1.0)
    assert torch.allclose(replayed.detach(), forward.restored, atol=1e-6)
    (unrolled,) = torch.autograd.grad(defended_objective(pipeline, z, y[:1], forward, 2, 1.0).sum(), z)
    (identity,) = torch.autograd.grad(defended_objective(pipeline, z, y[:1], forward, 0, 1.0).sum(), z)
    assert unrolled.abs().sum() > 0 and not torch.allclose(unrolled, identity)


def test_through_attack_respects_budget_and_its_check_is_the_real_defense(setup):
    pipeline, x, y = setup
    tracker = defended_pgd(pipeline, x[:2], y[:2], 8 / 255, steps=1, unroll=1)
    assert (tracker.kept - x[:2]).abs().max().item() <= 8 / 255 + 1e-6 and not torch.equal(tracker.kept, x[:2])
    fooled = pipeline.predict(tracker.kept, defend=True).logits.argmax(1) != y[:2]
    assert torch.equal(fooled, tracker.at >= 0)


def test_detector_aware_success_needs_an_unflagged_clip(setup):
    """With a threshold no clip can get under, a detector-aware attack can never succeed."""
    pipeline, x, y = setup
    tracker = defended_pgd(pipeline, x[:1], y[:1], 8 / 255, steps=1, detector_lambda=100.0, threshold=0.0)
    assert tracker.at.tolist() == [-1]
    with pytest.raises(ValueError, match="threshold"):
        defended_pgd(pipeline, x[:1], y[:1], 8 / 255, steps=1, detector_lambda=100.0)


def test_dlr_loss_is_negative_margin_ratio():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    assert attacks.dlr_loss(logits, torch.tensor([0])).item() == pytest.approx(-(3 - 1) / (3 - 0))
    assert attacks.dlr_loss(logits, torch.tensor([1])).item() == pytest.approx((3 - 1) / (3 - 0))


def test_parse_attack():
    spec = parse_attack("adaptive1:8")
    assert spec.kind == "adaptive1" and spec.epsilon == pytest.approx(8 / 255) and spec.options["lambda"] == 300
    assert spec.defense_aware and spec.name == "adaptive1:8:lambda=300"
    assert parse_attack("pgd:4:steps=40").options == {"steps": 40.0}
    assert parse_attack("pgd:8").name == "pgd:8"
    assert parse_attack("bpda:8").steps == 20 and parse_attack("through:8").steps == 10
    detector = parse_attack("through:8:detector=100")
    assert detector.detector_aware and isinstance(detector, AttackSpec)
    for bad in ["", "fgsm:8", "pgd:x", "pgd:0", "pgd:8:steps=abc", "pgd:8:detector=1", "pgd:8:foo=1", "bpda:8:eot=0"]:
        with pytest.raises(ValueError):
            parse_attack(bad)
    for bad in ["bpda:8:updates=12", "square:8:updates=12", "pgd:8:updates=0"]:
        with pytest.raises(ValueError, match="updates="):
            parse_attack(bad)


def test_updates_option_sets_the_raft_updates_of_the_gradient_path(setup):
    """``pgd:8:updates=12`` differentiates the 12-update flow (the model's own inference flow), not the
    2-update one: its first step follows another gradient."""
    pipeline, x, y = setup
    spec = parse_attack("pgd:8:steps=1:check=0:updates=12")
    assert "updates=12" in spec.name
    torch.manual_seed(0)
    deep = run_attack(spec, pipeline, x, y).x
    torch.manual_seed(0)
    shallow = run_attack(parse_attack("pgd:8:steps=1:check=0"), pipeline, x, y).x
    assert not torch.equal(deep, shallow) and (deep - x).abs().max().item() <= 8 / 255 + 1e-6


def test_transfer_is_pgd_crafted_on_the_source_bundle(setup, other_random_bundle):
    """With the evaluated model as its own source it is the PGD row exactly; another source gives other clips."""
    pipeline, x, y = setup
    spec = parse_attack("transfer:8:steps=2:check=0")
    default = parse_attack("transfer:8")
    assert spec.needs_source and default.name == "transfer:8" and default.steps == 20
    assert ATTACKS["transfer"].check == ATTACKS["pgd"].check == 10
    with pytest.raises(ValueError, match="--source-bundle"):
        run_attack(spec, pipeline, x, y)
    torch.manual_seed(0)
    own = run_attack(spec, pipeline, x, y, source=pipeline).x
    torch.manual_seed(0)
    assert torch.equal(own, run_attack(parse_attack("pgd:8:steps=2:check=0"), pipeline, x, y).x)
    torch.manual_seed(0)
    other = run_attack(spec, pipeline, x, y, source=load_bundle(other_random_bundle).pipeline).x
    assert not torch.equal(other, own) and (other - x).abs().max().item() <= 8 / 255 + 1e-6


def test_square_stays_in_budget_keeps_only_lower_losses_and_lowers_the_margin(setup):
    """Every query's current loss is the lower of the previous one and the proposal's (the spy records
    what the real prediction said), the kept clips are what that loss was measured on, and the clean
    margin goes down."""
    pipeline, x, y = setup
    real = prediction_query(pipeline, y, defend=False)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(z, open_):
        loss, success = real(z, open_)
        seen.append((open_.clone(), loss.clone()))
        return loss, success

    run = square_attack(spy, x, 8 / 255, queries=12, generator=torch.Generator().manual_seed(0))
    kept = run.tracker.kept
    assert (kept - x).abs().max().item() <= 8 / 255 + 1e-6 and kept.min() >= 0 and kept.max() <= 1
    assert run.losses.shape == (13, 3) and torch.equal(run.losses[0], seen[0][1])
    for k, (open_, loss) in enumerate(seen[1:], start=1):
        before, after = run.losses[k - 1][open_], run.losses[k][open_]
        assert torch.equal(after, torch.minimum(before, loss)), k
    with torch.no_grad():
        final = margin(pipeline.predict(kept, defend=False).logits, y)
    assert torch.allclose(final, run.losses[-1], atol=1e-4)
    assert int((final < run.losses[0] - 1e-6).sum()) >= 2
    # a clip already wrong at the start is a success at query 0 and is never queried again
    wrong = (y[:1] + 1) % 3
    first = square_attack(prediction_query(pipeline, wrong, defend=False), x[:1], 8 / 255, queries=5)
    assert first.tracker.at.tolist() == [0] and torch.equal(first.tracker.kept, x[:1])


def test_square_spec_is_seeded_and_follows_the_papers_schedule(setup):
    pipeline, x, y = setup
    spec = parse_attack("square:8:queries=3")
    assert spec.steps == 3 and spec.defense_aware and spec.judges_every_iterate and spec.name == "square:8:queries=3"
    assert parse_attack("square:8").steps == 100 and parse_attack("square-flag:8").flag_aware
    for bad in ["square:8:steps=3", "pgd:8:queries=3", "pgd:8:p=0.1", "square:8:p=0", "square:8:queries=0"]:
        with pytest.raises(ValueError):
            parse_attack(bad)
    results = []
    for _ in range(2):
        torch.manual_seed(7)  # what the evaluation does per (seed, row, clip)
        results.append(run_attack(spec, pipeline, x[:1], y[:1], defend=True))
    assert torch.equal(results[0].x, results[1].x) and torch.equal(results[0].fooled_at, results[1].fooled_at)
    assert [square_fraction(0.05, q, 100) for q in (0, 1, 2, 3, 6, 11, 21, 41, 61, 81)] == [
        0.05 / d for d in (1, 4, 4, 8, 16, 32, 64, 128, 256, 512)
    ]
    assert square_side(0.05, 64, 64) == 14 and square_side(0.05 / 512, 64, 64) == 1
