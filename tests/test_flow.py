"""Video RAFT equals torchvision's pairwise forward, and handles sizes RAFT cannot take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.nets.flow import DIRECTIONS, build_video_raft, pair_indices, pairwise_flows


@pytest.mark.parametrize(
    ("arch", "levels", "size", "frames"),
    [("raft_small", 3, 64, 5), ("raft_small", None, 128, 3), ("raft_large", None, 128, 3)],
)
def test_video_raft_matches_torchvision_pairwise(arch, levels, size, frames):
    torch.manual_seed(0)
    model = build_video_raft(arch, corr_levels=levels).eval()
    clip = torch.rand(2, frames, 3, size, size)
    with torch.no_grad():
        ours = model(clip, num_flow_updates=3, directions=DIRECTIONS)
        for direction in DIRECTIONS:
            reference = pairwise_flows(model.raft, clip, num_flow_updates=3, direction=direction)
            assert ours[direction].shape == reference.shape
            assert (ours[direction] - reference).abs().max().item() <= 1e-4, direction


def test_pair_indices():
    assert pair_indices(4, "forward") == ([0, 1, 2], [1, 2, 3])
    assert pair_indices(4, "backward") == ([1, 2, 3], [0, 1, 2])
    assert pair_indices(8, "long") == ([0, 1, 2, 3], [4, 5, 6, 7])
    with pytest.raises(ValueError):
        pair_indices(1, "forward")
    with pytest.raises(ValueError):
        pair_indices(4, "sideways")


@pytest.mark.parametrize(("height", "width"), [(50, 70), (64, 96), (36, 36)])
def test_odd_and_small_sizes_are_padded_or_resized(height, width):
    model = build_video_raft("raft_small", corr_levels=3).eval()
    clip = torch.rand(1, 3, 3, height, width)
    with torch.no_grad():
        flows = model(clip, num_flow_updates=2)
    assert flows["forward"].shape == (1, 2, 2, height, width)
    assert torch.isfinite(flows["forward"]).all()


class _InputPadder:
    """The RAFT release's ``core/utils/utils.py`` ``InputPadder`` (Sintel mode), from its definition."""

    def __init__(self, dims):
        self.ht, self.wd = dims[-2:]
        pad_ht = (((self.ht // 8) + 1) * 8 - self.ht) % 8
        pad_wd = (((self.wd // 8) + 1) * 8 - self.wd) % 8
        self._pad = [pad_wd // 2, pad_wd - pad_wd // 2, pad_ht // 2, pad_ht - pad_ht // 2]

    def pad(self, *inputs):
        return [F.pad(x, self._pad, mode="replicate") for x in inputs]

    def unpad(self, x):
        ht, wd = x.shape[-2:]
        c = [self._pad[2], ht - self._pad[3], self._pad[0], wd - self._pad[1]]
        return x[..., c[0] : c[1], c[2] : c[3]]


@pytest.mark.parametrize(("height", "width"), [(132, 148), (131, 149)])
def test_sizes_not_multiple_of_8_are_padded_as_the_raft_release_pads(height, width):
    """The release's evaluation: images in [0, 255] padded by InputPadder, normalised inside RAFT
    (2 * x / 255 - 1), flow unpadded. The bottom/right padding used before differs near borders."""
    torch.manual_seed(0)
    model = build_video_raft("raft_small").eval()
    clip = torch.rand(1, 3, 3, height, width)
    images = clip[0] * 255
    padder = _InputPadder(images.shape)
    with torch.no_grad():
        ours = model(clip, num_flow_updates=4)["forward"][0]
        image1, image2 = padder.pad(images[:-1], images[1:])
        reference = padder.unpad(model.raft(2 * image1 / 255 - 1, 2 * image2 / 255 - 1, num_flow_updates=4)[-1])
        pad_h, pad_w = (-height) % 8, (-width) % 8
        corner = F.pad(2 * images / 255 - 1, (0, pad_w, 0, pad_h), mode="replicate")
        corner = model.raft(corner[:-1], corner[1:], num_flow_updates=4)[-1][..., :height, :width]
    assert (ours - reference).abs().max().item() <= 1e-4
    assert (corner - reference).abs().max().item() > 1e-2  # the old padding: a different flow


def test_resized_flow_is_mapped_back_to_input_pixels():
    """A 4-level RAFT needs 128 px: a 64 px input is resized x2 inside, so its flow must be halved."""
    torch.manual_seed(0)
    model = build_video_raft("raft_small").eval()
    clip = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        small = model(clip, num_flow_updates=2)["forward"]
        upsampled = torch.nn.functional.interpolate(clip[0], size=(128, 128), mode="bilinear", align_corners=False)
        big = model(upsampled[None], num_flow_updates=2)["forward"]
    expected = torch.nn.functional.interpolate(big[0], size=(64, 64), mode="bilinear", align_corners=False) / 2
    assert torch.allclose(small[0], expected, atol=1e-4)


def test_gradient_reaches_pixels():
    model = build_video_raft("raft_small", corr_levels=3).eval()
    clip = torch.rand(1, 3, 3, 64, 64, requires_grad=True)
    flows = model(clip, num_flow_updates=2)["forward"]
    flows.abs().mean().backward()
    assert clip.grad is not None and clip.grad.abs().sum() > 0


def test_encoder_runs_once_per_frame():
    model = build_video_raft("raft_small", corr_levels=3).eval()
    seen: list[int] = []
    model.raft.feature_encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    with torch.no_grad():
        model(torch.rand(2, 6, 3, 64, 64), num_flow_updates=1, directions=DIRECTIONS)
    assert seen == [2 * 6]
