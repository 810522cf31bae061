"""FP8 weights (`--quantization fp8`) and the FP8 KV cache (`--kv-cache-dtype fp8`) against the model dtype,
measured side by side in one run.

speed (CUDA): Llama-3-8B-shaped random weights, bf16 engine, FP8 engine (default: first and last decoder layers and
  the LM head in bf16), FP8 with bf16 activations in every GEMM (fp8_w8a16: fp8_weight_only), with the LM head
  too (fp8_head: fp8_lm_head), then with all layers (fp8_all: + fp8_all_layers): decode tok/s at batch 1
  and 64 (1k context) and prefill of 4k tokens; writes bench/results/fp8.json. quality covers all three.
quality (CPU or CUDA): a real checkpoint (default: `baton up`'s SmolLM2-135M-Instruct) in bf16 and in FP8:
  perplexity on bench/data/declaration_of_independence.txt (public domain, teacher-forced prompt logprobs) and
  greedy agreement (tokens before the first divergence) on a few prompts; writes bench/results/fp8_quality.json.
kv-speed (CUDA): Llama-3-8B-shaped bf16 weights, a bf16 KV cache then an FP8 one: decode tok/s at batch 1 and 64
  over 4k-token contexts (where reading the KV cache is much of a step) and the blocks each pool gets from the same
  --gpu-memory-utilization; writes bench/results/fp8_kv.json.
kv-quality (CPU or CUDA): as quality, bf16 weights with a bf16 KV cache vs an FP8 one with the checkpoint's scales
  (else 1.0, vLLM's default), and vs one with --calculate-kv-scales (per-layer scales the engine measures at start-up
  on its built-in calibration text, not this one); also each token's |logprob - bf16's| on the text, mean and p99;
  writes bench/results/fp8_kv_quality.json.

Usage: python bench/fp8.py speed [--quick]  |  python bench/fp8.py quality [--model DIR] [--device cpu]
       python bench/fp8.py kv-speed [--quick]  |  python bench/fp8.py kv-quality [--model DIR] [--device cpu]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.engine.config import EngineConfig  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from baton.engine.sampling_params import SamplingParams  # noqa: E402
from bench.report import emit  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "declaration_of_independence.txt"
# What the bf16 and the FP8 engine of each mode differ in.
# fp8_w8a16: bf16 activations in every GEMM (fp8_weight_only); fp8_head: the LM head in FP8 too (fp8_lm_head);
# fp8_all: the first and last decoder layers as well (fp8_all_layers).
VARIANTS = {"weights": {"bf16": {}, "fp8": {"quantization": "fp8"},
                        "fp8_w8a16": {"quantization": "fp8", "fp8_weight_only": True},
                        "fp8_head": {"quantization": "fp8", "fp8_lm_head": True},
                        "fp8_all": {"quantization": "fp8", "fp8_all_layers": True, "fp8_lm_head": True}},
            "kv": {"bf16": {}, "fp8": {"kv_cache_dtype": "fp8"}}}
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France? Explain briefly.",
           "List three uses of a paperclip.", "def fibonacci(n):", "The theory of relativity says that"]


def speed(args) -> int:
    from bench.engine_gpu import LLAMA3_8B, QUICK, decode_rate, prefill_time

    config = QUICK if args.quick else LLAMA3_8B
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        names = list(dict.fromkeys(["bf16", "fp8", *args.variants.split(",")]))
        if unknown := set(names) - set(VARIANTS["weights"]):
            raise SystemExit(f"bench/fp8.py speed: unknown --variants {', '.join(sorted(unknown))}")
        for name in names:
            variant = VARIANTS["weights"][name]
            engine = LLMEngine(EngineConfig(tmp, device="cuda", dtype="bfloat16", load_format="dummy",
                                            max_num_seqs=64, max_num_batched_tokens=8192,
                                            max_model_len=4096 + 96, gpu_memory_utilization=0.6,
                                            enable_prefix_caching=False, show_progress=False, **variant))
            weight_bytes = sum(b.numel() * b.element_size() for b in [*engine.model.parameters(),
                                                                       *engine.model.buffers()])
            row = {"weight_gb": weight_bytes / 1e9}
            for batch in (1, 64):
                row[f"b{batch}_tok_s"], _ = decode_rate(engine, batch, 1024, 64)
            pt = prefill_time(engine, 4096)
            row["prefill_4k_s"] = pt
            row["prefill_tflops"] = 2 * 8.03e9 * 4096 / pt / 1e12 if not args.quick else float("nan")
            rows[name] = row
            print(f"{name}: weights {row['weight_gb']:.2f} GB, decode b1 {row['b1_tok_s']:.0f} tok/s, "
                  f"b64 {row['b64_tok_s']:.0f} tok/s, prefill 4k {pt * 1e3:.1f} ms", flush=True)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    bf, f8 = rows["bf16"], rows["fp8"]
    print("\n| weights | GB | decode b1 tok/s | decode b64 tok/s | prefill 4k ms |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['weight_gb']:.2f} | {r['b1_tok_s']:.0f} | {r['b64_tok_s']:.0f} | "
              f"{r['prefill_4k_s'] * 1e3:.1f} |")
    head = {"b1_fp8_tok_s": round(f8["b1_tok_s"], 1), "b1_bf16_tok_s": round(bf["b1_tok_s"], 1)}
    for name, r in rows.items():
        if name != "bf16":
            head |= {f"b1_{name}_over_bf16": round(r["b1_tok_s"] / bf["b1_tok_s"], 3),
                     f"b64_{name}_over_bf16": round(r["b64_tok_s"] / bf["b64_tok_s"], 3),
                     f"prefill_{name}_over_bf16": round(bf["prefill_4k_s"] / r["prefill_4k_s"], 3)}
    emit("fp8", head, {"model": "quick" if args.quick else "llama3-8b-shaped", "device": torch.cuda.get_device_name(),
                       "rows": rows}, out=args.out)
    return 0


def kv_speed(args) -> int:
    """Decode over long contexts with a bf16 and an FP8 KV cache; the pools come from the same memory share."""
    from bench.engine_gpu import LLAMA3_8B, QUICK, decode_rate

    config = QUICK if args.quick else LLAMA3_8B
    context, new_tokens = (1024, 32) if args.quick else (4096, 64)
    rows, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        for name, variant in VARIANTS["kv"].items():
            engine = LLMEngine(EngineConfig(tmp, device="cuda", dtype="bfloat16", load_format="dummy", max_num_seqs=64,
                                            max_num_batched_tokens=8192, max_model_len=context + new_tokens + 32,
                                            gpu_memory_utilization=0.6, enable_prefix_caching=False,
                                            show_progress=False, **variant))
            cache = engine.kv_cache
            row = {"kv_dtype": str(cache.dtype).removeprefix("torch."), "kv_blocks": cache.shape[0],
                   "kv_gb": cache.numel() * cache.element_size() / 1e9,
                   "kv_tokens": cache.shape[0] * engine.config.block_size}
            for batch in (1, 64):
                row[f"b{batch}_tok_s"], outputs[(name, batch)] = decode_rate(engine, batch, context, new_tokens)
            rows[name] = row
            print(f"KV {name}: {row['kv_blocks']} blocks ({row['kv_tokens']} tokens) in {row['kv_gb']:.1f} GB, "
                  f"decode b1 {row['b1_tok_s']:.0f} tok/s, b64 {row['b64_tok_s']:.0f} tok/s", flush=True)
            del engine, cache
            gc.collect()
            torch.cuda.empty_cache()
    bf, f8 = rows["bf16"], rows["fp8"]
    print(f"\n| KV cache | GB | tokens held | decode b1 tok/s ({context} ctx) | decode b64 tok/s ({context} ctx) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['kv_gb']:.1f} | {r['kv_tokens']} | {r['b1_tok_s']:.0f} | {r['b64_tok_s']:.0f} |")
    # Random weights: greedy ids mostly agree, not exactly (FP8 rounds the keys and values).
    agree = [agreement_of(a, b) for batch in (1, 64)
             for a, b in zip(outputs[("bf16", batch)], outputs[("fp8", batch)])]
    head = {"b1_fp8_over_bf16": round(f8["b1_tok_s"] / bf["b1_tok_s"], 3),
            "b64_fp8_over_bf16": round(f8["b64_tok_s"] / bf["b64_tok_s"], 3),
            "kv_tokens_fp8_over_bf16": round(f8["kv_tokens"] / bf["kv_tokens"], 3),
            "greedy_agreement": round(sum(n for n, _ in agree) / max(1, sum(m for _, m in agree)), 3)}
    emit("fp8_kv", head, {"model": "quick" if args.quick else "llama3-8b-shaped", "context": context,
                          "device": torch.cuda.get_device_name(), "rows": rows}, out=args.out)
    return 0


def agreement_of(a: list[int], b: list[int]) -> tuple[int, int]:
    """(tokens equal before the first divergence, tokens compared)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n, min(len(a), len(b))


def _engine(model_dir: str, device: str, variant: dict) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir, device=device, dtype="bfloat16", num_kv_blocks=256, max_num_seqs=8,
                                  enable_prefix_caching=False, show_progress=False, **variant))


def prompt_logprobs(engine: LLMEngine, ids: list[int]) -> list[float]:
    """Teacher-forced logprob of every token of ids after the first."""
    engine.add_request("ppl", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
    scores = None
    while engine.has_unfinished():
        for out in engine.step():
            scores = out.prompt_logprobs or scores
    return scores


def perplexity(engine: LLMEngine, ids: list[int]) -> float:
    scores = prompt_logprobs(engine, ids)
    return math.exp(-sum(scores) / len(scores))


def quality(args) -> int:
    from baton.devtools.fetch_model import resolve_any_model

    kv = args.mode == "kv-quality"
    what = "KV cache" if kv else "weights"
    model_dir, name = resolve_any_model(args.model)
    text_ids = None
    result = {}
    outputs = {}
    logprobs = {}
    runs = list(VARIANTS["kv" if kv else "weights"].items())
    if kv:
        runs.append(("fp8_calculated", {**VARIANTS["kv"]["fp8"], "calculate_kv_scales": True}))
    for label, variant in runs:
        engine = _engine(str(model_dir), args.device, variant)
        if text_ids is None:
            text_ids = engine.tokenizer.encode(TEXT.read_text())[: engine.max_model_len - 1]
        logprobs[label] = torch.tensor(prompt_logprobs(engine, text_ids))
        diff = (logprobs[label] - logprobs["bf16"]).abs()
        result[label] = {"perplexity": math.exp(-logprobs[label].mean().item()),
                         "logprob_diff_mean": diff.mean().item(), "logprob_diff_p99": diff.quantile(0.99).item()}
        if kv and variant.get("kv_cache_dtype") == "fp8":
            result[label]["kv_scales"] = engine.model.kv_scales.tolist()  # [layer] = [K, V]
        prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        seqs = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0))
        outputs[label] = [s.output_ids for s in seqs]
        print(f"{what} {label}: perplexity {result[label]['perplexity']:.3f}", flush=True)
        del engine
        gc.collect()
    agree = {label: [agreement_of(a, b) for a, b in zip(outputs["bf16"], outputs[label])] for label in result}
    print(f"\n| {what} | perplexity ({len(text_ids)} tokens) | |logprob - bf16's| mean / p99 | greedy tokens before "
          f"the first divergence from bf16 |")
    print("|---|---:|---:|---|")
    for label, r in result.items():
        print(f"| {label} | {r['perplexity']:.3f} | {r['logprob_diff_mean']:.3f} / {r['logprob_diff_p99']:.3f} | "
              f"{', '.join(f'{n}/{m}' for n, m in agree[label])} |")

    def share(label: str) -> float:
        return round(sum(n for n, _ in agree[label]) / sum(m for _, m in agree[label]), 3)

    head = {"ppl_bf16": round(result["bf16"]["perplexity"], 4), "ppl_fp8": round(result["fp8"]["perplexity"], 4),
            "ppl_fp8_over_bf16": round(result["fp8"]["perplexity"] / result["bf16"]["perplexity"], 4),
            "greedy_agreement": share("fp8")}
    if not kv:
        head |= {"ppl_fp8_w8a16_over_bf16": round(result["fp8_w8a16"]["perplexity"] / result["bf16"]["perplexity"], 4),
                 "ppl_fp8_head_over_bf16": round(result["fp8_head"]["perplexity"] / result["bf16"]["perplexity"], 4),
                 "greedy_agreement_fp8_head": share("fp8_head"),
                 "ppl_fp8_all_over_bf16": round(result["fp8_all"]["perplexity"] / result["bf16"]["perplexity"], 4),
                 "greedy_agreement_fp8_all": share("fp8_all")}
    if kv:
        head |= {"ppl_fp8_calculated": round(result["fp8_calculated"]["perplexity"], 4),
                 "ppl_fp8_calculated_over_bf16": round(result["fp8_calculated"]["perplexity"]
                                                       / result["bf16"]["perplexity"], 4),
                 "greedy_agreement_calculated": share("fp8_calculated"),
                 "logprob_diff_mean_fp8": round(result["fp8"]["logprob_diff_mean"], 4),
                 "logprob_diff_mean_fp8_calculated": round(result["fp8_calculated"]["logprob_diff_mean"], 4)}
    emit("fp8_kv_quality" if kv else "fp8_quality", head,
         {"model": name, "device": args.device, "text_tokens": len(text_ids), "rows": result, "agreement": agree},
         out=args.out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode, what in (("speed", "FP8 weights"), ("kv-speed", "an FP8 KV cache")):
        s = sub.add_parser(mode, help=f"decode speed on a CUDA device, bf16 vs {what}")
        s.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
        s.add_argument("--out", default=None)
        if mode == "speed":
            s.add_argument("--variants", default=",".join(VARIANTS["weights"]),
                           help="comma-separated weight variants besides bf16 (default: all, "
                                f"{', '.join(VARIANTS['weights'])}); fp8 is always measured")
    for mode, what in (("quality", "FP8 weights"), ("kv-quality", "an FP8 KV cache")):
        q = sub.add_parser(mode, help=f"perplexity and greedy agreement on a real checkpoint, bf16 vs {what}")
        q.add_argument("--model", default="smollm2", help="model directory, Hub id or packaged name (default smollm2)")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.mode in ("speed", "kv-speed"):
        if not torch.cuda.is_available():
            print(f"bench/fp8.py {args.mode} needs a CUDA device", file=sys.stderr)
            return 2
        return speed(args) if args.mode == "speed" else kv_speed(args)
    return quality(args)


if __name__ == "__main__":
    sys.exit(main())
