"""KV hand-off time (expect → send → receiver's wait returns) per transport, against plain in-process copies.

Sender and receiver are separate processes; a prompt's blocks go to scattered or consecutive blocks.
CPU: python bench/kv_transfer.py [--tokens 5000] [--reps 5] [--backends tcp,nixl]
GPU: python bench/kv_transfer.py --device cuda --tokens 5000,32000 --backends ipc  (also times the one-launch
copy kernel against a bulk device copy of the same bytes; writes kv_transfer_gpu.json)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.engine.kv_transfer import create_transport  # noqa: E402
from bench.report import emit  # noqa: E402

# [num_layers, 2, block_size, num_kv_heads, head_dim], bfloat16
GEOMETRIES = {
    "small (Qwen2.5-0.5B-like)": (24, 2, 16, 2, 64),
    "large (Llama-3-8B-like)": (32, 2, 16, 8, 128),
}
DTYPE = torch.bfloat16


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_cache(num_blocks: int, block: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    cache = torch.empty((num_blocks, *block), dtype=DTYPE, device=device)
    cache.view(torch.int16).random_(-(2 ** 15), 2 ** 15)  # random bits, pages touched before timing
    return cache


def checksum(cache: torch.Tensor, block_ids: list[int]) -> int:
    return int(cache[block_ids].view(torch.int16).to(torch.int64).sum())


def block_ids(layout: str, n: int, num_blocks: int, seed: int) -> tuple[list[int], list[int]]:
    if layout == "consecutive":
        return list(range(n)), list(range(num_blocks - n, num_blocks))
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(num_blocks, generator=g)[:n].tolist(),
            torch.randperm(num_blocks, generator=g)[:n].tolist())


def sender_process(conn, backend: str, num_blocks: int, block: tuple[int, ...], device: str) -> None:
    cache = make_cache(num_blocks, block, device)
    transport = create_transport(backend)
    transport.register_cache(cache)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        endpoint, tid, src, dst = msg
        result = transport.send(endpoint, tid, src, dst, timeout_s=60)
        conn.send((result.ok, result.error, checksum(cache, src)))
    transport.close()


LAYOUTS = ("consecutive", "scattered")


def time_transport(backend: str, block: tuple[int, ...], num_blocks: int, n: int, reps: int,
                   device: str = "cpu") -> dict[str, dict]:
    """Per layout: one cold hand-off (connection set-up, mapping the peer, first touch of pages), then `reps`
    timed ones, from the receiver's expect() to its wait() returning (the decode worker may run)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=sender_process, args=(child, backend, num_blocks, block, device), daemon=True)
    proc.start()
    receiver = create_transport(backend)
    dst_cache = torch.zeros((num_blocks, *block), dtype=DTYPE, device=device)
    receiver.register_cache(dst_cache)
    endpoint = receiver.endpoint()
    assert parent.recv() == "ready"
    out = {}
    try:
        for layout in LAYOUTS:
            times = []
            for rep in range(reps + 1):
                src, dst = block_ids(layout, n, num_blocks, seed=rep)
                tid = f"bench-{layout}-{rep}"
                started = time.perf_counter()
                receiver.expect(tid, dst)
                parent.send((endpoint, tid, src, dst))
                result = receiver.wait(tid, timeout_s=60)
                times.append(time.perf_counter() - started)
                sent_ok, sent_error, src_sum = parent.recv()
                if not (result.ok and sent_ok):
                    raise RuntimeError(f"{backend} transfer failed: receiver {result.error}, sender {sent_error}")
                if checksum(dst_cache, dst) != src_sum:
                    raise RuntimeError(f"{backend} transfer corrupted the blocks")
            out[layout] = summarize(times)
    finally:
        parent.send(None)
        proc.join(30)
        receiver.close()
    return out


def time_copies(block: tuple[int, ...], num_blocks: int, n: int, reps: int,
                device: str = "cpu") -> dict[tuple[str, str], dict]:
    src_cache, dst_cache = make_cache(num_blocks, block, device), make_cache(num_blocks, block, device)
    nbytes = n * src_cache[0].numel() * src_cache.element_size()
    flat_src, flat_dst = src_cache.view(-1).view(torch.uint8), dst_cache.view(-1).view(torch.uint8)

    def bulk(src, dst, _=None):
        flat_dst[:nbytes].copy_(flat_src[:nbytes])

    def per_block(src, dst):
        for s, d in zip(src, dst):
            dst_cache[d].copy_(src_cache[s])

    def upload(src, dst):
        return torch.tensor([src, dst], dtype=torch.int32, device=device)

    def kernel(src, dst, ids=None):
        from baton.kernels.kv_block_copy import copy_kv_blocks

        ids = upload(src, dst) if ids is None else ids
        copy_kv_blocks(src_cache, dst_cache, ids[0], ids[1])

    # The bulk reference ignores block ids, so it is timed once; on a GPU by CUDA events. "ids on device": the ids
    # uploaded before the clock starts and the kernel timed the same way (the copy alone, as the bulk copy is);
    # "1 launch": the ids' upload included, timed on the host.
    on_device = (lambda src, dst: None) if device == "cuda" else None  # CUDA events time the copy itself
    methods = [("consecutive", "bulk memcpy (reference)", bulk, on_device)] + [
        (layout, "per-block torch copies", per_block, None) for layout in LAYOUTS]
    if device == "cuda":
        methods += [(layout, "copy kernel (1 launch)", kernel, None) for layout in LAYOUTS]
        methods += [(layout, "copy kernel, ids on device", kernel, upload) for layout in LAYOUTS]
    out = {}
    for layout, name, fn, prepare in methods:
        times = []
        for rep in range(reps + 1):
            src, dst = block_ids(layout, n, num_blocks, seed=rep)
            if prepare is not None:
                ids = prepare(src, dst)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync(device)
                start.record()
                fn(src, dst, ids)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
                continue
            sync(device)
            started = time.perf_counter()
            fn(src, dst)
            sync(device)
            times.append(time.perf_counter() - started)
        out[layout, name] = summarize(times)
    return out


def summarize(times: list[float]) -> dict:
    return {"cold_s": times[0], "median_s": statistics.median(times[1:]), "best_s": min(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="5000", help="prompt lengths, comma-separated")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--backends", default="tcp,nixl")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cuda":
        return gpu_main(args)

    rows = []
    tokens = int(args.tokens)
    for geometry, block in GEOMETRIES.items():
        block_nbytes = torch.empty(block, dtype=DTYPE).nbytes
        n = -(-tokens // block[2])
        num_blocks = n + n // 2
        results = time_copies(block, num_blocks, n, args.reps)
        for backend in args.backends.split(","):
            for layout, r in time_transport(backend, block, num_blocks, n, args.reps).items():
                results[layout, f"{backend} (2 processes)"] = r
        for (layout, method), r in sorted(results.items(), key=lambda kv: LAYOUTS.index(kv[0][0])):
            rows.append({"geometry": geometry, "layout": layout, "method": method, "blocks": n,
                         "block_bytes": block_nbytes, "bytes": n * block_nbytes,
                         "median_ms": r["median_s"] * 1e3, "best_ms": r["best_s"] * 1e3,
                         "cold_ms": r["cold_s"] * 1e3, "gb_per_s": n * block_nbytes / r["median_s"] / 1e9})

    load = os.getloadavg()
    print(f"KV hand-off of a {tokens}-token prompt, bfloat16, median and best of {args.reps} after one cold "
          f"run; {os.cpu_count()} CPUs, load average {load[0]:.1f} (other work on the machine adds noise)")
    print(f"{'geometry':<28}{'layout':<13}{'method':<26}{'MB':>7}{'median ms':>11}{'GB/s':>7}{'best ms':>9}"
          f"{'cold ms':>9}")
    for r in rows:
        print(f"{r['geometry']:<28}{r['layout']:<13}{r['method']:<26}{r['bytes'] / 1e6:>7.1f}"
              f"{r['median_ms']:>11.2f}{r['gb_per_s']:>7.2f}{r['best_ms']:>9.2f}{r['cold_ms']:>9.1f}")
    def pick(geometry: str, method: str) -> dict:
        return next(r for r in rows if r["geometry"].startswith(geometry) and r["method"].startswith(method)
                    and r["layout"] == ("consecutive" if method == "bulk" else "scattered"))

    headline = {f"{key}_{g}_ms": round(pick(g, m)["median_ms"], 2) for g in ("small", "large")
                for key, m in [("memcpy", "bulk"), ("per_block", "per-block")]
                + [(b, b) for b in args.backends.split(",")]}
    emit("kv_transfer", headline, {"tokens": tokens, "dtype": "bfloat16", "reps": args.reps,
                                   "cpus": os.cpu_count(), "load_average": load, "rows": rows}, args.out)


def gpu_main(args) -> None:
    """Per geometry and prompt length: bulk device copy of the bytes (reference), the copy kernel on scattered
    blocks, per-block copies, and the hand-off between two processes through each backend (ipc: CUDA IPC)."""
    rows = []
    for geometry, block in GEOMETRIES.items():
        block_nbytes = torch.empty(block, dtype=DTYPE).nbytes
        for tokens in (int(t) for t in args.tokens.split(",")):
            n = -(-tokens // block[2])
            num_blocks = n + n // 2
            results = time_copies(block, num_blocks, n, args.reps, "cuda")
            for backend in args.backends.split(","):
                for layout, r in time_transport(backend, block, num_blocks, n, args.reps, "cuda").items():
                    results[layout, f"{backend} hand-off (2 processes)"] = r
            bulk = results["consecutive", "bulk memcpy (reference)"]["median_s"]
            for (layout, method), r in results.items():
                rows.append({"geometry": geometry, "tokens": tokens, "layout": layout, "method": method,
                             "bytes": n * block_nbytes, "median_ms": r["median_s"] * 1e3, "best_ms": r["best_s"] * 1e3,
                             "cold_ms": r["cold_s"] * 1e3, "over_bulk": r["median_s"] / bulk})
    print(f"{'geometry':<28}{'tokens':>7} {'layout':<12}{'method':<30}{'MB':>8}{'median ms':>10}{'x bulk':>8}"
          f"{'cold ms':>9}")
    for r in rows:
        print(f"{r['geometry']:<28}{r['tokens']:>7} {r['layout']:<12}{r['method']:<30}{r['bytes'] / 1e6:>8.1f}"
              f"{r['median_ms']:>10.3f}{r['over_bulk']:>8.2f}{r['cold_ms']:>9.1f}")
    headline = {}
    for r in rows:
        if r["geometry"].startswith("large") and r["layout"] == "scattered":
            key = ("kernel_only_over_bulk" if r["method"].endswith("ids on device") else "kernel_over_bulk") \
                if r["method"].startswith("copy kernel") else \
                f"{r['method'].split()[0]}_handoff_ms" if "hand-off" in r["method"] else None
            if key:
                headline[f"{key}_{r['tokens']}"] = round(r["median_ms"] if key.endswith("_ms") else r["over_bulk"], 3)
    emit("kv_transfer_gpu", headline, {"device": torch.cuda.get_device_name(), "dtype": "bfloat16",
                                       "reps": args.reps, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
