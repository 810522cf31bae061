"""Measures the embedding capacity profile an embed pool's policy can plan with (`embed: {profile: FILE}`): inputs/s
of one replica by inputs per forward, at inputs of a given length, on this device (schema: EmbedProfile in
controlplane/capacity.py). The autoscaler takes the busy rate (a full forward, what a loaded worker runs) as the
pool's service rate and sizes it for the p90 queue-time target.

Default: a small random-weight Qwen3 body (`--shape quick`) so it runs in seconds on a CPU; `--model DIR` measures a
real embedding model directory, `--device cuda` a GPU. The reference in the same run is one input per forward: the
headline's `batching_gain` is the busy rate over it.

Usage: python bench/embed_profile.py [--model DIR | --shape quick|qwen3-0.6b] [--device cpu|cuda] [--input-tokens 32]
       [--max-num-seqs 256] [--max-batch-tokens 8192] [--torch-threads 1] [--out profile.json]
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

SHAPES = {
    "quick": dict(arch="qwen3", layers=4, hidden=256, heads=8, kv_heads=4, vocab=4096, max_position=2048),
    "qwen3-0.6b": dict(arch="qwen3", layers=28, hidden=1024, heads=16, kv_heads=8, vocab=151669,
                       max_position=32768),
}


def rate(embedder, n: int, tokens: int, reps: int, device: str) -> float:
    """Inputs/s of one forward of `n` inputs of `tokens` tokens, best of `reps` (after one warm-up)."""
    import torch

    gen = torch.Generator().manual_seed(n * 31 + tokens)
    vocab = embedder.model_config.vocab_size
    inputs = torch.randint(3, vocab, (n, tokens), generator=gen).tolist()
    best = float("inf")
    for _ in range(reps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        embedder.embed(inputs)  # returns on the CPU: the device work is done
        best = min(best, time.perf_counter() - t0)
    return n / best


def measure(args, model_dir: Path, model: str) -> dict:
    from baton.engine.config import EngineConfig
    from baton.engine.embedding import Embedder

    busy = min(args.max_num_seqs, args.max_batch_tokens // args.input_tokens)
    if busy < 1:
        raise SystemExit(f"error: --input-tokens {args.input_tokens} exceeds --max-batch-tokens {args.max_batch_tokens}")
    sizes = sorted({n for n in (1, 4, 16, 64, 256, 1024) if n < busy} | {busy})
    embedder = Embedder(EngineConfig(model_dir=str(model_dir), device=args.device, dtype=args.dtype,
                                     show_progress=False))
    device = args.device
    if device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name()
    rates = []
    print(f"{'inputs/forward':>14} {'inputs/s':>10} {'tokens/s':>10}")
    for n in sizes:
        rates.append(rate(embedder, n, args.input_tokens, args.reps, args.device))
        print(f"{n:>14} {rates[-1]:>10.1f} {rates[-1] * args.input_tokens:>10.0f}", flush=True)
    return {"version": 1, "model": model, "device": device, "input_tokens": args.input_tokens,
            "source": f"bench/embed_profile.py on {device}, {args.dtype}, {datetime.date.today().isoformat()}",
            "batch_inputs": sizes, "inputs_per_s": [round(r, 2) for r in rates], "max_batch_inputs": busy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="an embedding model directory (default: --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="quick", help="random weights of this shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--input-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="the workers' --max-num-seqs (inputs/forward)")
    ap.add_argument("--max-batch-tokens", type=int, default=8192, help="the workers' --max-num-batched-tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=1, help="CPU threads (a `baton up` worker's default)")
    ap.add_argument("--out", type=Path, default=None, help="profile JSON (default: bench/results/"
                                                          "embed_capacity_<model>_<device>.json)")
    args = ap.parse_args()
    if args.input_tokens < 1:
        print("error: --input-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.model is not None and not (args.model / "config.json").is_file():
        print(f"error: --model {args.model}: no config.json there", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from baton.devtools.make_model import make_model

            model_dir, model = make_model(Path(tmp) / args.shape, **SHAPES[args.shape]), args.shape
        else:
            model_dir, model = args.model, args.model.name
        profile = measure(args, model_dir, model)
    from baton.controlplane.capacity import EmbedProfile

    EmbedProfile.model_validate(profile)  # what a policy will read
    slug = f"{profile['model']}_{profile['device'].split()[-1].lower()}"
    out = args.out or Path(__file__).resolve().parent / "results" / f"embed_capacity_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1) + "\n")
    rates = profile["inputs_per_s"]
    head = {"busy_inputs_per_s": rates[-1], "one_input_per_s": rates[0],
            "batching_gain": round(rates[-1] / rates[0], 2), "max_batch_inputs": profile["max_batch_inputs"],
            "input_tokens": profile["input_tokens"]}
    emit("embed_profile", head, {"profile_path": str(out), "profile": profile})
    return 0


if __name__ == "__main__":
    sys.exit(main())
