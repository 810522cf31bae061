"""The model's linear (oneDNN on CPU float32) against F.linear on fresh random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baton.engine.model import linear


@pytest.mark.parametrize("rows", [0, 1, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, bias):
    torch.manual_seed(rows)
    layer = nn.Linear(96, 40, bias=bias)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(linear(x, layer), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, layer.weight), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


def test_strided_input_and_other_dtypes():
    torch.manual_seed(1)
    weight = torch.randn(24, 32)
    x = torch.randn(5, 64)[:, ::2]  # not contiguous
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), weight.bfloat16()
    assert torch.equal(linear(xb, wb), F.linear(xb, wb))  # other dtypes take F.linear itself
