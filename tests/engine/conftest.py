"""Fixtures shared by the engine tests."""
from __future__ import annotations

import pytest
import torch

from baton.engine.kv_transfer import create_transport


@pytest.fixture
def pair(request):
    """A (sender, receiver) pair of one backend, closed after the test."""
    made = []

    def make(backend: str, src: torch.Tensor, dst: torch.Tensor):
        sender, receiver = create_transport(backend), create_transport(backend)
        made.extend([sender, receiver])
        sender.register_cache(src)
        receiver.register_cache(dst)
        return sender, receiver

    yield make
    for t in made:
        t.close()
