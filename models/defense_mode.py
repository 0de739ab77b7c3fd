"""The defence modes a client can ask for (``defend=true|false|auto``) and how a bundle answers them,
torch-free so the API process validates them without loading any model.

``always`` purifies every clip (what ``defend=true`` always meant), ``off`` none, ``auto`` only
the clips whose MC loss before the defence (or the attack flag's score) is above the bundle's
threshold. ``resolve_policy`` is the one place the default mode and that threshold are decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

DefendMode = Literal["always", "auto", "off"]
MODES: tuple[str, ...] = ("always", "auto", "off")


def parse_mode(value: bool | str | None, default: DefendMode = "always") -> DefendMode:
    """A mode from what clients send: ``true``/``false`` (and the other spellings a boolean query
    parameter accepted before ``auto`` existed: 1/0, yes/no, on/off), ``auto``, or a mode name;
    ``None`` gives ``default``. Raises ``ValueError`` for anything else."""
    if value is None:
        return default
    if isinstance(value, bool):
        return "always" if value else "off"
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on", "always"):
        return "always"
    if text in ("false", "0", "no", "off"):
        return "off"
    if text == "auto":
        return "auto"
    raise ValueError(f"defend must be true, false or auto, got {str(value)[:40]!r}")


DecidedOn = Literal["mc_loss", "attack_score"]


class _Calibrated(Protocol):
    """What the resolution reads of a bundle's metadata (``models.bundle_meta.BundleMeta``)."""

    defense: Any  # .mode, .threshold
    calibration: Any  # .threshold, or None
    flag: Any  # .auto_threshold, .thresholds["input"], or None


@dataclass(frozen=True)
class DefensePolicy:
    """How one bundle answers ``defend=`` in this process: the default mode and what ``auto`` decides on.

    ``mc_threshold``: the MC loss above which ``auto`` purifies. ``flag_threshold``: when set, ``auto``
    decides on the attack flag's input score instead (on the flag's scale, 1 = flagged;
    ``models.defense.flag.FlagDecision``)."""

    default_mode: DefendMode
    mc_threshold: float | None
    flag_threshold: float | None = None

    @property
    def decided_on(self) -> DecidedOn:
        return "attack_score" if self.flag_threshold is not None else "mc_loss"

    @property
    def auto_threshold(self) -> float | None:
        """The threshold ``auto`` compares with, on the scale of ``decided_on``."""
        return self.flag_threshold if self.flag_threshold is not None else self.mc_threshold

    @property
    def serves_auto(self) -> bool:
        return self.auto_threshold is not None

    def mode(self, defend: bool | str | None) -> DefendMode:
        """The mode of a request (``None``: the default); ``ValueError`` for an unknown value, or for
        ``auto`` when there is nothing to decide with."""
        mode = parse_mode(defend, self.default_mode)
        if mode == "auto" and not self.serves_auto:
            raise ValueError("defend=auto: the bundle has no MC-loss threshold")
        return mode


def resolve_policy(meta: _Calibrated, *, mode: str | None = None, threshold: float | None = None) -> DefensePolicy:
    """The one place the defend mode and its threshold are decided, from the bundle's metadata and the
    deployment's settings (``MOTIONGUARD_DEFENSE_MODE`` -> ``mode``, ``MOTIONGUARD_DEFENSE_THRESHOLD`` ->
    ``threshold``; None keeps the bundle's). The API (admission, ``/models``) and the worker
    (``models.bundle.load``, the job's request) both call it.

    The MC-loss threshold is the setting's, else the bundle's ``defense.threshold``, else its
    calibration's. ``auto`` decides on the attack flag when the bundle's flag has an ``auto_threshold``
    and the deployment set no MC-loss threshold of its own."""
    mc_threshold = threshold
    if mc_threshold is None:
        mc_threshold = meta.defense.threshold
    if mc_threshold is None and meta.calibration is not None:
        mc_threshold = meta.calibration.threshold
    flag = meta.flag
    flag_threshold = None
    if threshold is None and flag is not None and flag.auto_threshold is not None:
        flag_threshold = flag.auto_threshold / flag.thresholds["input"]
    return DefensePolicy(
        default_mode=parse_mode(mode or meta.defense.mode), mc_threshold=mc_threshold, flag_threshold=flag_threshold
    )
