"""What row-invariant verification costs in its linear layers, on the GPU: each projection of SmolLM2-135M and of
Llama-3-8B at 1 row (a decode step) and 8 rows (a batch-1 verification of 7 proposed tokens), bf16 weights.

Four ways, each timed as the engine times them (kernels.gemv.device_time_ms: a CUDA graph, L2 flushed):
- cuBLAS (F.linear; the separate SwiGLU kernel before the down projection): the reference;
- free: the fastest gemv config at each row count on its own, or cuBLAS (not row-invariant: configs differ);
- alike gemv: the one gemv config (ALIKE_TILES) whose 1-row + 8-row time is least;
- alike r1: the one gemv config run as a program per row ("r1") whose 1-row + 8-row time is least;
- alike mma: the one tensor-core config (MMA_CONFIGS) whose 1-row + 8-row time is least;
- alike: the best of the three, which is what the engine picks (kernels.gemv.pick_config's `alike`).
The alike ways compute a row the same bit for bit at 1 and 8 rows; the table shows what that costs against
free per layer (the sum over a layer's four projections).

Usage: python bench/row_invariant_gemm.py [--out PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.kernels.gemv import ALIKE_TILES, CONFIGS, MMA_CONFIGS, device_time_ms, gemv  # noqa: E402
from baton.kernels.silu_mul import silu_mul  # noqa: E402
from bench.report import emit  # noqa: E402

MODELS = {  # (out_features, in_features, fused SwiGLU before it)
    "smollm2": {"qkv": (960, 576, False), "o": (576, 576, False), "gate_up": (3072, 576, False),
                "down": (576, 1536, True)},
    "llama3_8b": {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (28672, 4096, False),
                  "down": (4096, 14336, True)},
}
ROWS = (1, 8)
WAYS = ("alike_gemv", "alike_r1", "alike_mma")


def time_us(fn) -> float:
    return 1e3 * device_time_ms(fn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/row_invariant_gemm.py needs a CUDA device", file=sys.stderr)
        return 2
    rows_out, head = [], {}
    for model, shapes in MODELS.items():
        totals = {way: {m: 0.0 for m in ROWS} for way in ("cublas", "free", *WAYS, "alike")}
        for name, (n, k, silu) in shapes.items():
            w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
            xs = {m: torch.randn(m, 2 * k if silu else k, device="cuda").to(torch.bfloat16) for m in ROWS}
            cublas = {m: time_us(lambda x=xs[m]: F.linear(silu_mul(x) if silu else x, w)) for m in ROWS}
            free_cfgs = tuple(CONFIGS) + MMA_CONFIGS
            one_row = tuple((*c, "r1") for c in CONFIGS)
            grid = {c: {m: time_us(lambda c=c, x=xs[m]: gemv(x, w, silu_mul=silu, config=c)) for m in ROWS}
                    for c in dict.fromkeys(free_cfgs + tuple(ALIKE_TILES) + one_row)}
            row = dict(model=model, shape=name, n=n, k=k)
            for m in ROWS:
                row[f"cublas_{m}_us"] = cublas[m]
                row[f"free_{m}_us"] = min(cublas[m], *(grid[c][m] for c in free_cfgs))
            for way, cands in (("alike_gemv", ALIKE_TILES), ("alike_r1", one_row), ("alike_mma", MMA_CONFIGS),
                               ("alike", ALIKE_TILES + one_row + MMA_CONFIGS)):
                best = min(cands, key=lambda c: sum(grid[c].values()))
                row[f"{way}_config"] = best
                for m in ROWS:
                    row[f"{way}_{m}_us"] = grid[best][m]
            for way in totals:
                for m in ROWS:
                    totals[way][m] += row[f"{way}_{m}_us"]
            rows_out.append(row)
            print(f"{model:9s} {name:7s} " + "  ".join(
                f"m={m}: cuBLAS {row[f'cublas_{m}_us']:5.1f} free {row[f'free_{m}_us']:5.1f} " + " ".join(
                    f"{way} {row[f'{way}_{m}_us']:5.1f}" for way in WAYS) for m in ROWS)
                + f"  (picked {row['alike_config']})", flush=True)
        for m in ROWS:
            for way in ("free", *WAYS, "alike"):
                head[f"{model}_m{m}_{way}_vs_cublas"] = round(totals["cublas"][m] / totals[way][m], 3)
            head[f"{model}_m{m}_alike_vs_free"] = round(totals["free"][m] / totals["alike"][m], 3)
    print("\n| model | projection | rows | cuBLAS us | free us | alike gemv us | alike r1 us | alike mma us | "
          "alike (picked) us | picked |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows_out:
        for m in ROWS:
            print(f"| {r['model']} | {r['shape']} | {m} | {r[f'cublas_{m}_us']:.1f} | {r[f'free_{m}_us']:.1f} | "
                  + " | ".join(f"{r[f'{way}_{m}_us']:.1f}" for way in (*WAYS, "alike"))
                  + f" | {r['alike_config']} |")
    emit("row_invariant_gemm", head, {"device": torch.cuda.get_device_name(), "rows": rows_out,
                                      "reference": "cuBLAS (F.linear) on the same shapes, measured in this run"},
         out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
