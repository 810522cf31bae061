from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda, poisoned

from baton.kernels.fp8_gemm import w8a16_gemm, w8a16_gemm_reference


def _fp8_linear(n: int, k: int, device: str, bias: bool):
    from baton.engine.quantization import Fp8Linear

    return Fp8Linear.quantize(torch.nn.Linear(k, n, bias=bias, device=device))


@pytest.mark.parametrize("m", [1, 9, 40, 130])
@pytest.mark.parametrize("n,k", [(128, 64), (200, 136)])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a16_matches_the_dequantized_reference(device, m, n, k, bias):
    """Even and ragged shapes (every mask), row counts from a decode batch to a prefill chunk spanning row blocks,
    with and without a bias; bf16 activations stay bf16 (no activation quantization)."""
    q = _fp8_linear(n, k, device, bias)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    out = poisoned(m, n, dtype=torch.bfloat16, device=device)
    w8a16_gemm(x, q.weight, q.scale, None if q.bias is None else q.bias.to(torch.bfloat16), out=out)
    assert_close(out, w8a16_gemm_reference(x, q.weight, q.scale, q.bias))


def test_w8a16_error_is_a_fraction_of_per_token_fp8_activations(device):
    """The reason for the kernel: FP8 activations keep 3 mantissa bits of every value (a few percent of noise on
    each product), bf16 ones keep 8. Same FP8 weights, both against the exact product of those weights (float32
    outputs, so output rounding does not blur the comparison)."""
    from baton.kernels.fp8_quant import quantize_rows_reference

    q = _fp8_linear(64, 128, device, bias=False)
    w = q.weight.float() * q.scale[:, None]
    x = torch.randn(16, 128, device=device).to(torch.bfloat16)
    exact = x.float() @ w.t()
    mine = w8a16_gemm(x, q.weight, q.scale, out=torch.empty(16, 64, device=device))
    xq, xs = quantize_rows_reference(x)
    w8a8 = (xq.float() * xs) @ w.t()
    err = lambda y: ((y - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(mine) < 1e-4 and err(w8a8) > 0.01, (err(mine), err(w8a8))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [16, 64, 4096])
def test_w8a16_at_llama3_8b_shapes(m):
    q = _fp8_linear(6144, 4096, "cuda", bias=False)
    x = torch.randn(m, 4096, device="cuda").to(torch.bfloat16)
    assert_close(w8a16_gemm(x, q.weight, q.scale), w8a16_gemm_reference(x, q.weight, q.scale))
