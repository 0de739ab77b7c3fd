"""Transfer from another model (``transfer:8``): PGD crafted on a *source* bundle's undefended model,
then judged on the evaluated bundle like every other row.

Why: a defence that masks its own gradients (an adversarially trained bundle whose white-box PGD
barely moves it) can still fall to perturbations crafted where the gradients are informative. The
source is another bundle of the same task (``motionguard eval --source-bundle``, carried here as
``AttackCall.source``); the attack is ``pgd.pgd`` unchanged (CE on the source's 2-update logits, the
PGD row's steps, step size and random start), and the evaluated bundle's real defended prediction
judges an iterate every ``check`` steps, the first success per clip kept, as for ``pgd``.
"""

from __future__ import annotations

from torch import Tensor

from models.robustness.attacks.base import AttackCall, FirstSuccess, transfer
from models.robustness.attacks.pgd import pgd


def _craft(c: AttackCall, t: FirstSuccess) -> None:
    source = c.source
    if source is None:
        raise ValueError("attack 'transfer' needs a source bundle (motionguard eval --source-bundle PATH)")

    def source_logits(z: Tensor) -> Tensor:
        return source.logits(z, c.grad_updates)

    pgd(source_logits, c.x, c.y, c.epsilon, c.steps, c.step_size, tracker=t, check_every=c.check)


TRANSFER = transfer(_craft, steps=20, check=10, needs_source=True, gradient_path=True)
