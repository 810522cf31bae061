"""Serving benchmark: aiperf (third-party OpenAI load generator) drives `baton up`'s router for 1 prefill + 1 decode
worker against one colocated worker with the same torch threads; TTFT / ITL / throughput at p50/p90/p99.

Usage: python bench/serve.py [--quick] [--model DIR] [--concurrency 4 8] [--isl 256] [--osl 64] [--out FILE]
aiperf runs from its own venv (.venv-bench, made on first use): installed into .venv it would downgrade
prometheus_client, rich, pillow and huggingface_hub under the serving stack.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from baton.devtools.local_cluster import LocalCluster, UpOptions, ensure_tiny_model, free_port  # noqa: E402
from bench.report import emit  # noqa: E402

BENCH_VENV = ROOT / ".venv-bench"
AIPERF_SPEC = "aiperf>=0.13"


@dataclass(frozen=True)
class Setup:
    name: str
    prefill: int
    decode: int
    torch_threads: int  # per worker; both setups get 2 in all
    local_prefill_threshold: int  # prompt tokens at or under this are prefilled on the decode worker


SETUPS = (
    Setup("1p1d", prefill=1, decode=1, torch_threads=1, local_prefill_threshold=16),
    Setup("colocated", prefill=0, decode=1, torch_threads=2, local_prefill_threshold=1_000_000),
)
# aiperf metric -> (our key, percentile fields taken); units are ms, tokens/s and requests/s.
METRICS = {
    "time_to_first_token": ("ttft_ms", ("avg", "p50", "p90", "p99")),
    "inter_token_latency": ("itl_ms", ("avg", "p50", "p90", "p99")),
    "request_latency": ("e2e_ms", ("avg", "p50", "p90", "p99")),
    "output_token_throughput_per_user": ("tok_s_per_user", ("avg", "p50", "p90", "p99")),
    "output_token_throughput": ("tok_s", ("avg",)),
    "request_throughput": ("req_s", ("avg",)),
    "usage_prompt_tokens": ("prompt_tokens", ("avg",)),
    "usage_completion_tokens": ("completion_tokens", ("avg",)),
    "usage_prompt_cache_read_tokens": ("cached_prompt_tokens", ("avg",)),
}


def ensure_aiperf(explicit: str | None, install: bool) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            sys.exit(f"error: --aiperf {explicit} does not exist")
        return path
    path = BENCH_VENV / "bin" / "aiperf"
    if path.is_file():
        return path
    if not install:
        sys.exit(f"error: {path} not found; run once without --no-install, or "
                 f"`python -m venv {BENCH_VENV} && {BENCH_VENV}/bin/pip install '{AIPERF_SPEC}'`")
    print(f"[serve] installing {AIPERF_SPEC} into {BENCH_VENV} (first run only, a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", AIPERF_SPEC], check=True)
    return path


def prefill_decisions(url: str) -> dict[str, float]:
    """Router decisions per pool so far; a remote prefill counts once in `prefill` as well as in `decode`."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out = {"prefill": 0.0, "decode": 0.0}
    for pool, value in re.findall(r'^baton_router_decisions_total\{[^}]*pool="(\w+)"[^}]*\} (\S+)$', text, re.M):
        if pool in out:
            out[pool] += float(value)
    return out


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def run_aiperf(aiperf: Path, cluster: LocalCluster, args, concurrency: int, requests: int, warmup: int, seed: int,
               artifacts: Path, bar: tqdm) -> dict:
    cmd = [str(aiperf), "profile", "--model", cluster.model_name, "--url", cluster.url, "--endpoint-type", "chat",
           "--streaming", "--tokenizer", str(cluster.model_dir), "--apply-chat-template",
           "--use-server-token-count",  # random weights: re-tokenizing the output text would not give the count back
           "--request-count", str(requests), "--concurrency", str(concurrency),
           "--warmup-request-count", str(warmup),
           # One distinct prompt per request: a re-sent prompt would hit the prefix cache and prefill locally.
           "--num-dataset-entries", str(requests + warmup),
           "--synthetic-input-tokens-mean", str(args.isl), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(args.osl), "--extra-inputs", "ignore_eos:true",
           "--random-seed", str(seed), "--no-server-metrics", "--no-gpu-telemetry", "--record-processors", "1",
           "--ui-type", "none", "--artifact-dir", str(artifacts)]
    # With HF_HUB_OFFLINE=1 aiperf takes the local tokenizer path for a hub id and fails.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    artifacts.mkdir(parents=True, exist_ok=True)
    with (artifacts / "aiperf.stdout").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=artifacts)
        records, shown = artifacts / "profile_export.jsonl", 0
        while proc.poll() is None:
            time.sleep(0.5)
            done = min(count_lines(records), requests + warmup)
            bar.update(done - shown)
            shown = done
    bar.update(requests + warmup - shown)
    export = artifacts / "profile_export_aiperf.json"
    if proc.returncode != 0 or not export.is_file():
        tail = (artifacts / "aiperf.stdout").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"aiperf exited with {proc.returncode}; artifacts in {artifacts}\n{tail}")
    data = json.loads(export.read_text())
    completed = data.get("completed_request_count", {}).get("avg", 0)
    if completed != requests or data.get("error_summary"):
        raise RuntimeError(f"aiperf completed {completed}/{requests} requests, errors: {data.get('error_summary')}; "
                           f"artifacts in {artifacts}")
    out = {"aiperf_version": data.get("aiperf_version")}
    for name, (key, fields) in METRICS.items():
        metric = data.get(name)
        if metric is None:
            raise RuntimeError(f"aiperf export lacks {name!r}; artifacts in {artifacts}")
        for field in fields:
            out[f"{key}_{field}" if len(fields) > 1 else key] = metric.get(field)
    return out


def counts(args, concurrency: int) -> tuple[int, int]:
    """(measured, warm-up) requests at this concurrency."""
    return (args.requests or args.requests_per_slot * concurrency,
            args.warmup if args.warmup is not None else concurrency)


def start_cluster(setup: Setup, model_dir: Path, run_dir: Path, started: list[LocalCluster]) -> LocalCluster:
    cluster = LocalCluster(UpOptions(model=model_dir, prefill=setup.prefill, decode=setup.decode,
                                     port=free_port(), grpc_port=free_port(), controlplane_port=free_port(),
                                     torch_threads=setup.torch_threads,
                                     local_prefill_threshold=setup.local_prefill_threshold, run_dir=run_dir))
    started.append(cluster)
    cluster.start()
    return cluster


def measure(setup: Setup, cluster: LocalCluster, aiperf: Path, args, concurrency: int, seed: int, work: Path,
            bar: tqdm) -> dict:
    name = f"{setup.name}-c{concurrency}"
    load_before = os.getloadavg()[0]
    before = prefill_decisions(cluster.url)
    bar.set_postfix_str(f"{name}: aiperf")
    requests, warmup = counts(args, concurrency)
    result = run_aiperf(aiperf, cluster, args, concurrency, requests, warmup, seed, work / name / "aiperf", bar)
    after = prefill_decisions(cluster.url)
    decodes = after["decode"] - before["decode"]
    result["remote_prefill_share"] = (after["prefill"] - before["prefill"]) / decodes if decodes else 0.0
    # Load average over 1 min (ours included): how busy the shared machine was around this measurement.
    result.update(setup=setup.name, concurrency=concurrency, requests=requests,
                  loadavg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    # The comparison means nothing if 1p1d prefilled locally or colocated found a prefill worker.
    want = 1.0 if setup.prefill else 0.0
    if abs(result["remote_prefill_share"] - want) > 1e-9:
        raise RuntimeError(f"{name}: share of requests prefilled remotely {result['remote_prefill_share']:.2f}, "
                           f"expected {want:.0f}")
    return result


def run_plan(plan: list[tuple[int, Setup]], aiperf: Path, model_dir: Path, args, work: Path) -> list[dict]:
    """One fresh cluster per measurement, so no run inherits another's prefix cache or queue. The previous
    cluster stops while the next one starts and is gone before the load begins. --quick starts them all at
    once (its numbers only show that the path works)."""
    started: list[LocalCluster] = []
    pool = ThreadPoolExecutor(max_workers=len(plan) + 1)

    def start(c: int, s: Setup) -> Future:
        return pool.submit(start_cluster, s, model_dir, work / f"{s.name}-c{c}" / "cluster", started)

    pending = [start(c, s) if args.quick else None for c, s in plan]
    stopping: list[Future] = []
    results = []
    total = sum(sum(counts(args, c)) for c, _ in plan)
    try:
        with tqdm(total=total, desc="serve", unit="req") as bar:
            for k, (c, setup) in enumerate(plan):
                bar.set_postfix_str(f"{setup.name}-c{c}: starting cluster")
                cluster = (pending[k] or start(c, setup)).result()
                for f in stopping:
                    f.result()
                try:
                    results.append(measure(setup, cluster, aiperf, args, c, args.seed + c, work, bar))
                finally:
                    stopping.append(pool.submit(cluster.stop))
    finally:
        for f in [*pending, *stopping]:
            if f is not None:
                wait([f])
        for cluster in started:
            cluster.stop()  # no-op for those already stopped
        pool.shutdown()
    return results


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def table(results: list[dict], concurrencies: list[int]) -> tuple[str, dict]:
    cols = ["ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p90", "itl_ms_p99",
            "e2e_ms_p50", "tok_s", "req_s"]
    head = f"{'conc':>4} {'setup':<12}" + "".join(f"{c:>12}" for c in cols)
    lines, ratios = [head, "-" * len(head)], {}
    for c in concurrencies:
        by = {r["setup"]: r for r in results if r["concurrency"] == c}
        for name in ("1p1d", "colocated"):
            lines.append(f"{c:>4} {name:<12}" + "".join(f"{fmt(by[name][k]):>12}" for k in cols))
        ratios[c] = {k: ratio(by["1p1d"][k], by["colocated"][k]) for k in cols}
        lines.append(f"{c:>4} {'1p1d/coloc':<12}" + "".join(f"{fmt(ratios[c][k]):>12}" for k in cols))
    return "\n".join(lines), ratios


def plot(results: list[dict], concurrencies: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("ttft_ms", "TTFT (ms)"), ("itl_ms", "ITL (ms)"), ("tok_s", "output tokens/s")]
    width = 0.38
    for ax, (key, title) in zip(axes, panels):
        for i, name in enumerate(("1p1d", "colocated")):
            rows = [next(r for r in results if r["setup"] == name and r["concurrency"] == c) for c in concurrencies]
            xs = [j + (i - 0.5) * width for j in range(len(concurrencies))]
            if key == "tok_s":
                ax.bar(xs, [r[key] for r in rows], width, label=name)
            else:
                p50 = [r[f"{key}_p50"] for r in rows]
                err = [[0] * len(rows), [r[f"{key}_p99"] - r[f"{key}_p50"] for r in rows]]
                ax.bar(xs, p50, width, yerr=err, capsize=3, label=f"{name} (p50, bar to p99)")
        ax.set_xticks(range(len(concurrencies)), [f"c={c}" for c in concurrencies])
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="model dir (default: baton up's baton-tiny-llama)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 8])
    p.add_argument("--requests", type=int, help="requests per measurement (default: --requests-per-slot x conc)")
    p.add_argument("--requests-per-slot", type=int, default=16)
    p.add_argument("--warmup", type=int, help="warm-up requests per measurement, not counted (default: conc)")
    p.add_argument("--isl", type=int, default=256, help="prompt tokens, chat template included")
    p.add_argument("--osl", type=int, default=64, help="output tokens (ignore_eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/serve.json; --quick: a temp dir)")
    p.add_argument("--work-dir", type=Path, help="keep cluster logs and aiperf artifacts here")
    p.add_argument("--aiperf", help="aiperf executable (default: .venv-bench/bin/aiperf, made on first use)")
    p.add_argument("--no-install", action="store_true", help="fail instead of creating .venv-bench")
    p.add_argument("--quick", action="store_true", help="smoke run: c=2, 8 requests, isl 96, osl 16")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.warmup, args.isl, args.osl = [2], 8, 2, 96, 16
    for name in ("isl", "osl", "requests_per_slot"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(c < 1 for c in args.concurrency) or (args.requests is not None and args.requests < 1):
        p.error("--concurrency and --requests must be >= 1")
    if args.isl <= SETUPS[0].local_prefill_threshold:
        p.error(f"--isl must exceed {SETUPS[0].local_prefill_threshold} so 1p1d prefills remotely")
    if args.model is not None and not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    aiperf = ensure_aiperf(args.aiperf, not args.no_install)
    model_dir = (args.model or ensure_tiny_model()).resolve()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="baton-bench-serve-"))
    out = args.out or (work / "serve.json" if args.quick else ROOT / "bench" / "results" / "serve.json")
    concurrencies = sorted(set(args.concurrency))
    # Alternate which setup goes first so slow drift on the shared machine does not favour one.
    plan = [(c, s) for i, c in enumerate(concurrencies) for s in (SETUPS if i % 2 == 0 else SETUPS[::-1])]
    started = time.monotonic()
    results = run_plan(plan, aiperf, model_dir, args, work)
    text, ratios = table(results, concurrencies)
    print(f"\nmodel {model_dir.name}, prompt ~{args.isl} tokens (chat template included), {args.osl} output tokens; "
          f"1p1d = 1 prefill + 1 decode worker x 1 torch thread, colocated = 1 worker x 2 threads\n")
    print(text)
    model_cfg = json.loads((model_dir / "config.json").read_text())
    doc = {
        "loadgen": f"aiperf {results[0]['aiperf_version']}", "endpoint": "/v1/chat/completions (streaming)",
        "model": {"dir": model_dir.name, **{k: model_cfg.get(k) for k in (
            "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size")}},
        "workload": {"isl": args.isl, "osl": args.osl, "concurrency": concurrencies, "seed": args.seed,
                     "quick": args.quick},
        "setups": [asdict(s) for s in SETUPS], "results": results,
        "ratios_1p1d_over_colocated": {str(c): r for c, r in ratios.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "note": "router, workers and aiperf share these CPUs; other engineers' jobs may run too"},
        "wall_s": time.monotonic() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.quick and len(concurrencies) > 0:
        plot(results, concurrencies, out.with_suffix(".png"))
    kv = []
    for c in concurrencies:
        by = {r["setup"]: r for r in results if r["concurrency"] == c}
        kv += [f"ttft_p50_ms_1p1d_c{c}={by['1p1d']['ttft_ms_p50']:.1f}",
               f"ttft_p50_ms_coloc_c{c}={by['colocated']['ttft_ms_p50']:.1f}",
               f"itl_p50_ms_1p1d_c{c}={by['1p1d']['itl_ms_p50']:.2f}",
               f"itl_p50_ms_coloc_c{c}={by['colocated']['itl_ms_p50']:.2f}",
               f"tok_s_1p1d_c{c}={by['1p1d']['tok_s']:.1f}", f"tok_s_coloc_c{c}={by['colocated']['tok_s']:.1f}",
               f"ttft_ratio_c{c}={ratios[c]['ttft_ms_p50']:.2f}", f"itl_ratio_c{c}={ratios[c]['itl_ms_p50']:.2f}",
               f"tok_s_ratio_c{c}={ratios[c]['tok_s']:.2f}"]
    emit("serve", dict(item.split("=", 1) for item in kv), doc, out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit(130)
