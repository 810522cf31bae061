"""/v1/embeddings under a mixed load against `baton up` with an embedding pool: many one-sentence requests (Poisson
arrivals) and a few 2k-input requests, with the embed worker's dynamic batching on vs off (one request per
forward), the same seeded arrivals for both, alternated over repeats. Also measures where the router should
tokenize a 10k-input request: the tokenizers batch API on a thread vs a process pool.

Usage: python bench/embeddings.py [--quick] [--seed 0] [--rate 20] [--duration 20] [--large 3] [--repeats 2]
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from baton.devtools.local_cluster import LocalCluster, UpOptions, free_port  # noqa: E402
from baton.router.embeddings import TOKENIZE_CHUNK  # noqa: E402
from bench.report import emit  # noqa: E402

# A small Qwen3 body: one forward of a few thousand tokens takes tens of ms on one core, so packing and queueing,
# not HTTP, decide the latencies.
MODEL = dict(arch="qwen3", layers=2, hidden=128, heads=4, kv_heads=2, vocab=4096, max_position=512, seed=11)
WORDS = ("the of and to in is was for on that with as by at from his her an were which this be are had not or "
         "have one all their but they she there been has when who more would into time will people other also "
         "model vector search query document paris river mountain system network memory latency batch worker "
         "router request answer question between through during before after under about against").split()
LARGE_INPUTS = 2000


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 24))).capitalize() + "."


def workload(seed: int, rate: float, duration: float, large: int) -> list[tuple[float, list[str]]]:
    """(send time, inputs) in time order: Poisson singles, and `large` 2k-input requests spread over the run."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        out.append((t, [sentence(rng)]))
    for i in range(large):
        out.append(((i + 0.5) * duration / large, [sentence(rng) for _ in range(LARGE_INPUTS)]))
    return sorted(out, key=lambda x: x[0])


async def drive(url: str, model: str, plan: list[tuple[float, list[str]]]) -> dict:
    """Sends every request at its time (open loop); returns latencies by class and the makespan."""
    latencies: dict[str, list[float]] = {"single": [], "large": []}
    errors = 0
    # Idle connections expire before uvicorn's 5 s keep-alive does, so none is reused as the server closes it.
    limits = httpx.Limits(max_connections=512, keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def one(at: float, inputs: list[str]) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/embeddings", json={"model": model, "input": inputs,
                                                                    "encoding_format": "base64"})
            except httpx.TransportError as exc:
                print(f"request failed: {exc!r}", file=sys.stderr)
                errors += 1
                return
            if r.status_code != 200 or len(r.json()["data"]) != len(inputs):
                errors += 1
                return
            latencies["single" if len(inputs) == 1 else "large"].append(time.perf_counter() - sent)

        await asyncio.gather(*(one(at, inputs) for at, inputs in plan))
        makespan = time.perf_counter() - start
    return {"latencies": latencies, "makespan_s": makespan, "errors": errors}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def summarize(runs: list[dict], inputs: int) -> dict:
    single = [x for r in runs for x in r["latencies"]["single"]]
    large = [x for r in runs for x in r["latencies"]["large"]]
    return {"single_p50_ms": pct(single, 50), "single_p95_ms": pct(single, 95), "single_p99_ms": pct(single, 99),
            "large_p50_ms": pct(large, 50), "large_max_ms": max(large) * 1000 if large else float("nan"),
            "all_p95_ms": pct(single + large, 95),
            "inputs_per_s": inputs / statistics.mean(r["makespan_s"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "requests": len(single) + len(large)}


def run_mode(model_dir: pathlib.Path, dynamic: bool, plan, args, run_dir: pathlib.Path) -> tuple[dict, dict]:
    settings = {"dynamic_batching": dynamic, "max_batch_delay_ms": args.max_batch_delay_ms,
                "max_num_batched_tokens": args.batch_tokens, "max_num_seqs": args.batch_inputs}
    cluster = LocalCluster(UpOptions(model=model_dir, prefill=0, decode=0, embed=1, port=free_port(),
                                     grpc_port=free_port(), controlplane_port=free_port(), worker_settings=settings,
                                     torch_threads=1, run_dir=run_dir))
    try:
        cluster.start()
        warm = [(0.01 * i, [sentence(random.Random(i))] * (1 + 31 * (i % 2))) for i in range(20)]
        asyncio.run(drive(cluster.url, cluster.model_name, warm))
        result = asyncio.run(drive(cluster.url, cluster.model_name, plan))
        (record,) = [w for w in cluster.workers() if w.pool == "embed"]
        stats = httpx.get(f"http://{record.http_address}/stats", timeout=5).json()
    finally:
        cluster.stop()
    return result, stats


# -- tokenization: a thread vs a process pool ----------------------------------------------
_PROCESS_TOKENIZER = None


def _init_tokenizer(model_dir: str) -> None:
    global _PROCESS_TOKENIZER
    from baton.engine.tokenizer import Tokenizer

    _PROCESS_TOKENIZER = Tokenizer.from_dir(model_dir)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return _PROCESS_TOKENIZER.encode_batch(texts)


async def _with_loop_lag(work) -> tuple[float, float]:
    """(seconds the work took, the longest the event loop went without running a 1 ms ticker meanwhile)."""
    lag, done = 0.0, False

    async def ticker() -> None:
        nonlocal lag
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            lag, last = max(lag, now - last), now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)  # the ticker is running before the work starts
    t = time.perf_counter()
    await work()
    seconds = time.perf_counter() - t
    done = True
    await tick
    return seconds, lag


def tokenization(model_dir: pathlib.Path, n: int, repeats: int) -> dict:
    from baton.engine.tokenizer import Tokenizer

    rng = random.Random(5)
    texts = [sentence(rng) for _ in range(n)]
    tokenizer = Tokenizer.from_dir(model_dir)
    workers = os.cpu_count() or 2
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_tokenizer, initargs=(str(model_dir),))
    chunk = -(-n // workers)

    async def thread() -> None:  # as the router does it
        for i in range(0, n, TOKENIZE_CHUNK):
            await asyncio.to_thread(tokenizer.encode_batch, texts[i:i + TOKENIZE_CHUNK])

    async def processes() -> None:
        loop = asyncio.get_running_loop()
        parts = [loop.run_in_executor(pool, _encode_chunk, texts[i:i + chunk]) for i in range(0, n, chunk)]
        await asyncio.gather(*parts)

    async def inline() -> None:
        tokenizer.encode_batch(texts)

    out: dict[str, dict] = {}
    try:
        asyncio.run(_with_loop_lag(processes))  # start the pool's processes outside the timing
        for name, work in (("thread", thread), ("process_pool", processes), ("on_the_event_loop", inline)):
            runs = [asyncio.run(_with_loop_lag(work)) for _ in range(repeats)]
            out[name] = {"ms": min(r[0] for r in runs) * 1000, "max_loop_stall_ms": max(r[1] for r in runs) * 1000}
    finally:
        pool.shutdown()
    out["inputs"] = n
    out["faster"] = min(("thread", "process_pool"), key=lambda k: out[k]["ms"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 6 s of load, one 2k-input request, 1 repeat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=20.0, help="one-sentence requests per second (Poisson)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of offered load per run (default 20)")
    ap.add_argument("--large", type=int, default=None, help="2k-input requests per run (default 3)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per mode, alternated (default 2)")
    ap.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    ap.add_argument("--batch-tokens", type=int, default=1024, help="token budget of one forward")
    ap.add_argument("--batch-inputs", type=int, default=256, help="most inputs in one forward")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args()
    duration = args.duration or (6.0 if args.quick else 20.0)
    large = args.large if args.large is not None else (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 2)

    from baton.devtools.make_model import make_model

    model_dir = pathlib.Path.home() / ".cache" / "baton" / "models" / "bench-embeddings-qwen3"
    if not (model_dir / "config.json").is_file():
        make_model(model_dir, **MODEL)
    plan = workload(args.seed, args.rate, duration, large)
    inputs = sum(len(x) for _, x in plan)
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    worker_stats: dict[str, list[dict]] = {"on": [], "off": []}
    for r in range(repeats):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            t = time.perf_counter()
            result, stats = run_mode(model_dir, mode == "on", plan, args, run_dir / f"{mode}-{r}")
            runs[mode].append(result)
            worker_stats[mode].append(stats)
            print(f"[{mode} #{r}] {time.perf_counter() - t:.0f}s, {stats['forwards']} forwards, "
                  f"errors {result['errors']}", file=sys.stderr)
    table = {mode: summarize(rs, inputs) for mode, rs in runs.items()}
    for mode in table:
        table[mode]["forwards_per_run"] = statistics.mean(s["forwards"] for s in worker_stats[mode])
    tok = tokenization(model_dir, 10_000, 3)

    print(f"\nmixed load: {sum(1 for _, x in plan if len(x) == 1)} one-sentence requests at {args.rate}/s + {large} x "
          f"{LARGE_INPUTS} inputs over {duration:.0f}s; {repeats} run(s) per mode")
    print(f"{'batching':<9} {'P50 ms':>8} {'P95 ms':>8} {'P99 ms':>8} {'2k P50 ms':>10} {'2k max ms':>10} "
          f"{'inputs/s':>9} {'forwards':>9}")
    for mode, row in table.items():
        print(f"{mode:<9} {row['single_p50_ms']:>8.1f} {row['single_p95_ms']:>8.1f} {row['single_p99_ms']:>8.1f} "
              f"{row['large_p50_ms']:>10.0f} {row['large_max_ms']:>10.0f} {row['inputs_per_s']:>9.0f} "
              f"{row['forwards_per_run']:>9.0f}")
    print(f"\ntokenizing {tok['inputs']} inputs: thread {tok['thread']['ms']:.0f} ms "
          f"(event loop stalled <= {tok['thread']['max_loop_stall_ms']:.1f} ms), process pool "
          f"{tok['process_pool']['ms']:.0f} ms (<= {tok['process_pool']['max_loop_stall_ms']:.1f} ms), on the loop "
          f"{tok['on_the_event_loop']['ms']:.0f} ms (stalls it {tok['on_the_event_loop']['max_loop_stall_ms']:.0f} ms)"
          f"; faster: {tok['faster']}")
    on, off = table["on"], table["off"]
    headline = {
        "single_p95_ms_on": round(on["single_p95_ms"], 2), "single_p95_ms_off": round(off["single_p95_ms"], 2),
        "p95_speedup": round(off["single_p95_ms"] / on["single_p95_ms"], 3),
        "p99_speedup": round(off["single_p99_ms"] / on["single_p99_ms"], 3),
        "all_p95_speedup": round(off["all_p95_ms"] / on["all_p95_ms"], 3),
        "inputs_per_s_on": round(on["inputs_per_s"], 1), "inputs_per_s_off": round(off["inputs_per_s"], 1),
        "throughput_ratio": round(on["inputs_per_s"] / off["inputs_per_s"], 3),
        "tokenize_10k_thread_ms": round(tok["thread"]["ms"], 1),
        "tokenize_10k_process_pool_ms": round(tok["process_pool"]["ms"], 1),
        "tokenizer_choice": tok["faster"],
        "errors": on["errors"] + off["errors"],
        "p95_3x_floor_met": off["single_p95_ms"] / on["single_p95_ms"] >= 3,
    }
    doc = {"quick": args.quick, "seed": args.seed, "rate": args.rate, "duration_s": duration, "large_requests": large,
           "large_inputs": LARGE_INPUTS, "repeats": repeats, "model": MODEL,
           "worker": {"max_batch_delay_ms": args.max_batch_delay_ms, "max_num_batched_tokens": args.batch_tokens,
                      "max_num_seqs": args.batch_inputs, "torch_threads": 1},
           "load_average_1m": os.getloadavg()[0], "modes": table, "tokenization": tok,
           "raw": {m: [{"makespan_s": r["makespan_s"], "errors": r["errors"],
                        "single_ms": [round(x * 1000, 2) for x in r["latencies"]["single"]],
                        "large_ms": [round(x * 1000, 1) for x in r["latencies"]["large"]]} for r in rs]
                   for m, rs in runs.items()}}
    emit("embeddings", headline, doc, args.out)


if __name__ == "__main__":
    main()
