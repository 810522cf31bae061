"""What the layer-wise KV hand-off (`--kv-layerwise`) buys: prefill + hand-off time with the copy started per layer
during the prompt's last step, against the same prompt prefilled and then handed off whole, and against the
prefill alone (the floor: a hand-off that costs nothing), all in one run on the same engine.

The engine runs the prompt through the real runtime (dummy weights); the receiver is a second KV pool of the same
geometry behind its own ipc transport (CUDA IPC on a GPU, shared memory on the CPU), blocks scattered.
GPU: python bench/kv_layerwise.py --tokens 4096,16384,32768      (Llama-3-8B-shaped; --quick: a 4-layer model)
CPU: python bench/kv_layerwise.py --device cpu --quick --tokens 512,2048
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.engine.config import EngineConfig  # noqa: E402
from baton.engine.kv_transfer import create_transport  # noqa: E402
from baton.engine.llm_engine import LLMEngine  # noqa: E402
from baton.engine.sampling_params import SamplingParams  # noqa: E402
from bench.engine_gpu import LLAMA3_8B, QUICK  # noqa: E402
from bench.report import emit  # noqa: E402

PARAMS = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
CPU_QUICK = dict(QUICK, hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=4096)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Bench:
    def __init__(self, engine: LLMEngine, device: str, receiver_blocks: int, seed: int = 0) -> None:
        self.engine, self.device = engine, device
        self.rng = torch.Generator().manual_seed(seed)
        self.pool = torch.zeros((receiver_blocks, *engine.kv_cache.shape[1:]), dtype=engine.kv_cache.dtype,
                                device=engine.kv_cache.device)
        self.sender, self.receiver = create_transport("ipc"), create_transport("ipc")
        self.sender.register_cache(engine.kv_cache)
        self.receiver.register_cache(self.pool)
        self.n = 0

    def _prefill(self, prompt: list[int], sink=None):
        rid = f"r{self.n}"
        self.n += 1
        self.engine.add_request(rid, prompt, PARAMS, prefill_only=True, kv_sink=sink)
        first = None
        while first is None:
            first = next((o for o in self.engine.step() if o.request_id == rid), None)
        return rid, first

    def _dst(self, n: int) -> list[int]:
        return torch.randperm(self.pool.shape[0], generator=self.rng)[:n].tolist()

    def prefill_only(self, prompt: list[int]) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        rid, _ = self._prefill(prompt)
        sync(self.device)
        elapsed = time.perf_counter() - t0
        self.engine.release(rid)
        return elapsed

    def prefill_then_send(self, prompt: list[int]) -> float:
        dst = self._dst(-(-len(prompt) // self.engine.config.block_size))
        tid = f"t{self.n}"
        self.receiver.expect(tid, dst)
        sync(self.device)
        t0 = time.perf_counter()
        rid, first = self._prefill(prompt)
        sent = self.sender.send(self.receiver.endpoint(), tid, first.block_ids, dst, timeout_s=60)
        got = self.receiver.wait(tid, timeout_s=60)
        elapsed = time.perf_counter() - t0
        assert sent.ok and got.ok, (sent, got)
        self.engine.release(rid)
        return elapsed

    def layerwise(self, prompt: list[int]) -> float:
        dst = self._dst(-(-len(prompt) // self.engine.config.block_size))
        tid = f"t{self.n}"
        self.receiver.expect(tid, dst)
        sync(self.device)
        t0 = time.perf_counter()
        sink = self.sender.start_layerwise(self.receiver.endpoint(), tid, 0, dst, timeout_s=60)
        rid, first = self._prefill(prompt, sink)
        sent = sink.finish(first.block_ids)
        got = self.receiver.wait(tid, timeout_s=60)
        elapsed = time.perf_counter() - t0
        assert sent.ok and got.ok, (sent, got)
        assert torch.equal(self.pool[dst[-1]], self.engine.kv_cache[first.block_ids[-1]]), "the copy differs"
        self.engine.release(rid)
        return elapsed

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="a 4-layer model instead of the 8B shape")
    ap.add_argument("--tokens", default=None, help="prompt lengths, comma-separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prefill chunk (the last chunk's "
                    "step is the one that copies layer by layer)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA device", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    tokens = [int(x) for x in (args.tokens or ("4096,16384,32768" if cuda else "512,2048")).split(",")]
    config = (QUICK if args.quick else LLAMA3_8B) if cuda else CPU_QUICK
    config = dict(config, max_position_embeddings=max(config["max_position_embeddings"], max(tokens) + 16))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        engine = LLMEngine(EngineConfig(
            tmp, device=args.device, dtype="bfloat16" if cuda else "float32", load_format="dummy",
            max_num_seqs=4, max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max(tokens) + 16,
            gpu_memory_utilization=0.45, num_kv_blocks=None if cuda else -(-max(tokens) // 16) + 8,
            enable_prefix_caching=False, show_progress=False))
        bench = Bench(engine, args.device, receiver_blocks=-(-max(tokens) // engine.config.block_size) * 2)
        rows = []
        try:
            for n in tokens:
                prompt = torch.randint(3, config["vocab_size"] - 1, (n,), generator=bench.rng).tolist()
                for fn in (bench.prefill_only, bench.prefill_then_send, bench.layerwise):  # warm-up
                    fn(prompt)
                times = {name: [] for name in ("prefill", "whole", "layerwise")}
                for _ in range(args.reps):  # interleaved, so drift hits all three alike
                    times["prefill"].append(bench.prefill_only(prompt))
                    times["whole"].append(bench.prefill_then_send(prompt))
                    times["layerwise"].append(bench.layerwise(prompt))
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                kv_mb = -(-n // engine.config.block_size) * engine.kv_cache[0].numel() \
                    * engine.kv_cache.element_size() / 1e6
                rows.append({"tokens": n, "kv_mb": round(kv_mb, 1), "prefill_ms": round(med["prefill"], 3),
                             "prefill_then_send_ms": round(med["whole"], 3),
                             "layerwise_ms": round(med["layerwise"], 3),
                             "exposed_whole_ms": round(med["whole"] - med["prefill"], 3),
                             "exposed_layerwise_ms": round(med["layerwise"] - med["prefill"], 3),
                             "saved_ms": round(med["whole"] - med["layerwise"], 3),
                             "saved_pct_of_ttft": round(100 * (med["whole"] - med["layerwise"]) / med["whole"], 2),
                             "raw_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in times.items()}})
        finally:
            bench.close()
    print(f"\n{'tokens':>7} {'KV MB':>8} {'prefill':>10} {'+whole':>10} {'+layerwise':>11} "
          f"{'exposed whole':>14} {'exposed lw':>11} {'saved':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['kv_mb']:>8.1f} {r['prefill_ms']:>8.2f}ms {r['prefill_then_send_ms']:>8.2f}ms "
              f"{r['layerwise_ms']:>9.2f}ms {r['exposed_whole_ms']:>12.2f}ms {r['exposed_layerwise_ms']:>9.2f}ms "
              f"{r['saved_pct_of_ttft']:>7.2f}%")
    headline = {"device": args.device, "model": "quick" if (args.quick or not cuda) else "llama-3-8b-shaped"}
    for r in rows:
        headline[f"exposed_whole_ms_{r['tokens']}"] = r["exposed_whole_ms"]
        headline[f"exposed_layerwise_ms_{r['tokens']}"] = r["exposed_layerwise_ms"]
        headline[f"saved_pct_{r['tokens']}"] = r["saved_pct_of_ttft"]
    out = Path(args.out) if args.out else None
    if out is None and not cuda:
        out = Path(__file__).resolve().parent / "results" / "kv_layerwise_cpu.json"
    emit("kv_layerwise", headline, {"config": {k: config[k] for k in ("hidden_size", "num_hidden_layers",
                                                                       "num_key_value_heads")},
                                    "max_num_batched_tokens": args.max_num_batched_tokens, "reps": args.reps,
                                    "rows": rows}, out=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
