"""Per-token FP8 (e4m3) quantization of activations for FP8 GEMMs, in one launch: each row's absmax, its scale
(absmax / 448) and the scaled, saturated cast. With `silu_mul`, x holds SwiGLU's gate || up and the row quantized
is silu(gate) * up (rounded to x's dtype first, as the separate kernel stores it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, SILU_MUL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK)
    mask = ks < K
    if SILU_MUL:
        gate = tl.load(x_ptr + row * stride_x + ks, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + K + ks, mask=mask, other=0.0).to(tl.float32)
        x = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(x_ptr + row * stride_x + ks, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    tl.store(q_ptr + row * stride_q + ks, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_rows(x: torch.Tensor, silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (or [M, 2K] with silu_mul) -> (FP8 [M, K], float32 scales [M, 1])."""
    m, width = x.shape
    k = width // 2 if silu_mul else width
    assert x.stride(1) == 1
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _quant_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), SILU_MUL=silu_mul,
                            BLOCK=triton.next_power_of_2(k), num_warps=8 if k >= 4096 else 4)
    return q, scale


def quantize_rows_reference(x: torch.Tensor, silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if silu_mul:
        gate, up = x.float().chunk(2, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
