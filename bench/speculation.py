"""Speculative decoding with n-gram prompt lookup: acceptance rate and decode tok/s with and without it, on a
code-editing workload (prompts hold code that the answer repeats with edits) and on chat, at batch 1 and 16; greedy
output is checked to be unchanged. The reference is the same engine, same requests, speculation off, in this run.

CPU (default): the real SmolLM2-135M-Instruct from the model cache when present (else a random tiny model).
GPU: --device cuda builds Llama-3-8B-shaped random bf16 weights as bench/engine_gpu.py does (random weights rarely
copy their prompt, so acceptance is low there), or --model DIR for a real checkpoint.
Requests run until their answer ends (EOS) or --new-tokens: a code edit is worth measuring over the whole edited
code it returns, not its first lines. Batch 1 serves the prompts one after another (one request at a time, as a
batch-1 server would); a larger batch serves them together, each prompt repeated to fill it.
Usage: python bench/speculation.py [--device cuda] [--model DIR] [--batches 1,16] [--new-tokens 256]
       [--num-tokens 7] [--ignore-eos] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.engine.config import EngineConfig  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from baton.engine.sampling_params import SamplingParams, SpeculationParams  # noqa: E402
from bench.engine_gpu import timed_decode  # noqa: E402
from bench.report import emit  # noqa: E402

CODE = [
    '''def moving_average(values, window):
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
''',
    '''class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count):
        if self.items.get(name, 0) < count:
            raise ValueError(f"not enough {name}")
        self.items[name] -= count

    def total(self):
        return sum(self.items.values())
''',
    '''def parse_config(lines):
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        config[key.strip()] = value.strip()
    return config
''',
    '''def binary_search(items, target):
    low, high = 0, len(items) - 1
    while low <= high:
        mid = (low + high) // 2
        if items[mid] == target:
            return mid
        if items[mid] < target:
            low = mid + 1
        else:
            high = mid - 1
    return -1
''',
]
EDITS = ["Add type hints to this code and return the complete code:",
         "Rename every variable to a longer, clearer name and return the complete code:",
         "Add a docstring to this code and return the complete code:",
         "Return this code unchanged except that it uses 4-space indentation and double quotes:"]
CHAT = ["What is the capital of France? Answer in two sentences.", "Give me three tips for sleeping better.",
        "Explain what a hash table is to a beginner.", "Write a short poem about the sea."]
TINY = dict(arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=512)


def prompts_for(engine: LLMEngine, workload: str) -> list[list[int]]:
    tok = engine.tokenizer
    if tok is None or not tok.chat_template:
        # No tokenizer (random weights): code is a token block the prompt shows twice, the second time cut short.
        rng = random.Random(len(workload))
        vocab = min(engine.model_config.vocab_size, 30000)
        out = []
        for i in range(4):
            block = [rng.randrange(3, vocab) for _ in range(120)]
            out.append(block + block[:60] if workload == "code" else block)
        return out
    texts = [f"{EDITS[i]}\n\n{CODE[i]}" for i in range(4)] if workload == "code" else CHAT
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in texts]


def build_engine(args, tmp: str, row_invariant: bool | None = None) -> tuple[LLMEngine, str]:
    # ngram by default (the plain runs ask for "off"): decode graphs are then captured for verification rows too.
    common = dict(max_num_seqs=max(args.batches), show_progress=False, seed=0, speculative_method="ngram",
                  row_invariant_verification=args.row_invariant if row_invariant is None else row_invariant,
                  num_speculative_tokens=args.num_tokens, ngram_min=args.ngram_min, ngram_max=args.ngram_max)
    if args.device.startswith("cuda"):
        if args.model:
            return LLMEngine(EngineConfig(args.model, device=args.device, dtype=args.dtype or "bfloat16",
                                          gpu_memory_utilization=0.85, **common)), Path(args.model).name
        from bench.engine_gpu import LLAMA3_8B, QUICK

        config = QUICK if args.quick else LLAMA3_8B
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        return LLMEngine(EngineConfig(tmp, device=args.device, dtype="bfloat16", load_format="dummy",
                                      max_model_len=4096, gpu_memory_utilization=0.85, **common)), \
            "quick" if args.quick else "llama3-8b-shaped-random"
    model = args.model
    if model is None and not args.quick:
        from baton.devtools.fetch_model import models_cache_dir

        cached = models_cache_dir() / "SmolLM2-135M-Instruct"
        model = str(cached) if (cached / "model.safetensors").is_file() else None
    if model is None:
        from baton.devtools.make_model import make_model

        model = str(make_model(Path(tmp) / "tiny", seed=1, **TINY))
    return LLMEngine(EngineConfig(model, device="cpu", dtype=args.dtype or "auto", num_kv_blocks=512, **common)), \
        Path(model).name


class _Phases:
    """Host wall time per engine phase, from wrappers around the engine's own methods (no cProfile: its overhead
    would dwarf a 1 ms step). "device wait" is a synchronize right after the model is queued: what the host then
    waits for the device, which a synchronous (speculative) step has to wait for anyway. That sync also stops async
    scheduling's overlap, so every profiled step is timed as a synchronous one."""

    def __init__(self, engine: LLMEngine) -> None:
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo = []
        cuda = engine.config.device.startswith("cuda")
        self._wrap(engine, "step", "step (all)")
        self._wrap(engine.speculator, "propose", "propose")
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "run", "model queued", after=torch.cuda.synchronize if cuda else None,
                   after_name="device wait")
        if engine.runner.graphs is not None:  # inside "model queued": filling the inputs, then the launch itself
            self._wrap(engine.runner.graphs, "replay", "graph inputs + launch")
            self._wrap(torch.cuda.CUDAGraph, "replay", "graph launch", restore=True)
        import baton.engine.model_runner as runner_module
        import baton.kernels.greedy_sample as greedy_module

        self._wrap(engine.runner, "_inputs", "runner inputs")  # inside "model queued", before the graph inputs
        self._wrap(runner_module, "_sources", "runner sources", restore=True)
        self._wrap(greedy_module, "greedy_sample", "greedy sample", restore=True)  # inside "verify", queued only
        self._wrap(engine, "_pipelinable", "pipelinable check")
        self._wrap(engine.speculator, "verify", "verify")
        self._wrap(engine.sampler, "sample", "sample")
        self._wrap(engine, "_accept", "accept")
        self._wrap(engine, "_append_token", "append token")
        self._wrap(engine.block_manager, "register_computed", "register blocks")

    def _wrap(self, obj, name: str, label: str, after=None, after_name: str = "", restore: bool = False) -> None:
        import functools
        import time

        inner = getattr(obj, name)

        @functools.wraps(inner)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            t1 = time.perf_counter()
            self.ms[label] = self.ms.get(label, 0.0) + (t1 - t0) * 1e3
            self.calls[label] = self.calls.get(label, 0) + 1
            if after is not None:
                after()
                self.ms[after_name] = self.ms.get(after_name, 0.0) + (time.perf_counter() - t1) * 1e3
                self.calls[after_name] = self.calls.get(after_name, 0) + 1
            return out

        had = name in vars(obj)  # a class's own method (restore it), or one an instance finds on its class
        setattr(obj, name, timed)
        self._undo.append((obj, name, inner if restore and had else None))

    def close(self) -> None:
        for obj, name, original in self._undo:
            if original is not None:
                setattr(obj, name, original)
            else:
                delattr(obj, name)  # back to the class's method


def profile_buckets(engine: LLMEngine, reps: int = 50) -> dict:
    """Device time of each captured decode graph (batch-size bucket) replayed as it stands, and per kernel name
    (torch.profiler) for the smallest two buckets a batch-1 step uses: plain (1 row) and verifying (1 + k rows)."""
    graphs = engine.runner.graphs
    if graphs is None:
        return {}
    out = {}
    for b, (graph, _) in sorted(graphs.graphs.items()):
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        out[f"bucket{b}_ms"] = round(start.elapsed_time(end) / reps, 4)
    verify = next(b for b in graphs.buckets if b >= 1 + engine.config.num_speculative_tokens)
    print("\ndecode graph replay, device ms per step by bucket: " + ", ".join(f"{k}={v}" for k, v in out.items()))
    for b in dict.fromkeys((1, verify)):
        graph = graphs.graphs[b][0]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
            for _ in range(reps):
                graph.replay()
            torch.cuda.synchronize()
        kernels = sorted(((e.key, e.device_time_total / reps, e.count // reps) for e in tp.key_averages()
                          if e.device_time_total), key=lambda x: -x[1])
        out[f"bucket{b}_kernels_us"] = [(name[:80], round(us, 2), n) for name, us, n in kernels[:15]]
        print(f"bucket {b}: kernels by device time per step (us, launches per step)")
        for name, us, n in out[f"bucket{b}_kernels_us"]:
            print(f"  {us:9.2f} us  {n:4d}x  {name}")
    return out


def serve(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, one_at_a_time: bool
          ) -> tuple[float, list[list[int]], int]:
    """(decode tok/s, outputs, tokens) of these prompts served together, or one after another (batch 1): then the
    rate is all tokens over the sum of the decode times."""
    if not one_at_a_time:
        return timed_decode(engine, prompts, params)
    seconds, outputs, total = 0.0, [], 0
    for prompt in prompts:
        rate, out, tokens = timed_decode(engine, [prompt], params)
        seconds += tokens / rate if tokens else 0.0
        outputs += out
        total += tokens
    return total / seconds if seconds else float("nan"), outputs, total


def free_plain_rates(args, tmp: str) -> dict[tuple[str, int], float]:
    """With --row-invariant: plain decoding's rate per (workload, batch) on an engine that is not row-invariant
    (each row count's fastest kernels), the reference a row-invariant engine's speculation has to beat. Built and
    freed before the row-invariant engine (each takes most of the GPU's memory)."""
    engine, _ = build_engine(args, tmp, row_invariant=False)
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=args.ignore_eos,
                            speculation=SpeculationParams("off"))
    rates = {}
    for workload in ("code", "chat"):
        base = prompts_for(engine, workload)
        for batch in args.batches:
            prompts = base if batch == 1 else [base[i % len(base)] for i in range(batch)]
            serve(engine, prompts, greedy, batch == 1)  # warm-up
            rates[(workload, batch)] = statistics.median(
                serve(engine, prompts, greedy, batch == 1)[0] for _ in range(args.repeats))
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rates


def profile_steps(engine: LLMEngine, prompts: list[list[int]], args) -> dict:
    """One decode of these prompts, plain then n-gram: per engine step, the wall time and the host time of each
    phase (see _Phases), beside the same decode's unprofiled rate (async scheduling's overlap intact)."""
    out = {}
    for mode in ("off", "ngram"):
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=args.ignore_eos,
                                speculation=SpeculationParams(mode, args.num_tokens if mode == "ngram" else None))
        timed_decode(engine, prompts, params)  # warm
        rate, _, tokens = timed_decode(engine, prompts, params)
        phases = _Phases(engine)
        try:
            timed_decode(engine, prompts, params)
        finally:
            phases.close()
        steps = max(1, phases.calls.get("step (all)", 1))
        out[mode] = {"tokens": tokens, "tok_s_unprofiled": rate, "steps": steps,
                     "wall_ms_per_token_unprofiled": 1e3 / rate if rate else float("nan"),
                     "phase_ms_per_step": {k: round(v / steps, 4) for k, v in phases.ms.items()},
                     "phase_calls": phases.calls}
        print(f"\nprofile b{len(prompts)} {mode}: {tokens} tokens, {1e3 / rate:.3f} ms/token unprofiled; "
              f"profiled run {steps} steps, host ms per step by phase (device wait = a sync after the model):")
        for name, ms in sorted(phases.ms.items(), key=lambda kv: -kv[1]):
            print(f"  {ms / steps:8.4f} ms/step  {phases.calls[name]:6d} calls  {name}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="a real checkpoint directory (default: see above)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=256, help="max_tokens of each request")
    ap.add_argument("--ignore-eos", action="store_true", help="every request generates --new-tokens tokens")
    ap.add_argument("--row-invariant", action="store_true",
                    help="GPU: row_invariant_verification (bf16 greedy output with speculation equal to without)")
    ap.add_argument("--num-tokens", type=int, default=7,
                    help="tokens proposed per step (7: a batch-1 verification is 8 rows, the gemv kernel's most "
                         "in one launch and a decode graph bucket of its own)")
    ap.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                    help="a real checkpoint's dtype (default: bfloat16 on the GPU, as served; the checkpoint's on the CPU)")
    ap.add_argument("--ngram-min", type=int, default=EngineConfig.ngram_min, help="shortest suffix prompt lookup matches")
    ap.add_argument("--ngram-max", type=int, default=EngineConfig.ngram_max, help="longest suffix prompt lookup matches")
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs of each mode; the median counts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="a random tiny model (CPU) or a small shape (GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="after the table: where a code step's time goes (each batch), plain vs n-gram: host time "
                         "per engine phase and the device wait per step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/speculation.py: --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    if not 1 <= args.num_tokens <= 16:
        print("bench/speculation.py: --num-tokens must be in [1, 16]", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, head = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        free = free_plain_rates(args, tmp) if args.row_invariant else {}
        engine, model_name = build_engine(args, tmp)
        spec = SpeculationParams("ngram", args.num_tokens)
        for workload in ("code", "chat"):
            base = prompts_for(engine, workload)
            for batch in args.batches:
                alone = batch == 1
                prompts = base if alone else [base[i % len(base)] for i in range(batch)]
                greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=args.ignore_eos,
                                        speculation=SpeculationParams("off"))
                specced = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=args.ignore_eos,
                                         speculation=spec)
                for warm in (greedy, specced):  # warm-up (kernels and their configs per row count, prefix cache)
                    serve(engine, prompts, warm, alone)
                plain_rates, spec_rates = [], []
                before = engine.stats().spec
                for _ in range(args.repeats):  # alternated, so that load from other jobs hits both alike
                    rate, plain_out, _ = serve(engine, prompts, greedy, alone)
                    plain_rates.append(rate)
                    rate, spec_out, _ = serve(engine, prompts, specced, alone)
                    spec_rates.append(rate)
                after = engine.stats().spec
                plain_rate, spec_rate = statistics.median(plain_rates), statistics.median(spec_rates)
                proposed = after.num_draft_tokens - before.num_draft_tokens
                accepted = after.num_accepted_tokens - before.num_accepted_tokens
                steps = after.num_drafts - before.num_drafts
                row = dict(workload=workload, batch=batch, plain_tok_s=plain_rate, ngram_tok_s=spec_rate,
                           speedup=spec_rate / plain_rate, acceptance=accepted / proposed if proposed else 0.0,
                           proposed=proposed, accepted=accepted,
                           tokens_per_verify=(accepted + steps) / steps if steps else 0.0,
                           greedy_equal=spec_out == plain_out)
                if free:  # the fastest plain decoding: an engine that is not row-invariant
                    row |= dict(free_plain_tok_s=free[(workload, batch)],
                                speedup_vs_free_plain=spec_rate / free[(workload, batch)])
                rows.append(row)
                print(f"{workload:5s} b{batch:<3d} plain {plain_rate:8.1f} tok/s  ngram {spec_rate:8.1f} tok/s  "
                      f"x{row['speedup']:.2f}  acceptance {row['acceptance']:.2f} ({accepted}/{proposed})  "
                      f"tokens/verify {row['tokens_per_verify']:.2f}  greedy equal {row['greedy_equal']}"
                      + (f"  plain (not row-invariant) {row['free_plain_tok_s']:8.1f} tok/s: "
                         f"x{row['speedup_vs_free_plain']:.2f}" if free else ""), flush=True)
                head[f"{workload}_b{batch}_speedup"] = round(row["speedup"], 3)
                if free:
                    head[f"{workload}_b{batch}_speedup_vs_free_plain"] = round(row["speedup_vs_free_plain"], 3)
                head[f"{workload}_b{batch}_acceptance"] = round(row["acceptance"], 3)
        if args.profile:
            code = prompts_for(engine, "code")
            head_profile = {f"b{b}": profile_steps(engine, [code[i % len(code)] for i in range(b)], args)
                            for b in args.batches}
            if args.device.startswith("cuda"):
                head_profile["graphs"] = profile_buckets(engine)
    head["greedy_equal"] = all(r["greedy_equal"] for r in rows)
    doc = {"model": model_name, "device": args.device, "dtype": str(next(engine.model.parameters()).dtype),
           "num_speculative_tokens": args.num_tokens,
           "row_invariant_verification": engine.runner.invariant_rows > 0,
           "ngram_min": args.ngram_min, "ngram_max": args.ngram_max,
           "new_tokens": args.new_tokens, "ignore_eos": args.ignore_eos, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
           "load_average": os.getloadavg(), "rows": rows,
           "reference": "the same engine and requests with speculation off, measured in this run" + (
               "; with --row-invariant also plain decoding on an engine that is not row-invariant (free_plain)"
               if args.row_invariant else "")}
    if args.profile:
        doc["profile"] = head_profile
    emit("speculation", head, doc, Path(args.out) if args.out else None)
    return 0 if head["greedy_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
