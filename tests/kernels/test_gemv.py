from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda, poisoned

from baton.kernels.gemv import CONFIGS, CONFIGS_FP8, gemv, gemv_reference, pick_config


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("n,k,config", [(24, 64, (8, 32, 4)), (21, 80, (8, 32, 4)), (16, 48, (4, 16, 2))])
def test_gemv_matches_reference(device, m, silu_mul, n, k, config):
    """Even and ragged shapes (masks), every row count, with and without the fused activation."""
    weight = torch.randn(n, k, device=device)
    x = torch.randn(m, 2 * k if silu_mul else k, device=device)
    out = poisoned(m, n, dtype=torch.float32, device=device)
    gemv(x, weight, silu_mul=silu_mul, config=config, out=out)
    assert_close(out, gemv_reference(x, weight, silu_mul=silu_mul))


def test_gemv_bias_and_strided_rows(device):
    """A bias (qkv of Qwen2) and an x whose rows are a view with a row stride larger than K."""
    weight, bias = torch.randn(32, 64, device=device), torch.randn(32, device=device)
    wide = torch.randn(2, 100, device=device)
    x = wide[:, :64]
    assert_close(gemv(x, weight, bias, config=(8, 32, 4)), gemv_reference(x, weight, bias))


def test_gemv_bf16_rounds_the_fused_activation_like_the_separate_kernel(device):
    """In bf16, silu(gate) * up is rounded to bf16 before the dot product, as the unfused path stores it."""
    from baton.kernels.silu_mul import silu_mul

    weight = torch.randn(16, 64, device=device).to(torch.bfloat16)
    x = torch.randn(1, 128, device=device).to(torch.bfloat16)
    fused = gemv(x, weight, silu_mul=True, config=(8, 32, 4))
    separate = gemv(silu_mul(x, block=16), weight, config=(8, 32, 4))
    assert_close(fused, separate)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,k,silu", [(6144, 4096, False), (4096, 4096, False), (28672, 4096, False),
                                      (4096, 14336, True), (128256, 4096, False)])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_llama3_8b_projections(m, n, k, silu):
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    x = torch.randn(m, 2 * k if silu else k, device="cuda").to(torch.bfloat16)
    for config in CONFIGS:
        assert_close(gemv(x, weight, silu_mul=silu, config=config), gemv_reference(x, weight, silu_mul=silu))
    pick_config(m, weight, None, silu)  # runs: returns a config or None (cuBLAS)


@pytest.mark.parametrize("silu_mul", [False, True])
def test_fp8_row_quantization_matches_reference(device, silu_mul):
    from baton.kernels.fp8_quant import quantize_rows, quantize_rows_reference

    x = 3 * torch.randn(5, 96 if silu_mul else 48, device=device)
    x[2] *= 100  # a loud row keeps its own scale
    q, scale = quantize_rows(x, silu_mul=silu_mul)
    q_ref, scale_ref = quantize_rows_reference(x, silu_mul=silu_mul)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    if device == "cpu":
        return  # Triton's interpreter casts float32 to e4m3 wrongly (124.7 -> 64): the values are checked on the GPU
    ref = q_ref.float()
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=2 ** -6))) - 3)
    assert ((q.float() - ref).abs() <= ulp).all()
    assert (q.float() - ref).abs().sum() < 0.05 * ref.abs().sum()


def test_fp8_gemv_matches_dequantized_reference(device):
    from baton.engine.quantization import Fp8Linear

    lin = torch.nn.Linear(64, 24, bias=True, device=device)
    q = Fp8Linear.quantize(lin)
    x = torch.randn(6, 64, device=device)  # two groups of rows
    out = gemv(x, q.weight, q.bias, config=(8, 32, 4), scale=q.scale)
    assert_close(out, gemv_reference(x, q.weight, q.bias, scale=q.scale))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,k,silu", [(6144, 4096, False), (4096, 14336, True)])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_fp8_configs_at_llama3_8b_shapes(m, n, k, silu):
    """Every config pick_config may choose for FP8 weights (the 2048-wide ones too) gives the reference's answer."""
    from baton.engine.quantization import Fp8Linear

    lin = torch.nn.Linear(k, n, bias=False, device="cuda")
    q = Fp8Linear.quantize(lin)
    x = torch.randn(m, 2 * k if silu else k, device="cuda").to(torch.bfloat16)
    expected = gemv_reference(x, q.weight, None, silu_mul=silu, scale=q.scale)
    for config in CONFIGS_FP8:
        assert_close(gemv(x, q.weight, silu_mul=silu, config=config, scale=q.scale), expected)
