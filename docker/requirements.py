"""Print a requirements list taken from pyproject.toml, for the images (and tests/test_deploy.py).

    python docker/requirements.py api     # the API's dependencies: everything but the model stack
    python docker/requirements.py torch   # the pinned torch and torchvision, for the workers' index

One source of versions (pyproject.toml): the images can never drift from what the tests install.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

MODEL_STACK = {"torch", "torchvision", "matplotlib"}
TORCH = {"torch", "torchvision"}


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip().lower()


def requirements(kind: str, pyproject: Path = Path("pyproject.toml")) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if kind == "api":
        return [d for d in deps if name_of(d) not in MODEL_STACK]
    if kind == "torch":
        return [d for d in deps if name_of(d) in TORCH]
    raise SystemExit(f"unknown kind {kind!r}: api or torch")


if __name__ == "__main__":
    pyproject = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("pyproject.toml")
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "api", pyproject)))
