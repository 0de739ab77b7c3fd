"""Adaptive attacks that know the defence's loss but take undefended gradients (paper Fig. 8):
Adaptive I (CE - lambda * L_MC) and Adaptive II / FlowReg (CE - lambda * |G(x+d) - G(x)|), judged
through the defence like the transfer attacks."""

from __future__ import annotations

import torch
from torch import Tensor

from models.defense.pipeline import Pipeline
from models.defense.purify import DefenseConfig
from models.robustness.attacks.base import (
    GRAD_UPDATES,
    AttackCall,
    FirstSuccess,
    ce_loss,
    transfer,
)
from models.robustness.attacks.pgd import pgd


def adaptive_mc(
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    lam: float,
    defense: DefenseConfig | None = None,
    steps: int = 20,
    tracker: FirstSuccess | None = None,
    check_every: int = 0,
) -> Tensor:
    """Adaptive I: maximise CE - lambda * L_MC, so the result also looks motion-consistent."""
    config = defense or pipeline.defense

    def objective(z: Tensor) -> Tensor:
        flows = pipeline.flow_model(z, GRAD_UPDATES, config.directions)
        logits = pipeline.classify_flows(flows["forward"])
        return ce_loss(logits, y) - lam * pipeline.mc_loss_of(z, flows, config)

    return pgd(pipeline.logits, x, y, epsilon, steps, loss_fn=objective, tracker=tracker, check_every=check_every)


def adaptive_flow(
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    lam: float,
    steps: int = 20,
    tracker: FirstSuccess | None = None,
    check_every: int = 0,
) -> Tensor:
    """Adaptive II (FlowReg): maximise CE - lambda * mean |G(x+d) - G(x)|, a "stealthy" flow change."""
    with torch.no_grad():
        clean_flow = pipeline.flow_model(x, GRAD_UPDATES)["forward"]

    def objective(z: Tensor) -> Tensor:
        flow = pipeline.flow_model(z, GRAD_UPDATES)["forward"]
        change = (flow - clean_flow).abs().mean(dim=(1, 2, 3, 4))
        return ce_loss(pipeline.classify_flows(flow), y) - lam * change

    return pgd(pipeline.logits, x, y, epsilon, steps, loss_fn=objective, tracker=tracker, check_every=check_every)


def _mc(c: AttackCall, t: FirstSuccess) -> None:
    adaptive_mc(c.pipeline, c.x, c.y, c.epsilon, c.options["lambda"], steps=c.steps, tracker=t, check_every=c.check)


def _flow(c: AttackCall, t: FirstSuccess) -> None:
    adaptive_flow(c.pipeline, c.x, c.y, c.epsilon, c.options["lambda"], steps=c.steps, tracker=t, check_every=c.check)


# lambda: the paper's strongest (Fig. 8)
ADAPTIVE_MC = transfer(_mc, steps=20, check=10, defaults={"lambda": 300.0}, defense_aware=True)
ADAPTIVE_FLOW = transfer(_flow, steps=20, check=10, defaults={"lambda": 105.0}, defense_aware=True)
