"""Pictures of the defence, per clip, as PNG bytes (made in the worker, stored with the job's result).

- ``flow_strip_png``: a strip of a few frames of the clip with their optical flow before and after
  purification (rows: frames / flow before / flow after; flow drawn with the colour wheel of
  ``torchvision.utils.flow_to_image``, before and after on one shared magnitude scale so their
  colours compare).
- ``mc_loss_png``: the MC loss over the defence steps (Algorithm 1's trajectory), with the bundle's
  clean-calibration threshold when known.

Both are deterministic: same input, same bytes (matplotlib's Agg backend, no timestamp metadata).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

DEFAULT_FRAMES = 4
_PNG_METADATA = {"Software": None}  # matplotlib writes its version otherwise; no date is written for PNG
_DPI = 100


def _figure(width_px: int, height_px: int):
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot): no global state or GUI backend, safe in a long-lived worker;
    # savefig renders PNG with the Agg canvas.
    return Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata=_PNG_METADATA)
    return buf.getvalue()


def _as_tensor(array: Any) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu", torch.float32)
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


def pick_indices(pairs: int, count: int = DEFAULT_FRAMES) -> list[int]:
    """``count`` flow indices spread evenly over ``pairs`` adjacent-frame pairs (all when fewer)."""
    if pairs <= 0:
        return []
    count = max(1, min(count, pairs))
    return sorted({int(round(i)) for i in np.linspace(0, pairs - 1, count)})


def flow_images(flows_before: Any, flows_after: Any) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 images (N, H, W, 3) of two flow stacks (N, 2, H, W), on one shared scale."""
    before, after = _as_tensor(flows_before), _as_tensor(flows_after)
    if before.shape != after.shape or before.dim() != 4 or before.shape[1] != 2:
        raise ValueError(f"expected two flow stacks (N, 2, H, W), got {tuple(before.shape)} and {tuple(after.shape)}")
    from torchvision.utils import flow_to_image

    # flow_to_image normalises a batch by its largest magnitude: one call, one scale for both.
    images = flow_to_image(torch.cat([before, after]).contiguous())
    images = images.permute(0, 2, 3, 1).numpy()
    return images[: len(before)], images[len(before) :]


def flow_strip_png(
    frames: Any,
    flows_before: Any,
    flows_after: Any,
    *,
    count: int = DEFAULT_FRAMES,
    tile: int | None = None,
    title: str | None = None,
) -> bytes:
    """PNG strip: ``count`` frames (T, 3, H, W in [0, 1]) over their flow before/after (T-1, 2, H, W).

    Column j shows frame t_j and the flow from frame t_j to t_j + 1. ``tile`` is the drawn width of
    one picture in pixels (default: the frame width, at least 128 so tiny clips stay visible).
    """
    clip = _as_tensor(frames)
    if clip.dim() != 4 or clip.shape[1] != 3:
        raise ValueError(f"expected frames (T, 3, H, W), got {tuple(clip.shape)}")
    before, after = _as_tensor(flows_before), _as_tensor(flows_after)
    if before.dim() != 4 or before.shape[0] != clip.shape[0] - 1 or before.shape[-2:] != clip.shape[-2:]:
        raise ValueError(f"flows {tuple(before.shape)} do not match frames {tuple(clip.shape)}")
    idx = pick_indices(before.shape[0], count)
    if not idx:
        raise ValueError("a clip needs at least two frames to have a flow")
    img_before, img_after = flow_images(before[idx], after[idx])
    pictures = (clip[idx].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)

    height, width = clip.shape[-2:]
    tile_w = int(tile or max(128, width))
    tile_h = max(1, int(round(tile_w * height / width)))
    label_w, title_h, caption_h, pad = 104, (26 if title else 6), 18, 4
    cols = len(idx)
    fig_w = label_w + cols * (tile_w + pad) + pad
    fig_h = title_h + 3 * (tile_h + caption_h) + pad
    fig = _figure(fig_w, fig_h)
    fig.patch.set_facecolor("white")
    if title:
        fig.text(pad / fig_w, 1 - 4 / fig_h, title, ha="left", va="top", fontsize=11, weight="bold")
    rows = [("frames", pictures), ("flow before\npurification", img_before), ("flow after\npurification", img_after)]
    for r, (name, images) in enumerate(rows):
        top = title_h + r * (tile_h + caption_h) + caption_h
        y0 = 1 - (top + tile_h) / fig_h
        fig.text(
            (label_w - 8) / fig_w, y0 + tile_h / 2 / fig_h, name, ha="right", va="center", fontsize=10, linespacing=1.1
        )
        for c, t in enumerate(idx):
            x0 = (label_w + c * (tile_w + pad)) / fig_w
            ax = fig.add_axes((x0, y0, tile_w / fig_w, tile_h / fig_h))
            ax.imshow(images[c], interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {t} \u2192 {t + 1}", fontsize=8, pad=2)
    return _png(fig)


def mc_loss_png(
    trajectory: Any,
    *,
    threshold: float | None = None,
    mc_before: float | None = None,
    mc_after: float | None = None,
    size: tuple[int, int] = (480, 300),
    title: str | None = None,
) -> bytes:
    """PNG line plot of the MC loss per defence step (K + 1 values: the input, then after each step).

    ``threshold`` (the bundle's clean calibration) is drawn as a dashed line; ``mc_before`` /
    ``mc_after`` (inference-flow MC loss of the input / restored clip) go into the legend.
    """
    values = np.asarray(_as_tensor(trajectory).reshape(-1).numpy(), dtype=np.float64)
    if values.size == 0:
        raise ValueError("empty MC-loss trajectory")
    fig = _figure(*size)
    fig.patch.set_facecolor("white")
    ax = fig.add_axes((0.15, 0.16, 0.8, 0.72))
    steps = np.arange(values.size)
    label = "MC loss (defence flow)"
    if mc_before is not None and mc_after is not None:
        label += f"; clip {mc_before:.4f} \u2192 {mc_after:.4f}"
    ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, color="#1f5fa8", label=label)
    if threshold is not None and np.isfinite(threshold):
        ax.axhline(threshold, linestyle="--", linewidth=1.2, color="#b3261e", label=f"attack threshold {threshold:.4f}")
    ax.set_xlabel("defence step")
    ax.set_ylabel("MC loss")
    if values.size > 1:
        ax.set_xlim(0, values.size - 1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or "MC loss over the defence steps", fontsize=10)
    return _png(fig)


def clip_figures(
    frames: Any,
    flows_before: Any,
    flows_after: Any,
    trajectory: Any,
    *,
    threshold: float | None = None,
    mc_before: float | None = None,
    mc_after: float | None = None,
    index: int | None = None,
    count: int = DEFAULT_FRAMES,
) -> dict[str, bytes]:
    """Both pictures of one clip: ``{"flow.png": ..., "mc_loss.png": ...}``."""
    name = f"clip {index}" if index is not None else None
    return {
        "flow.png": flow_strip_png(frames, flows_before, flows_after, count=count, title=name),
        "mc_loss.png": mc_loss_png(
            trajectory,
            threshold=threshold,
            mc_before=mc_before,
            mc_after=mc_after,
            title=f"MC loss over the defence steps ({name})" if name else None,
        ),
    }
