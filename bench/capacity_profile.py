"""Measures the capacity profile the autoscaler plans with: prefill tokens/s vs batch tokens and decode ITL vs
concurrency and context, of the Baton engine on this device, written as the JSON `baton policy simulate
--capacity-json` and a policy's `profile:` read (schema: controlplane/capacity.py).

Default shape: one GPU's shard of Llama-3-70B under 4-way tensor parallelism (hidden 8192, 80 layers, 16 of 64
query heads, 2 of 8 KV heads, a quarter of the MLP and vocabulary), with random bf16 weights: what each GPU of a
4-GPU replica computes per step. The two all-reduces per layer that tensor parallelism adds are not in it (one
GPU here), so the profile is optimistic by their time. `--shape llama3-8b` measures a whole 8B replica on one GPU.

Without a GPU, `--from-engine-gpu bench/results/engine_gpu.json` turns the decode and prefill rates that
bench/engine_gpu.py measured (Llama-3-8B shape, one H200) into a profile: fewer points, the same format.

Usage: python bench/capacity_profile.py [--shape llama3-70b-tp4|llama3-8b|quick] [--out profile.json]
       python bench/capacity_profile.py --from-engine-gpu bench/results/engine_gpu.json [--out profile.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from bench.report import emit

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0,
              tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
              max_position_embeddings=131072)
SHAPES = {
    # model name in the profile, GPUs per replica, config of what one GPU computes
    "llama3-70b-tp4": ("llama-3-70b", 4, dict(_LLAMA, hidden_size=8192, intermediate_size=28672 // 4,
                                              num_hidden_layers=80, num_attention_heads=64 // 4,
                                              num_key_value_heads=8 // 4, head_dim=128, vocab_size=128256 // 4)),
    "llama3-8b": ("llama-3-8b", 1, dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "quick": ("quick", 1, dict(_LLAMA, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, vocab_size=32000)),
}


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 30000, (n, length), generator=gen).tolist()


def prefill_rate(engine, tokens: int, reps: int) -> float:
    """Prompt tokens/s of one prompt of `tokens` tokens (chunked at the engine's batch limit), best of `reps`."""
    import torch

    from baton.engine.sampling_params import SamplingParams

    best = float("inf")
    for i in range(reps):
        prompt = _prompts(1, tokens, tokens * 10 + i)[0]
        engine.add_request(f"p{tokens}-{i}-{time.monotonic_ns()}", prompt,
                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        best = min(best, time.perf_counter() - t0)
    return tokens / best


def decode_itl(engine, concurrency: int, context: int, new_tokens: int) -> float:
    """Median seconds per decode step with `concurrency` requests whose contexts start at `context` tokens."""
    import torch

    from baton.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(_prompts(concurrency, context, concurrency * 7 + context)):
        engine.add_request(f"d{concurrency}-{context}-{i}-{time.monotonic_ns()}", prompt, params)
    steps = []
    while engine.has_unfinished():
        decode_only = not engine.scheduler.waiting and all(
            s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if decode_only and len(outs) == concurrency:
            steps.append(dt)
    steps.sort()
    return steps[len(steps) // 2]


def measure(args) -> dict:
    """Runs the engine on this GPU over the prefill sizes and the (context, concurrency) grid."""
    import torch

    from baton.engine.config import EngineConfig
    from baton.engine.llm_engine import LLMEngine

    model, gpus, config = SHAPES[args.shape]
    prefill_tokens = [int(x) for x in args.prefill_tokens.split(",")]
    concurrency = [int(x) for x in args.concurrency.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    device = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(tmp, device="cuda", dtype="bfloat16", load_format="dummy",
                                        max_num_seqs=max(concurrency), max_num_batched_tokens=args.max_batch_tokens,
                                        max_model_len=max(*contexts, *prefill_tokens) + args.new_tokens + 16,
                                        gpu_memory_utilization=args.gpu_memory_utilization,
                                        enable_prefix_caching=False, show_progress=False))
        kv_tokens = len(engine.block_manager.blocks) * engine.config.block_size
        print(f"{args.shape} up in {time.perf_counter() - t0:.1f}s on {device}; KV pool {kv_tokens} tokens",
              flush=True)
        prefill_rate(engine, 1024, 1)  # warm-up: kernels compile on first use
        rates = []
        for n in prefill_tokens:
            rates.append(prefill_rate(engine, n, 3))
            print(f"prefill {n:>6} tokens: {rates[-1]:>9.0f} tokens/s", flush=True)
        itl: list[list[float | None]] = []
        for context in contexts:
            row: list[float | None] = []
            for c in concurrency:
                if c * (context + args.new_tokens) > kv_tokens or (row and row[-1] is None):
                    row.append(None)
                    continue
                row.append(decode_itl(engine, c, context, args.new_tokens) * 1e3)
                print(f"decode c={c:>4} ctx={context:>6}: ITL {row[-1]:7.2f} ms, {c / row[-1] * 1e3:8.0f} tokens/s",
                      flush=True)
            itl.append(row)
    source = f"bench/capacity_profile.py --shape {args.shape} on {device}, {datetime.date.today().isoformat()}"
    if gpus > 1:
        source += "; one GPU's tensor-parallel shard, all-reduces not included"
    return _profile(model, device, gpus, source, prefill_tokens, rates, args.max_batch_tokens, contexts,
                    concurrency, itl, kv_tokens)


def convert_engine_gpu(path: Path, gpu_memory_utilization: float) -> dict:
    """A profile from bench/engine_gpu.py's measurement: decode tok/s per (batch, context) becomes ITL, the one
    prefill timing the whole prefill curve. That run did not record its KV pool, so kv_tokens is computed for
    `gpu_memory_utilization` from its weight bytes and the model's KV bytes per token (labelled in `source`)."""
    run = json.loads(path.read_text())
    rows = run["decode"]
    contexts = sorted({r["context"] for r in rows})
    concurrency = sorted({r["batch"] for r in rows})
    by = {(r["context"], r["batch"]): r for r in rows}
    itl = [[round(c / by[(x, c)]["tok_s"] * 1e3, 3) if "tok_s" in by.get((x, c), {}) else None
            for c in concurrency] for x in contexts]
    prefill = run["prefill"]
    weights_gb = 16.06  # the run's printed weight size (README, GPU section)
    kv_bytes_per_token = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16
    memory_gb = H200_MEMORY_GB
    kv_tokens = int((gpu_memory_utilization * memory_gb - weights_gb) * KV_SHARE * 1e9 / kv_bytes_per_token)
    date = run.get("date") or "2026-12-02"
    source = (f"{path.name} (bench/engine_gpu.py, Llama-3-8B shape, bf16, {run['device']}, {date}): decode ITL "
              f"= batch / measured tok/s; prefill measured at {prefill['tokens']} tokens only; kv_tokens computed "
              f"for gpu_memory_utilization {gpu_memory_utilization} ({memory_gb:.0f} GB device, {weights_gb} GB "
              f"weights, {KV_SHARE:.0%} of the rest for KV), not measured")
    return _profile("llama-3-8b", run["device"], 1, source, [prefill["tokens"]],
                    [prefill["tokens"] / prefill["seconds"]], 8192, contexts, concurrency, itl, kv_tokens)


# What nvidia-smi reports for an H200 (143,771 MiB), and the share of memory left after weights that the
# engine's KV pool gets (the rest: activations, CUDA graphs, allocator slack).
H200_MEMORY_GB = 150.76
KV_SHARE = 0.95


def _profile(model, device, gpus, source, prefill_tokens, rates, max_batch, contexts, concurrency, itl,
             kv_tokens) -> dict:
    return {
        "version": 1, "model": model, "device": device, "gpus_per_replica": gpus, "source": source,
        "prefill": {"batch_tokens": prefill_tokens, "tokens_per_s": [round(r, 1) for r in rates],
                    "max_batch_tokens": max_batch},
        "decode": {"context": contexts, "concurrency": concurrency,
                   "itl_ms": [[None if v is None else round(v, 3) for v in row] for row in itl],
                   "kv_tokens": kv_tokens},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-70b-tp4")
    ap.add_argument("--from-engine-gpu", type=Path, default=None, help="convert this bench/engine_gpu.py result")
    ap.add_argument("--prefill-tokens", default="256,512,1024,2048,4096,8192,16384")
    ap.add_argument("--concurrency", default="1,16,64,128,256")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--out", default=None, help="profile JSON (default: bench/results/capacity_<model>_<device>.json)")
    args = ap.parse_args()
    if args.from_engine_gpu is not None:
        profile = convert_engine_gpu(args.from_engine_gpu, args.gpu_memory_utilization)
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench/capacity_profile.py needs a CUDA device (or --from-engine-gpu)", file=sys.stderr)
            return 2
        profile = measure(args)
    slug = f"{profile['model']}_{profile['device'].split()[-1].lower()}"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"capacity_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1) + "\n")
    head = {"prefill_busy_tokens_per_s": profile["prefill"]["tokens_per_s"][-1],
            "kv_tokens": profile["decode"]["kv_tokens"]}
    decode = profile["decode"]
    for context, row in zip(decode["context"], decode["itl_ms"]):
        for c, v in zip(decode["concurrency"], row):
            if v is not None:
                head[f"itl_ms_c{c}_ctx{context}"] = v
    root = Path(__file__).resolve().parents[1]
    where = out.resolve().relative_to(root) if out.resolve().is_relative_to(root) else out
    emit("capacity_profile", head, {"profile_path": str(where), "profile": profile},
         out=Path(__file__).resolve().parent / "results" / f"capacity_profile_{slug}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
