"""The classifier training loop shared by the demo's I3D stage and ``motionguard finetune``.

Inputs are tensors prepared once (cached flows, or frozen-backbone features), so an epoch costs only
the classifier. The loop checkpoints model + optimizer + progress every few batches and after each
epoch, and re-running it with the same checkpoint path resumes where it stopped (the elapsed time is
stored, so the minutes budget is the total across interruptions). After each epoch it measures
accuracy on every validation set, keeps the weights of the best epoch (sum of the accuracies), and
stops early after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models.training.common import atomic_save, cpu_state, one_cycle_lr

log = logging.getLogger(__name__)

# (inputs, labels, epoch, batch indices) -> augmented (inputs, labels); indices address the training set.
Augment = Callable[[Tensor, Tensor, int, Tensor], tuple[Tensor, Tensor]]


@dataclass
class FitConfig:
    epochs: int = 12
    max_minutes: float = 20.0
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    warmup: float = 0.03
    patience: int | None = None  # epochs without a better validation score before stopping early
    checkpoint_every: int = 20  # batches
    desc: str = "i3d"


@torch.no_grad()
def accuracy(
    forward: Callable[[Tensor], Tensor], model: nn.Module, inputs: Tensor, labels: Tensor, batch: int = 64
) -> float:
    """Top-1 accuracy of ``forward`` (model in eval mode) on prepared inputs."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch):
        logits = forward(inputs[i : i + batch].to(device).float())
        correct += int((logits.argmax(1) == labels[i : i + batch].to(device)).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


def fit_classifier(
    model: nn.Module,
    forward: Callable[[Tensor], Tensor],
    train_x: Tensor,
    train_y: Tensor,
    val_sets: dict[str, tuple[Tensor, Tensor]],
    cfg: FitConfig,
    *,
    ckpt_path: Path,
    best_path: Path,
    parameters: list[nn.Parameter] | None = None,
    train_mode: Callable[[], None] | None = None,
    augment: Augment | None = None,
) -> dict:
    """Train ``model`` through ``forward`` (inputs -> logits); returns the final loop state.

    ``parameters``: what the optimizer updates (default: all of the model's). ``train_mode`` puts
    the model in training mode (default ``model.train()``; a frozen backbone keeps its batch norm in
    eval mode). The best epoch's weights go to ``best_path`` (a bare state dict on the CPU)."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(parameters or list(model.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {
        "epoch": 0,
        "batch": 0,
        "elapsed": 0.0,
        "best_score": -1.0,
        "best": {},
        "best_epoch": -1,
        "improved_epoch": -1,  # last epoch that strictly beat every earlier one (ties keep the later weights)
        "history": [],
    }
    if ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {**state, **saved["state"]}  # runs saved before some keys existed
        log.info(
            "resuming %s training at epoch %d batch %d (%.1f min done)",
            cfg.desc,
            state["epoch"],
            state["batch"],
            state["elapsed"] / 60,
        )
    enter_training = train_mode or model.train

    def save() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, ckpt_path)

    def stalled() -> bool:
        improved = state["improved_epoch"]
        return cfg.patience is not None and improved >= 0 and state["epoch"] - improved >= cfg.patience

    budget_s = cfg.max_minutes * 60
    batches_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    total_batches = cfg.epochs * batches_per_epoch
    enter_training()
    while state["epoch"] < cfg.epochs and state["elapsed"] < budget_s and not stalled():
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed * 1009 + state["epoch"]))
        bar = tqdm(
            total=batches_per_epoch,
            initial=state["batch"],
            desc=f"{cfg.desc} epoch {state['epoch'] + 1}",
            mininterval=10,
            dynamic_ncols=True,
        )
        losses: list[float] = []
        while state["batch"] < batches_per_epoch and state["elapsed"] < budget_s:
            t0 = time.perf_counter()
            done = state["epoch"] * batches_per_epoch + state["batch"]
            lr = one_cycle_lr(cfg.lr, max(done / total_batches, state["elapsed"] / budget_s), warmup=cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[state["batch"] * cfg.batch_size : (state["batch"] + 1) * cfg.batch_size]
            inputs, labels = train_x[idx].to(device).float(), train_y[idx].to(device)
            if augment is not None:
                inputs, labels = augment(inputs, labels, state["epoch"], idx)
            loss = F.cross_entropy(forward(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            state["batch"] += 1
            state["elapsed"] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{lr:.1e}")
            if state["batch"] % cfg.checkpoint_every == 0:
                save()
        bar.close()
        if state["batch"] < batches_per_epoch:  # out of time mid-epoch
            break
        accuracies = {name: accuracy(forward, model, x, y) for name, (x, y) in val_sets.items()}
        enter_training()
        state["history"].append(
            {
                "epoch": state["epoch"] + 1,
                "minutes": round(state["elapsed"] / 60, 2),
                "train_loss": sum(losses) / max(1, len(losses)),
                **accuracies,
            }
        )
        log.info(
            "%s epoch %d  %.1f min  loss %.4f  %s",
            cfg.desc,
            state["epoch"] + 1,
            state["elapsed"] / 60,
            state["history"][-1]["train_loss"],
            "  ".join(f"{name} {value:.4f}" for name, value in accuracies.items()),
        )
        if sum(accuracies.values()) > state["best_score"]:
            state["improved_epoch"] = state["epoch"] + 1
        if sum(accuracies.values()) >= state["best_score"]:
            state["best_score"], state["best"], state["best_epoch"] = (
                sum(accuracies.values()),
                accuracies,
                state["epoch"] + 1,
            )
            torch.save(cpu_state(model), best_path)
        state["epoch"] += 1
        state["batch"] = 0
        save()
    if stalled():
        log.info("%s: no better validation score for %d epochs, stopped early", cfg.desc, cfg.patience)
        state["stopped_early"] = True
    if not best_path.is_file():  # budget ended inside the first epoch
        torch.save(cpu_state(model), best_path)
        state["best"] = {name: accuracy(forward, model, x, y) for name, (x, y) in val_sets.items()}
    return state
