"""Paged decode attention on the GPU: the engine's default launch (kernels/paged_decode_attention.py: the last split
merges) against the same with a separate merge kernel and against a sweep of its tuning knobs (keys per loop step,
warps, pipeline stages, splits per request and KV head), on Llama-3-8B's attention shape (32 query heads, 8 KV
heads, head_dim 128, 16-token pages scattered over the pool), at decode batch sizes and contexts the engine serves.
Times are device time as a decode step runs the kernels: from a CUDA graph, L2 flushed before each call
(kernels.gemv.device_time_ms). Bandwidth counts the K and V bytes read against the measured HBM copy bandwidth.
Usage: python bench/decode_attention.py [--shapes 1x1024,1x4096,16x4096,64x1024,64x4096] [--out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.kernels.gemv import device_time_ms  # noqa: E402
from baton.kernels.paged_decode_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_reference,
    pick_num_splits,
)
from bench.engine_gpu import hbm_bandwidth  # noqa: E402
from bench.report import emit  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
KNOBS = list(itertools.product((64, 128), (4, 8), (2, 3)))  # (block_n, num_warps, num_stages)
SPLITS = (1, 2, 4, 8, 16, 32, 64)


def setup(batch: int, context: int, gen: torch.Generator):
    pages_per_seq = -(-context // PAGE)
    num_blocks = batch * pages_per_seq + 8
    cache = torch.randn(num_blocks, 1, 2, PAGE, KV_HEADS, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * pages_per_seq].view(batch, pages_per_seq)
    tables = tables.to("cuda", torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    return q, cache, tables, lens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x1024,1x4096,16x4096,64x1024,64x4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/decode_attention.py needs a CUDA device", file=sys.stderr)
        return 2
    copy_bw = hbm_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"HBM copy {copy_bw / 1e12:.2f} TB/s (read + write), {sms} SMs", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows, head = [], {"hbm_tb_s": round(copy_bw / 1e12, 3)}
    for shape in args.shapes.split(","):
        batch, context = (int(x) for x in shape.split("x"))
        q, cache, tables, lens = setup(batch, context, gen)
        scale = HEAD_DIM ** -0.5
        kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * cache.element_size()
        default_splits = pick_num_splits(batch, KV_HEADS, sms)
        ref = paged_decode_attention_reference(q, cache, 0, tables, lens, scale, None).float()

        def call(splits, knobs=(None, 4, 2), fused=True):
            block_n, warps, stages = knobs
            return paged_decode_attention(q, cache, 0, tables, lens, scale, None, splits, block_n=block_n,
                                          num_warps=warps, num_stages=stages, fused_merge=fused)

        default_us = 1e3 * device_time_ms(lambda: call(default_splits))
        unfused_us = 1e3 * device_time_ms(lambda: call(default_splits, fused=False))  # split + merge kernels
        best = (default_us, (64, 4, 2), default_splits)
        for knobs in KNOBS:
            for splits in SPLITS:
                if batch * KV_HEADS * splits > 8 * 1024 or (splits - 1) * PAGE >= context:
                    continue
                out = call(splits, knobs).float()
                if not torch.allclose(out, ref, atol=2e-2, rtol=2e-2):
                    print(f"  {shape} {knobs} splits {splits}: WRONG (max err {(out - ref).abs().max():.3g})")
                    continue
                us = 1e3 * device_time_ms(lambda: call(splits, knobs))
                if us < best[0]:
                    best = (us, knobs, splits)
        row = dict(batch=batch, context=context, kv_mb=kv_bytes / 1e6, default_us=default_us, unfused_us=unfused_us,
                   default_splits=default_splits, default_tb_s=kv_bytes / default_us / 1e6, best_us=best[0],
                   best_block_n=best[1][0], best_warps=best[1][1], best_stages=best[1][2], best_splits=best[2],
                   best_tb_s=kv_bytes / best[0] / 1e6, speedup=default_us / best[0])
        rows.append(row)
        head[f"b{batch}_c{context}_default_tb_s"] = round(row["default_tb_s"], 3)
        head[f"b{batch}_c{context}_best_speedup"] = round(row["speedup"], 3)
        head[f"b{batch}_c{context}_fused_merge_speedup"] = round(unfused_us / default_us, 3)
        print(f"b={batch:3d} ctx={context:5d}: default {default_us:7.1f} us ({row['default_tb_s']:.2f} TB/s, "
              f"{default_splits} splits; separate merge kernel {unfused_us:.1f} us)  best {best[0]:7.1f} us ({row['best_tb_s']:.2f} TB/s) "
              f"block_n {best[1][0]} warps {best[1][1]} stages {best[1][2]} splits {best[2]}", flush=True)
    print("\n| batch | context | KV MB | default us | default TB/s | best us | best TB/s | best (block_n, warps, "
          "stages, splits) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['kv_mb']:.0f} | {r['default_us']:.1f} | {r['default_tb_s']:.2f} "
              f"| {r['best_us']:.1f} | {r['best_tb_s']:.2f} | {r['best_block_n']}, {r['best_warps']}, "
              f"{r['best_stages']}, {r['best_splits']} |")
    emit("decode_attention", head, {"device": torch.cuda.get_device_name(), "rows": rows}, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
