"""Inception-v1 I3D (Carreira & Zisserman, 2017), flow stream.

Parameter names follow the widely used PyTorch port (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b0.conv3d.weight``, ..., ``logits.conv3d.weight``) so its flow-stream checkpoints load
as they are. Padding is TensorFlow's "SAME" (computed per input size, as in the original), batch
norm uses eps 1e-3. A ``width`` multiplier makes small models (the demo's).

The head before the logits is selectable (``temporal_pool``, recorded in the bundle), because a
checkpoint only computes what it computed when trained if its head is kept:

- ``"port"``: the port's (and the original Kinetics I3D's) ``AvgPool3d([2, 7, 7], stride 1)``
  before the logits, then the mean over the remaining positions. Over time this weights the
  last block's T' steps 1, 2, ..., 2, 1 (/ 2(T'-1)); at 224 px the 7x7 window covers the 7x7 map
  exactly, so the logits equal the port's. Where the port itself cannot run, the window is clipped
  to the map: below 224 px (map smaller than 7x7) it averages the whole map, and with T' = 1 (fewer
  than 9 input frames) it takes the one step. Above 224 px the port would return one logit vector
  per window position; this averages them (the same weights as the port's logits averaged).
- ``"mean"``: uniform average over space, logits per time step averaged uniformly over time (what
  the demo bundle was trained with).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bundle_meta import FlowNormalisation


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME": output = ceil(size / stride); the extra pixel of odd padding goes at the end."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True):
        pads.extend(_same_padding(size, k, s))
    return F.pad(x, pads) if any(pads) else x


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class Unit3D(nn.Module):
    """Conv3d (SAME padding) + BatchNorm + ReLU; the logits unit has bias and neither of the others."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int, int] = 1,
        stride: int | tuple[int, int, int] = 1,
        *,
        batch_norm: bool = True,
        activation: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        # Zero padding as in the port: inputs are post-ReLU (>= 0), so zeros never win the max wrongly.
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches: 1x1; 1x1->3x3; 1x1->3x3; 3x3 max-pool->1x1 (names b0, b1a/b1b, b2a/b2b, b3b)."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = widths
        self.b0 = Unit3D(in_channels, c0)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = Unit3D(c1a, c1b, 3)
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = Unit3D(c2a, c2b, 3)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# Channel widths of the Inception-v1 mixed blocks at width 1.0 (Szegedy et al., Table 1).
_MIXED = OrderedDict(
    Mixed_3b=(64, 96, 128, 16, 32, 32),
    Mixed_3c=(128, 128, 192, 32, 96, 64),
    Mixed_4b=(192, 96, 208, 16, 48, 64),
    Mixed_4c=(160, 112, 224, 24, 64, 64),
    Mixed_4d=(128, 128, 256, 24, 64, 64),
    Mixed_4e=(112, 144, 288, 32, 64, 64),
    Mixed_4f=(256, 160, 320, 32, 128, 128),
    Mixed_5b=(256, 160, 320, 32, 128, 128),
    Mixed_5c=(384, 192, 384, 48, 128, 128),
)
_POOL_BEFORE = {"Mixed_3b": "MaxPool3d_3a_3x3", "Mixed_4b": "MaxPool3d_4a_3x3", "Mixed_5b": "MaxPool3d_5a_2x2"}
_POOLS = {
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}
TEMPORAL_POOLS = ("port", "mean")
TemporalPool = Literal["port", "mean"]
# The port's pooling window before the logits (time, height, width), stride 1.
PORT_POOL_KERNEL = (2, 7, 7)


class InceptionI3d(nn.Module):
    """I3D on a (B, in_channels, T, H, W) input -> clip logits (B, num_classes)."""

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 2,
        width: float = 1.0,
        dropout: float = 0.5,
        temporal_pool: TemporalPool = "mean",
    ):
        super().__init__()
        if not 0 < width <= 1:
            raise ValueError(f"width multiplier must be in (0, 1], got {width}")
        if temporal_pool not in TEMPORAL_POOLS:
            raise ValueError(f"temporal_pool must be one of {TEMPORAL_POOLS}, got {temporal_pool!r}")
        self.width = width
        self.temporal_pool = temporal_pool

        def w(c: int) -> int:
            return max(1, int(round(c * width)))

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["Conv3d_1a_7x7"] = Unit3D(in_channels, w(64), 7, 2)
        layers["MaxPool3d_2a_3x3"] = MaxPool3dSame(*_POOLS["MaxPool3d_2a_3x3"])
        layers["Conv3d_2b_1x1"] = Unit3D(w(64), w(64), 1)
        layers["Conv3d_2c_3x3"] = Unit3D(w(64), w(192), 3)
        channels = w(192)
        for name, widths in _MIXED.items():
            if name in _POOL_BEFORE:
                pool = _POOL_BEFORE[name]
                layers[pool] = MaxPool3dSame(*_POOLS[pool])
            block = InceptionModule(channels, tuple(w(c) for c in widths))  # type: ignore[arg-type]
            layers[name] = block
            channels = block.out_channels
        for name, layer in layers.items():
            self.add_module(name, layer)
        self._endpoints = list(layers)
        self.feature_channels = channels
        self.dropout = nn.Dropout(dropout)
        self.logits = Unit3D(channels, num_classes, 1, batch_norm=False, activation=False, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        """He init (fan-out) keeps activations alive through the 20+ conv layers; PyTorch's default
        shrinks them so much that an untrained model gives the same logits for every input."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.logits.conv3d.weight, std=0.01)

    @property
    def num_classes(self) -> int:
        return self.logits.conv3d.out_channels

    def replace_logits(self, num_classes: int) -> None:
        """New classifier head (fine-tuning a checkpoint on other labels)."""
        self.logits = Unit3D(self.feature_channels, num_classes, 1, batch_norm=False, activation=False, bias=True)

    def features(self, x: Tensor) -> Tensor:
        for name in self._endpoints:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected (B, C, T, H, W), got {tuple(x.shape)}")
        return self.head(self.features(x))

    def head(self, features: Tensor) -> Tensor:
        """Clip logits (B, classes) from the last block's features (B, C, T', H', W')."""
        if self.temporal_pool == "port":
            kernel = tuple(min(k, n) for k, n in zip(PORT_POOL_KERNEL, features.shape[2:], strict=True))
            x = F.avg_pool3d(features, kernel, stride=1)
        else:
            x = features.mean(dim=(3, 4), keepdim=True)  # spatial average: any input size from 64 to 224+
        logits = self.logits(self.dropout(x))  # (B, classes, T'', H'', W'')
        return logits.flatten(2).mean(dim=2)


def build_i3d(
    num_classes: int, *, width: float = 1.0, in_channels: int = 2, temporal_pool: TemporalPool = "mean"
) -> InceptionI3d:
    return InceptionI3d(num_classes, in_channels=in_channels, width=width, temporal_pool=temporal_pool)


def flow_to_classifier_input(flows: Tensor, norm: FlowNormalisation | None = None) -> Tensor:
    """(B, T-1, 2, H, W) flow in pixels -> (B, 2, T-1, H, W) classifier input in [-1, 1]."""
    norm = norm or FlowNormalisation()
    x = flows.clamp(-norm.clamp, norm.clamp) / norm.scale
    if norm.channel_order == "yx":
        x = x.flip(2)
    return x.permute(0, 2, 1, 3, 4)
