"""The random baseline (``random:8``): uniform noise in the L-inf ball, what any perturbation does."""

from __future__ import annotations

import torch

from models.robustness.attacks.base import Attack, AttackCall, AttackResult, project


def run(call: AttackCall) -> AttackResult:
    x, eps = call.x, call.epsilon
    return AttackResult(project(x + (torch.rand_like(x) * 2 - 1) * eps, x, eps), None, 0)


RANDOM = Attack(run)
