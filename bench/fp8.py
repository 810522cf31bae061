"""FP8 weights (`--quantization fp8`) against the model dtype, measured side by side in one run.

speed (CUDA): Llama-3-8B-shaped random weights, bf16 engine then FP8 engine: decode tok/s at batch 1 and 64
  (1k context) and prefill of 4k tokens; writes bench/results/fp8.json.
quality (CPU or CUDA): a real checkpoint (default: `baton up`'s SmolLM2-135M-Instruct) in bf16 and in FP8:
  perplexity on bench/data/declaration_of_independence.txt (public domain, teacher-forced prompt logprobs) and
  greedy agreement (tokens before the first divergence) on a few prompts; writes bench/results/fp8_quality.json.

Usage: python bench/fp8.py speed [--quick]  |  python bench/fp8.py quality [--model DIR] [--device cpu]
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
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France? Explain briefly.",
           "List three uses of a paperclip.", "def fibonacci(n):", "The theory of relativity says that"]


def speed(args) -> int:
    from bench.engine_gpu import LLAMA3_8B, QUICK, decode_rate, prefill_time

    config = QUICK if args.quick else LLAMA3_8B
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        for quant in (None, "fp8"):
            engine = LLMEngine(EngineConfig(tmp, device="cuda", dtype="bfloat16", load_format="dummy",
                                            quantization=quant, max_num_seqs=64, max_num_batched_tokens=8192,
                                            max_model_len=4096 + 96, gpu_memory_utilization=0.6,
                                            enable_prefix_caching=False, show_progress=False))
            weight_bytes = sum(b.numel() * b.element_size() for b in [*engine.model.parameters(),
                                                                       *engine.model.buffers()])
            name = quant or "bf16"
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
    head = {"b1_fp8_over_bf16": round(f8["b1_tok_s"] / bf["b1_tok_s"], 3),
            "b64_fp8_over_bf16": round(f8["b64_tok_s"] / bf["b64_tok_s"], 3),
            "prefill_fp8_over_bf16": round(bf["prefill_4k_s"] / f8["prefill_4k_s"], 3),
            "b1_fp8_tok_s": round(f8["b1_tok_s"], 1)}
    emit("fp8", head, {"model": "quick" if args.quick else "llama3-8b-shaped", "device": torch.cuda.get_device_name(),
                       "rows": rows}, out=args.out)
    return 0


def _engine(model_dir: str, device: str, quant: str | None) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir, device=device, dtype="bfloat16", quantization=quant, num_kv_blocks=256,
                                  max_num_seqs=8, enable_prefix_caching=False, show_progress=False))


def perplexity(engine: LLMEngine, ids: list[int]) -> float:
    engine.add_request("ppl", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
    scores = None
    while engine.has_unfinished():
        for out in engine.step():
            scores = out.prompt_logprobs or scores
    return math.exp(-sum(scores) / len(scores))


def quality(args) -> int:
    from baton.devtools.fetch_model import resolve_any_model

    model_dir, name = resolve_any_model(args.model)
    text_ids = None
    result = {}
    outputs = {}
    for quant in (None, "fp8"):
        engine = _engine(str(model_dir), args.device, quant)
        if text_ids is None:
            text_ids = engine.tokenizer.encode(TEXT.read_text())[: engine.max_model_len - 1]
        label = quant or "bf16"
        result[label] = {"perplexity": perplexity(engine, text_ids)}
        prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        seqs = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0))
        outputs[label] = [s.output_ids for s in seqs]
        print(f"{label}: perplexity {result[label]['perplexity']:.3f}", flush=True)
        del engine
        gc.collect()
    agree = []
    for a, b in zip(outputs["bf16"], outputs["fp8"]):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        agree.append((n, min(len(a), len(b))))
    ppl_ratio = result["fp8"]["perplexity"] / result["bf16"]["perplexity"]
    print(f"\n| weights | perplexity ({len(text_ids)} tokens) |")
    print("|---|---:|")
    for label, r in result.items():
        print(f"| {label} | {r['perplexity']:.3f} |")
    print("greedy tokens agreeing before the first divergence (fp8 vs bf16): "
          + ", ".join(f"{n}/{m}" for n, m in agree))
    head = {"ppl_bf16": round(result["bf16"]["perplexity"], 4), "ppl_fp8": round(result["fp8"]["perplexity"], 4),
            "ppl_fp8_over_bf16": round(ppl_ratio, 4),
            "greedy_agreement": round(sum(n for n, _ in agree) / sum(m for _, m in agree), 3)}
    emit("fp8_quality", head, {"model": name, "device": args.device, "text_tokens": len(text_ids),
                               "agreement": agree}, out=args.out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed", help="decode and prefill speed on a CUDA device, bf16 vs FP8")
    s.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    s.add_argument("--out", default=None)
    q = sub.add_parser("quality", help="perplexity and greedy agreement on a real checkpoint, bf16 vs FP8")
    q.add_argument("--model", default="smollm2", help="model directory, Hub id or packaged name (default smollm2)")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.mode == "speed":
        if not torch.cuda.is_available():
            print("bench/fp8.py speed needs a CUDA device", file=sys.stderr)
            return 2
        return speed(args)
    return quality(args)


if __name__ == "__main__":
    sys.exit(main())
