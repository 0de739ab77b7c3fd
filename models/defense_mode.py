"""The defence modes a client can ask for (``defend=true|false|auto``), torch-free so the API
process validates them without loading any model.

``always`` purifies every clip (what ``defend=true`` always meant), ``off`` none, ``auto`` only
the clips whose MC loss before the defence is above the bundle's threshold.
"""

from __future__ import annotations

from typing import Literal

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
