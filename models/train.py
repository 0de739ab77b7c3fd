"""Training the demo model pair on MotionShapes: RAFT-small on exact flow, then I3D on RAFT's flow.

Everything is budgeted for a 2-core CPU (``device="cuda"`` and ``loader_workers`` take the same
stages to a GPU, the synthetic data rendered by worker processes ahead of it): both stages stop at
a step/epoch budget or a wall-clock budget, whichever comes first, and the learning-rate schedule
follows the *fraction of the budget used* (not a step count fixed in advance), so a
minutes-budgeted run still anneals properly. Each stage checkpoints model + optimizer + progress
into the run directory, and re-running the same command resumes from the last checkpoint (the
elapsed time is stored, so the budget is the total training time across interruptions, not per
invocation).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.bundle_meta import FlowNormalisation
from models.data.synthetic import CLASSES, SPLIT_BASE, make_clip, make_flow_pair, split_seed
from models.errors import UserError
from models.flow import VideoRAFT, build_raft

log = logging.getLogger(__name__)

RAFT_CKPT = "raft_state.pt"  # resumable training state
RAFT_FINAL = "raft_final.pt"  # bare torchvision state dict: the bundle's flow checkpoint
I3D_CKPT = "i3d_state.pt"
I3D_FINAL = "i3d_final.pt"
FLOW_CACHE = "flow_cache.pt"
RAFT_CORR_LEVELS = 3
RAFT_CORR_RADIUS = 3


def _atomic_save(obj: object, path: Path) -> None:
    """Write then rename: an interrupted save never leaves a truncated checkpoint behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def one_cycle_lr(base_lr: float, progress: float, warmup: float = 0.05, final: float = 0.05) -> float:
    """Linear warm-up to ``base_lr`` then linear decay to ``final * base_lr``, on progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base_lr * (0.1 + 0.9 * progress / warmup)
    return base_lr * (1.0 - (1.0 - final) * (progress - warmup) / (1.0 - warmup))


def _training_device(name: str) -> torch.device:
    """The device a stage trains on; CUDA is an option, never a requirement, so asking for it on a
    machine without it is an error up front rather than a crash at the first batch."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda":
        # Full fp32: cached flows and the selection of the best epoch must not depend on TF32 rounding.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict on the CPU: final checkpoints load anywhere, whatever device trained them."""
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def _adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-8)


def build_demo_raft() -> nn.Module:
    """The demo's flow model: torchvision RAFT-small with 3 correlation levels (fits 64x64)."""
    return build_raft("raft_small", corr_levels=RAFT_CORR_LEVELS, corr_radius=RAFT_CORR_RADIUS)


# --------------------------------------------------------------------------------------------- RAFT


@dataclass
class RaftTrainConfig:
    run_dir: Path
    max_steps: int = 100_000
    max_minutes: float = 40.0
    batch_size: int = 16
    lr: float = 4e-4
    weight_decay: float = 1e-4
    gamma: float = 0.8
    train_updates: int = 8
    eval_updates: int = 12
    clip_grad: float = 1.0
    frames: int = 8
    size: int = 64
    dense_prob: float = 0.9  # fraction of pairs from make_flow_pair (dense motion) vs class clips
    noise_prob: float = 0.3  # fraction of pairs with uniform noise (the defence's perturbation range)
    noise_eps: float = 12 / 255
    checkpoint_every: int = 20
    eval_clips: int = 40
    seed: int = 0
    threads: int | None = None
    init: Path | None = None  # warm-start weights for a fresh run (ignored when resuming)
    device: str = "cpu"
    loader_workers: int = 0  # processes rendering batches ahead (0: render in the training process)


def sequence_loss(predictions: list[Tensor], target: Tensor, gamma: float = 0.8) -> Tensor:
    """RAFT's loss: L1 of every iterate to the ground truth, later iterates weighted more (gamma^(N-i-1))."""
    n = len(predictions)
    total = predictions[0].new_zeros(())
    for i, pred in enumerate(predictions):
        total = total + gamma ** (n - i - 1) * (pred - target).abs().mean()
    return total


def _pair_batch(step: int, cfg: RaftTrainConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Batch of (frame t, frame t+1, GT flow), mostly dense-motion pairs plus pairs of class clips
    (so static backgrounds and small motions are seen as well); seeds are a function of the step,
    so a resumed run sees the same data stream it would have seen uninterrupted."""
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    img1, img2, flows = [], [], []
    for i in range(cfg.batch_size):
        index = (step * cfg.batch_size + i) % (SPLIT_BASE["test"] - SPLIT_BASE["train"])
        seed = split_seed("train", index)
        label = int(torch.randint(len(CLASSES), (), generator=g))
        if float(torch.rand((), generator=g)) < cfg.dense_prob:
            clip, flow = make_flow_pair(seed, size=cfg.size)
        else:
            clip, flow = make_clip(seed, label, frames=cfg.frames, size=cfg.size)
        t = int(torch.randint(clip.shape[0] - 1, (), generator=g))
        a, b = clip[t], clip[t + 1]
        if float(torch.rand((), generator=g)) < cfg.noise_prob:
            a = (a + (torch.rand(a.shape, generator=g) * 2 - 1) * cfg.noise_eps).clamp(0, 1)
            b = (b + (torch.rand(b.shape, generator=g) * 2 - 1) * cfg.noise_eps).clamp(0, 1)
        img1.append(a)
        img2.append(b)
        flows.append(flow[t])
    return torch.stack(img1), torch.stack(img2), torch.stack(flows)


class _PairBatches(Dataset):
    """Item i = the training batch of step ``first_step + i``, so ``DataLoader`` workers can render
    batches ahead of a GPU while the stream stays exactly the one ``_pair_batch`` defines."""

    def __init__(self, cfg: RaftTrainConfig, first_step: int):
        self.cfg, self.first_step = cfg, first_step

    def __len__(self) -> int:
        return max(0, self.cfg.max_steps - self.first_step)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return _pair_batch(self.first_step + index, self.cfg)


def _loader(dataset: Dataset, workers: int) -> DataLoader:
    """Items in order (``batch_size=None``: each item already is a batch), rendered by ``workers``
    processes when > 0; renders are CPU-bound numpy-free torch code, one thread per worker."""
    extra = {"prefetch_factor": 2} if workers > 0 else {}
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, **extra)


@torch.no_grad()
def flow_epe(
    raft: nn.Module, split: str = "val", n_clips: int = 40, updates: int = 12, frames: int = 8, size: int = 64
) -> float:
    """Mean end-point error (px) of the flow of every adjacent pair of ``n_clips`` clips of a split."""
    video = VideoRAFT(raft).eval()
    was_training = raft.training
    raft.eval()
    device = next(raft.parameters()).device
    errors = []
    for start in range(0, n_clips, 8):
        batch = [
            make_clip(split_seed(split, i), i % len(CLASSES), frames, size)
            for i in range(start, min(n_clips, start + 8))
        ]
        clips = torch.stack([c for c, _ in batch]).to(device)
        gt = torch.stack([f for _, f in batch]).to(device)
        pred = video(clips, num_flow_updates=updates)["forward"]
        errors.append((pred - gt).norm(dim=2).flatten(1).mean(1))
    raft.train(was_training)
    return float(torch.cat(errors).mean())


def zero_flow_epe(split: str = "val", n_clips: int = 40, frames: int = 8, size: int = 64) -> float:
    """EPE of predicting no motion at all: the floor a useful flow model must beat by far (most
    pixels are static background, so this is small in absolute terms)."""
    mags = [
        make_clip(split_seed(split, i), i % len(CLASSES), frames, size)[1].norm(dim=1).mean() for i in range(n_clips)
    ]
    return float(torch.stack(mags).mean())


def train_raft(cfg: RaftTrainConfig) -> dict:
    """Train (or resume training) RAFT-small; returns a summary (steps, minutes, EPE before/after)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = _training_device(cfg.device)
    raft = build_demo_raft()
    ckpt_path = run_dir / RAFT_CKPT
    state = {"step": 0, "elapsed": 0.0, "epe_before": None, "history": []}
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.is_file() else None
    if saved is not None:
        raft.load_state_dict(saved["model"])
    elif cfg.init is not None:
        from models.checkpoints import read_state_dict

        raft.load_state_dict(read_state_dict(cfg.init))
        log.info("RAFT initialised from %s", cfg.init)
    raft.to(device)
    optimizer = _adamw(raft, cfg.lr, cfg.weight_decay)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])  # after .to(device): its state follows the params
        state = saved["state"]
        log.info("resuming RAFT training at step %d (%.1f min done)", state["step"], state["elapsed"] / 60)
    if state["epe_before"] is None:
        state["epe_before"] = flow_epe(raft, "val", cfg.eval_clips, cfg.eval_updates, cfg.frames, cfg.size)
        log.info("val EPE before training (%d updates): %.3f px", cfg.eval_updates, state["epe_before"])

    def save() -> None:
        _atomic_save(
            {
                "model": raft.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": state,
                "config": {k: str(v) for k, v in asdict(cfg).items()},
            },
            ckpt_path,
        )

    budget_s = cfg.max_minutes * 60
    raft.train()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="raft", mininterval=10, dynamic_ncols=True)
    window: list[float] = []
    batches = iter(_loader(_PairBatches(cfg, state["step"]), cfg.loader_workers))
    while state["step"] < cfg.max_steps and state["elapsed"] < budget_s:
        t0 = time.perf_counter()
        progress = max(state["step"] / cfg.max_steps, state["elapsed"] / budget_s)
        lr = one_cycle_lr(cfg.lr, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        img1, img2, gt = (t.to(device, non_blocking=True) for t in next(batches))
        preds = raft(img1 * 2 - 1, img2 * 2 - 1, num_flow_updates=cfg.train_updates)
        loss = sequence_loss(preds, gt, cfg.gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(raft.parameters(), cfg.clip_grad)
        optimizer.step()
        epe = float((preds[-1].detach() - gt).norm(dim=1).mean())
        window.append(epe)
        state["step"] += 1
        state["elapsed"] += time.perf_counter() - t0
        bar.update(1)
        if state["step"] % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", epe=f"{sum(window) / len(window):.3f}", lr=f"{lr:.1e}")
        if state["step"] % cfg.checkpoint_every == 0:
            mean_epe = sum(window) / len(window)
            window.clear()
            state["history"].append({"step": state["step"], "minutes": state["elapsed"] / 60, "train_epe": mean_epe})
            log.info(
                "raft step %d  %.1f min  train EPE %.3f  lr %.2e", state["step"], state["elapsed"] / 60, mean_epe, lr
            )
            save()
    bar.close()
    del batches  # stops the loader's worker processes
    save()
    state["epe_after"] = flow_epe(raft, "val", cfg.eval_clips, cfg.eval_updates, cfg.frames, cfg.size)
    log.info(
        "val EPE after %d steps / %.1f min (%d updates): %.3f px (before %.3f)",
        state["step"],
        state["elapsed"] / 60,
        cfg.eval_updates,
        state["epe_after"],
        state["epe_before"],
    )
    save()
    torch.save(_cpu_state(raft), run_dir / RAFT_FINAL)
    summary = {
        "steps": state["step"],
        "minutes": round(state["elapsed"] / 60, 2),
        "val_epe_before": round(state["epe_before"], 4),
        "val_epe_after": round(state["epe_after"], 4),
        "eval_updates": cfg.eval_updates,
        "train_updates": cfg.train_updates,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "eval_clips": cfg.eval_clips,
        "device": str(device),
        "val_zero_flow_epe": round(zero_flow_epe("val", cfg.eval_clips, cfg.frames, cfg.size), 4),
    }
    (run_dir / "raft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------- I3D

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
    ``run_dir/flows`` (an interrupted caching run resumes at the first missing chunk); the
    classifier then trains for many epochs without another RAFT pass."""
    from models.defense import DefenseConfig, purify

    if kind not in FLOW_KINDS:
        raise ValueError(f"kind must be one of {FLOW_KINDS}, got {kind!r}")
    folder = Path(run_dir) / "flows"
    folder.mkdir(parents=True, exist_ok=True)
    device = next(video_raft.parameters()).device

    def path_of(first: int, n: int) -> Path:
        return folder / f"{split}_{kind}_{cfg.flow_updates}u_{first:07d}_{n}.pt"

    chunks = [(first, min(cfg.chunk, start + count - first)) for first in range(start, start + count, cfg.chunk)]
    missing = [chunk for chunk in chunks if not path_of(*chunk).is_file()]
    rendered = iter(_loader(_ClipChunks(split, missing, kind == "noisy", cfg), cfg.loader_workers) if missing else ())
    flows_out, labels_out = [], []
    for chunk in tqdm(chunks, desc=f"flows {split}/{kind}", mininterval=10, dynamic_ncols=True):
        path = path_of(*chunk)
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
        else:
            clips, labels = next(rendered)
            chunk_flows = []
            for b in range(0, len(labels), cfg.flow_batch):
                batch = clips[b : b + cfg.flow_batch].to(device)
                if kind == "defended":
                    batch = purify(batch, video_raft, DefenseConfig()).restored
                flows = video_raft(batch, num_flow_updates=cfg.flow_updates)["forward"]
                chunk_flows.append(flows.half().cpu())
            saved = {"flows": torch.cat(chunk_flows), "labels": labels}
            _atomic_save(saved, path)
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


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module, flows: Tensor, labels: Tensor, norm: FlowNormalisation, batch: int = 64
) -> float:
    from models.i3d import flow_to_classifier_input

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch):
        logits = model(flow_to_classifier_input(flows[i : i + batch].to(device).float(), norm))
        correct += int((logits.argmax(1) == labels[i : i + batch].to(device)).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


def train_i3d(cfg: I3DTrainConfig) -> dict:
    """Train (or resume) the flow-stream I3D on cached flows of the trained RAFT; returns a summary."""
    from models.i3d import build_i3d, flow_to_classifier_input

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    device = _training_device(cfg.device)
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
    model = build_i3d(len(CLASSES), width=cfg.width)
    ckpt_path = run_dir / I3D_CKPT
    state = {"epoch": 0, "batch": 0, "elapsed": 0.0, "best_score": -1.0, "best": {}, "best_epoch": -1, "history": []}
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.is_file() else None
    if saved is not None:
        model.load_state_dict(saved["model"])
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        state = {"best_score": -1.0, "best": {}, **saved["state"]}  # runs saved before those keys existed
        log.info(
            "resuming I3D training at epoch %d batch %d (%.1f min done)",
            state["epoch"],
            state["batch"],
            state["elapsed"] / 60,
        )

    def save() -> None:
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, ckpt_path)

    budget_s = cfg.max_minutes * 60
    batches_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    total_batches = cfg.epochs * batches_per_epoch
    model.train()
    while state["epoch"] < cfg.epochs and state["elapsed"] < budget_s:
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed * 1009 + state["epoch"]))
        g_aug = torch.Generator().manual_seed(cfg.seed * 2003 + state["epoch"])
        flips = (torch.rand(len(train_y), 2, generator=g_aug) < 0.5).to(device)
        bar = tqdm(
            total=batches_per_epoch,
            initial=state["batch"],
            desc=f"i3d epoch {state['epoch'] + 1}",
            mininterval=10,
            dynamic_ncols=True,
        )
        losses: list[float] = []
        while state["batch"] < batches_per_epoch and state["elapsed"] < budget_s:
            t0 = time.perf_counter()
            done = state["epoch"] * batches_per_epoch + state["batch"]
            lr = one_cycle_lr(cfg.lr, max(done / total_batches, state["elapsed"] / budget_s), warmup=0.03)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[state["batch"] * cfg.batch_size : (state["batch"] + 1) * cfg.batch_size]
            flows, labels = train_f[idx].float(), train_y[idx]
            if cfg.flip_aug:
                flows, labels = flip_flows(flows, labels, flips[idx, 0], flips[idx, 1])
            loss = F.cross_entropy(model(flow_to_classifier_input(flows, cfg.norm)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            state["batch"] += 1
            state["elapsed"] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{lr:.1e}")
            if state["batch"] % 20 == 0:
                save()
        bar.close()
        if state["batch"] < batches_per_epoch:  # out of time mid-epoch
            break
        accuracies = {name: classifier_accuracy(model, f, y, cfg.norm) for name, (f, y) in val_sets.items()}
        state["history"].append(
            {
                "epoch": state["epoch"] + 1,
                "minutes": round(state["elapsed"] / 60, 2),
                "train_loss": sum(losses) / max(1, len(losses)),
                **accuracies,
            }
        )
        log.info(
            "i3d epoch %d  %.1f min  loss %.4f  %s",
            state["epoch"] + 1,
            state["elapsed"] / 60,
            state["history"][-1]["train_loss"],
            "  ".join(f"{name} {value:.4f}" for name, value in accuracies.items()),
        )
        # Select on all of them: the bundle must work on its own RAFT's flow (defended too, where
        # measured) and stay right on good flow.
        if sum(accuracies.values()) >= state["best_score"]:
            state["best_score"], state["best"], state["best_epoch"] = (
                sum(accuracies.values()),
                accuracies,
                state["epoch"] + 1,
            )
            torch.save(_cpu_state(model), run_dir / I3D_FINAL)
        state["epoch"] += 1
        state["batch"] = 0
        save()
    if not (run_dir / I3D_FINAL).is_file():  # budget ended inside the first epoch
        torch.save(_cpu_state(model), run_dir / I3D_FINAL)
        state["best"] = {name: classifier_accuracy(model, f, y, cfg.norm) for name, (f, y) in val_sets.items()}
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


# ------------------------------------------------------------------------------ bundle + evaluation


@torch.no_grad()
def _evaluate_batch(pipeline, clips: Tensor, defend: bool) -> tuple[Tensor, Tensor]:
    pred = pipeline.predict(clips, defend=defend, keep_flows=True)
    return pred.probs.argmax(1), pred.flows_before


MOVING_PX = 0.5


def evaluate_split(bundle_dir: Path, split: str = "test", n: int = 200, defended_n: int = 0, batch: int = 8) -> dict:
    """Flow EPE (the bundle's inference updates) vs exact flow, and top-1 accuracy, on a MotionShapes split.

    Undefended accuracy and EPE use ``n`` clips; the defence is ~40x the cost of a plain prediction
    on CPU, so its accuracy is measured on the first ``defended_n`` of them."""
    from models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    meta = bundle.meta
    frames, size = meta.input.frames, meta.input.height
    epe_sum, zero_sum, correct, correct_def, correct_sub, t0 = 0.0, 0.0, 0, 0, 0, time.perf_counter()
    moving_err, moving_mag, moving_px = 0.0, 0.0, 0
    for start in tqdm(range(0, n, batch), desc=f"evaluate {split}", mininterval=10, dynamic_ncols=True):
        idx = range(start, min(n, start + batch))
        items = [make_clip(split_seed(split, i), i % len(CLASSES), frames, size) for i in idx]
        clips = torch.stack([c for c, _ in items])
        gt = torch.stack([f for _, f in items])
        labels = torch.tensor([i % len(CLASSES) for i in idx])
        guess, flows = _evaluate_batch(bundle.pipeline, clips, defend=False)
        error, magnitude = (flows - gt).norm(dim=2), gt.norm(dim=2)
        epe_sum += float(error.flatten(1).mean(1).sum())
        zero_sum += float(magnitude.flatten(1).mean(1).sum())  # EPE of predicting no motion
        moving = magnitude > MOVING_PX  # most pixels are static background: EPE there says little
        moving_err += float(error[moving].sum())
        moving_mag += float(magnitude[moving].sum())
        moving_px += int(moving.sum())
        correct += int((guess == labels).sum())
        if start < defended_n:
            keep = min(len(idx), defended_n - start)
            guess_def, _ = _evaluate_batch(bundle.pipeline, clips[:keep], defend=True)
            correct_def += int((guess_def == labels[:keep]).sum())
            correct_sub += int((guess[:keep] == labels[:keep]).sum())
    result = {
        "split": split,
        "n": n,
        "flow_epe": round(epe_sum / n, 4),
        "flow_updates": meta.flow.updates_infer,
        "zero_flow_epe": round(zero_sum / n, 4),
        "moving_threshold_px": MOVING_PX,
        "moving_flow_epe": round(moving_err / max(moving_px, 1), 4),
        "moving_zero_flow_epe": round(moving_mag / max(moving_px, 1), 4),
        "top1_undefended": round(correct / n, 4),
        "minutes": round((time.perf_counter() - t0) / 60, 2),
    }
    if defended_n:
        result["defended_n"] = defended_n
        result["top1_defended"] = round(correct_def / defended_n, 4)
        result["top1_undefended_same_clips"] = round(correct_sub / defended_n, 4)
        result["defense_steps"] = meta.defense.steps
    log.info("evaluation on %s: %s", split, result)
    return result


def bundle_demo(
    run_dir: Path,
    out: Path,
    *,
    name: str = "motionshapes",
    version: str = "1",
    frames: int = 8,
    size: int = 64,
    width: float = 0.25,
    command: str = "",
    calib_clips: int = 200,
    test_clips: int = 0,
    defended_test_clips: int = 0,
) -> Path:
    """Build the demo bundle from a finished run, calibrate it on clean val clips, optionally test it.

    How it was trained (both stages' summaries, the command, the seed ranges) goes into
    ``meta.training`` so a shipped bundle documents its own provenance."""
    from models.bundle import create_bundle
    from models.bundle_meta import BundleMeta, ClassifierSpec, FlowSpec, InputSpec, read_bundle_meta, write_bundle_meta
    from models.calibrate import calibrate_bundle
    from models.data.synthetic import labels

    run_dir = Path(run_dir)
    training: dict = {
        "dataset": "MotionShapes (models/data/synthetic.py)",
        "split_seed_base": dict(SPLIT_BASE),
        "command": command,
        "machine": f"CPU, {torch.get_num_threads()} torch thread(s)",
    }
    for stage in ("raft", "i3d"):
        path = run_dir / f"{stage}_summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            summary.pop("history", None)
            training[stage] = summary
    meta = BundleMeta(
        name=name,
        version=version,
        labels=labels(),
        input=InputSpec(frames=frames, height=size, width=size, resize="short_side", crop="center"),
        flow=FlowSpec(
            arch="raft_small",
            checkpoint="flow.pth",
            format="torchvision",
            corr_levels=RAFT_CORR_LEVELS,
            corr_radius=RAFT_CORR_RADIUS,
        ),
        classifier=ClassifierSpec(checkpoint="classifier.pth", width=width, num_classes=len(CLASSES)),
        training=training,
    )
    out = create_bundle(out, meta, run_dir / RAFT_FINAL, run_dir / I3D_FINAL)
    log.info("bundle written to %s", out)
    if calib_clips:
        _, report = calibrate_bundle(out, split="val", n=calib_clips)
        training["calibration"] = {k: report[k] for k in ("n", "source", "undefended_accuracy") if k in report}
    if test_clips:
        training["test"] = evaluate_split(out, "test", test_clips, defended_test_clips)
    current = read_bundle_meta(out)
    write_bundle_meta(out, current.model_copy(update={"training": training}))
    return out
