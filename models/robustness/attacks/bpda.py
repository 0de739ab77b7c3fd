"""BPDA (Athalye et al. 2018): the purification is the identity backward; the classifier gradient at
the purified clip is applied to the attacker's clip. It is the through-defence loop with nothing
replayed (``unroll=0``), so every iterate is judged by the real defended prediction the same way."""

from __future__ import annotations

from models.robustness.attacks.base import Attack
from models.robustness.attacks.through import runner

BPDA = Attack(runner(0), steps=20, defense_aware=True, detector=True)
