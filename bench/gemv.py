"""Decode-time linear layers on the GPU: kernels/gemv.py (bf16 and FP8 weights, each config of a grid) against
cuBLAS (F.linear, plus the separate SwiGLU kernel for the down projection) on Llama-3-8B's projections, at
1 and 4 rows. Reports each one's weight-read bandwidth next to the measured HBM copy bandwidth, and for FP8 weights
the best config of each way of turning e4m3 into float32 ("cvt": hardware conversions, "bits": integer ops), of the
tensor-core kernel ("mma": weights pipelined through shared memory) and of "cvt" with the weight prefetch
("prefetch": the next tile's load issued before this one's FMAs).

Usage: python bench/gemv.py [--rows 1,4,64]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.engine.quantization import Fp8Linear  # noqa: E402
from baton.kernels.gemv import (CONFIGS, FP8_TILES, MAX_ROWS, MMA_CONFIGS, MMA_CONFIGS_FP8,  # noqa: E402
                                device_time_ms, gemv)
from baton.kernels.silu_mul import silu_mul  # noqa: E402
from bench.engine_gpu import hbm_bandwidth  # noqa: E402
from bench.report import emit  # noqa: E402

SHAPES = {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (28672, 4096, False),
          "down": (4096, 14336, True), "lm_head": (128256, 4096, False)}
# (BLOCK_N, BLOCK_K, num_warps): the engine's candidates plus a few outside them, to see whether any would pay.
GRID = sorted(set(CONFIGS) | set(FP8_TILES) | {(2, 512, 4), (8, 1024, 4), (16, 512, 8)})
FP8_MODES = ("cvt", "bits", "mma", "prefetch")


def fp8_candidates(mode: str) -> list[tuple]:
    if mode == "mma":
        return list(MMA_CONFIGS_FP8)
    return [(*t, "cvt" if mode == "prefetch" else mode) for t in GRID]


def time_us(fn) -> float:
    """As the engine picks: device time from a CUDA graph, L2 flushed before each call (kernels.gemv)."""
    return 1e3 * device_time_ms(fn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gemv.py needs a CUDA device", file=sys.stderr)
        return 2
    copy_bw = hbm_bandwidth()
    print(f"HBM copy {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows_out, head = [], {"hbm_tb_s": round(copy_bw / 1e12, 3)}
    for name, (out_f, in_f, silu) in SHAPES.items():
        w = (torch.randn(out_f, in_f, device="cuda") / in_f**0.5).to(torch.bfloat16)
        q = Fp8Linear.quantize(torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16))
        for m in [int(x) for x in args.rows.split(",")]:
            x = torch.randn(m, 2 * in_f if silu else in_f, device="cuda").to(torch.bfloat16)

            def cublas():
                return F.linear(silu_mul(x) if silu else x, w)

            base = time_us(cublas)
            scaled = time_us(lambda: q(x, silu_mul=silu))  # what the engine runs for FP8 weights at m rows
            if m > MAX_ROWS:  # only the FP8 layer (torch._scaled_mm) against cuBLAS bf16
                best = best_mma = (base, None)
                by_mode = {mode: (base, None) for mode in FP8_MODES}
            else:
                best = min((time_us(lambda c=c: gemv(x, w, silu_mul=silu, config=c)), c) for c in GRID)
                best_mma = min((time_us(lambda c=c: gemv(x, w, silu_mul=silu, config=c)), c) for c in MMA_CONFIGS)
                by_mode = {mode: min((time_us(lambda c=c, p=mode == "prefetch": gemv(
                    x, q.weight, silu_mul=silu, config=c, scale=q.scale, prefetch=p)), c) for c in fp8_candidates(mode))
                    for mode in FP8_MODES}
            best8 = min(by_mode.values())
            bytes_bf16 = out_f * in_f * 2
            row = dict(shape=name, rows=m, cublas_us=base, gemv_us=best[0], gemv_config=best[1],
                       mma_us=best_mma[0], mma_config=best_mma[1], fp8_gemv_us=best8[0],
                       fp8_config=best8[1], fp8_linear_us=scaled, cublas_tb_s=bytes_bf16 / base / 1e6,
                       gemv_tb_s=bytes_bf16 / best[0] / 1e6, fp8_gemv_tb_s=bytes_bf16 / 2 / best8[0] / 1e6)
            for mode, (us, config) in by_mode.items():
                row |= {f"fp8_{mode}_us": us, f"fp8_{mode}_config": config,
                        f"fp8_{mode}_tb_s": bytes_bf16 / 2 / us / 1e6}
            rows_out.append(row)
            print(f"{name:8s} m={m}: cuBLAS {base:7.1f} us ({row['cublas_tb_s']:.2f} TB/s)  gemv {best[0]:7.1f} us "
                  f"{best[1]} ({row['gemv_tb_s']:.2f} TB/s)  " + "  ".join(
                      f"fp8 {mode} {row[f'fp8_{mode}_us']:7.1f} us {row[f'fp8_{mode}_config']} "
                      f"({row[f'fp8_{mode}_tb_s']:.2f} TB/s)" for mode in FP8_MODES)
                  + f"  Fp8Linear {scaled:7.1f} us", flush=True)
    print("\n| projection | rows | cuBLAS bf16 us | gemv bf16 us | mma bf16 us | gemv / cuBLAS | "
          "FP8 gemv cvt us (TB/s) | FP8 gemv bits us (TB/s) | FP8 mma us (TB/s) | FP8 cvt + prefetch us (TB/s) | "
          "cvt / bits | Fp8Linear us | Fp8Linear / cuBLAS bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['shape']} | {r['rows']} | {r['cublas_us']:.1f} | {r['gemv_us']:.1f} | {r['mma_us']:.1f} | "
              f"{r['cublas_us'] / r['gemv_us']:.2f}x | " + " | ".join(
                  f"{r[f'fp8_{mode}_us']:.1f} ({r[f'fp8_{mode}_tb_s']:.2f})" for mode in FP8_MODES) + " | "
              f"{r['fp8_cvt_us'] / r['fp8_bits_us']:.2f}x | {r['fp8_linear_us']:.1f} | "
              f"{r['cublas_us'] / r['fp8_linear_us']:.2f}x |")
    for m in sorted({r["rows"] for r in rows_out}):
        mine = [r for r in rows_out if r["rows"] == m and r["shape"] != "lm_head"]
        layer_cublas = sum(r["cublas_us"] for r in mine)
        head[f"m{m}_layer_gemv_speedup"] = round(layer_cublas / sum(min(r["gemv_us"], r["cublas_us"]) for r in mine), 3)
        head[f"m{m}_layer_fp8_speedup"] = round(layer_cublas / sum(r["fp8_linear_us"] for r in mine), 3)
        # > 1: the integer e4m3 conversion's best configs beat the hardware conversion's over a layer
        head[f"m{m}_layer_fp8_bits_vs_cvt"] = round(sum(r["fp8_cvt_us"] for r in mine) /
                                                    sum(r["fp8_bits_us"] for r in mine), 3)
        for mode in ("mma", "prefetch"):  # > 1: faster than the cvt gemv over a layer
            head[f"m{m}_layer_fp8_{mode}_vs_cvt"] = round(sum(r["fp8_cvt_us"] for r in mine) /
                                                          sum(r[f"fp8_{mode}_us"] for r in mine), 3)
    emit("gemv", head, {"device": torch.cuda.get_device_name(), "rows": rows_out}, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
