"""Soak: N concurrent streaming clients for a duration against a local cluster (1 prefill + 2 decode workers),
random prompt lengths, random client disconnects, one decode worker SIGKILLed halfway (the control plane starts
a replacement). Every request must end in a full completion or an explicit error (counted; a stream that just
stops is a silent loss), no worker may hold a KV block afterwards, and the RSS of every process is read at the
start and the end. The reference is the same run's first half: completions per second after the kill over before.

    python bench/soak.py                      # 100 clients x 600 s
    python bench/soak.py --clients 8 --duration 30 --out /tmp/soak.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from baton.devtools.local_cluster import LocalCluster, UpOptions, free_port  # noqa: E402
from bench.report import RESULTS_DIR, emit  # noqa: E402

# A small Llama: the soak measures the serving path's robustness, not the model.
MODEL = dict(arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=512, max_position=1024, seed=3)
OUTCOMES = ("complete", "error", "disconnected", "lost")


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # explicit errors by status / message head
    lost: list[str] = field(default_factory=list)  # what each silent loss looked like
    completions_at: list[float] = field(default_factory=list)  # monotonic times of full completions


def rss_kb(pid: int) -> int | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def processes(cluster: LocalCluster) -> dict[str, int]:
    """name -> pid of every process of the cluster now (workers by their registry record)."""
    out = {name: proc.pid for name, proc in cluster.procs}
    for record in cluster.workers():
        out[record.worker_id] = record.pid
    return out


def worker_stats(cluster: LocalCluster) -> dict[str, dict]:
    stats = {}
    for record in cluster.workers():
        try:
            stats[record.worker_id] = httpx.get(f"http://{record.http_address}/stats", timeout=5).json()
        except httpx.HTTPError:
            continue  # a killed worker stays registered until its key's TTL runs out
    return stats


async def one_request(client: httpx.AsyncClient, cluster: LocalCluster, rng: random.Random, tally: Tally,
                      disconnect_p: float) -> None:
    prompt = [rng.randrange(1, MODEL["vocab"]) for _ in range(rng.randint(4, 600))]
    max_tokens = rng.randint(8, 64)
    leave_after = rng.randint(1, max_tokens) if rng.random() < disconnect_p else None
    body = {"model": cluster.model_name, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.7, "ignore_eos": True, "stream_options": {"include_usage": True}}
    chunks, finished, usage = 0, None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    tally.counts["lost"] += 1
                    tally.lost.append(f"HTTP {response.status_code} without an error body: {text[:120]}")
                    return
                tally.counts["error"] += 1
                tally.errors[f"{response.status_code} {message[:60]}"] += 1
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    tally.counts["error"] += 1
                    tally.errors[f"stream {event['error'].get('message', '')[:60]}"] += 1
                    return
                for choice in event.get("choices", []):
                    chunks += 1
                    finished = choice.get("finish_reason") or finished
                usage = event.get("usage") or usage
                if leave_after is not None and chunks >= leave_after:
                    tally.counts["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        tally.counts["lost"] += 1
        tally.lost.append(f"{type(exc).__name__} after {chunks} chunks: {exc!r} (cause {exc.__cause__!r})")
        return
    if finished == "length" and usage and usage.get("completion_tokens") == max_tokens:
        tally.counts["complete"] += 1
        tally.completions_at.append(time.monotonic())
    else:
        tally.counts["lost"] += 1
        tally.lost.append(f"ended after {chunks} chunks, finish_reason={finished}, usage={usage}")


async def client_loop(i: int, cluster: LocalCluster, until: float, tally: Tally, disconnect_p: float) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=httpx.Timeout(120, connect=10)) as client:
        while time.monotonic() < until:
            await one_request(client, cluster, rng, tally, disconnect_p)


def kill_a_decode_worker(cluster: LocalCluster) -> tuple[str, int]:
    decode = sorted((r.worker_id, r.pid) for r in cluster.workers() if r.pool == "decode")
    worker_id, pid = decode[0]
    os.kill(pid, signal.SIGKILL)
    return worker_id, pid


async def wait_replaced(cluster: LocalCluster, killed_pid: int, timeout_s: float) -> float | None:
    """Seconds until two live decode workers answer again (the control plane replaces the killed one)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        stats = await asyncio.to_thread(worker_stats, cluster)
        live = [s for s in stats.values() if s["pool"] == "decode" and int(s["pid"]) != killed_pid]
        if len(live) >= 2:
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    return None


async def soak(cluster: LocalCluster, args) -> dict:
    tally = Tally()
    started = time.monotonic()
    until = started + args.duration
    clients = [asyncio.create_task(client_loop(i, cluster, until, tally, args.disconnect_p))
               for i in range(args.clients)]
    await asyncio.sleep(args.duration / 2)
    killed_at = time.monotonic()
    victim, pid = await asyncio.to_thread(kill_a_decode_worker, cluster)
    print(f"[soak] t={killed_at - started:.0f}s: SIGKILL decode worker {victim} (pid {pid})", flush=True)
    replaced_s = await wait_replaced(cluster, pid, timeout_s=max(args.duration / 2, 60))
    print(f"[soak] replacement decode worker serving after {replaced_s}s", flush=True)
    await asyncio.gather(*clients)
    ended = time.monotonic()
    before = sum(1 for t in tally.completions_at if t < killed_at) / (killed_at - started)
    after = sum(1 for t in tally.completions_at if t >= killed_at) / max(ended - killed_at, 1e-9)
    return {"tally": tally, "victim": victim, "replaced_after_s": replaced_s, "wall_s": ended - started,
            "completions_per_s_before_kill": before, "completions_per_s_after_kill": after}


def settle(cluster: LocalCluster, timeout_s: float = 60.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = worker_stats(cluster)
        idle = all(int(s["num_requests_running"]) == 0 and int(s["kv_blocks_used"]) == 0 for s in stats.values())
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def migrations(cluster: LocalCluster) -> float:
    text = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("baton_router_migrations_total"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--disconnect-p", type=float, default=0.1, help="share of requests the client leaves mid-stream")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR / "soak.json")
    args = ap.parse_args(argv)

    from baton.devtools.make_model import make_model

    work = pathlib.Path(tempfile.mkdtemp(prefix="baton-soak-"))
    model_dir = make_model(work / "soak-llama", **MODEL)
    cluster = LocalCluster(UpOptions(model=model_dir, prefill=1, decode=2, port=free_port(), grpc_port=free_port(),
                                     controlplane_port=free_port(), num_kv_blocks=1024, run_dir=work / "run",
                                     local_prefill_threshold=64, routing="kv_aware",
                                     policy_overrides={"tick_s": 2}))
    try:
        cluster.start()
        start_rss = {name: rss_kb(pid) for name, pid in processes(cluster).items()}
        run = asyncio.run(soak(cluster, args))
        settled = settle(cluster)
        end_pids = processes(cluster)
        end_rss = {name: rss_kb(pid) for name, pid in end_pids.items()}
        migrated = migrations(cluster)
    finally:
        cluster.stop()

    tally: Tally = run["tally"]
    counts = {k: tally.counts.get(k, 0) for k in OUTCOMES}
    requests = sum(counts.values())
    leaked = sum(int(s["kv_blocks_used"]) for s in settled.values())
    running = sum(int(s["num_requests_running"]) for s in settled.values())
    print(f"\nsoak: {args.clients} clients x {args.duration:.0f} s, 1 prefill + 2 decode, one decode worker "
          f"killed at {args.duration / 2:.0f} s")
    print(f"{'outcome':<14}{'requests':>10}{'share':>9}")
    for k in OUTCOMES:
        print(f"{k:<14}{counts[k]:>10}{counts[k] / max(requests, 1):>9.1%}")
    print(f"{'explicit errors by kind':<40}")
    for kind, n in tally.errors.most_common(8):
        print(f"  {n:>6}  {kind}")
    for line in tally.lost[:10]:
        print(f"  lost: {line}")
    print(f"\n{'process':<36}{'RSS start MiB':>14}{'RSS end MiB':>13}")
    for name in sorted(set(start_rss) | set(end_rss)):
        s, e = start_rss.get(name), end_rss.get(name)
        print(f"{name:<36}{(s or 0) / 1024:>14.1f}{(e or 0) / 1024:>13.1f}" + ("" if s and e else "  (not alive "
                                                                             "at both reads)"))
    print(f"\nworkers after settling: {leaked} KV blocks used, {running} requests running; migrations {migrated:.0f}")
    print(f"completions/s before the kill {run['completions_per_s_before_kill']:.2f}, after "
          f"{run['completions_per_s_after_kill']:.2f}; replacement serving after {run['replaced_after_s']} s")

    both = [n for n in start_rss if start_rss[n] and end_rss.get(n)]
    rss_growth = max((end_rss[n] / start_rss[n] for n in both), default=0.0)
    ratio = run["completions_per_s_after_kill"] / max(run["completions_per_s_before_kill"], 1e-9)
    headline = {"clients": args.clients, "duration_s": args.duration, "requests": requests, **counts,
                "leaked_blocks": leaked, "requests_left_running": running, "migrations": int(migrated),
                "decode_replaced_after_s": round(run["replaced_after_s"], 1) if run["replaced_after_s"] else -1,
                "throughput_after_vs_before_kill": round(ratio, 3), "max_rss_end_vs_start": round(rss_growth, 3)}
    emit("soak", headline, {
        "settings": vars(args) | {"out": str(args.out), "model": MODEL},
        "errors": dict(tally.errors), "lost_examples": tally.lost[:50], "killed": run["victim"],
        "rss_kb_start": start_rss, "rss_kb_end": end_rss, "workers_after": settled,
        "wall_s": run["wall_s"], "loadavg": os.getloadavg()}, out=args.out)
    return 0 if counts["lost"] == 0 and leaked == 0 and running == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
