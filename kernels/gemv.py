"""Skinny GEMM for decode: out[M, N] = x[M, K] @ w[N, K]^T (+ bias) for a handful of rows (M <= 8).

At decode batch 1 a linear layer is a pure stream of its weight bytes; cuBLAS's kernels for these shapes leave
bandwidth unused on the narrow projections (qkv, o) and add a split-K reduction on the long ones (down).
Here each program owns BLOCK_N whole output columns and walks K itself: one pass over the weight, no second
kernel. With `silu_mul`, x is the MLP's gate||up [M, 2K] and the activation silu(gate) * up is computed on the
fly (rounded to x's dtype, as the separate kernel stores it), so the down projection needs no kernel before it.
Accumulation is float32. A program keeps at most 4 rows' accumulators: 5-8 rows (a batch-1 speculative
verification step) run as a second group of programs over the same columns, still one launch, which is what a small
launch-bound model pays for. FP8 (e4m3) weights become float32 either through the hardware conversions or through
integer ops on their bytes (`_e4m3_bits`); which is faster is a config field. A second kernel (`_mma_kernel`) runs
the same product on tensor cores, always as a 16-row tile: one pass over the weight for any row count up to 16, and
a row's result independent of how many rows share the call (SwiGLU runs before it, as its own kernel).
Configs may also ask for in-register partial sums ("p": a V-th of the accumulator registers, so more programs and
weight bytes in flight an SM), SwiGLU by its own kernel first ("s"), or a program per row ("r1"); the weight
prefetch and programmatic dependent launch are process-wide switches (PREFETCH, kernels/pdl.py).
`pick_config` times the candidate configs against cuBLAS on the real shape, once."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels.pdl import launch_dependents, launch_kwargs, pdl_enabled, wait_for_previous

MAX_ROWS = 8  # above this, tensor-core GEMMs win; between 5 and 8, pick_config decides per shape
ROWS_PER_PROGRAM = 4


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                 SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, FP8_BITS: tl.constexpr,
                 PREFETCH: tl.constexpr, PDL: tl.constexpr, V: tl.constexpr):
    # Per row of x, a [BLOCK_N, BLOCK_K] float32 accumulator summed over K only once at the end: the loop body is
    # loads and FMAs, no cross-thread reduction per step. Rows past M are never loaded or stored. Program axis 1
    # picks the group of BLOCK_M rows (a second group only when M > ROWS_PER_PROGRAM, where BLOCK_M is that).
    # FP8_BITS: w holds e4m3 bytes as int8, turned into float32 by integer ops (_e4m3_bits), not the conversion unit.
    # PREFETCH: the next weight tile's load is issued before this one's FMAs (twice the bytes in flight), and the
    # first one before waiting for the previous kernel (PDL, kernels/pdl.py). Same sums in the same order either way.
    # V > 1 (configs flagged "p"): each thread first sums the V products of one 16-byte weight load, so the
    # accumulator is [BLOCK_N, BLOCK_K / V]: a V-th of the registers, room for more programs an SM and so more bytes
    # in flight (another rounding order, the same for every row count).
    launch_dependents(PDL)
    row0 = tl.program_id(1) * BLOCK_M
    x_ptr += row0 * stride_xm
    out_ptr += row0 * stride_om
    M -= row0
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros((BLOCK_N, BLOCK_K // V), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K // V), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K // V), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K // V), dtype=tl.float32)
    if PREFETCH:
        ahead = _w_tile(w_rows, tl.arange(0, BLOCK_K), K, col_ok, EVEN)
    wait_for_previous(PDL)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if PREFETCH:
            w = ahead
            nxt = ks + BLOCK_K
            if EVEN:
                ahead = tl.load(w_rows + nxt[None, :], mask=(nxt < K)[None, :], other=0.0)
            else:
                ahead = tl.load(w_rows + nxt[None, :], mask=col_ok[:, None] & (nxt < K)[None, :], other=0.0)
        else:
            w = _w_tile(w_rows, ks, K, col_ok, EVEN)
        w = _e4m3_bits(w) if FP8_BITS else w.to(tl.float32)
        acc0 = _acc(acc0, w * _x_row(x_ptr, 0, stride_xm, ks, K, BLOCK_N, EVEN, SILU_MUL, FP8_BITS, V > 1), V)
        if BLOCK_M > 1:
            if M > 1:
                acc1 = _acc(acc1, w * _x_row(x_ptr, 1, stride_xm, ks, K, BLOCK_N, EVEN, SILU_MUL, FP8_BITS, V > 1), V)
        if BLOCK_M > 2:
            if M > 2:
                acc2 = _acc(acc2, w * _x_row(x_ptr, 2, stride_xm, ks, K, BLOCK_N, EVEN, SILU_MUL, FP8_BITS, V > 1), V)
            if M > 3:
                acc3 = _acc(acc3, w * _x_row(x_ptr, 3, stride_xm, ks, K, BLOCK_N, EVEN, SILU_MUL, FP8_BITS, V > 1), V)
    _store_row(acc0, 0, s_ptr, b_ptr, out_ptr, stride_om, cols, col_ok, HAS_BIAS, HAS_SCALE, FP8_BITS)
    if BLOCK_M > 1:
        if M > 1:
            _store_row(acc1, 1, s_ptr, b_ptr, out_ptr, stride_om, cols, col_ok, HAS_BIAS, HAS_SCALE, FP8_BITS)
    if BLOCK_M > 2:
        if M > 2:
            _store_row(acc2, 2, s_ptr, b_ptr, out_ptr, stride_om, cols, col_ok, HAS_BIAS, HAS_SCALE, FP8_BITS)
        if M > 3:
            _store_row(acc3, 3, s_ptr, b_ptr, out_ptr, stride_om, cols, col_ok, HAS_BIAS, HAS_SCALE, FP8_BITS)


@triton.jit
def _w_tile(w_rows, ks, K, col_ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(w_rows + ks[None, :])
    return tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)


# FP8_BITS scaling: _e4m3_bits gives w * 2**-120; x is loaded times 2**60 and the sum times 2**60 again on store,
# all exact powers of two. Products are w * x * 2**-60: no underflow for |w * x| >= 2**-66, no overflow below 2**68.
X_GAIN = tl.constexpr(2.0**60)


@triton.jit
def _e4m3_bits(b):
    # e4m3 byte s.eeee.mmm (sign-extended int8) -> float32 bits s.0000eeee.mmm0...: the same exponent and mantissa
    # fields under float32's bias of 127 instead of 7, so the float is exactly w * 2**-120, subnormals included
    # (e = 0 lands on float32 subnormals). e4m3fn has no inf; its NaN bytes 0x7F/0xFF would read as 480 * 2**-120,
    # but quantized weights never hold them (clamped to +-448). -0x78100000 is 0x87F00000 as an int32.
    return ((b.to(tl.int32) << 20) & -0x78100000).to(tl.float32, bitcast=True)


@triton.jit
def _acc(acc, prod, V: tl.constexpr):
    if V > 1:  # the V products of one thread's 16-byte weight load summed in registers first (no shuffles)
        acc += tl.sum(tl.reshape(prod, (prod.shape[0], prod.shape[1] // V, V)), axis=2)
    else:
        acc += prod
    return acc


@triton.jit
def _x_row(x_ptr, row, stride_xm, ks, K, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, SILU_MUL: tl.constexpr,
           FP8_BITS: tl.constexpr, BROADCAST: tl.constexpr):
    """x's row as it multiplies the [BLOCK_N, BLOCK_K] weight tile, in float32. BROADCAST ("p" configs): loaded
    straight into the tile's layout; else as a [BLOCK_K] row that changes layout (through shared memory)."""
    ptrs = x_ptr + row * stride_xm + ks
    if SILU_MUL or not BROADCAST:
        # A [BLOCK_K] row, broadcast over the tile (a layout change through shared memory each step). With SILU_MUL
        # x holds gate || up: silu(gate) * up, computed once a program, rounded to x's dtype as the separate kernel
        # stores it.
        if EVEN:
            x = tl.load(ptrs).to(tl.float32)
        else:
            x = tl.load(ptrs, mask=ks < K, other=0.0).to(tl.float32)
        if SILU_MUL:
            if EVEN:
                up = tl.load(ptrs + K).to(tl.float32)
            else:
                up = tl.load(ptrs + K, mask=ks < K, other=0.0).to(tl.float32)
            x = (x / (1.0 + tl.exp(-x)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = x[None, :]
    else:
        # Loaded straight into the weight tile's layout (each thread reads the x values of its own weight columns,
        # from L1): no layout change, so no barrier in the loop.
        tile = tl.broadcast_to(ptrs[None, :], (BLOCK_N, ks.shape[0]))
        if EVEN:
            x = tl.load(tile).to(tl.float32)
        else:
            x = tl.load(tile, mask=tl.broadcast_to((ks < K)[None, :], (BLOCK_N, ks.shape[0])), other=0.0)
            x = x.to(tl.float32)
    if FP8_BITS:
        x *= X_GAIN
    return x


@triton.jit
def _store_row(acc, row, s_ptr, b_ptr, out_ptr, stride_om, cols, col_ok, HAS_BIAS: tl.constexpr,
               HAS_SCALE: tl.constexpr, FP8_BITS: tl.constexpr):
    out = tl.sum(acc, axis=1)
    if HAS_SCALE:  # FP8 weights: one float32 scale per output channel
        scale = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
        if FP8_BITS:
            scale *= X_GAIN
        out *= scale
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Issue the next weight tile's load before the current tile's FMAs (off by default until bench/gemv.py measures it).
PREFETCH = os.environ.get("BATON_GEMV_PREFETCH", "0") == "1"
MMA_ROWS = tl.constexpr(16)  # an MMA tile's x rows (the fewest a tensor-core dot takes): up to this many per call


@triton.jit(do_not_specialize=["M"])
def _mma_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr):
    # Tensor cores on out^T = W @ x^T: a program owns BLOCK_N output columns and all MMA_ROWS rows, rows past M
    # load as zeros (and are never stored). Every launch computes the same [BLOCK_N, MMA_ROWS] tile whatever M
    # is, and an MMA's element (n, m) depends on W's row n and x's row m only: a row's result is the same bit for
    # bit in a 1-row call and in an 8-row one. M is never specialized (M == 1 would compile another kernel).
    # No fused SwiGLU here: every program would compute it for all MMA_ROWS rows (gemv() runs silu_mul first).
    # PDL (kernels/pdl.py): the loop's loads (pipelined, x among them) all come after the wait.
    launch_dependents(PDL)
    wait_for_previous(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, MMA_ROWS)
    row_ok = rows < M
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + rows[:, None] * stride_xm
    acc = tl.zeros((BLOCK_N, MMA_ROWS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = _w_tile(w_rows, ks, K, col_ok, EVEN)
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
        if DOT_F32:  # Triton's CPU interpreter multiplies bf16 tiles wrongly: float32 holds their products exactly
            acc = tl.dot(w.to(x_ptr.dtype.element_ty).to(tl.float32), tl.trans(x).to(tl.float32), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x), acc)
    if HAS_SCALE:  # FP8 weights: one float32 scale per output channel
        acc *= tl.load(s_ptr + cols, mask=col_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows[None, :] * stride_om + cols[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=col_ok[:, None] & row_ok[None, :])


# (BLOCK_N, BLOCK_K, num_warps): few enough to compile and time at start-up, varied enough for every projection.
# BLOCK_N sets the program count, and so how evenly the last wave of programs fills the SMs on narrow projections.
CONFIGS = ((2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 512, 8), (8, 1024, 8))
# FP8 weights: a 1024-wide row step is only 8 bytes a thread at 4 warps; 2048 gives each thread 16-byte loads.
# A 4th field says how the e4m3 bytes become float32: "cvt", the hardware conversions (e4m3x2 -> f16x2 -> f32), or
# "bits", integer ops (_e4m3_bits) that keep the conversion unit out of the loop. On the H200 "bits" lost on every
# Llama-3-8B projection (0.88-0.97x of cvt, bench/results/gemv.json): the engine's candidates are cvt only, and
# bench/gemv.py keeps timing both.
FP8_TILES = CONFIGS + ((2, 2048, 4), (4, 2048, 4), (4, 2048, 8), (8, 2048, 8), (16, 2048, 8))
CONFIGS_FP8 = tuple((*c, "cvt") for c in FP8_TILES)
CONFIGS_FP8_BITS = tuple((*c, "bits") for c in FP8_TILES)
# "p": in-register partial sums (the kernel's V), long K steps: a quarter to a half of the registers of the same
# tile without, so two to four times the programs an SM and the weight bytes in flight (compiled for sm_90,
# tests/kernels/sm90_compile.py: FP8 (4, 2048, 4) 40 registers against 96, about 96 KB in flight an SM against 32).
PARTIAL_TILES = ((2, 2048, 4), (4, 2048, 4), (8, 2048, 8), (2, 4096, 4), (4, 4096, 4), (8, 1024, 8))
CONFIGS_P = tuple((*c, "p") for c in PARTIAL_TILES)
CONFIGS_FP8_P = tuple((*c, "cvt", "p") for c in PARTIAL_TILES + ((8, 4096, 8), (16, 2048, 8)))
# "s" (SwiGLU's down projection only): the activation by its own kernel before the gemv. Fused, the activation is
# computed once a program on a row and then has to change layout through shared memory at every K step.
CONFIGS_P_SILU = tuple((*c, "s") for c in CONFIGS_P)
CONFIGS_FP8_P_SILU = tuple((*c, "s") for c in CONFIGS_FP8_P)
# Four rows a program with partial sums: the accumulators of ALIKE_TILES' budget (16 a thread a row).
ALIKE_P_TILES = tuple(c for c in PARTIAL_TILES if c[0] * c[1] <= 16 * 32 * c[2] * 8)
# Row-invariant decoding (speculative verification): one config serves 1 to MAX_ROWS rows, and a row's result is
# the same bit for bit however many rows share the launch (each row's accumulation runs the same code whatever
# BLOCK_M is). So its program must hold ROWS_PER_PROGRAM rows' accumulators without spilling: at most 16 elements
# a thread per row (BLOCK_N * BLOCK_K / (32 * num_warps)).
ALIKE_TILES = tuple(c for c in sorted(set(FP8_TILES) | {(2, 512, 4), (4, 256, 4), (8, 256, 8), (1, 1024, 4)})
                    if c[0] * c[1] <= 16 * 32 * c[2])
# Tensor-core configs (_mma_kernel), (BLOCK_N, BLOCK_K, num_warps, "mma", num_stages): row-invariant by
# construction for up to MMA_ROWS rows, and no second pass over the weight for rows 5-8 as the gemv kernel makes.
# Their weight loads are pipelined through shared memory (num_stages tiles in flight a program, no registers held),
# which a bandwidth-bound decode step wants most with FP8's half-size tiles: those get longer K steps too.
MMA_CONFIGS = tuple((n, k, w, "mma", st) for n, k, w, st in (
    (16, 128, 4, 3), (16, 256, 4, 3), (16, 512, 4, 2), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3),
    (64, 256, 8, 3), (32, 64, 4, 4)))
MMA_CONFIGS_FP8 = MMA_CONFIGS + tuple((n, k, w, "mma", st) for n, k, w, st in (
    (32, 512, 4, 3), (64, 256, 4, 4), (64, 512, 8, 3), (128, 256, 8, 3)))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu_mul: bool = False,
         config: tuple = (8, 256, 4), out: torch.Tensor | None = None,
         scale: torch.Tensor | None = None, prefetch: bool | None = None, pdl: bool | None = None) -> torch.Tensor:
    """scale: float32 [N] for FP8 (e4m3) weights, W = weight * scale[:, None]; the output takes x's dtype.
    config: (BLOCK_N, BLOCK_K, num_warps), for FP8 weights optionally with "cvt" (the default) or "bits" after,
    then optionally "r1" (a program per row); or a tensor-core config (MMA_CONFIGS, up to MMA_ROWS rows).
    prefetch / pdl: the gemv kernel's weight prefetch and programmatic dependent launch (kernels/pdl.py); by default
    PREFETCH and pdl_enabled() (BATON_GEMV_PREFETCH, BATON_PDL)."""
    prefetch = PREFETCH if prefetch is None else prefetch
    pdl = pdl_enabled() if pdl is None else pdl
    m = x.shape[0]
    n, k = weight.shape
    block_n, block_k, warps, *mode = config
    mma = mode[:1] == ["mma"]
    assert 0 < m <= (MMA_ROWS if mma else MAX_ROWS) and x.stride(1) == 1 and weight.stride(1) == 1
    assert x.shape[1] == (2 * k if silu_mul else k), (tuple(x.shape), tuple(weight.shape), silu_mul)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    even = n % block_n == 0 and k % block_k == 0
    assert (scale is not None) == (weight.dtype == torch.float8_e4m3fn)
    if silu_mul and (mma or "s" in mode):  # SwiGLU by its own kernel first (the MMA kernel has no fused one)
        from baton.kernels.silu_mul import silu_mul as act

        x, silu_mul = act(x), False
    if mma:
        assert out.stride(1) == 1, "the MMA kernel stores rows with unit column stride"
        _mma_kernel[(triton.cdiv(n, block_n),)](
            x, weight, scale if scale is not None else x, bias if bias is not None else x, out, m, n, k,
            x.stride(0), weight.stride(0), out.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, EVEN=even,
            HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
            DOT_F32=x.dtype == torch.float32 or _INTERPRETED, PDL=pdl, num_warps=warps, num_stages=mode[1],
            **launch_kwargs(pdl))
        return out
    # "r1": a program per row, each compiled and run exactly as a one-row call (M = 1): a row's result is that
    # of the one-row call by construction, and rows past the first re-read the weight from L2, not HBM, as long as
    # it fits there (small models).
    one_row = "r1" in mode
    partial = "p" in mode
    fp8_mode = [f for f in mode if f not in ("r1", "p", "s")]
    bits = fp8_mode == ["bits"]
    assert fp8_mode in ([], ["cvt"], ["bits"]) and (scale is not None or not fp8_mode), config
    v = 16 // weight.element_size() if partial else 1  # the elements of one 16-byte weight load
    block_m = 1 if one_row else min(ROWS_PER_PROGRAM, triton.next_power_of_2(m))
    _gemv_kernel[(triton.cdiv(n, block_n), m if one_row else triton.cdiv(m, block_m))](
        x, weight.view(torch.int8) if bits else weight, scale if scale is not None else x,
        bias if bias is not None else x, out, 1 if one_row else m, n, k, x.stride(0), weight.stride(0),
        out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN=even, SILU_MUL=silu_mul,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, FP8_BITS=bits, PREFETCH=prefetch or pdl, PDL=pdl,
        V=v, num_warps=warps, **launch_kwargs(pdl),
    )
    return out


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   silu_mul: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
    if silu_mul:
        gate, up = x.float().chunk(2, dim=-1)
        x = (F.silu(gate) * up).to(x.dtype)
    out = x.float() @ weight.float().t()
    if scale is not None:
        out = out * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def device_time_ms(fn, reps: int = 16) -> float:
    """Device time of one fn() as a decode step runs it: replayed from a CUDA graph (no host launch cost) with
    the L2 cache flushed before each call (a step streams every layer's weights once, so none is cached).
    The flush's own time is measured the same way and subtracted."""
    device = torch.device("cuda", torch.cuda.current_device())
    # Twice the L2 size: writing it evicts whatever the previous call left there (freed again on return).
    l2 = torch.cuda.get_device_properties(device).L2_cache_size or 64 << 20
    scratch = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device)
    fn()
    torch.cuda.synchronize(device)

    def graph_ms(with_fn: bool) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                scratch.zero_()
                if with_fn:
                    fn()
        graph.replay()
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        return best

    return max(0.0, graph_ms(True) - graph_ms(False)) / reps


def plan_cache_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "baton" / "gemv_plans.json"


def cached_plan(key: tuple, pick) -> tuple | None:
    """pick() (a pick_config call) once per key on this machine: its answer is kept in plan_cache_path(), keyed by
    the GPU, the Triton version and the candidate lists as well, so a worker's next start skips the timing (most of
    its start-up). BATON_GEMV_PLAN_CACHE=0: neither read nor written."""
    if os.environ.get("BATON_GEMV_PLAN_CACHE", "1") == "0":
        return pick()
    import hashlib
    import json

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    candidates = hashlib.sha1(repr((CONFIGS, FP8_TILES, PARTIAL_TILES, ALIKE_TILES, MMA_CONFIGS_FP8)).encode())
    full = repr((device, triton.__version__, candidates.hexdigest()[:12], *key))
    path = plan_cache_path()
    try:
        plans = json.loads(path.read_text())
    except (OSError, ValueError):
        plans = {}
    if full in plans:
        return tuple(plans[full]) if plans[full] is not None else None
    plan = pick()
    plans[full] = plan
    try:  # written whole and renamed into place: concurrent workers never see half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(plans))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the plan still serves this process
    return plan


def pick_config(m: int, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
                scale: torch.Tensor | None = None, baseline=None, alike: bool = False) -> tuple | None:
    """The fastest config on this device for this shape, or None where cuBLAS (after the separate activation
    kernel, for silu_mul) is as fast; `baseline(x)` replaces both (FP8 weights: it takes gate||up itself).
    alike: one config for every row count up to MAX_ROWS (ALIKE_TILES, a one-row config run as a program per row
    ("r1"), or MMA_CONFIGS; timed at 1 row plus at MAX_ROWS rows), never cuBLAS, whose kernels differ by row count.
    Runs kernels: call it outside CUDA-graph capture."""
    k = weight.shape[1]
    dtype = weight.dtype if scale is None else torch.bfloat16
    x = torch.randn(m, 2 * k if silu_mul else k, device=weight.device).to(dtype)
    mode = () if scale is None else ("cvt",)
    if alike:
        xs = (x[:1], torch.randn(MAX_ROWS, x.shape[1], device=weight.device).to(dtype))
        mma = MMA_CONFIGS if scale is None else MMA_CONFIGS_FP8
        one_row = tuple((*c, "r1") for c in (CONFIGS + CONFIGS_P if scale is None else CONFIGS_FP8 + CONFIGS_FP8_P))
        four_rows = tuple((*c, *mode) for c in ALIKE_TILES) + tuple((*c, *mode, "p") for c in ALIKE_P_TILES)
        return min((*four_rows, *one_row, *mma), key=lambda c: sum(
            device_time_ms(lambda h=h: gemv(h, weight, bias, silu_mul=silu_mul, config=c, scale=scale)) for h in xs))

    def reference():
        if baseline is not None:
            return baseline(x)
        h = x
        if silu_mul:
            from baton.kernels.silu_mul import silu_mul as act

            h = act(x)
        return F.linear(h, weight, bias)

    best, best_ms = None, device_time_ms(reference)
    separate = (CONFIGS_P_SILU if scale is None else CONFIGS_FP8_P_SILU) if silu_mul else ()
    for config in (CONFIGS + CONFIGS_P + MMA_CONFIGS if scale is None else
                   CONFIGS_FP8 + CONFIGS_FP8_P + MMA_CONFIGS_FP8) + separate:
        ms = device_time_ms(lambda c=config: gemv(x, weight, bias, silu_mul=silu_mul, config=c, scale=scale))
        if ms < 0.97 * best_ms:  # a clear win only: equal time is not worth leaving cuBLAS for
            best, best_ms = config, ms
    return best
