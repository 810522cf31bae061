from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close, needs_cuda, poisoned

from baton.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference, rms_norm, rms_norm_reference


def _weight(hidden, dtype, device):
    return (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)


@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 48), (torch.bfloat16, 64), (torch.float16, 100)])
def test_rms_norm(device, dtype, hidden):
    x = torch.randn(5, hidden, device=device).to(dtype)
    w = _weight(hidden, dtype, device)
    out = poisoned(5, hidden, dtype=dtype, device=device)
    rms_norm(x, w, 1e-6, out=out)
    assert_close(out, rms_norm_reference(x, w, 1e-6))


def test_fp32_weight_gives_fp32_output_on_3d_input(device):
    x = torch.randn(2, 3, 32, device=device).to(torch.bfloat16)
    w = _weight(32, torch.float32, device)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close(out, rms_norm_reference(x, w, 1e-5), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add(device, dtype):
    x = torch.randn(6, 80, device=device).to(dtype)
    residual = torch.randn(6, 80, device=device).to(dtype)
    w = _weight(80, dtype, device)
    out = poisoned(6, 80, dtype=dtype, device=device)
    res_out = poisoned(6, 80, dtype=dtype, device=device)
    fused_add_rms_norm(x, residual, w, 1e-6, out=out, residual_out=res_out)
    ref_out, ref_res = fused_add_rms_norm_reference(x, residual, w, 1e-6)
    assert_close(res_out, ref_res)
    assert_close(out, ref_out)


def test_fused_add_in_place(device):
    x = torch.randn(4, 64, device=device)
    residual = torch.randn(4, 64, device=device)
    w = _weight(64, torch.float32, device)
    ref_out, ref_res = fused_add_rms_norm_reference(x, residual, w, 1e-6)
    fused_add_rms_norm(x, residual, w, 1e-6, out=x, residual_out=residual)
    assert_close(x, ref_out)
    assert_close(residual, ref_res)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llama3_8b_hidden(num_tokens, dtype):
    x = torch.randn(num_tokens, 4096, device="cuda").to(dtype)
    residual = torch.randn(num_tokens, 4096, device="cuda").to(dtype)
    w = _weight(4096, dtype, "cuda")
    out, res = fused_add_rms_norm(x, residual, w, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_reference(x, residual, w, 1e-5)
    assert torch.equal(res, ref_res)
    assert_close(out, ref_out)
    assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
