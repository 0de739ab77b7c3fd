"""MotionShapes: determinism, motion-only classes, exact ground-truth flow, disjoint splits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.data import CLASSES, LABELS_FILE, SPLIT_BASE, MotionShapes, labels, make_clip, split_seed


def backward_warp(frames: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
    """Sample frames (N,3,H,W) at p + flow(p): reconstructs the previous frame under our convention."""
    n, _, h, w = frames.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    x, y = xs + flows[:, 0], ys + flows[:, 1]
    grid = torch.stack((2 * (x + 0.5) / w - 1, 2 * (y + 0.5) / h - 1), dim=-1)
    return F.grid_sample(frames, grid, mode="bilinear", align_corners=False)


def test_shapes_range_and_determinism():
    clip, flows = make_clip(123, 4)
    assert clip.shape == (8, 3, 64, 64) and clip.dtype == torch.float32
    assert flows.shape == (7, 2, 64, 64) and flows.dtype == torch.float32
    assert 0.0 <= float(clip.min()) and float(clip.max()) <= 1.0
    again, flows_again = make_clip(123, 4)
    assert torch.equal(clip, again) and torch.equal(flows, flows_again)
    other, _ = make_clip(124, 4)
    assert not torch.equal(clip, other)


def test_other_frame_counts_and_sizes():
    clip, flows = make_clip(5, 0, frames=4, size=32)
    assert clip.shape == (4, 3, 32, 32) and flows.shape == (3, 2, 32, 32)
    with pytest.raises(ValueError):
        make_clip(5, len(CLASSES))


def test_at_least_ten_classes_and_labels_file():
    assert len(CLASSES) >= 10 and len(set(CLASSES)) == len(CLASSES)
    assert labels() == list(CLASSES)
    assert LABELS_FILE.read_text().split() == list(CLASSES)


def _mean_object_flow(label: int, seed: int = 7) -> torch.Tensor:
    _, flows = make_clip(seed, label)
    moving = flows.norm(dim=1, keepdim=True) > 0.6  # object pixels (the background drifts < 0.5 px)
    return (flows * moving).sum(dim=(0, 2, 3)) / moving.sum().clamp(min=1)


def test_classes_differ_by_their_motion():
    right, left = (
        _mean_object_flow(CLASSES.index("translate_right")),
        _mean_object_flow(CLASSES.index("translate_left")),
    )
    up, down = _mean_object_flow(CLASSES.index("translate_up")), _mean_object_flow(CLASSES.index("translate_down"))
    assert right[0] > 0.5 and left[0] < -0.5
    assert up[1] < -0.5 and down[1] > 0.5

    # Rotation: the curl has opposite signs; zoom: the divergence has opposite signs (medians over
    # moving pixels: the means telescope to the boundary values).
    def curl_div(label: int) -> tuple[float, float]:
        _, flows = make_clip(11, label)
        u, v = flows[:, 0], flows[:, 1]
        du_dx, du_dy = u[..., 1:-1, 2:] - u[..., 1:-1, :-2], u[..., 2:, 1:-1] - u[..., :-2, 1:-1]
        dv_dx, dv_dy = v[..., 1:-1, 2:] - v[..., 1:-1, :-2], v[..., 2:, 1:-1] - v[..., :-2, 1:-1]
        moving = flows.norm(dim=1)[..., 1:-1, 1:-1] > 0.2
        return float((dv_dx - du_dy)[moving].median()), float((du_dx + dv_dy)[moving].median())

    assert curl_div(CLASSES.index("rotate_cw"))[0] > 0 > curl_div(CLASSES.index("rotate_ccw"))[0]
    assert curl_div(CLASSES.index("zoom_in"))[1] > 0 > curl_div(CLASSES.index("zoom_out"))[1]
    # Oscillation reverses direction within the clip.
    _, flows = make_clip(3, CLASSES.index("oscillate_horizontal"))
    moving = flows.norm(dim=1) > 0.3
    per_frame = [float(flows[t, 0][moving[t]].mean()) for t in range(flows.shape[0]) if moving[t].any()]
    assert min(per_frame) < 0 < max(per_frame)


def test_appearance_does_not_depend_on_the_label():
    """Frame statistics are the same for every class: appearance is drawn independently of the label."""
    a, _ = make_clip(42, 0)
    b, _ = make_clip(42, 5)
    assert not torch.equal(a, b)
    stats_a = torch.stack([make_clip(s, 0)[0][0].mean() for s in range(30)])
    stats_b = torch.stack([make_clip(s, 2)[0][0].mean() for s in range(30)])
    assert abs(float(stats_a.mean() - stats_b.mean())) < 0.05  # first-frame statistics carry no label


@pytest.mark.parametrize("label", range(len(CLASSES)))
def test_ground_truth_flow_reconstructs_the_previous_frame(label: int):
    clip, flows = make_clip(1000 + label, label)
    warped = backward_warp(clip[1:], flows)
    err = (warped - clip[:-1]).abs().amax(dim=1)
    # Occlusions happen only near flow discontinuities (object edges): exclude those, widened by
    # the largest displacement, plus a border; everywhere else the warp must be near exact.
    jump = torch.zeros_like(err, dtype=torch.bool)
    jump[:, :, 1:] |= (flows[:, :, :, 1:] - flows[:, :, :, :-1]).abs().amax(1) > 0.25
    jump[:, 1:, :] |= (flows[:, :, 1:, :] - flows[:, :, :-1, :]).abs().amax(1) > 0.25
    reach = int(flows.abs().max().ceil()) + 2
    near_edge = F.max_pool2d(jump.float().unsqueeze(1), 2 * reach + 1, 1, reach).squeeze(1) > 0
    valid = ~near_edge
    valid[:, :reach] = valid[:, -reach:] = False
    valid[:, :, :reach] = valid[:, :, -reach:] = False
    assert valid.float().mean() > 0.05
    assert float(err[valid].quantile(0.99)) < 0.03
    assert float(err[valid].mean()) < 0.005
    if CLASSES[label].startswith("translate"):
        still = (clip[1:] - clip[:-1]).abs().amax(dim=1)[:, 6:-6, 6:-6]
        assert float(err[:, 6:-6, 6:-6].mean()) < 0.5 * float(still.mean())


def test_splits_are_disjoint_and_fixed():
    seeds = {split: {split_seed(split, i) for i in (0, 1, 999_999, 9_999_999)} for split in SPLIT_BASE}
    assert (
        not (seeds["train"] & seeds["val"])
        and not (seeds["train"] & seeds["test"])
        and not (seeds["val"] & seeds["test"])
    )
    with pytest.raises(ValueError):
        split_seed("train", 10_000_000)
    with pytest.raises(ValueError):
        split_seed("holdout", 0)
    train, test = MotionShapes("train", 3), MotionShapes("test", 3)
    assert not torch.equal(train[0][0], test[0][0])


def test_dataset_items_balance_and_cache():
    ds = MotionShapes("val", 20, frames=4, size=32, with_flow=True, cache=True)
    clip, flows, label = ds[13]
    assert clip.shape == (4, 3, 32, 32) and flows.shape == (3, 2, 32, 32) and label == 3
    assert ds[13][0] is clip  # cached
    assert sorted(ds[i][2] for i in range(10)) == list(range(10))
    assert ds.labels() == list(CLASSES) and ds.num_classes == len(CLASSES)
    with pytest.raises(IndexError):
        ds[20]


def test_flow_training_pairs_move_densely_and_exactly():
    from models.data import make_flow_pair

    pair, flow = make_flow_pair(77)
    assert pair.shape == (2, 3, 64, 64) and flow.shape == (1, 2, 64, 64)
    assert torch.equal(pair, make_flow_pair(77)[0])
    mean_motion = torch.stack([make_flow_pair(s)[1].norm(dim=1).mean() for s in range(10)]).mean()
    assert mean_motion > 0.8  # most pixels move: supervision everywhere, unlike the class clips
    err = (backward_warp(pair[1:], flow) - pair[:1]).abs().amax(dim=1)[:, 8:-8, 8:-8]
    assert float(err.median()) < 0.01
