"""Host cost of the check the async scheduler makes of every running request, every decode step, when n-gram
speculation is on: "do the tokens known so far end in a match?" (NgramProposer.expects_proposal, incremental)
against answering it with a whole prompt lookup (ngram_lookup over the request's tokens), in the same run.
A decode step's host work must stay under its device time for async scheduling to hide it.

Usage: python bench/ngram_check.py [--batches 1,16,64] [--context 2000] [--steps 50] [--out FILE]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.engine.speculation import NgramProposer, ngram_lookup  # noqa: E402
from bench.report import emit  # noqa: E402


def per_step_ms(check, batch: int, context: int, steps: int, seed: int) -> float:
    """Mean host ms per decode step: each request gains one token, then the check runs for all of them."""
    rng = random.Random(seed)
    seqs = [SimpleNamespace(request_id=f"r{i}", token_ids=[rng.randrange(32000) for _ in range(context)])
            for i in range(batch)]
    for seq in seqs:
        check(seq)  # the first look builds the incremental state (once per request)
    start = time.perf_counter()
    for _ in range(steps):
        for seq in seqs:
            seq.token_ids.append(rng.randrange(32000))
            check(seq)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=2000, help="tokens per request (prompt + output so far)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, head = [], {}
    print(f"| batch | whole lookup ms/step | incremental ms/step | ratio |  ({args.context}-token requests)")
    print("|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        full = per_step_ms(lambda s: bool(ngram_lookup(s.token_ids, 1, 2, 4)), batch, args.context, args.steps, batch)
        inc = per_step_ms(NgramProposer(2, 4).expects_proposal, batch, args.context, args.steps, batch)
        rows.append(dict(batch=batch, whole_lookup_ms=full, incremental_ms=inc, ratio=full / inc))
        print(f"| {batch} | {full:.3f} | {inc:.3f} | {full / inc:.1f}x |")
        head[f"b{batch}_incremental_ms"] = round(inc, 4)
        head[f"b{batch}_speedup"] = round(full / inc, 1)
    emit("ngram_check", head, {"context_tokens": args.context, "steps": args.steps, "rows": rows,
                               "reference": "ngram_lookup over each request's tokens, same run"},
         Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
