"""Shared fixtures. Keep torch on one thread in tests: the machine has 2 cores shared with workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # the API-only parts of the suite need no torch
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real clips folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory) -> Path:
    """A tiny randomly initialised bundle: 4 frames, 64x64, 3 classes, 2 defence steps."""
    from models.bundle import make_random_bundle

    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "random")
