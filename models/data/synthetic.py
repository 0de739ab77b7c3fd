"""MotionShapes: a seeded synthetic benchmark whose classes differ only by motion, with exact flow.

No pretrained weights or real datasets can be downloaded here, so the demo model is trained on clips
whose label is carried by motion alone: every class draws shapes, textures, colours, sizes and the
background from the same distribution, and only the per-frame transform differs (translation in four
directions, rotation either way, zoom in/out, horizontal/vertical oscillation). No single frame
tells the classes apart, which is the property a flow-stream classifier needs to be tested on.

Frames are rendered by inverse mapping: each object is an analytic shape with a texture image in
its own coordinates, placed by an affine map A_t per frame; a pixel p of frame t shows the texture
at A_t^-1(p) (bilinear ``grid_sample``). The ground-truth flow of the visible surface at p is then
exactly A_{t+1}(A_t^-1(p)) - p, so RAFT can be supervised without any flow estimation of our own.

Flow convention: pixel p of frame t moves to p + flow_t(p) in frame t+1 (channel 0 = x, pixels), so
backward-warping frame t+1 with flow_t reconstructs frame t except where the surface is occluded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "translate_right",
    "translate_left",
    "translate_up",
    "translate_down",
    "rotate_cw",
    "rotate_ccw",
    "zoom_in",
    "zoom_out",
    "oscillate_horizontal",
    "oscillate_vertical",
)
LABELS_FILE = Path(__file__).resolve().parent / "motionshapes_labels.txt"

# Disjoint seed ranges per split: a clip is fully determined by (seed, label), so fixed ranges make
# the splits reproducible and guarantee the test clips are never seen in training.
SPLIT_BASE: dict[str, int] = {"train": 0, "test": 10_000_000, "val": 20_000_000}
SPLIT_SPAN = 10_000_000

_TEX_SIZE = 24  # texels across an object's [-1, 1] square: ~1-1.5 px per texel at typical sizes
_BG_MARGIN = 8  # background texture extends this many pixels past the frame (room for drift)


def labels() -> list[str]:
    """Class names in label-index order."""
    return list(CLASSES)


def write_labels_file(path: str | Path = LABELS_FILE) -> Path:
    path = Path(path)
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _smooth_noise(g: torch.Generator, size: int, cells: int) -> Tensor:
    """Band-limited noise in [0, 1], (size, size): random cells upsampled bicubically."""
    base = torch.rand(1, 1, cells, cells, generator=g)
    up = F.interpolate(base, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    return (up - lo) / (hi - lo + 1e-6)


def _texture(g: torch.Generator, size: int) -> Tensor:
    """A random colour texture (3, size, size) in [0, 1]: smoothed noise, stripes or checker.

    Every kind is mixed with some smoothed noise so that no texture is a pure 1-D pattern (the
    aperture problem would make the flow of stripes ill-posed along the stripes)."""
    kind = _randint(g, 0, 2)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    noise = _smooth_noise(g, size, max(3, size // _randint(g, 4, 7)))
    if kind == 0:
        pattern = noise
    elif kind == 1:
        angle = _uniform(g, 0, math.pi)
        freq = _uniform(g, 1.5, 3.5) * size / _TEX_SIZE
        phase = _uniform(g, 0, 2 * math.pi)
        pattern = 0.5 + 0.5 * torch.sin(math.pi * freq * (xs * math.cos(angle) + ys * math.sin(angle)) + phase)
        pattern = 0.6 * pattern + 0.4 * noise
    else:
        fx = _uniform(g, 1.5, 3.0) * size / _TEX_SIZE
        fy = _uniform(g, 1.5, 3.0) * size / _TEX_SIZE
        checker = torch.sin(math.pi * fx * xs) * torch.sin(math.pi * fy * ys)
        pattern = torch.sigmoid(4.0 * checker)  # soft edges: no aliasing at 64 px
        pattern = 0.6 * pattern + 0.4 * noise
    c1 = torch.rand(3, generator=g)
    c2 = torch.rand(3, generator=g)
    if (c1 - c2).abs().sum() < 0.6:  # keep some contrast inside the texture
        c2 = 1.0 - c1
    return c1.view(3, 1, 1) * (1 - pattern) + c2.view(3, 1, 1) * pattern


def _pixel_grid(size: int) -> Tensor:
    """Pixel-centre coordinates (H, W, 2), (x, y)."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    return torch.stack((xs, ys), dim=-1)


def _object_track(g: torch.Generator, label: int, frames: int, size: int, boost: float = 1.0) -> dict[str, Tensor]:
    """Per-frame centre (T,2), rotation (T,) and scale (T,) of one object under the class motion.

    Sizes and positions are drawn from the same ranges for every class; only how they change over
    time depends on the label. Ranges are for 64 px and scaled with the frame size. Rotation and
    zoom move an object's rim by only ~1-3 px a frame even at these rates (8-16 degrees, 6-12 %):
    at half those rates a RAFT-small trained here told cw from ccw and in from out barely above
    chance (val confusion of the first demo model), while translations were fine."""
    unit = size / 64.0
    t = torch.arange(frames, dtype=torch.float32)
    mid = (frames - 1) / 2.0
    theta0 = _uniform(g, 0, 2 * math.pi)
    scale_mid = _uniform(g, 9.0, 15.0) * unit
    centre_mid = torch.tensor([_uniform(g, 18, 46), _uniform(g, 18, 46)]) * unit
    centre = centre_mid.expand(frames, 2).clone()
    theta = torch.full((frames,), theta0)
    scale = torch.full((frames,), scale_mid)
    name = CLASSES[label]
    if name.startswith("translate"):
        speed = _uniform(g, 1.0, 3.0) * unit * boost
        direction = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[name.split("_")[1]]
        centre = centre_mid + (t - mid).unsqueeze(1) * speed * torch.tensor(direction, dtype=torch.float32)
    elif name.startswith("rotate"):
        omega = math.radians(_uniform(g, 8.0, 16.0)) * boost
        sign = 1.0 if name == "rotate_cw" else -1.0  # y points down: increasing angle looks clockwise
        theta = theta0 + sign * omega * t
    elif name.startswith("zoom"):
        rate = _uniform(g, 0.06, 0.12) * boost
        sign = 1.0 if name == "zoom_in" else -1.0
        scale = scale_mid * (1.0 + rate) ** (sign * (t - mid))
    elif name.startswith("oscillate"):
        amplitude = _uniform(g, 2.0, 5.0) * unit * boost
        period = _uniform(g, 4.0, 7.0)  # frames: at least one reversal within 8 frames
        phase = _uniform(g, 0, 2 * math.pi)
        axis = torch.tensor((1.0, 0.0) if name.endswith("horizontal") else (0.0, 1.0))
        centre = centre_mid + (amplitude * torch.sin(2 * math.pi * t / period + phase)).unsqueeze(1) * axis
    else:  # pragma: no cover - CLASSES and this table are kept together
        raise ValueError(f"unknown class {name}")
    return {"centre": centre, "theta": theta, "scale": scale}


def _to_object(p: Tensor, centre: Tensor, theta: Tensor, scale: Tensor, aspect: Tensor) -> Tensor:
    """Inverse affine: pixel coords (T,H,W,2) -> object coords q with the shape in [-1, 1]^2."""
    d = p - centre.view(-1, 1, 1, 2)
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    # p = c + R(theta) diag(s*ax, s*ay) q  =>  q = diag(1/(s*ax), 1/(s*ay)) R(-theta) (p - c)
    rx = cos * d[..., 0] + sin * d[..., 1]
    ry = -sin * d[..., 0] + cos * d[..., 1]
    s = scale.view(-1, 1, 1)
    return torch.stack((rx / (s * aspect[0]), ry / (s * aspect[1])), dim=-1)


def _to_pixel(q: Tensor, centre: Tensor, theta: Tensor, scale: Tensor, aspect: Tensor) -> Tensor:
    """Forward affine: object coords (T,H,W,2) -> pixel coords."""
    s = scale.view(-1, 1, 1)
    ux, uy = q[..., 0] * s * aspect[0], q[..., 1] * s * aspect[1]
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    x = cos * ux - sin * uy + centre[:, 0].view(-1, 1, 1)
    y = sin * ux + cos * uy + centre[:, 1].view(-1, 1, 1)
    return torch.stack((x, y), dim=-1)


def _shape_distance(q: Tensor, shape: int) -> Tensor:
    """Normalised distance: < 1 inside the shape (0 circle/ellipse, 1 square, 2 diamond)."""
    if shape == 0:
        return q.norm(dim=-1)
    if shape == 1:
        return q.abs().amax(dim=-1)
    return q.abs().sum(dim=-1) / 1.2


def make_clip(seed: int, label: int, frames: int = 8, size: int = 64) -> tuple[Tensor, Tensor]:
    """Render one clip and its exact ground-truth flow.

    Returns ``clip`` (T, 3, H, W) float32 in [0, 1] and ``flows`` (T-1, 2, H, W) float32 in pixels,
    channel 0 = x; pixel p of frame t moves to p + flows[t](p) in frame t+1. The same (seed, label,
    frames, size) always gives the same tensors.
    """
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    return _render(seed, label, frames, size)


def make_flow_pair(seed: int, size: int = 64) -> tuple[Tensor, Tensor]:
    """A frame pair (2, 3, H, W) and its flow (1, 2, H, W) for training the flow model.

    Class clips are mostly static background, and on them an L1-supervised RAFT trained from scratch
    collapses to predicting zero flow everywhere (we saw it: 300 steps, zero output). These pairs
    move densely, like FlyingChairs: the background translates by up to 10 px and every object gets
    its own randomly chosen class motion, up to 4x faster than in the clips (mean flow ~4-5 px, as
    on the moving-shapes data RAFT-small is known to learn from scratch here). Larger motions matter:
    RAFT matches features on a 1/8-resolution grid (8 px cells at 64 px), and 1-3 px motions are a
    fraction of a cell, too weak a signal to learn matching from in a CPU budget of steps: with at
    most 6 px (mean 2.3 px) RAFT stayed on the zero-flow plateau for 900 steps."""
    return _render(seed, 0, 2, size, bg_speed=(0.0, 10.0), bg_static=0.1, mixed=True, boost=(1.0, 4.0))


def _render(
    seed: int,
    label: int,
    frames: int,
    size: int,
    *,
    bg_speed: tuple[float, float] = (0.1, 0.5),
    bg_static: float = 0.5,
    mixed: bool = False,
    boost: tuple[float, float] = (1.0, 1.0),
) -> tuple[Tensor, Tensor]:
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7)  # label-independent appearance draws
    p = _pixel_grid(size).expand(frames, size, size, 2)

    # Background: a texture 1 texel per pixel, static or drifting slowly (same for all classes).
    margin = max(_BG_MARGIN, math.ceil(bg_speed[1] * size / 64.0 * (frames - 1)) + 2)
    bg_size = size + 2 * margin
    bg_tex = _texture(g, bg_size)
    if float(torch.rand((), generator=g)) < bg_static:
        drift = torch.zeros(2)
    else:
        angle, speed = _uniform(g, 0, 2 * math.pi), _uniform(g, *bg_speed) * size / 64.0
        drift = torch.tensor([math.cos(angle), math.sin(angle)]) * speed
    t = torch.arange(frames, dtype=torch.float32)
    bg_offset = t.view(-1, 1, 1, 1) * drift.view(1, 1, 1, 2)
    bg_coords = p - bg_offset  # where in the (static) background texture pixel p looks
    bg_norm = 2 * (bg_coords + 0.5 + margin) / bg_size - 1
    image = F.grid_sample(
        bg_tex.expand(frames, -1, -1, -1), bg_norm, mode="bilinear", align_corners=False, padding_mode="border"
    )
    flow = drift.view(1, 2, 1, 1).expand(frames, 2, size, size).clone()

    # Objects, back to front; the motion draws use a label-specific generator so appearance does not
    # depend on the label but each (seed, label) pair still gives one fixed clip.
    g_motion = torch.Generator().manual_seed(int(seed) * 1_000_003 + 101 + label)
    count = _randint(g, 1, 3)
    for _ in range(count):
        tex = _texture(g, _TEX_SIZE)
        shape = _randint(g, 0, 2)
        aspect = torch.tensor([_uniform(g, 0.7, 1.3), 1.0])
        aspect = aspect / aspect.prod().sqrt()
        object_label = _randint(g_motion, 0, len(CLASSES) - 1) if mixed else label
        factor = _uniform(g_motion, *boost) if boost != (1.0, 1.0) else 1.0
        track = _object_track(g_motion, object_label, frames, size, factor)
        q = _to_object(p, track["centre"], track["theta"], track["scale"], aspect)
        dist = _shape_distance(q, shape)
        px_per_unit = track["scale"].view(-1, 1, 1) * aspect.min()
        alpha = ((1.0 - dist) * px_per_unit + 0.5).clamp(0, 1).unsqueeze(1)  # ~1 px anti-aliased edge
        colour = F.grid_sample(
            tex.expand(frames, -1, -1, -1), q, mode="bilinear", align_corners=False, padding_mode="border"
        )
        image = image * (1 - alpha) + colour * alpha
        # Exact flow of this object's surface: where q lands in the next frame.
        nxt = {k: torch.cat((v[1:], v[-1:])) for k, v in track.items()}  # last frame's flow is dropped
        p_next = _to_pixel(q, nxt["centre"], nxt["theta"], nxt["scale"], aspect)
        obj_flow = (p_next - p).permute(0, 3, 1, 2)
        visible = (alpha > 0.5).expand(-1, 2, -1, -1)
        flow = torch.where(visible, obj_flow, flow)
    return image.clamp(0, 1).contiguous(), flow[:-1].contiguous()


def split_seed(split: str, index: int) -> int:
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BASE)}")
    if not 0 <= index < SPLIT_SPAN:
        raise ValueError(f"index {index} outside the split's seed range")
    return SPLIT_BASE[split] + index


class MotionShapes(Dataset):
    """Clips of one split, generated on the fly: item i -> (clip, label) or (clip, flows, label).

    Labels cycle through the classes (item i has label i % num_classes) so every split is balanced;
    the seed of item i is the split's base + i, so splits never share a clip. ``cache=True`` keeps
    generated items in memory (useful for val/test, which are read every epoch)."""

    def __init__(
        self,
        split: str = "train",
        length: int = 1000,
        *,
        frames: int = 8,
        size: int = 64,
        with_flow: bool = False,
        cache: bool = False,
    ):
        if split not in SPLIT_BASE:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BASE)}")
        if not 0 < length <= SPLIT_SPAN:
            raise ValueError(f"length must be in (0, {SPLIT_SPAN}]")
        self.split, self.length, self.frames, self.size = split, length, frames, size
        self.with_flow = with_flow
        self._cache: dict[int, tuple] | None = {} if cache else None

    @staticmethod
    def labels() -> list[str]:
        return labels()

    @property
    def num_classes(self) -> int:
        return len(CLASSES)

    def __len__(self) -> int:
        return self.length

    def item_seed_label(self, index: int) -> tuple[int, int]:
        return split_seed(self.split, index), index % len(CLASSES)

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        seed, label = self.item_seed_label(index)
        clip, flows = make_clip(seed, label, self.frames, self.size)
        item = (clip, flows, label) if self.with_flow else (clip, label)
        if self._cache is not None:
            self._cache[index] = item
        return item
