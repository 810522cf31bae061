from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda, poisoned

from baton.kernels.silu_mul import silu_mul, silu_mul_reference


@pytest.mark.parametrize("dtype,inter", [(torch.float32, 40), (torch.bfloat16, 64), (torch.float16, 33)])
def test_silu_mul(device, dtype, inter):
    x = (3 * torch.randn(6, 2 * inter, device=device)).to(dtype)
    out = poisoned(6, inter, dtype=dtype, device=device)
    silu_mul(x, out=out, block=16)
    assert_close(out, silu_mul_reference(x))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_llama3_8b_mlp(num_tokens):
    x = torch.randn(num_tokens, 2 * 14336, device="cuda").to(torch.bfloat16)
    assert_close(silu_mul(x), silu_mul_reference(x))
