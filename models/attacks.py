"""Adversarial attacks for the robustness evaluation (clips in [0, 1], L-inf unless said).

Every attack takes a batch of clips (B, T, 3, H, W) with their true labels and returns the
adversarial clips. Gradients through RAFT use 2 flow updates (``Pipeline.logits(x, 2)``: with 12 the
recurrence obfuscates gradients, paper App. A.1); accuracies are always measured with 12.

Static attacks (PGD, APGD-CE/DLR, one-frame, flickering) target the undefended model. The
defence-aware ones target the defence: Adaptive I (CE - lambda * L_MC), Adaptive II
(CE - lambda * |G(x+d) - G(x)|), Adaptive III = BPDA (the purification runs forward, its backward
is the identity). The purification has no randomness, so EOT over it would average identical
gradients; ``eot_samples`` exists for defences that add a random start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from models.defense import DefenseConfig, project, purify
from models.pipeline import Pipeline

LogitsFn = Callable[[Tensor], Tensor]

GRAD_UPDATES = 2


def _input_grad(loss_fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample losses (B,) and the gradient of their sum w.r.t. ``x``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): scale-invariant margin; needs >= 3 classes."""
    sorted_logits, _ = logits.sort(dim=1)
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    best_other = others.max(dim=1).values
    denom = sorted_logits[:, -1] - sorted_logits[:, -3] + 1e-12
    return -(true - best_other) / denom


def pgd(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    mask: Tensor | None = None,
    loss_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Projected gradient ascent on CE (or on ``loss_fn(x_adv)`` per sample) within the L-inf ball.

    ``mask`` (broadcastable to x) restricts the perturbation, e.g. to one frame.
    """
    step_size = epsilon / 4 if step_size is None else step_size
    mask = torch.ones_like(x[:1]) if mask is None else mask
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = project(x + (torch.rand_like(x) * 2 - 1) * epsilon * mask, x, epsilon)

    if loss_fn is None:

        def loss_fn(z: Tensor) -> Tensor:
            return ce_loss(logits_fn(z), y)

    for _ in range(steps):
        _, grad = _input_grad(loss_fn, x_adv)
        x_adv = project(x_adv + step_size * grad.sign() * mask, x, epsilon)
    return x_adv.detach()


def apgd(
    logits_fn: LogitsFn, x: Tensor, y: Tensor, epsilon: float, steps: int = 10, loss: str = "ce", rho: float = 0.75
) -> Tensor:
    """APGD (Croce & Hein 2020, as in AutoAttack): momentum 0.75, step halving at checkpoints.

    Per sample: the step size starts at 2*eps and halves at a checkpoint when fewer than rho of the
    steps since the last checkpoint raised the loss (or the step size and best loss didn't change).
    Returns the best point found per sample.
    """
    loss_of = {"ce": ce_loss, "dlr": dlr_loss}[loss]
    x = x.detach()
    batch = x.shape[0]
    shape = (batch,) + (1,) * (x.dim() - 1)

    def objective(z: Tensor) -> Tensor:
        return loss_of(logits_fn(z), y)

    # Checkpoints w_j: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    fractions = [0.0, 0.22]
    while fractions[-1] < 1:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    checkpoints = sorted({math.ceil(f * steps) for f in fractions if 0 < f <= 1})

    step = torch.full((batch,), 2.0 * epsilon, device=x.device)
    x_cur = x.clone()
    loss_cur, grad = _input_grad(objective, x_cur)
    best_x, best_loss = x_cur.clone(), loss_cur.clone()
    x_prev = x_cur.clone()
    improved_count = torch.zeros(batch, device=x.device)
    last_check, loss_at_check, step_at_check = 0, best_loss.clone(), step.clone()
    for k in range(steps):
        z = project(x_cur + step.view(shape) * grad.sign(), x, epsilon)
        momentum = 0.75 if k > 0 else 1.0
        x_next = project(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev), x, epsilon)
        loss_next, grad_next = _input_grad(objective, x_next)
        improved_count += (loss_next > loss_cur).float()
        better = loss_next > best_loss
        best_x[better], best_loss[better] = x_next[better], loss_next[better]
        x_prev, x_cur, loss_cur, grad = x_cur, x_next, loss_next, grad_next
        if k + 1 in checkpoints:
            window = k + 1 - last_check
            stalled = improved_count < rho * window
            unchanged = (step_at_check == step) & (loss_at_check == best_loss)
            halve = stalled | unchanged
            step = torch.where(halve, step / 2, step)
            # restart halved samples from their best point
            x_cur[halve] = best_x[halve]
            loss_cur[halve] = best_loss[halve]
            if halve.any():
                _, grad_best = _input_grad(objective, x_cur)
                grad[halve] = grad_best[halve]
            improved_count.zero_()
            last_check, loss_at_check, step_at_check = k + 1, best_loss.clone(), step.clone()
    return best_x.detach()


def one_frame(
    logits_fn: LogitsFn, x: Tensor, y: Tensor, epsilon: float, steps: int = 20, step_size: float | None = None
) -> Tensor:
    """PGD on the single most damaging frame of each clip (largest CE gradient mass at the input)."""
    _, grad = _input_grad(lambda z: ce_loss(logits_fn(z), y), x)
    frame = grad.abs().flatten(2).sum(dim=2).argmax(dim=1)  # (B,)
    mask = torch.zeros_like(x)
    mask[torch.arange(x.shape[0]), frame] = 1.0
    return pgd(logits_fn, x, y, epsilon, steps, step_size, mask=mask)


def flickering(
    logits_fn: LogitsFn,
    x: Tensor,
    y: Tensor,
    epsilon: float = 32 / 255,
    steps: int = 300,
    lr: float = 1e-3,
    beta_thickness: float = 0.5,
    beta_roughness: float = 0.5,
    reg_weight: float = 1.0,
) -> Tensor:
    """Flickering attack (Pony et al. 2021): one RGB shift per frame, uniform over the pixels.

    Maximises a margin loss while penalising thickness (mean squared shift) and roughness (first and
    second temporal differences, cyclic), so the flicker stays faint and slow. Not an L-p attack in
    spirit; ``epsilon`` only caps the per-frame shift so clips stay valid images.
    """
    x = x.detach()
    delta = torch.zeros(x.shape[0], x.shape[1], 3, 1, 1, device=x.device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            logits = logits_fn((x + delta).clamp(0, 1))
            true = logits.gather(1, y[:, None])[:, 0]
            other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
            margin = (true - other).clamp_min(-0.05)  # stop pushing once fooled with a margin
            thickness = delta.pow(2).mean(dim=(1, 2, 3, 4))
            first = delta - delta.roll(1, dims=1)
            second = first - first.roll(1, dims=1)
            roughness = first.pow(2).mean(dim=(1, 2, 3, 4)) + second.pow(2).mean(dim=(1, 2, 3, 4))
            loss = margin + reg_weight * (beta_thickness * thickness + beta_roughness * roughness)
            optimiser.zero_grad()
            loss.sum().backward()
        optimiser.step()
        with torch.no_grad():
            delta.clamp_(-epsilon, epsilon)
    return (x + delta.detach()).clamp(0, 1)


def adaptive_mc(
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    lam: float,
    defense: DefenseConfig | None = None,
    steps: int = 20,
) -> Tensor:
    """Adaptive I: maximise CE - lambda * L_MC, so the result also looks motion-consistent."""
    config = defense or pipeline.defense

    def objective(z: Tensor) -> Tensor:
        flows = pipeline.flow_model(z, GRAD_UPDATES, config.directions)
        logits = pipeline.classify_flows(flows["forward"])
        return ce_loss(logits, y) - lam * pipeline.mc_loss_of(z, flows, config)

    return pgd(pipeline.logits, x, y, epsilon, steps, loss_fn=objective)


def adaptive_flow(pipeline: Pipeline, x: Tensor, y: Tensor, epsilon: float, lam: float, steps: int = 20) -> Tensor:
    """Adaptive II (FlowReg): maximise CE - lambda * mean |G(x+d) - G(x)|, a "stealthy" flow change."""
    with torch.no_grad():
        clean_flow = pipeline.flow_model(x, GRAD_UPDATES)["forward"]

    def objective(z: Tensor) -> Tensor:
        flow = pipeline.flow_model(z, GRAD_UPDATES)["forward"]
        change = (flow - clean_flow).abs().mean(dim=(1, 2, 3, 4))
        return ce_loss(pipeline.classify_flows(flow), y) - lam * change

    return pgd(pipeline.logits, x, y, epsilon, steps, loss_fn=objective)


def bpda(
    pipeline: Pipeline,
    x: Tensor,
    y: Tensor,
    epsilon: float,
    defense: DefenseConfig | None = None,
    steps: int = 20,
    step_size: float | None = None,
    eot_samples: int = 1,
) -> Tensor:
    """Adaptive III: PGD where the purification is run forward and treated as identity backward.

    The gradient is taken at the purified point (through the classifier with 2 RAFT updates) and
    applied to the attacker's clip.
    """
    config = defense or pipeline.defense
    step_size = epsilon / 4 if step_size is None else step_size
    x = x.detach()
    x_adv = project(x + (torch.rand_like(x) * 2 - 1) * epsilon, x, epsilon)
    for _ in range(steps):
        grad = torch.zeros_like(x)
        for _ in range(eot_samples):
            purified = purify(x_adv, pipeline.flow_model, config).restored
            _, g = _input_grad(lambda z: ce_loss(pipeline.logits(z, GRAD_UPDATES), y), purified)
            grad += g
        x_adv = project(x_adv + step_size * grad.sign(), x, epsilon)
    return x_adv.detach()


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation, parsed from e.g. ``pgd:8``, ``apgd-dlr:8``, ``adaptive1:8:lambda=300``.

    Options: ``steps``, ``step`` (PGD step size, in 1/255 like eps; default eps/4), ``lambda``
    (adaptive attacks), ``eot`` (BPDA samples), ``n`` (run this row on the first n clips only)."""

    kind: str
    epsilon_255: float
    options: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = "".join(f":{k}={v:g}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.epsilon_255:g}{extra}"

    @property
    def epsilon(self) -> float:
        return self.epsilon_255 / 255

    @property
    def defense_aware(self) -> bool:
        return self.kind in ("adaptive1", "adaptive2", "bpda")


ATTACK_KINDS = ("pgd", "apgd-ce", "apgd-dlr", "oneframe", "flicker", "adaptive1", "adaptive2", "bpda", "random")
_DEFAULT_LAMBDA = {"adaptive1": 300.0, "adaptive2": 105.0}  # the paper's strongest (Fig. 8)


def parse_attack(text: str) -> AttackSpec:
    """``kind:eps[:key=value...]`` with eps in 1/255 units; raises ValueError with the allowed forms."""
    parts = [p.strip() for p in text.strip().split(":") if p.strip()]
    if not parts or parts[0] not in ATTACK_KINDS:
        raise ValueError(f"unknown attack {text!r}; kinds: {', '.join(ATTACK_KINDS)} (e.g. pgd:8, apgd-dlr:8)")
    kind = parts[0]
    default_eps = 32.0 if kind == "flicker" else 8.0
    try:
        eps = float(parts[1]) if len(parts) > 1 and "=" not in parts[1] else default_eps
        options = dict((k, float(v)) for k, v in (p.split("=", 1) for p in parts[1:] if "=" in p))
    except ValueError as exc:
        raise ValueError(f"bad attack spec {text!r}: numbers expected, e.g. pgd:8:steps=40 ({exc})") from exc
    if not 0 < eps <= 255:
        raise ValueError(f"attack {text!r}: eps must be in (0, 255] (units of 1/255)")
    if kind in _DEFAULT_LAMBDA:
        options.setdefault("lambda", _DEFAULT_LAMBDA[kind])
    return AttackSpec(kind, eps, options)


def run_attack(spec: AttackSpec, pipeline: Pipeline, x: Tensor, y: Tensor) -> Tensor:
    """Adversarial (or randomly perturbed) clips for one spec."""
    steps = int(spec.options.get("steps", 0)) or None

    def grad_logits(z: Tensor) -> Tensor:
        return pipeline.logits(z, GRAD_UPDATES)

    eps = spec.epsilon
    if spec.kind == "random":
        return project(x + (torch.rand_like(x) * 2 - 1) * eps, x, eps)
    if spec.kind == "pgd":
        step = spec.options.get("step")
        return pgd(grad_logits, x, y, eps, steps or 20, None if step is None else step / 255)
    if spec.kind in ("apgd-ce", "apgd-dlr"):
        return apgd(grad_logits, x, y, eps, steps or 10, loss=spec.kind.split("-")[1])
    if spec.kind == "oneframe":
        return one_frame(grad_logits, x, y, eps, steps or 20)
    if spec.kind == "flicker":
        return flickering(grad_logits, x, y, eps, steps or 300)
    if spec.kind == "adaptive1":
        return adaptive_mc(pipeline, x, y, eps, spec.options["lambda"], steps=steps or 20)
    if spec.kind == "adaptive2":
        return adaptive_flow(pipeline, x, y, eps, spec.options["lambda"], steps=steps or 20)
    if spec.kind == "bpda":
        return bpda(pipeline, x, y, eps, steps=steps or 20, eot_samples=int(spec.options.get("eot", 1)))
    raise ValueError(f"unknown attack kind {spec.kind!r}")
