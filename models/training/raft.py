"""Demo stage 1: RAFT-small trained on MotionShapes' exact flow (dense-motion pairs plus pairs of
class clips, some with the defence's noise range), budgeted by steps or minutes, resumable.

The data stream is a function of the step (``_pair_batch``), so a resumed run, or one whose batches
are rendered ahead by loader workers, sees exactly the stream an uninterrupted in-process run sees.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from models.data.synthetic import CLASSES, SPLIT_BASE, make_clip, make_flow_pair, split_seed
from models.nets.flow import VideoRAFT, build_raft
from models.training.common import adamw, atomic_save, cpu_state, one_cycle_lr, ordered_loader, training_device

log = logging.getLogger(__name__)

RAFT_CKPT = "raft_state.pt"  # resumable training state
RAFT_FINAL = "raft_final.pt"  # bare torchvision state dict: the bundle's flow checkpoint
RAFT_CORR_LEVELS = 3
RAFT_CORR_RADIUS = 3


def build_demo_raft() -> nn.Module:
    """The demo's flow model: torchvision RAFT-small with 3 correlation levels (fits 64x64)."""
    return build_raft("raft_small", corr_levels=RAFT_CORR_LEVELS, corr_radius=RAFT_CORR_RADIUS)


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
    device = training_device(cfg.device)
    raft = build_demo_raft()
    ckpt_path = run_dir / RAFT_CKPT
    state = {"step": 0, "elapsed": 0.0, "epe_before": None, "history": []}
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
    if saved is not None:
        raft.load_state_dict(saved["model"])
    elif cfg.init is not None:
        from models.nets.checkpoints import read_state_dict

        raft.load_state_dict(read_state_dict(cfg.init))
        log.info("RAFT initialised from %s", cfg.init)
    raft.to(device)
    optimizer = adamw(raft, cfg.lr, cfg.weight_decay)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])  # after .to(device): its state follows the params
        state = saved["state"]
        log.info("resuming RAFT training at step %d (%.1f min done)", state["step"], state["elapsed"] / 60)
    if state["epe_before"] is None:
        state["epe_before"] = flow_epe(raft, "val", cfg.eval_clips, cfg.eval_updates, cfg.frames, cfg.size)
        log.info("val EPE before training (%d updates): %.3f px", cfg.eval_updates, state["epe_before"])

    def save() -> None:
        atomic_save(
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
    batches = iter(ordered_loader(_PairBatches(cfg, state["step"]), cfg.loader_workers))
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
    torch.save(cpu_state(raft), run_dir / RAFT_FINAL)
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
