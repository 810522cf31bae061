"""round_robin vs least_load vs kv_aware on a real local cluster (4 decode workers that prefill locally, one router
per policy on the same workers and Redis), on two seeded workloads: multi-turn chat and shared system prompts.

Usage: python bench/routing.py [--quick] [--seed 0] [--workers 4] [--concurrency 4] [--repeats 2] [--kv-blocks 384]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import redis
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from baton.contracts.block_hash import hash_blocks  # noqa: E402
from baton.devtools.local_cluster import LocalCluster, UpOptions, free_port  # noqa: E402
from baton.router.selection import (  # noqa: E402
    ConditionalDisaggregation,
    RoutingConfig,
    RoutingRequest,
    WorkerState,
    make_policy,
    select_route,
)
from bench.report import emit  # noqa: E402
from bench.routing_index import build_workload, ours_absorb, percentiles  # noqa: E402

POLICIES = ("round_robin", "least_load", "kv_aware")
BLOCK = 16
VOCAB = 4096
# 2 layers / hidden 128 prefill 1k tokens in ~130 ms on one core, so a long uncached prompt costs far more
# than the ~10 ms of HTTP + gRPC around it: TTFT then measures what routing can save.
MODEL = dict(arch="llama", layers=2, hidden=128, heads=4, kv_heads=2, vocab=VOCAB, max_position=4096, seed=7)
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    """Sizes of both workloads and of the cluster; --quick shrinks them."""

    chat_sessions: int = 16
    chat_turns: int = 6
    chat_first: tuple[int, int] = (768, 1536)  # the first user message (a pasted document)
    chat_msg: tuple[int, int] = (64, 160)  # later user messages and the (replayed) assistant replies
    system_prompts: int = 8
    system_len: tuple[int, int] = (1536, 2048)
    shared_requests: int = 96
    question: tuple[int, int] = (32, 128)
    max_tokens: int = 8
    kv_blocks: int = 384  # per worker (6k tokens): ~3 of the 8 system prompts, so where a prompt goes matters
    index_blocks: int = 100_000
    index_queries: int = 4000


QUICK = Shape(chat_sessions=4, chat_turns=3, chat_first=(256, 384), system_prompts=4, system_len=(512, 768),
              shared_requests=16, index_queries=1000)


def chat_workload(rng: random.Random, s: Shape) -> list[list[list[int]]]:
    """Sessions of turns; each turn re-sends the whole conversation: a short system prompt shared by all
    sessions, then user/assistant messages. Replies are replayed from the workload, not taken from the model,
    so every policy sees identical prompts."""
    toks = lambda lo_hi: [rng.randrange(1, VOCAB) for _ in range(rng.randint(*lo_hi))]  # noqa: E731
    system = toks((128, 128))
    sessions = []
    for _ in range(s.chat_sessions):
        convo, turns = system + toks(s.chat_first), []
        for turn in range(s.chat_turns):
            if turn:
                convo = convo + toks(s.chat_msg) + toks(s.chat_msg)  # the previous reply, then the next question
            turns.append(convo)
        sessions.append(turns)
    return sessions


def shared_workload(rng: random.Random, s: Shape) -> list[list[list[int]]]:
    """Independent users, each one request: one of a few long system prompts plus a private question."""
    systems = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(*s.system_len))] for _ in range(s.system_prompts)]
    return [[rng.choice(systems) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(*s.question))]]
            for _ in range(s.shared_requests)]


def relabel(streams: list[list[list[int]]], seed: int) -> list[list[list[int]]]:
    """The same workload under a random permutation of the vocabulary: identical structure and sharing, but
    no block in common with another policy's run, so each policy starts from caches that are cold for it."""
    perm = list(range(1, VOCAB))
    random.Random(seed).shuffle(perm)
    table = [0, *perm]
    return [[[table[t] for t in prompt] for prompt in stream] for stream in streams]


def oracle_hit_rate(streams: list[list[list[int]]]) -> float:
    """Prompt tokens a global cache of infinite capacity would serve: each prompt's leading full blocks seen in
    any earlier prompt (streams interleaved turn by turn), never the last token, as the engine's cache does."""
    seen: set[int] = set()
    hit = total = 0
    for turn in range(max(map(len, streams))):
        for stream in streams:
            if turn < len(stream):
                prompt = stream[turn]
                hashes = hash_blocks(prompt, BLOCK)
                usable = (len(prompt) - 1) // BLOCK
                n = next((i for i, h in enumerate(hashes[:usable]) if h not in seen), usable)
                hit += n * BLOCK
                total += len(prompt)
                seen.update(hashes)
    return hit / total


@dataclass
class Run:
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    reported_cached: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0


class BenchError(RuntimeError):
    pass


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                     run: Run) -> None:
    # logprobs make the router send a chunk for every token, so the first chunk is the first token even when
    # its text is an incomplete UTF-8 sequence.
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 1, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise BenchError(f"{url} answered {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if "error" in doc:
                raise BenchError(f"{url}: {doc['error']}")
            if ttft is None and doc.get("choices"):
                ttft = time.perf_counter() - start
            if doc.get("usage"):
                run.reported_cached += doc["usage"]["prompt_tokens_details"]["cached_tokens"]
                run.output_tokens += doc["usage"]["completion_tokens"]
    if ttft is None:
        raise BenchError(f"{url}: stream ended without a token")
    run.ttft_s.append(ttft)
    run.e2e_s.append(time.perf_counter() - start)
    run.prompt_tokens += len(prompt)


async def drive(url: str, model: str, streams: list[list[list[int]]], concurrency: int, max_tokens: int,
                label: str, run: Run | None = None) -> Run:
    """Closed loop: `concurrency` clients, each taking the next stream and sending its prompts in order;
    results are added to `run`."""
    run, queue = run or Run(), list(reversed(streams))
    bar = tqdm(total=sum(map(len, streams)), desc=label, unit="req", leave=False, file=sys.stderr)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            for prompt in queue.pop():
                await stream_one(client, url, model, prompt, max_tokens, run)
                bar.update()

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    run.wall_s += time.perf_counter() - start
    bar.close()
    return run


def worker_counters(redis_url: str) -> dict[str, tuple[int, int]]:
    """worker id -> (prompt tokens computed, prompt tokens served from its prefix cache), from /stats."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    out = {}
    for key in client.scan_iter(match="baton:worker:*"):
        rec = client.hgetall(key)
        s = httpx.get(f"http://{rec['http_address']}/stats", timeout=10).json()
        out[rec["worker_id"]] = (int(s["prompt_tokens_computed_total"]), int(s["prompt_tokens_cached_total"]))
    return out


def start_routers(cluster: LocalCluster, policies, run_dir: pathlib.Path) -> dict[str, tuple[str, subprocess.Popen]]:
    """Extra router replicas on the cluster's Redis and workers, one per policy; each keeps its own index
    from the shared KV event stream."""
    routers = {}
    for policy in policies:
        port = free_port()
        log = open(run_dir / f"router-{policy}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "router", "--model", str(cluster.model_dir),
                                 "--redis-url", cluster.redis_url, "--host", "127.0.0.1", "--http-port", str(port),
                                 "--grpc-port", "0", "--policy", policy], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        routers[policy] = (f"http://127.0.0.1:{port}", proc)
    deadline = time.monotonic() + 120
    for policy, (url, proc) in routers.items():
        while True:
            if proc.poll() is not None:
                raise BenchError(f"router {policy} exited ({proc.returncode}); see {run_dir}/router-{policy}.log")
            try:
                if httpx.get(f"{url}/ready", timeout=1).json().get("decode_workers") == cluster.opts.decode:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"router {policy} not ready; see {run_dir}/router-{policy}.log")
            time.sleep(0.3)
    return routers


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure_workload(name: str, streams, routers, cluster: LocalCluster, args, shape: Shape) -> dict:
    """Each repeat runs every policy once on its own relabelled copy of the workload; repeats alternate the
    policy order, so a change in the load of this shared machine does not favour whoever runs first."""
    oracle = oracle_hit_rate(streams)
    runs = {policy: Run() for policy in POLICIES}
    per_worker: dict[str, dict[str, int]] = {policy: {} for policy in POLICIES}
    computed, cached, drift = dict.fromkeys(POLICIES, 0), dict.fromkeys(POLICIES, 0), dict.fromkeys(POLICIES, 0)
    for rep in range(args.repeats):
        for policy in (POLICIES if rep % 2 == 0 else POLICIES[::-1]):
            salt = (args.seed * 100 + rep) * 10 + POLICIES.index(policy) + (0 if name == "chat" else 5)
            mine, run = relabel(streams, salt), runs[policy]
            sent = run.prompt_tokens
            before = worker_counters(cluster.redis_url)
            asyncio.run(drive(routers[policy][0], cluster.model_name, mine, args.concurrency, shape.max_tokens,
                              f"{name}/{policy} #{rep + 1}", run))
            after = worker_counters(cluster.redis_url)
            counted = 0
            for w in after:
                c, h = after[w][0] - before[w][0], after[w][1] - before[w][1]
                computed[policy] += c
                cached[policy] += h
                counted += c + h
                per_worker[policy][w] = per_worker[policy].get(w, 0) + c + h
            # A request preempted mid-prefill (KV pool full) recomputes its partial block and is not
            # counted as cached again, so the sums may differ by a little; more means broken accounting.
            drift[policy] += counted - (run.prompt_tokens - sent)
            if abs(counted - (run.prompt_tokens - sent)) > 0.05 * (run.prompt_tokens - sent):
                raise BenchError(f"{name}/{policy}: workers counted {counted} prompt tokens, "
                                 f"the client sent {run.prompt_tokens - sent}")
    rows = {}
    for policy, run in runs.items():
        hit = cached[policy] / run.prompt_tokens
        rows[policy] = {
            "requests": len(run.ttft_s), "prompt_tokens": run.prompt_tokens,
            "prefill_tokens_computed": computed[policy], "cached_tokens": cached[policy], "hit_rate": hit,
            "oracle_hit_rate": oracle, "hit_vs_oracle": hit / oracle if oracle else None,
            "router_reported_cached": run.reported_cached, "counted_minus_sent_tokens": drift[policy],
            "ttft_p50_ms": 1000 * pct(run.ttft_s, 0.5), "ttft_p90_ms": 1000 * pct(run.ttft_s, 0.9),
            "e2e_p50_ms": 1000 * pct(run.e2e_s, 0.5), "wall_s": run.wall_s,
            "requests_per_s": len(run.ttft_s) / run.wall_s, "output_tokens_per_s": run.output_tokens / run.wall_s,
            "prompt_tokens_per_worker": per_worker[policy], "ttft_ms": [1000 * t for t in run.ttft_s],
        }
    return rows


def time_decisions(fns: dict, requests: list) -> dict[str, dict[str, dict[str, float]]]:
    """Like routing_index.time_calls (interleaved, alternating who goes first), timing each call both by the
    wall clock and by this thread's CPU clock: on a shared 2-core machine the wall-clock tail is mostly time
    spent preempted by other processes, the CPU clock is what the decision itself costs."""
    for fn in fns.values():
        for r in requests[:200]:
            fn(r)  # warm-up
    gc.collect()
    wall: dict[str, list[int]] = {name: [] for name in fns}
    cpu: dict[str, list[int]] = {name: [] for name in fns}
    order = list(fns.items())
    wclock, cclock = time.perf_counter_ns, time.thread_time_ns
    for i, r in enumerate(requests):
        for name, fn in (order if i % 2 else order[::-1]):
            w, c = wclock(), cclock()
            fn(r)
            cpu[name].append(cclock() - c)
            wall[name].append(wclock() - w)
    return {name: {"wall": percentiles(wall[name]), "cpu": percentiles(cpu[name])} for name in fns}


def decision_latency(shape: Shape, seed: int) -> dict:
    """Router decision (select_route: one index lookup, decode pick, disaggregation decider, prefill pick when
    remote) against a ~100k-entry index built from routing_index.py's workload, per policy."""
    events, queries, entries = build_workload(shape.index_blocks, shape.index_queries, seed)
    index, _, _ = ours_absorb(events)
    rng = random.Random(seed)
    workers = [WorkerState(f"w{i}", "decode", capacity=32, running_requests=rng.randrange(32),
                           active_kv_blocks=rng.randrange(40_000), total_kv_blocks=40_000,
                           queued_prefill_tokens=rng.randrange(8192)) for i in range(4)]
    workers += [WorkerState(f"p{i}", "prefill", queued_prefill_tokens=rng.randrange(8192)) for i in range(2)]
    requests = [RoutingRequest([0] * (len(q) * BLOCK), q, BLOCK) for q in queries]
    fns = {}
    for policy in POLICIES:
        config = RoutingConfig(policy=policy, block_size=BLOCK, seed=seed)
        p, decider = make_policy(config, index), ConditionalDisaggregation(config.local_prefill_threshold_tokens)
        fns[policy] = lambda r, p=p, d=decider: select_route(p, d, r, workers)
    return {"index_entries": entries, "queries": len(queries), "load_average_1m": os.getloadavg()[0],
            "mean_query_blocks": sum(map(len, queries)) / len(queries), **time_decisions(fns, requests)}


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        for policy, row in rows.items():
            xs = sorted(row["ttft_ms"])
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                    label=f"{policy} (p50 {row['ttft_p50_ms']:.0f} ms, hit {row['hit_rate']:.0%})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("TTFT at the client (ms, log scale)")
        ax.set_ylabel("share of requests")
        ax.set_title(f"{name}: oracle hit rate {next(iter(rows.values()))['oracle_hit_rate']:.0%}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict, decisions: dict) -> None:
    print(f"{'workload':8} {'policy':12} {'reqs':>5} {'hit':>6} {'oracle':>6} {'hit/or':>6} {'TTFT p50':>9} "
          f"{'p90':>7} {'prefill computed':>16} {'req/s':>6} {'out tok/s':>9}   (ms; tokens)")
    for name, rows in results.items():
        for policy, r in rows.items():
            print(f"{name:8} {policy:12} {r['requests']:5d} {r['hit_rate']:6.1%} {r['oracle_hit_rate']:6.1%} "
                  f"{r['hit_vs_oracle']:6.2f} {r['ttft_p50_ms']:9.1f} {r['ttft_p90_ms']:7.1f} "
                  f"{r['prefill_tokens_computed']:16,d} {r['requests_per_s']:6.2f} {r['output_tokens_per_s']:9.1f}")
    print(f"router decision (select_route) on a {decisions['index_entries']:,}-entry index, "
          f"{decisions['mean_query_blocks']:.0f}-block prompts on average, machine load "
          f"{decisions['load_average_1m']:.1f} on {os.cpu_count()} cores:")
    for policy in POLICIES:
        c, w = decisions[policy]["cpu"], decisions[policy]["wall"]
        print(f"  {policy:12} CPU p50 {c['p50_us']:6.1f} us  p99 {c['p99_us']:6.1f} us   "
              f"wall p50 {w['p50_us']:6.1f} us  p99 {w['p99_us']:7.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 workers, small workloads (< 60 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default 4; 2 with --quick)")
    ap.add_argument("--concurrency", type=int, default=4, help="clients in the closed loop")
    ap.add_argument("--kv-blocks", type=int, default=None, help="KV pool per worker in blocks (default 384)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per policy and workload (default 2; 1 quick)")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS / "routing.json")
    args = ap.parse_args()
    shape = QUICK if args.quick else Shape()
    if args.kv_blocks is not None:
        if args.kv_blocks < 64:
            ap.error("--kv-blocks must be >= 64 (a prompt of the workloads needs up to ~190 blocks)")
        shape = dataclasses.replace(shape, kv_blocks=args.kv_blocks)
    workers = args.workers or (2 if args.quick else 4)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if min(workers, args.concurrency, args.repeats) < 1:
        ap.error("--workers, --concurrency and --repeats must be >= 1")

    from baton.devtools.make_model import make_model

    model_dir = pathlib.Path.home() / ".cache" / "baton" / "models" / "bench-routing-llama"
    if not (model_dir / "config.json").is_file():
        make_model(model_dir, **MODEL)
    rng = random.Random(args.seed)
    workloads = {"chat": chat_workload(rng, shape), "shared": shared_workload(rng, shape)}
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-routing-"))
    # prefill=0: every decode worker prefills locally ("conditional disaggregation" with no prefill pool), so
    # the worker a policy picks is the one whose cache is hit or missed.
    cluster = LocalCluster(UpOptions(model=model_dir, prefill=0, decode=workers, port=free_port(),
                                     grpc_port=free_port(), controlplane_port=free_port(), routing=POLICIES[0],
                                     num_kv_blocks=shape.kv_blocks, torch_threads=1, run_dir=run_dir))
    routers: dict[str, tuple[str, subprocess.Popen | None]] = {}
    results = {}
    try:
        t = time.perf_counter()
        cluster.start()
        routers = {POLICIES[0]: (cluster.url, None), **start_routers(cluster, POLICIES[1:], run_dir)}
        print(f"cluster of {workers} decode workers and {len(routers)} routers up in {time.perf_counter() - t:.0f}s "
              f"(logs in {run_dir})", file=sys.stderr)
        warm = [[[random.Random(i).randrange(1, VOCAB) for _ in range(64)]] for i in range(2 * workers)]
        asyncio.run(drive(cluster.url, cluster.model_name, warm, workers, shape.max_tokens, "warm-up"))
        for name, streams in workloads.items():
            results[name] = measure_workload(name, streams, routers, cluster, args, shape)
    finally:
        for _url, proc in routers.values():
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
        cluster.stop()
    decisions = decision_latency(shape, args.seed)

    print_table(results, decisions)
    ratios = {}
    for name, rows in results.items():
        ratios[f"{name}_ttft_p50_speedup"] = rows["round_robin"]["ttft_p50_ms"] / rows["kv_aware"]["ttft_p50_ms"]
        ratios[f"{name}_ttft_p90_speedup"] = rows["round_robin"]["ttft_p90_ms"] / rows["kv_aware"]["ttft_p90_ms"]
        ratios[f"{name}_hit_vs_oracle"] = rows["kv_aware"]["hit_vs_oracle"]
        ratios[f"{name}_hit_vs_round_robin"] = rows["kv_aware"]["hit_rate"] / max(rows["round_robin"]["hit_rate"], 1e-9)
    ratios["decision_p99_us"] = decisions["kv_aware"]["cpu"]["p99_us"]
    ratios["decision_wall_p99_us"] = decisions["kv_aware"]["wall"]["p99_us"]
    targets = {
        "ttft_p50_2x": all(ratios[f"{n}_ttft_p50_speedup"] >= 2 for n in results),
        "hit_90pct_of_oracle": all(ratios[f"{n}_hit_vs_oracle"] >= 0.9 for n in results),
        "decision_p99_le_1ms": ratios["decision_p99_us"] <= 1000,
    }
    doc = {"quick": args.quick, "seed": args.seed, "workers": workers, "concurrency": args.concurrency,
           "repeats": args.repeats,
           "model": MODEL, "block_size": BLOCK, "shape": shape.__dict__, "workloads": results,
           "decision_latency": decisions, "ratios": ratios, "targets_met": targets}
    png = args.out.with_name(args.out.stem + "_ttft_cdf.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    print(f"wrote {args.out} and {png}; targets met: {targets}")
    emit("routing", {**{k: round(v, 4) for k, v in ratios.items()}, **targets}, doc, args.out)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"error: {exc}")
