"""Decode throughput with and without a JSON schema (xgrammar mask each step), at batch 1 and 32, on the CPU.

Tokens/s is batch / the median time of a decode step in which every request of the batch sampled, so requests
that finish early (a grammar can end its output) do not shrink the batch being measured.
Usage: python bench/structured_output.py [--model DIR] [--batch-sizes 1,32] [--new-tokens 32] [--repeats 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baton.engine.config import EngineConfig
from baton.engine.grammar import StructuredOutput
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from bench.report import emit

DEFAULT_MODEL = Path.home() / ".cache" / "baton" / "models" / "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}


def step_times(engine: LLMEngine, prompt: list[int], batch: int, params: SamplingParams) -> list[float]:
    """Seconds of each decode step in which all `batch` requests sampled a token."""
    ids = [f"b{time.monotonic_ns()}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, prompt, params)
    times, first = [], True
    while engine.has_unfinished():
        started = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - started
        if len(outs) == batch and not first:
            times.append(elapsed)
        first = first and len(outs) < batch  # the prefill step (or steps) that produce first tokens
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = LLMEngine(EngineConfig(args.model, show_progress=False, num_kv_blocks=1024))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    rows, headline = [], {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        row = {"batch": batch}
        params = {label: SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=1, ignore_eos=True,
                                        structured_output=structured)
                  for label, structured in (("free", None), ("json_schema", spec))}
        times: dict[str, list[float]] = {label: [] for label in params}
        for p in params.values():
            step_times(engine, prompt, batch, p)  # untimed warm-up (grammar compile, allocations)
        for _ in range(args.repeats):  # alternate, so a burst of load from other work hits both alike
            for label, p in params.items():
                times[label] += step_times(engine, prompt, batch, p)
        for label, ts in times.items():
            row[label] = {"decode_tok_s": batch / statistics.median(ts), "steps": len(ts)}
        row["ratio"] = row["json_schema"]["decode_tok_s"] / row["free"]["decode_tok_s"]
        rows.append(row)
        headline[f"ratio_b{batch}"] = row["ratio"]
        print(f"batch {batch:3d}: free {row['free']['decode_tok_s']:8.1f} tok/s   json_schema "
              f"{row['json_schema']['decode_tok_s']:8.1f} tok/s   ratio {row['ratio']:.3f}", flush=True)
    emit("structured_output", headline, {"model": args.model, "device": "cpu", "threads": torch.get_num_threads(),
                                         "new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
