"""GPU decode and prefill of the Baton engine on a Llama-3-8B-shaped bf16 model with random weights, each next to
a reference measured in the same run: the HBM roofline from a measured device copy, a measured bf16 matmul, and
transformers with a static KV cache (it compiles the decoding forward itself) on the same weights.

Usage: python bench/engine_gpu.py [--quick] [--no-hf] [--batches 1,16,64,256] [--contexts 1024,4096]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.engine.config import EngineConfig  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from baton.engine.sampling_params import SamplingParams  # noqa: E402
from bench.report import emit  # noqa: E402

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                 torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
QUICK = dict(LLAMA3_8B, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, vocab_size=32000)


def median_ms(fn, reps: int = 20) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=max(100, reps * 10), return_mode="median")


def hbm_bandwidth() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy (two buffers alternated)."""
    n = 2**30
    a, b = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    ms = median_ms(lambda: b.copy_(a))
    del a, b
    return 2 * n * 4 / (ms / 1e3)


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    return 2 * 8192**3 / (ms / 1e3)


def timed_decode(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
                 ) -> tuple[float, list[list[int]], int]:
    """(decode tok/s, each request's output ids, tokens generated in the timed part). Prefill (and the mixed
    steps) run first; then the decode-only run is timed as a whole: a sync per step would stall async
    scheduling, which queues each step while the previous one still runs."""
    stamp = time.monotonic_ns()
    ids = [f"t{stamp}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    outputs = {rid: [] for rid in ids}

    def collect(outs) -> int:
        for out in outs:
            outputs[out.request_id].extend(out.new_token_ids)
        return sum(len(out.new_token_ids) for out in outs)

    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        collect(engine.step())
    if engine.config.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    while engine.has_unfinished():
        tokens += collect(engine.step())
    timed = time.perf_counter() - t0
    return tokens / timed if timed else float("nan"), [outputs[r] for r in ids], tokens


def decode_rate(engine: LLMEngine, batch: int, context: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tok/s with `batch` requests whose contexts start at `context` tokens: decode-only steps timed."""
    gen = torch.Generator().manual_seed(batch * 7 + context)
    prompts = torch.randint(3, 30000, (batch, context), generator=gen).tolist()
    rate, outputs, _ = timed_decode(engine, prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                                     ignore_eos=True))
    return rate, outputs


def prefill_time(engine: LLMEngine, tokens: int) -> float:
    prompt = torch.randint(3, 30000, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    best = float("inf")
    for i in range(3):
        rid = f"prefill-{tokens}-{i}-{time.monotonic_ns()}"
        engine.add_request(rid, prompt[:-1] + [3 + i], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        best = min(best, time.perf_counter() - t0)
    return best


def hf_model_from(engine: LLMEngine, config: dict):
    """transformers' Llama on the engine's own weights (merged projections split back into HF's names)."""
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
    hf = hf.to("cuda").eval()
    mine = engine.model.state_dict()
    mc = engine.model_config
    q, kv, inter = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.intermediate_size
    state = {}
    for name, tensor in mine.items():
        if ".qkv_proj." in name:
            for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv])):
                state[name.replace("qkv_proj", part)] = t
        elif ".gate_up_proj." in name:
            for part, t in zip(("gate_proj", "up_proj"), tensor.split([inter, inter])):
                state[name.replace("gate_up_proj", part)] = t
        elif not name.startswith("rotary"):
            state[name] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


def hf_decode_rate(hf, batch: int, context: int, new_tokens: int) -> tuple[float, list[int]]:
    gen = torch.Generator().manual_seed(batch * 7 + context)
    ids = torch.randint(3, 30000, (batch, context), generator=gen).cuda()
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0,
              cache_implementation="static")

    def run(n: int):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    run(new_tokens)  # compiles
    t1, _ = run(1)
    tn, out = run(new_tokens)
    return batch * (new_tokens - 1) / (tn - t1), out[0, context:].tolist()


def agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def profile_step(engine: LLMEngine, batch: int, context: int) -> list[tuple[str, float, int]]:
    """Kernel time of a few decode steps: (kernel, ms per step, calls per step), the largest, then all kernels."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"prof-{i}-{time.monotonic_ns()}", [5 + i % 100] * context, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    before = engine.stats().generated_tokens
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished():
            engine.step()
    steps = max(1, (engine.stats().generated_tokens - before) // batch)  # forward passes, not step() calls
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events if e.device_time_total > 0 and "Memcpy" not in e.key
                and not e.key.startswith(("cuda", "Command Buffer")))
    rows = [(e.key[:60], e.device_time_total / 1e3 / steps, e.count // steps) for e in events[:14]]
    # The device timeline: from the first kernel to the last, how much of it some kernel was running. Time
    # neither in a kernel nor between graph replays is the launch gap between kernels inside the graph.
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a >= end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    wall = (spans[-1][1] - spans[0][0]) if spans else 0.0
    return rows + [("all kernels", total / 1e3 / steps, sum(c for _, _, c in rows)),
                   ("device busy (union of kernels)", busy / 1e3 / steps, 0),
                   ("device timeline, first to last kernel", wall / 1e3 / steps, 0)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (its compile takes about a minute)")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--hf-batches", default="1,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.62)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/engine_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    config = QUICK if args.quick else LLAMA3_8B
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    bw, peak = hbm_bandwidth(), matmul_peak()
    print(f"HBM copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(tmp, device="cuda", dtype="bfloat16", load_format="dummy",
                                        max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                        max_model_len=max(*contexts, 4096) + args.new_tokens + 16,
                                        gpu_memory_utilization=args.gpu_memory_utilization,
                                        enable_prefix_caching=False, show_progress=False))
        startup = time.perf_counter() - t0
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        kv_token_bytes = engine.kv_cache[0].numel() * engine.kv_cache.element_size() / engine.config.block_size
        capacity = len(engine.block_manager.blocks) * engine.config.block_size
        print(f"engine up in {startup:.1f}s: weights {weight_bytes / 1e9:.2f} GB, KV pool {capacity} tokens",
              flush=True)
        # Warm-up: the first steps of each batch bucket compile kernels and pick gemv configs; none of that is timed.
        for batch in batches:
            if batch * (128 + 8) <= capacity:
                decode_rate(engine, batch, 128, 8)
        rows = []
        for context in contexts:
            for batch in batches:
                if batch * (context + args.new_tokens) > capacity:
                    rows.append(dict(batch=batch, context=context, skipped="KV pool too small"))
                    continue
                rate, _ = decode_rate(engine, batch, context, args.new_tokens)
                step_bytes = weight_bytes + batch * (context + args.new_tokens / 2) * kv_token_bytes
                roofline = batch * bw / step_bytes
                rows.append(dict(batch=batch, context=context, tok_s=rate, roofline_tok_s=roofline,
                                 of_roofline=rate / roofline))
                print(f"decode b={batch} ctx={context}: {rate:.0f} tok/s, {rate / roofline:.0%} of roofline",
                      flush=True)
        prefill_tokens = 4096
        pt = prefill_time(engine, prefill_tokens)
        mc = engine.model_config
        flops = 2 * (weight_bytes / 2) * prefill_tokens + 2 * mc.num_layers * mc.num_heads * mc.head_dim \
            * prefill_tokens * prefill_tokens  # GEMMs + causal attention (QK and PV, half the square each)
        prefill = dict(tokens=prefill_tokens, seconds=pt, tflops=flops / pt / 1e12, of_matmul_peak=flops / pt / peak)
        print(f"prefill {prefill_tokens}: {pt * 1e3:.1f} ms, {prefill['of_matmul_peak']:.0%} of matmul peak", flush=True)
        # What async scheduling buys: the same batch-1 run with the host waiting for each step's ids.
        # Back to back, twice each, alternating, so that drift hits both alike; the better of each counts.
        sync_rates, async_rates = [], []
        for _ in range(2):
            engine.async_scheduling = False
            sync_rates.append(decode_rate(engine, 1, contexts[0], args.new_tokens)[0])
            engine.async_scheduling = True
            async_rates.append(decode_rate(engine, 1, contexts[0], args.new_tokens)[0])
        sync_rate, async_rate = max(sync_rates), max(async_rates)
        print(f"batch 1 ctx {contexts[0]}: synchronous steps {sync_rate:.0f} tok/s, async scheduling "
              f"{async_rate:.0f} tok/s", flush=True)
        profiles = {b: profile_step(engine, b, 1024) for b in (1, 64) if b <= max(batches)}
        hf_rows = []
        if not args.no_hf:
            hf = hf_model_from(engine, config)
            for batch in [int(x) for x in args.hf_batches.split(",")]:
                context = contexts[0]
                hf_rate, hf_tokens = hf_decode_rate(hf, batch, context, args.new_tokens)
                mine = next((r for r in rows if r["batch"] == batch and r["context"] == context and "tok_s" in r),
                            None)
                _, baton_tokens = decode_rate(engine, batch, context, args.new_tokens)
                hf_rows.append(dict(batch=batch, context=context, hf_tok_s=hf_rate,
                                    baton_over_hf=(mine["tok_s"] / hf_rate) if mine else None,
                                    bf16_tokens_agreeing=agreement(baton_tokens[0], hf_tokens)))
                print(f"transformers static b={batch} ctx={context}: {hf_rate:.0f} tok/s", flush=True)
            del hf
    print("\n| batch | context | Baton tok/s | roofline tok/s | of roofline |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        if "tok_s" in r:
            print(f"| {r['batch']} | {r['context']} | {r['tok_s']:.0f} | {r['roofline_tok_s']:.0f} | "
                  f"{r['of_roofline']:.0%} |")
        else:
            print(f"| {r['batch']} | {r['context']} | - | - | {r['skipped']} |")
    for r in hf_rows:
        print(f"transformers static+compiled b={r['batch']} ctx={r['context']}: {r['hf_tok_s']:.0f} tok/s; "
              f"Baton {r['baton_over_hf'] or float('nan'):.2f}x; bf16 tokens agreeing before divergence: "
              f"{r['bf16_tokens_agreeing']}/{args.new_tokens}")
    print(f"prefill {prefill_tokens} tokens: {pt * 1e3:.1f} ms = {prefill['tflops']:.0f} TFLOP/s, "
          f"{prefill['of_matmul_peak']:.0%} of the measured bf16 matmul")
    for b, prof in profiles.items():
        print(f"\nkernel time per decode step, batch {b}, ctx 1024:")
        for name, ms, calls in prof:
            print(f"  {ms:8.3f} ms  x{calls:<4} {name}")
    head = {"hbm_tb_s": bw / 1e12, "matmul_tflops": peak / 1e12}
    for r in rows:
        if "tok_s" in r:
            head[f"b{r['batch']}_c{r['context']}_of_roofline"] = round(r["of_roofline"], 3)
    for r in hf_rows:
        if r["baton_over_hf"]:
            head[f"b{r['batch']}_over_hf_static"] = round(r["baton_over_hf"], 3)
    head["prefill_4k_of_matmul_peak"] = round(prefill["of_matmul_peak"], 3)
    head["b1_async_over_sync"] = round(async_rate / sync_rate, 3)
    emit("engine_gpu", head, {"model": "quick" if args.quick else "llama3-8b-shaped", "device":
                              torch.cuda.get_device_name(), "startup_s": startup, "decode": rows, "prefill": prefill,
                              "transformers": hf_rows,
                              "b1_sync_tok_s": sync_rate, "profiles": {str(k): v for k, v in profiles.items()}},
         out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
