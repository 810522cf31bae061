"""What the decode kernels' launch options buy, in one engine and one process: Llama-3-8B-shaped random weights,
bf16 then FP8 (`--quantization fp8`), decode tok/s at batch 1 and 64 (1k context) with
- off: kernels launched one after another (the default);
- prefetch: the gemv kernel issues its next weight tile's load before the current tile's FMAs (BATON_GEMV_PREFETCH);
- pdl: programmatic dependent launch (kernels/pdl.py, BATON_PDL): a projection starts reading its weights while the
  kernel before it finishes (prefetch included).
The CUDA graphs are captured again for each mode; modes alternate twice (off, prefetch, pdl, off, prefetch, pdl) and
the better run of each counts. Greedy tokens must be the same in every mode (none changes a sum).
The reference is `off` in the same engine; the HBM roofline comes from a measured copy.

Usage: python bench/pdl.py [--weights bf16,fp8] [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.engine.config import EngineConfig  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from bench.engine_gpu import LLAMA3_8B, QUICK, decode_rate, hbm_bandwidth  # noqa: E402
from bench.report import emit  # noqa: E402

MODES = {"off": (False, False), "prefetch": (True, False), "pdl": (True, True)}  # (gemv prefetch, PDL)
WEIGHTS = {"bf16": {}, "fp8": {"quantization": "fp8"}}


def set_mode(engine: LLMEngine, mode: str) -> None:
    from baton.kernels import gemv
    from baton.kernels.pdl import set_pdl

    gemv.PREFETCH, pdl = MODES[mode]
    set_pdl(pdl)
    graphs = engine.runner.graphs
    graphs.graphs.clear()
    gc.collect()
    graphs.capture()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="bf16,fp8", help="comma-separated: bf16, fp8")
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/pdl.py needs a CUDA device", file=sys.stderr)
        return 2
    bw = hbm_bandwidth()
    rows, head = [], {"hbm_tb_s": round(bw / 1e12, 3)}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(QUICK if args.quick else LLAMA3_8B))
        for weights in args.weights.split(","):
            engine = LLMEngine(EngineConfig(tmp, device="cuda", dtype="bfloat16", load_format="dummy",
                                            max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=2048,
                                            gpu_memory_utilization=0.6, enable_prefix_caching=False,
                                            show_progress=False, **WEIGHTS[weights]))
            step_bytes = sum(t.numel() * t.element_size() for t in [*engine.model.parameters(),
                                                                    *engine.model.buffers()])
            best: dict[tuple[str, int], float] = {}
            tokens: dict[str, list[int]] = {}
            for mode in [*MODES, *MODES]:
                set_mode(engine, mode)
                decode_rate(engine, 1, 128, 8)  # warm-up: kernels compiled for this mode
                for batch in (1, 64):
                    rate, out = decode_rate(engine, batch, 1024, args.new_tokens)
                    best[(mode, batch)] = max(best.get((mode, batch), 0.0), rate)
                    if batch == 1:
                        tokens.setdefault(mode, out[0])
            set_mode(engine, "off")
            same = all(t == tokens["off"] for t in tokens.values())
            for mode in MODES:
                row = dict(weights=weights, mode=mode, b1_tok_s=best[(mode, 1)], b64_tok_s=best[(mode, 64)],
                           b1_over_off=best[(mode, 1)] / best[("off", 1)],
                           b64_over_off=best[(mode, 64)] / best[("off", 64)],
                           b1_ms_per_token=1e3 / best[(mode, 1)], b1_weight_ms=step_bytes / bw * 1e3)
                rows.append(row)
                head[f"{weights}_{mode}_b1_over_off"] = round(row["b1_over_off"], 3)
                head[f"{weights}_{mode}_b1_tok_s"] = round(row["b1_tok_s"], 1)
                print(f"{weights:4s} {mode:8s} b1 {row['b1_tok_s']:6.0f} tok/s ({row['b1_ms_per_token']:.2f} ms; "
                      f"weights alone at the copy rate {row['b1_weight_ms']:.2f} ms) x{row['b1_over_off']:.3f}  "
                      f"b64 {row['b64_tok_s']:6.0f} tok/s x{row['b64_over_off']:.3f}", flush=True)
            head[f"{weights}_greedy_same"] = same
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    print("\n| weights | mode | b1 tok/s | b1 vs off | b64 tok/s | b64 vs off |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['weights']} | {r['mode']} | {r['b1_tok_s']:.0f} | {r['b1_over_off']:.3f}x | "
              f"{r['b64_tok_s']:.0f} | {r['b64_over_off']:.3f}x |")
    if "bf16_pdl_b1_tok_s" in head and "fp8_pdl_b1_tok_s" in head:
        head["fp8_over_bf16_b1_off"] = round(head["fp8_off_b1_tok_s"] / head["bf16_off_b1_tok_s"], 3)
        head["fp8_over_bf16_b1_pdl"] = round(head["fp8_pdl_b1_tok_s"] / head["bf16_pdl_b1_tok_s"], 3)
    emit("pdl", head, {"model": "quick" if args.quick else "llama3-8b-shaped", "device": torch.cuda.get_device_name(),
                       "context": 1024, "rows": rows,
                       "reference": "mode off (plain launches) in the same engine, measured in this run"},
         out=args.out)
    return 0 if all(v for k, v in head.items() if k.endswith("greedy_same")) else 1


if __name__ == "__main__":
    sys.exit(main())
