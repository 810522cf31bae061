"""Decode throughput with and without a JSON schema (xgrammar mask each step), at batch 1 and 32.

Tokens/s is batch / the median time of a decode step in which every request of the batch sampled, so requests
that finish early (a grammar can end its output) do not shrink the batch being measured.
Usage: python bench/structured_output.py [--model DIR] [--batch-sizes 1,32] [--new-tokens 32] [--repeats 4]
GPU:   python bench/structured_output.py --device cuda --shape llama3-8b [--model DIR]
       (random Llama-3-8B-shaped bf16 weights with the vocabulary and tokenizer of --model: the grammar's per-step
       work measured against an 8B model's decode step; only the tokenizer files of --model are read)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
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
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", default=None, choices=("llama3-8b",),
                        help="random weights of this shape with --model's tokenizer (GPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tmp = args.model, None
    extra = dict(num_kv_blocks=1024) if args.device == "cpu" else dict(gpu_memory_utilization=0.85)
    if args.shape:
        import shutil
        import tempfile

        from bench.engine_gpu import LLAMA3_8B

        tmp = tempfile.mkdtemp(prefix="baton-so-")
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (Path(args.model) / name).is_file():
                shutil.copy(Path(args.model) / name, Path(tmp) / name)
        source = json.loads((Path(args.model) / "config.json").read_text())
        config = dict(LLAMA3_8B, vocab_size=source["vocab_size"], bos_token_id=source.get("bos_token_id"),
                      eos_token_id=source.get("eos_token_id"))
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        model, extra = tmp, dict(extra, load_format="dummy", dtype="bfloat16", max_model_len=4096)
    engine = LLMEngine(EngineConfig(model, device=args.device, show_progress=False, max_num_seqs=64, **extra))
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
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    emit("structured_output", headline, {"model": args.model, "shape": args.shape, "device": device,
                                         "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
                                         "rows": rows}, out=args.out)


if __name__ == "__main__":
    main()
