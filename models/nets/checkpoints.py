"""Loading weights users bring: torchvision RAFT, the original RAFT release, the PyTorch I3D port.

Every checkpoint is read with ``torch.load(weights_only=True)`` (no pickled code runs) and must fill
every key of the target model exactly once; anything else fails with the missing, unexpected or
misshapen keys named, so a wrong file is refused instead of silently half-loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from models.errors import BundleError

# Original RAFT (princeton-vl) -> torchvision names. Blocks keep their layer/index structure; inside a
# block convN/normN become convnormreluN.{0,1}; the downsample norm is registered twice in the
# original (normK and downsample.1), so normK is dropped in favour of downsample.1 after a check.
_ORIGINAL_ENCODER_TOP = [
    (r"^(fnet|cnet)\.conv1\.", r"\1.convnormrelu.0."),
    (r"^(fnet|cnet)\.norm1\.", r"\1.convnormrelu.1."),
    (r"^(fnet|cnet)\.conv2\.", r"\1.conv."),
]
_ORIGINAL_BLOCK = re.compile(r"^(fnet|cnet)\.(layer\d\.\d)\.(conv|norm)(\d)\.(.*)$")
_ORIGINAL_UPDATE = [
    (r"^update_block\.encoder\.convc(\d)\.", r"motion_encoder.convcorr\1.0."),
    (r"^update_block\.encoder\.convf(\d)\.", r"motion_encoder.convflow\1.0."),
    (r"^update_block\.encoder\.conv\.", r"motion_encoder.conv.0."),
    (r"^update_block\.gru\.conv([zrq])(\d)\.", r"recurrent_block.convgru\2.conv\1."),
    (r"^update_block\.gru\.conv([zrq])\.", r"recurrent_block.convgru1.conv\1."),
    (r"^update_block\.flow_head\.", r"flow_head."),
]
_PREFIX = {"fnet": "feature_encoder", "cnet": "context_encoder"}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a checkpoint file (bare, or under "state_dict"/"model"), safely loaded."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, wrong format
        raise BundleError(f"cannot read checkpoint {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise BundleError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop a DataParallel-style prefix if every key carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _block_conv_count(state: Mapping[str, Tensor], encoder: str, block: str) -> int:
    convs = {
        m.group(4)
        for k in state
        if (m := _ORIGINAL_BLOCK.match(k)) and m.group(1, 2) == (encoder, block) and m.group(3) == "conv"
    }
    return len(convs)


def convert_original_raft(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original RAFT release names (large or small, with or without ``module.``) -> torchvision names."""
    state = strip_prefix(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        block = _ORIGINAL_BLOCK.match(key)
        if block:
            encoder, layer, kind, index, rest = block.groups()
            convs = _block_conv_count(state, encoder, layer)
            if kind == "norm" and int(index) > convs:
                alias = f"{encoder}.{layer}.downsample.1.{rest}"
                if alias not in state or not torch.equal(state[alias], value):
                    raise BundleError(f"original RAFT checkpoint: {key} has no matching {alias}")
                continue  # the same module as downsample.1
            new = f"{_PREFIX[encoder]}.{layer}.convnormrelu{index}.{0 if kind == 'conv' else 1}.{rest}"
        elif key.startswith(("fnet.", "cnet.")):
            for pattern, repl in _ORIGINAL_ENCODER_TOP:
                new = re.sub(pattern, repl, new)
            head, _, tail = new.partition(".")
            new = f"{_PREFIX[head]}.{tail}"
        elif key.startswith("update_block.mask."):
            index, _, rest = key[len("update_block.mask.") :].partition(".")
            new = {"0": "mask_predictor.convrelu.0.", "2": "mask_predictor.conv."}.get(index, key + "?") + rest
        elif key.startswith("update_block."):
            for pattern, repl in _ORIGINAL_UPDATE:
                new, n = re.subn(pattern, repl, new)
                if n:
                    new = "update_block." + new
                    break
        if new in out:
            raise BundleError(f"original RAFT checkpoint: two keys map to {new}")
        out[new] = value
    return out


def load_exact(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Load so that every target key is filled exactly once with a tensor of the right shape."""
    target = model.state_dict()
    state = dict(state)
    for key in target:
        # BatchNorm's step counter is no weight (older checkpoints lack it); training code never reads it here.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(target[key])
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    misshapen = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(target[k].shape)}"
        for k in set(target) & set(state)
        if state[k].shape != target[k].shape
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise BundleError(f"{what} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_raft_weights(raft: nn.Module, state: Mapping[str, Tensor], fmt: str = "torchvision") -> None:
    if fmt == "original":
        state = convert_original_raft(state)
    elif fmt == "torchvision":
        state = strip_prefix(state)
    else:
        raise BundleError(f"unknown RAFT checkpoint format {fmt!r}; expected torchvision or original")
    load_exact(raft, state, f"RAFT checkpoint ({fmt} format)")


def load_i3d_weights(i3d: nn.Module, state: Mapping[str, Tensor]) -> None:
    load_exact(i3d, strip_prefix(state), "I3D checkpoint")
