"""Demo stage 2: the flow-stream I3D trained on MotionShapes flows of the stage-1 RAFT (cached on
disk: clean, noisy and optionally purified clips), plus cheap exact-flow clips, with mirror
augmentation; the epoch loop is ``models.training.classifier_fit``'s (checkpoints, resume, best epoch).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from models.bundle_meta import FlowNormalisation
from models.data.synthetic import CLASSES, make_clip, split_seed
from models.defense.purify import DefenseConfig
from models.nets.flow import VideoRAFT
from models.training.classifier_fit import Augment, FitConfig, fit_classifier
from models.training.common import ordered_loader, training_device
from models.training.flow_cache import flows_of, load_or_compute
from models.training.raft import RAFT_FINAL, build_demo_raft

log = logging.getLogger(__name__)

I3D_CKPT = "i3d_state.pt"
I3D_FINAL = "i3d_final.pt"

# Mirroring a flow field maps every MotionShapes class onto a class: a left-right mirror swaps
# right/left translation and the rotation sense, keeps zoom and oscillation axes. This doubles the
# effective training set for free (the flows are cached, so new RAFT passes would be the expensive part).
_HFLIP_LABEL = {
    "translate_right": "translate_left",
    "translate_left": "translate_right",
    "rotate_cw": "rotate_ccw",
    "rotate_ccw": "rotate_cw",
}
_VFLIP_LABEL = {
    "translate_up": "translate_down",
    "translate_down": "translate_up",
    "rotate_cw": "rotate_ccw",
    "rotate_ccw": "rotate_cw",
}


def _flip_table(mapping: dict[str, str]) -> Tensor:
    return torch.tensor([CLASSES.index(mapping.get(name, name)) for name in CLASSES])


def flip_flows(flows: Tensor, labels: Tensor, horizontal: Tensor, vertical: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror flows (B, T-1, 2, H, W) per sample and remap the labels accordingly."""
    flows = flows.clone()
    h = horizontal.view(-1, 1, 1, 1, 1)
    v = vertical.view(-1, 1, 1, 1, 1)
    mirrored = flows.flip(-1)
    mirrored[:, :, 0] = -mirrored[:, :, 0]
    flows = torch.where(h, mirrored, flows)
    mirrored = flows.flip(-2)
    mirrored[:, :, 1] = -mirrored[:, :, 1]
    flows = torch.where(v, mirrored, flows)
    labels = torch.where(horizontal, _flip_table(_HFLIP_LABEL).to(labels.device)[labels], labels)
    labels = torch.where(vertical, _flip_table(_VFLIP_LABEL).to(labels.device)[labels], labels)
    return flows, labels


@dataclass
class I3DTrainConfig:
    run_dir: Path
    epochs: int = 12
    max_minutes: float = 20.0
    width: float = 0.25
    train_clips: int = 1500
    val_clips: int = 300
    noisy_fraction: float = 0.5  # extra clips cached with uniform noise of +-noise_eps
    noise_eps: float = 12 / 255
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    flow_updates: int = 12
    frames: int = 8
    size: int = 64
    seed: int = 0
    chunk: int = 50  # clips per cached flow file (and per rendering task of a loader worker)
    flow_batch: int = 10  # clips per RAFT call while caching
    gt_clips: int = 0  # extra training clips with their exact (ground-truth) flow instead of RAFT's
    # Extra clips cached as the deployment's defended path sees them: purified (bundle defence
    # defaults) before RAFT. The purification shifts the flow a little; a classifier that has seen
    # that shift loses less accuracy to the defence. ~40x a plain flow pass: meant for a GPU.
    defended_fraction: float = 0.0
    flip_aug: bool = True
    threads: int | None = None
    device: str = "cpu"
    loader_workers: int = 0
    norm: FlowNormalisation = field(default_factory=FlowNormalisation)


def load_trained_raft(run_dir: Path) -> VideoRAFT:
    path = Path(run_dir) / RAFT_FINAL
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run the RAFT stage first")
    raft = build_demo_raft()
    raft.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return VideoRAFT(raft).eval()


def _noise_for(seed: int, clip: Tensor, eps: float) -> Tensor:
    g = torch.Generator().manual_seed(seed * 31 + 17)
    return (clip + (torch.rand(clip.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)


class _ClipChunks(Dataset):
    """Item i = clips (n, T, 3, H, W) and labels of chunk ``chunks[i]`` = (first index, n) of a split,
    with the split's uniform noise when ``noisy``: rendered by loader workers ahead of RAFT."""

    def __init__(self, split: str, chunks: list[tuple[int, int]], noisy: bool, cfg: I3DTrainConfig):
        self.split, self.chunks, self.noisy, self.cfg = split, chunks, noisy, cfg

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        first, n = self.chunks[index]
        clips, labels = [], []
        for i in range(first, first + n):
            seed, label = split_seed(self.split, i), i % len(CLASSES)
            clip, _ = make_clip(seed, label, self.cfg.frames, self.cfg.size)
            clips.append(_noise_for(seed, clip, self.cfg.noise_eps) if self.noisy else clip)
            labels.append(label)
        return torch.stack(clips), torch.tensor(labels)


FLOW_KINDS = ("clean", "noisy", "defended")


@torch.no_grad()
def cache_flows(
    video_raft: VideoRAFT, run_dir: Path, split: str, start: int, count: int, *, kind: str, cfg: I3DTrainConfig
) -> tuple[Tensor, Tensor]:
    """RAFT flows (float16, (N, T-1, 2, H, W)) and labels of split items [start, start+count).

    ``kind``: "clean" clips, "noisy" (uniform noise of +-noise_eps) or "defended" (clean clips
    purified with the default ``DefenseConfig`` first). Computed once in chunks saved under
    ``run_dir/flows`` (an interrupted caching run resumes at the first missing chunk)."""
    if kind not in FLOW_KINDS:
        raise ValueError(f"kind must be one of {FLOW_KINDS}, got {kind!r}")
    folder = Path(run_dir) / "flows"
    defense = DefenseConfig() if kind == "defended" else None

    def path_of(first: int, n: int) -> Path:
        return folder / f"{split}_{kind}_{cfg.flow_updates}u_{first:07d}_{n}.pt"

    chunks = [(first, min(cfg.chunk, start + count - first)) for first in range(start, start + count, cfg.chunk)]
    missing = [chunk for chunk in chunks if not path_of(*chunk).is_file()]
    dataset = _ClipChunks(split, missing, kind == "noisy", cfg)
    rendered = iter(ordered_loader(dataset, cfg.loader_workers) if missing else ())

    def compute() -> dict[str, Tensor]:
        clips, labels = next(rendered)
        flows = flows_of(video_raft, clips, updates=cfg.flow_updates, batch=cfg.flow_batch, defense=defense)
        return {"flows": flows, "labels": labels}

    flows_out, labels_out = [], []
    for chunk in tqdm(chunks, desc=f"flows {split}/{kind}", mininterval=10, dynamic_ncols=True):
        saved = load_or_compute(path_of(*chunk), compute)
        flows_out.append(saved["flows"])
        labels_out.append(saved["labels"])
    return torch.cat(flows_out), torch.cat(labels_out)


def gt_flows(start: int, count: int, frames: int, size: int, split: str = "train") -> tuple[Tensor, Tensor]:
    """Exact flows (float16) and labels of split items [start, start+count)."""
    flows, labels = [], []
    for i in range(start, start + count):
        label = i % len(CLASSES)
        flows.append(make_clip(split_seed(split, i), label, frames, size)[1].half())
        labels.append(label)
    return torch.stack(flows), torch.tensor(labels)


def _flip_augment(cfg: I3DTrainConfig, count: int) -> Augment:
    """Random mirrors per training item, drawn once per epoch from a seed of the epoch (a resumed
    epoch mirrors the same items)."""
    drawn: dict[int, Tensor] = {}

    def augment(flows: Tensor, labels: Tensor, epoch: int, idx: Tensor) -> tuple[Tensor, Tensor]:
        if epoch not in drawn:
            drawn.clear()
            g_aug = torch.Generator().manual_seed(cfg.seed * 2003 + epoch)
            drawn[epoch] = torch.rand(count, 2, generator=g_aug) < 0.5
        flips = drawn[epoch][idx].to(flows.device)
        return flip_flows(flows, labels, flips[:, 0], flips[:, 1])

    return augment


def train_i3d(cfg: I3DTrainConfig) -> dict:
    """Train (or resume) the flow-stream I3D on cached flows of the trained RAFT; returns a summary."""
    from models.nets.i3d import build_i3d, flow_to_classifier_input

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    device = training_device(cfg.device)
    video_raft = load_trained_raft(run_dir).to(device)
    t_cache = time.perf_counter()
    train_f, train_y = cache_flows(video_raft, run_dir, "train", 0, cfg.train_clips, kind="clean", cfg=cfg)
    n_noisy = int(round(cfg.train_clips * cfg.noisy_fraction))
    n_defended = int(round(cfg.train_clips * cfg.defended_fraction))
    if n_noisy:
        # Different clips from the clean ones: more appearance variety for the same RAFT cost.
        nf, ny = cache_flows(video_raft, run_dir, "train", cfg.train_clips, n_noisy, kind="noisy", cfg=cfg)
        train_f, train_y = torch.cat((train_f, nf)), torch.cat((train_y, ny))
    if cfg.gt_clips:
        # Exact flows cost ~10 ms a clip against ~1 s of RAFT on 2 shared cores: they add motion
        # variety cheaply, while the RAFT flows above keep the classifier on its deployment inputs.
        gf, gy = gt_flows(cfg.train_clips + n_noisy, cfg.gt_clips, cfg.frames, cfg.size)
        train_f, train_y = torch.cat((train_f, gf)), torch.cat((train_y, gy))
    val_sets = {"val_acc": cache_flows(video_raft, run_dir, "val", 0, cfg.val_clips, kind="clean", cfg=cfg)}
    if n_defended:
        first = cfg.train_clips + n_noisy + cfg.gt_clips
        df, dy = cache_flows(video_raft, run_dir, "train", first, n_defended, kind="defended", cfg=cfg)
        train_f, train_y = torch.cat((train_f, df)), torch.cat((train_y, dy))
        # The same val clips, purified: selection then also weighs the deployment's defended path.
        val_sets["val_acc_defended"] = cache_flows(
            video_raft, run_dir, "val", 0, cfg.val_clips, kind="defended", cfg=cfg
        )
    log.info(
        "flow caches ready (%d train, %d val) in %.1f min",
        len(train_y),
        cfg.val_clips,
        (time.perf_counter() - t_cache) / 60,
    )
    del video_raft
    # Accuracy on exact flow separates the classifier's quality from the flow model's: if it is high
    # while the RAFT-flow accuracy is low, the flow model is the bottleneck.
    val_sets["val_acc_gt_flow"] = gt_flows(0, cfg.val_clips, cfg.frames, cfg.size, split="val")
    train_f, train_y = train_f.to(device), train_y.to(device)

    torch.manual_seed(cfg.seed)
    model = build_i3d(len(CLASSES), width=cfg.width).to(device)
    # Select on all of the validation sets: the bundle must work on its own RAFT's flow (defended
    # too, where measured) and stay right on good flow.
    state = fit_classifier(
        model,
        lambda flows: model(flow_to_classifier_input(flows, cfg.norm)),
        train_f,
        train_y,
        val_sets,
        FitConfig(
            epochs=cfg.epochs,
            max_minutes=cfg.max_minutes,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        ),
        ckpt_path=run_dir / I3D_CKPT,
        best_path=run_dir / I3D_FINAL,
        augment=_flip_augment(cfg, len(train_y)) if cfg.flip_aug else None,
    )
    summary = {
        "epochs": state["epoch"],
        "minutes": round(state["elapsed"] / 60, 2),
        "width": cfg.width,
        "train_clips": cfg.train_clips,
        "noisy_clips": n_noisy,
        "gt_flow_clips": cfg.gt_clips,
        "defended_clips": n_defended,
        "val_clips": cfg.val_clips,
        **{name: round(value, 4) for name, value in state["best"].items()},
        "best_epoch": state["best_epoch"],
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "flow_updates": cfg.flow_updates,
        "flip_aug": cfg.flip_aug,
        "device": str(device),
        "history": state["history"],
    }
    (run_dir / "i3d_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
