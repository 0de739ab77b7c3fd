"""worker.serving.figures: the per-clip flow strip and MC-loss plot are valid, sized, deterministic PNGs."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from worker.serving.figures import clip_figures, flow_images, flow_strip_png, mc_loss_png, pick_indices

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def clip():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(8, 3, 32, 48, generator=g)
    before = torch.randn(7, 2, 32, 48, generator=g) * 4
    after = before * 0.25
    return frames, before, after


def test_pick_indices():
    assert pick_indices(15, 4) == [0, 5, 9, 14]
    assert pick_indices(3, 4) == [0, 1, 2]
    assert pick_indices(1, 4) == [0]
    assert pick_indices(0, 4) == []


def test_flow_images_share_one_scale(clip):
    _, before, after = clip
    img_b, img_a = flow_images(before, after)
    assert img_b.shape == img_a.shape == (7, 32, 48, 3) and img_b.dtype == np.uint8
    # The smaller flow is drawn paler (closer to white) on the shared scale.
    assert img_a.astype(float).mean() > img_b.astype(float).mean()
    # A zero flow is white on the colour wheel.
    zero_b, _ = flow_images(torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4))
    assert (zero_b == 255).all()


def test_flow_strip_is_a_sized_deterministic_png(clip):
    frames, before, after = clip
    data = flow_strip_png(frames, before, after, count=4, tile=96, title="clip 0")
    width, height = png_size(data)
    # label column + 4 tiles of 96 px (+ padding); three rows of 64 px tiles (+ captions and title)
    assert 104 + 4 * 96 <= width <= 104 + 4 * 100 + 8
    assert 3 * 64 <= height <= 3 * 64 + 3 * 18 + 40
    assert flow_strip_png(frames, before, after, count=4, tile=96, title="clip 0") == data
    # Different flows, different picture.
    assert flow_strip_png(frames, before, after * 2, count=4, tile=96, title="clip 0") != data
    # Numpy input gives the same picture as torch input.
    assert flow_strip_png(frames.numpy(), before.numpy(), after.numpy(), count=4, tile=96, title="clip 0") == data
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (width, height)


def test_flow_strip_default_tile_and_fewer_frames(clip):
    frames, before, after = clip
    width, _ = png_size(flow_strip_png(frames[:3], before[:2], after[:2]))
    assert width >= 104 + 2 * 128  # two pairs only, each tile at least 128 px wide


def test_flow_strip_rejects_mismatched_shapes(clip):
    frames, before, after = clip
    with pytest.raises(ValueError):
        flow_strip_png(frames, before[:3], after[:3])
    with pytest.raises(ValueError):
        flow_strip_png(frames[:, :2], before, after)
    with pytest.raises(ValueError):
        flow_images(before, after[:, :, :16])


def test_mc_loss_plot():
    trajectory = torch.linspace(0.9, 0.4, 21)
    data = mc_loss_png(trajectory, threshold=0.6, mc_before=0.8, mc_after=0.5, size=(400, 250))
    assert png_size(data) == (400, 250)
    assert mc_loss_png(trajectory.numpy(), threshold=0.6, mc_before=0.8, mc_after=0.5, size=(400, 250)) == data
    assert mc_loss_png([0.5], size=(400, 250))[:8] == PNG_SIGNATURE  # undefended: one point
    with pytest.raises(ValueError):
        mc_loss_png([])


def test_clip_figures_names(clip):
    frames, before, after = clip
    figures = clip_figures(frames, before, after, [0.9, 0.7, 0.6], threshold=0.8, index=2, count=2)
    assert set(figures) == {"flow.png", "mc_loss.png"}
    assert all(data[:8] == PNG_SIGNATURE for data in figures.values())


def test_classify_cli_writes_figures(tmp_path, random_bundle, capsys):
    from conftest import write_video

    from service.cli import main

    path = write_video(tmp_path / "v.mp4", count=8, height=64, width=64)
    out = tmp_path / "figs"
    assert main(["classify", str(path), "--bundle", str(random_bundle), "--steps", "1", "--figures", str(out)]) == 0
    assert "figures" in capsys.readouterr().out  # the figures stage is timed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["clip0.flow.png", "clip0.mc_loss.png", "clip1.flow.png", "clip1.mc_loss.png"]
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    # Not defended: no pictures (and no error).
    none = tmp_path / "none"
    assert main(["classify", str(path), "--bundle", str(random_bundle), "--no-defend", "--figures", str(none)]) == 0
    assert not any(none.iterdir())
