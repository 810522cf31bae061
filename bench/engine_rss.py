"""Does an engine's RSS grow with the requests it serves? Runs the same request mix through a fresh engine twice, in
separate processes: prompts of random lengths (as the soak sends) and prompts of one length (the reference), and
samples RSS and the live Python object count every `--every` requests. A per-request leak grows in both; memory
kept per distinct tensor shape (allocator, kernel caches) grows only with random lengths, and levels off."""
from __future__ import annotations

import argparse
import gc
import json
import pathlib
import random
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.report import RESULTS_DIR, emit  # noqa: E402


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_phase(model_dir: str, requests: int, every: int, prompt_len: int) -> list[dict]:
    """One engine, `requests` requests in waves of 16 (one aborted mid-flight per wave); RSS every `every`."""
    from baton.engine.config import EngineConfig
    from baton.engine.llm_engine import LLMEngine
    from baton.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model_dir, show_progress=False, num_kv_blocks=256))
    rng, samples, n, t0 = random.Random(0), [], 0, time.monotonic()
    while n < requests:
        for _ in range(16):
            params = SamplingParams(max_tokens=rng.randrange(4, 40), temperature=rng.choice([0.0, 0.8]),
                                    seed=rng.randrange(100), ignore_eos=True)
            length = prompt_len or rng.randrange(4, 300)
            engine.add_request(f"r{n}", [rng.randrange(3, 500) for _ in range(length)], params)
            n += 1
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
            if steps == 3:
                engine.abort(f"r{n - 1}")
        if n % every == 0:
            samples.append({"requests": n, "rss_mib": round(_rss_mib(), 1), "objects": len(gc.get_objects()),
                            "elapsed_s": round(time.monotonic() - t0, 1)})
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=4800)
    ap.add_argument("--every", type=int, default=800)
    ap.add_argument("--phase", choices=["random", "fixed"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR / "engine_rss.json")
    args = ap.parse_args()
    if args.phase:  # a child: one phase, JSON on stdout
        print(json.dumps(run_phase(args.model_dir, args.requests, args.every, 0 if args.phase == "random" else 100)))
        return
    from baton.devtools.make_model import make_model

    model_dir = make_model(pathlib.Path(tempfile.mkdtemp(prefix="engine-rss-")) / "llama", arch="llama", layers=2,
                           hidden=64, heads=4, kv_heads=2, vocab=512, max_position=1024, seed=5)
    phases = {}
    for phase in ("fixed", "random"):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--model-dir", str(model_dir),
                              "--requests", str(args.requests), "--every", str(args.every)],
                             check=True, capture_output=True, text=True).stdout
        phases[phase] = json.loads(out.strip().splitlines()[-1])
    print(f"{'requests':>9} {'fixed RSS MiB':>14} {'random RSS MiB':>15} {'fixed objs':>11} {'random objs':>12}")
    for f, r in zip(phases["fixed"], phases["random"]):
        print(f"{f['requests']:>9} {f['rss_mib']:>14} {r['rss_mib']:>15} {f['objects']:>11} {r['objects']:>12}")

    def growth(samples: list[dict], start: int, end: int) -> float:
        return round(samples[end]["rss_mib"] - samples[start]["rss_mib"], 1)

    fixed, rnd = phases["fixed"], phases["random"]
    half = len(rnd) // 2
    headline = {
        "fixed_growth_mib": growth(fixed, 0, -1), "random_growth_mib": growth(rnd, 0, -1),
        "random_first_half_mib": growth(rnd, 0, half), "random_second_half_mib": growth(rnd, half, -1),
        "random_objects_growth": rnd[-1]["objects"] - rnd[0]["objects"],
        "second_to_first_half": round(growth(rnd, half, -1) / max(growth(rnd, 0, half), 0.1), 3),
    }
    emit("engine_rss", headline, {"settings": {"requests": args.requests, "every": args.every}, "phases": phases},
         out=args.out)


if __name__ == "__main__":
    main()
