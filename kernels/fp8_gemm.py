"""Weight-only FP8 GEMM (W8A16): out[M, N] = x[M, K] @ (weight[N, K] * scale[:, None])^T (+ bias), x in bf16/fp16.

`torch._scaled_mm` (FP8 tensor cores) needs FP8 activations too, quantized per token on the fly; a small model whose
activations have outlier channels loses perplexity to that (SmolLM2-135M: +3.5% on the H200). Here the activations
stay in the model dtype: each weight tile is loaded as e4m3 (half the bytes of bf16), widened to x's dtype in
registers and multiplied on the 16-bit tensor cores, accumulating in float32; the per-channel scale is applied once
at the end. The weight tile is the dot's left operand (out^T = W @ x^T), the one that may come from registers, and
x^T the right one; row counts of a decode batch fit BLOCK_M = 16..64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                  UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output rows = x rows
    col_ok, row_ok = cols < N, rows < M
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    x_ptrs = x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks[:, None]  # x^T tile [BLOCK_K, BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter gets 16-bit dots wrong: float32 there (kernels/attention_common.py)
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
        else:  # every e4m3 value is exact in bf16 and fp16
            acc = tl.dot(w.to(tl.float32).to(xt.dtype), xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    acc *= tl.load(s_ptr + cols, mask=col_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[None, :] * stride_om + cols[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


def w8a16_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16 (unit stride along K), weight [N, K] float8_e4m3fn, scale float32 [N]; out takes x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.dtype == torch.float8_e4m3fn and x.stride(1) == 1
    assert weight.stride(1) == 1 and scale.numel() == n
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    # Not tuned on a GPU yet. A decode batch (M <= 64) is memory-bound: narrower column blocks give more programs.
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n, block_k = (64 if m <= 64 else 128), 64
    _w8a16_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
        x, weight, scale, bias if bias is not None else scale, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        UPCAST=x.device.type != "cuda", num_warps=4, num_stages=3,
    )
    return out


def w8a16_gemm_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ (weight.float() * scale.float()[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
