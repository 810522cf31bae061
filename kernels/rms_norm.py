"""RMSNorm, plain and fused with the residual add, in the model's op order (normalise in fp32, cast, scale)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.pdl import launch_dependents, pdl_enabled


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    hidden, eps,
    ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    launch_dependents(PDL)  # the next kernel (with PDL: a projection) may start reading its weights
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        # residual = x + residual, rounded to x's dtype before it is normalised, as the unfused model does
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out, residual_out):
    hidden = x.shape[-1]
    x2 = x.view(-1, hidden)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    o2 = out.view(-1, hidden)
    r2 = x2 if residual is None else residual.view(-1, hidden)
    ro2 = x2 if residual_out is None else residual_out.view(-1, hidden)
    assert x2.stride(1) == 1 and r2.stride(1) == 1 and o2.stride(1) == 1 and ro2.stride(1) == 1
    assert weight.is_contiguous() and weight.shape == (hidden,)
    block = triton.next_power_of_2(hidden)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, o2, ro2,
            x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
            hidden, eps,
            ADD_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl_enabled(), num_warps=min(16, max(1, block // 512)),
        )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim; out has dtype promote(x, weight)."""
    return _launch(x, None, weight, eps, out, None)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual). Each row is read whole before it is written, so out=x and
    residual_out=residual work in place."""
    assert residual.shape == x.shape and residual.dtype == x.dtype
    if residual_out is None:
        residual_out = torch.empty_like(x)
    return _launch(x, residual, weight, eps, out, residual_out), residual_out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual
