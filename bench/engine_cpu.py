"""CPU decode throughput and time-to-first-token of the Baton engine next to transformers `generate`.

Both run greedy, float32, the same random ~100M-parameter checkpoint and the same prompts, in one process
with the same torch thread count; runs alternate between the two so machine load hits both alike.
Usage: python bench/engine_cpu.py [--quick] [--batch-sizes 1,16] [--new-tokens 64] [--prompt-len 128]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baton.devtools.make_model import make_model  # noqa: E402
from baton.engine.config import EngineConfig  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from baton.engine.sampling_params import SamplingParams  # noqa: E402
from bench.report import emit  # noqa: E402

# Llama shape, tied embeddings: 12 x 6.9M (GQA 12 query / 4 KV heads, MLP 2304) + 24.6M embedding ~ 107M.
FULL_MODEL = dict(arch="llama", layers=12, hidden=768, heads=12, kv_heads=4, vocab=32000, tie_embeddings=True)
QUICK_MODEL = dict(arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=512, tie_embeddings=True)


class StepClock:
    """A transformers stopping criterion that never stops; it records when each new token was produced."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_hf(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[int]]]:
    """Returns (time of each step's tokens since start, the generated ids per prompt)."""
    from transformers import StoppingCriteriaList

    ids = torch.tensor(prompts)
    clock = StepClock()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([clock]))
    return [t - started for t in clock.times], out[:, len(prompts[0]):].tolist()


def run_baton(engine: LLMEngine, prompts: list[list[int]], new_tokens: int):
    """Returns (time since start at which every request had its k-th token, the generated ids per prompt)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}
    times: list[float] = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        done = min(len(v) for v in outputs.values())
        while len(times) < done:
            times.append(time.perf_counter() - started)
    return times, [outputs[rid] for rid in ids]


def decode_rate(times: list[float], batch: int) -> float:
    """Output tokens/s after the first token: prefill is excluded, so this is the decode loop alone."""
    return batch * (len(times) - 1) / (times[-1] - times[0])


def measure(hf_model, engine, batch: int, prompt_len: int, new_tokens: int, repeats: int, vocab: int,
            bar: tqdm) -> dict:
    rng = random.Random(batch * 1000 + prompt_len)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    runs: dict[str, list[list[float]]] = {"baton": [], "hf": []}
    tokens: dict[str, list[list[int]]] = {}
    run_baton(engine, prompts, 2)  # untimed: the first run of a new shape pays one-off allocation costs
    run_hf(hf_model, prompts, 2)
    for _ in range(repeats):  # alternate, so a burst of load from other work hits both systems alike
        for system in ("baton", "hf"):
            bar.set_postfix_str(f"{system} batch {batch} prompt {prompt_len}")
            times, out = run_baton(engine, prompts, new_tokens) if system == "baton" else \
                run_hf(hf_model, prompts, new_tokens)
            runs[system].append(times)
            tokens[system] = out
            bar.update(1)
    row = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": repeats,
           "same_tokens": tokens["baton"] == tokens["hf"]}
    for system, rs in runs.items():
        rates = [decode_rate(t, batch) for t in rs] if new_tokens > 1 else [float("nan")]
        row[system] = {"decode_tok_s": statistics.median(rates), "decode_tok_s_runs": rates,
                       "ttft_ms": statistics.median(t[0] for t in rs) * 1e3,
                       "e2e_tok_s": statistics.median(batch * new_tokens / t[-1] for t in rs)}
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and short runs (a smoke test)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16; quick: 1,4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 64)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens for decode runs (default 128)")
    parser.add_argument("--ttft-prompt-len", type=int, default=None, help="prompt for the TTFT run (default 512)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per system and shape (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_cpu.json"))
    args = parser.parse_args()
    defaults = dict(batch_sizes="1,4", new_tokens=8, prompt_len=16, ttft_prompt_len=32, repeats=1) if args.quick \
        else dict(batch_sizes="1,16", new_tokens=64, prompt_len=128, ttft_prompt_len=512, repeats=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    for name in ("new_tokens", "prompt_len", "ttft_prompt_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"--batch-sizes must all be at least 1, got {args.batch_sizes}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    return args


def main() -> None:
    args = parse_args()
    import transformers

    shape = QUICK_MODEL if args.quick else FULL_MODEL
    max_len = max(args.prompt_len, args.ttft_prompt_len) + args.new_tokens
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="baton-bench-") as tmp:
        model_dir = str(make_model(tmp, max_position=max(2048, max_len), **shape))
        max_batch = max(args.batch_sizes)
        blocks = max_batch * -(-max_len // 16) + 16
        engine = LLMEngine(EngineConfig(
            model_dir, num_kv_blocks=blocks, max_num_seqs=max_batch, enable_prefix_caching=False,
            max_num_batched_tokens=max(2048, max_batch * args.prompt_len, args.ttft_prompt_len), show_progress=False))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        params = sum(p.numel() for p in hf_model.parameters())
        # (batch, prompt, new tokens, runs); TTFT runs are short, so they get more runs against noise.
        shapes = [(b, args.prompt_len, args.new_tokens, args.repeats) for b in args.batch_sizes]
        shapes.append((1, args.ttft_prompt_len, 2, 2 * args.repeats + 1))  # its decode rate is not reported
        with tqdm(total=2 * sum(s[3] for s in shapes), desc="engine_cpu", unit="run") as bar:
            rows = [measure(hf_model, engine, b, p, n, r, shape["vocab"], bar) for b, p, n, r in shapes]
    decode_rows, ttft_row = rows[:-1], rows[-1]
    load = os.getloadavg()

    print(f"\nBaton engine vs transformers {transformers.__version__} generate on CPU: llama {params / 1e6:.0f}M "
          f"params ({shape['layers']} layers, hidden {shape['hidden']}, heads {shape['heads']}/{shape['kv_heads']} "
          f"KV, vocab {shape['vocab']}), float32, greedy, {threads} torch threads, median of {args.repeats} runs "
          f"({ttft_row['runs']} for TTFT) after an untimed one; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} (other work on the machine adds noise)")
    print(f"{'batch':>5}{'prompt':>8}{'new':>5}{'baton tok/s':>13}{'hf tok/s':>10}{'ratio':>7}"
          f"{'baton ttft ms':>15}{'hf ttft ms':>12}{'same tokens':>13}")
    for r in rows:
        decode = r is not ttft_row
        ratio = f"{r['baton']['decode_tok_s'] / r['hf']['decode_tok_s']:.2f}" if decode else "-"
        b_rate = f"{r['baton']['decode_tok_s']:.1f}" if decode else "-"
        h_rate = f"{r['hf']['decode_tok_s']:.1f}" if decode else "-"
        print(f"{r['batch']:>5}{r['prompt_len']:>8}{r['new_tokens']:>5}{b_rate:>13}{h_rate:>10}"
              f"{ratio:>7}{r['baton']['ttft_ms']:>15.1f}{r['hf']['ttft_ms']:>12.1f}"
              f"{str(r['same_tokens']):>13}")
    print("tok/s: output tokens per second after each request's first token (decode only); "
          "ttft: prompt in to first token out")

    summary = {"params_m": round(params / 1e6, 1), "threads": threads}
    for r in decode_rows:
        b = r["batch"]
        summary[f"baton_b{b}_tok_s"] = round(r["baton"]["decode_tok_s"], 1)
        summary[f"hf_b{b}_tok_s"] = round(r["hf"]["decode_tok_s"], 1)
        summary[f"ratio_b{b}"] = round(r["baton"]["decode_tok_s"] / r["hf"]["decode_tok_s"], 3)
    p = ttft_row["prompt_len"]
    summary[f"baton_ttft{p}_ms"] = round(ttft_row["baton"]["ttft_ms"], 1)
    summary[f"hf_ttft{p}_ms"] = round(ttft_row["hf"]["ttft_ms"], 1)
    summary[f"ttft{p}_ratio"] = round(ttft_row["baton"]["ttft_ms"] / ttft_row["hf"]["ttft_ms"], 3)
    summary["same_tokens"] = all(r["same_tokens"] for r in rows)

    emit("engine_cpu", summary, {
        "model": {**shape, "params": params}, "dtype": "float32", "threads": threads, "cpus": os.cpu_count(),
        "load_average": load, "repeats": args.repeats, "transformers": transformers.__version__,
        "torch": torch.__version__, "quick": args.quick, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
