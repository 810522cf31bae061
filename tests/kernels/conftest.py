"""Kernel tests run under Triton's CPU interpreter where there is no GPU; the env var must precede triton's import."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items) -> None:
    # The interpreter's own use of numpy (int() of a 1-element array) warns once per loop; not ours to fix.
    here = os.path.dirname(__file__)
    noise = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(noise)
