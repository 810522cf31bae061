"""SwiGLU's activation: x [T, 2*I] holding gate then up -> silu(gate) * up [T, I]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels.pdl import launch_dependents, pdl_enabled


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    launch_dependents(PDL)  # the next kernel (with PDL: the down projection) may start reading its weights
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    num_tokens, two_inter = x.shape
    inter = two_inter // 2
    assert two_inter % 2 == 0 and x.stride(1) == 1
    if out is None:
        out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    assert out.shape == (num_tokens, inter) and out.stride(1) == 1
    if num_tokens:
        _silu_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block, PDL=pdl_enabled(), num_warps=4,
        )
    return out


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
