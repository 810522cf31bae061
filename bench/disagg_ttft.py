"""TTFT through `baton up` for long prompts: 1 prefill + 1 decode worker handing KV over `ipc` (CUDA IPC on a GPU,
shared memory on the CPU) against one colocated worker that prefills itself, both on the same device with the same
worker settings; requests streamed through the OpenAI completions API at concurrency 1 and 4.

Usage: python bench/disagg_ttft.py [--model DIR] [--device cpu|cuda] [--dtype auto] [--prompt-tokens 4096]
                                   [--requests 16] [--out FILE]
CPU smoke run (under a minute):  python bench/disagg_ttft.py --prompt-tokens 512 --requests 4 --out /tmp/t.json
8B-shaped checkpoint for the GPU: python bench/disagg_ttft.py --make-llama3-8b DIR --tokenizer-from TOKENIZER_DIR
The sequential run's greedy texts must be equal in both setups (exit 1 otherwise); at concurrency 4 the batches
differ between the setups (the colocated worker prefills beside other requests' decode steps), so bf16 rounding may
part them and their agreement is reported, not asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed baton wins over the checkout
from baton.devtools.fetch_model import models_cache_dir  # noqa: E402
from baton.devtools.local_cluster import TINY_MODEL, LocalCluster, UpOptions, free_port  # noqa: E402
from baton.engine.tokenizer import Tokenizer  # noqa: E402
from baton.worker.metrics import DECODE_STAGES, PREFILL_STAGES  # noqa: E402
from bench.report import emit  # noqa: E402

CONCURRENCIES = (1, 4)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


@dataclass(frozen=True)
class Setup:
    name: str
    prefill: int
    decode: int
    remote_prefill: bool  # the router's decider sends every bench prompt to the prefill worker


SETUPS = (Setup("disaggregated", prefill=1, decode=1, remote_prefill=True),
          Setup("colocated", prefill=0, decode=1, remote_prefill=False))


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    text: str
    prompt_tokens: int
    completion_tokens: int


def default_model() -> Path:
    """baton up's tiny random Llama with room for 4k-token prompts (its own one stops at 4096 positions)."""
    path = models_cache_dir() / "baton-tiny-llama-8k"
    if not (path / "config.json").is_file():
        from baton.devtools.make_model import make_model

        print(f"[disagg_ttft] making a small random-weight model at {path} (first run only)", flush=True)
        make_model(path, **{**TINY_MODEL, "max_position": 8192})
    return path


def make_llama3_8b(out: Path, tokenizer_from: Path, shape: dict | None = None, layers_per_shard: int = 4,
                   seed: int = 0) -> Path:
    """A random bf16 checkpoint of bench/engine_gpu.py's Llama-3-8B shape with the vocabulary, special ids and
    tokenizer files of `tokenizer_from`, written one safetensors shard at a time (never the whole 16 GB in memory).
    config.json is written last, so a directory that has one is complete."""
    import torch
    from safetensors.torch import save_file

    from bench.engine_gpu import LLAMA3_8B

    source = json.loads((tokenizer_from / "config.json").read_text())
    config = dict(shape or LLAMA3_8B, vocab_size=source["vocab_size"], bos_token_id=source.get("bos_token_id"),
                  eos_token_id=source.get("eos_token_id"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, out / name)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # randn of 8B values takes minutes on a CPU
    gen = torch.Generator(device).manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    def norm() -> torch.Tensor:  # not all ones, as baton.devtools.make_model's
        return (1.0 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(torch.bfloat16).cpu()

    layers = config["num_hidden_layers"]
    groups = [range(i, min(i + layers_per_shard, layers)) for i in range(0, layers, layers_per_shard)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        tensors = {"model.embed_tokens.weight": matrix(vocab, hidden)} if k == 1 else {}
        for i in group:
            p = f"model.layers.{i}."
            tensors.update({p + "self_attn.q_proj.weight": matrix(hidden, hidden),
                            p + "self_attn.k_proj.weight": matrix(kv, hidden),
                            p + "self_attn.v_proj.weight": matrix(kv, hidden),
                            p + "self_attn.o_proj.weight": matrix(hidden, hidden),
                            p + "mlp.gate_proj.weight": matrix(inter, hidden),
                            p + "mlp.up_proj.weight": matrix(inter, hidden),
                            p + "mlp.down_proj.weight": matrix(hidden, inter),
                            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm()})
        if k == len(groups):
            tensors.update({"model.norm.weight": norm(), "lm_head.weight": matrix(vocab, hidden)})
        filename = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"[disagg_ttft] {out / filename} ({k}/{len(groups)})", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def make_prompts(tokenizer: Tokenizer, count: int, tokens: int, seed: int, tag: str) -> list[list[int]]:
    """`count` distinct prompts of exactly `tokens` ids as the model's tokenizer encodes them: random non-special
    tokens decoded to text and encoded again, after a per-prompt header, so no two share a KV block."""
    rng = random.Random(seed)
    pool = [i for i in range(tokenizer.vocab_size) if i not in tokenizer.all_special_ids]
    prompts = []
    for n in range(count):
        ids: list[int] = []
        text = f"{tag} request {n}:"
        while len(ids) < tokens:
            text += tokenizer.decode(rng.choices(pool, k=tokens), skip_special_tokens=True)
            ids = tokenizer.encode(text)
        prompts.append(ids[:tokens])
    return prompts


async def stream_one(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> Sample:
    """One streamed completion; TTFT is the time to the first chunk with text (the router sends no empty ones)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, parts, usage = None, [], None
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:500]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    first = first or time.perf_counter()
                    parts.append(choice["text"])
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    if first is None or usage is None:
        raise RuntimeError(f"stream without {'text' if first is None else 'usage'}")
    return Sample(first - started, end - started, "".join(parts), usage["prompt_tokens"], usage["completion_tokens"])


async def run_load(url: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> list[Sample]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(prompt: list[int]) -> Sample:
            async with gate:
                return await stream_one(client, model, prompt, max_tokens)

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for got, value in re.findall(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', got))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def scrape(cluster: LocalCluster) -> dict[str, str]:
    """The router's and every worker's /metrics text, by pool (one worker per pool in these setups)."""
    texts = {r.pool: httpx.get(f"http://{r.http_address}/metrics", timeout=10).text for r in cluster.workers()}
    return {"router": httpx.get(f"{cluster.url}/metrics", timeout=10).text, **texts}


def window_mean(before: str, after: str, name: str, **labels: str) -> float | None:
    """Mean of histogram `name` over the observations made between two scrapes of one worker."""
    count = metric_sum(after, f"{name}_count", **labels) - metric_sum(before, f"{name}_count", **labels)
    if not count:
        return None
    return (metric_sum(after, f"{name}_sum", **labels) - metric_sum(before, f"{name}_sum", **labels)) / count


def stage_means_ms(before: dict[str, str], after: dict[str, str]) -> dict[str, float]:
    """Where the time to the first token went between two scrapes, in mean ms: the first token as the router and as
    the decode worker saw it (arrival to first token out), each stage of a remote prefill on its worker, and on the
    worker that prefilled, its engine prefill (first step to first token) and its KV send as the transport timed it."""
    prefiller = "prefill" if "prefill" in after else "decode"
    out: dict[str, float | None] = {
        "router_ttft": window_mean(before["router"], after["router"], "baton_router_time_to_first_token_seconds"),
        "worker_ttft": window_mean(before["decode"], after["decode"], "baton_worker_time_to_first_token_seconds"),
        "engine_prefill": window_mean(before[prefiller], after[prefiller],
                                      "baton_worker_request_prefill_time_seconds"),
        "kv_send": window_mean(before[prefiller], after[prefiller], "baton_kv_transfer_seconds")}
    for pool, stages in (("decode", DECODE_STAGES), ("prefill", PREFILL_STAGES)):
        for stage in stages if pool in after else ():
            out[f"{pool}.{stage}"] = window_mean(before[pool], after[pool],
                                                 "baton_worker_remote_prefill_stage_seconds", stage=stage)
    return {k: round(v * 1e3, 3) for k, v in out.items() if v is not None}


def handoff_counts(cluster: LocalCluster) -> dict[str, float]:
    """What says where prompts were prefilled: the router's prefill-pool decisions and the KV bytes each pool's
    workers moved through any transport (a remote prefill counts on both sides of the hand-off)."""
    texts = scrape(cluster)
    router = texts.pop("router")
    out = {"router_prefill_decisions": metric_sum(router, "baton_router_decisions_total", pool="prefill"),
           "router_decode_decisions": metric_sum(router, "baton_router_decisions_total", pool="decode"),
           "kv_bytes_prefill": 0.0, "kv_bytes_decode": 0.0}
    for pool, text in texts.items():
        out[f"kv_bytes_{pool}"] += metric_sum(text, "baton_kv_transfer_bytes_total")
    return out


def summarize(samples: list[Sample]) -> dict:
    ttft = np.array([s.ttft_s for s in samples]) * 1e3
    return {"ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p90": float(np.percentile(ttft, 90)),
            "ttft_ms_mean": float(ttft.mean()), "e2e_ms_mean": float(np.mean([s.e2e_s for s in samples]) * 1e3),
            "requests": len(samples)}


def bench_setup(setup: Setup, args, model_dir: Path, prompts: dict[int, list[list[int]]],
                warmup: dict[int, list[list[int]]],
                work: Path) -> tuple[dict, dict[int, list[Sample]]]:
    """Starts the setup's cluster, warms it up, runs every concurrency, checks where prompts were prefilled."""
    settings = {"device": args.device, "dtype": args.dtype, "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.device == "cuda":
        settings["gpu_memory_utilization"] = args.gpu_memory_utilization
    # On the CPU the two setups get the same torch threads in all.
    threads = max(1, args.threads // (setup.prefill + setup.decode))
    cluster = LocalCluster(UpOptions(
        model=model_dir, prefill=setup.prefill, decode=setup.decode, kv_transport="ipc",
        local_prefill_threshold=0 if setup.remote_prefill else args.prompt_tokens, torch_threads=threads,
        port=free_port(), grpc_port=free_port(), controlplane_port=free_port(), worker_settings=settings,
        run_dir=work / setup.name, ready_timeout_s=900 if args.device == "cuda" else 180))
    started = time.perf_counter()
    try:
        cluster.start()
        up_s = time.perf_counter() - started
        print(f"[disagg_ttft] {setup.name}: cluster up in {up_s:.0f}s (logs {cluster.run_dir})", flush=True)
        # Compiles kernels, captures graphs and maps the peer's KV pool outside the timed runs.
        scrapes = [scrape(cluster)]
        # At every concurrency: there a colocated worker runs prompt chunks beside other requests' decode rows, in
        # batches of their own shapes (kernel variants to compile). Warmed up at c=1 only, the H200 run's colocated
        # c=4 TTFT had p90 3.4 s against p50 157 ms.
        for c in CONCURRENCIES:
            asyncio.run(run_load(cluster.url, cluster.model_name, warmup[c], c, args.max_tokens))
        scrapes.append(scrape(cluster))
        stages = {"warmup": stage_means_ms(*scrapes[-2:])}
        runs = {}
        for c in CONCURRENCIES:
            runs[c] = asyncio.run(run_load(cluster.url, cluster.model_name, prompts[c], c, args.max_tokens))
            scrapes.append(scrape(cluster))
            stages[f"c{c}"] = stage_means_ms(*scrapes[-2:])
            s = summarize(runs[c])
            print(f"[disagg_ttft] {setup.name} c={c}: TTFT p50 {s['ttft_ms_p50']:.1f} ms, "
                  f"p90 {s['ttft_ms_p90']:.1f} ms; mean ms by stage {stages[f'c{c}']}", flush=True)
        print(f"[disagg_ttft] {setup.name} warm-up: mean ms by stage {stages['warmup']}", flush=True)
        handoffs = handoff_counts(cluster)
    finally:
        cluster.stop()
    sent = sum(len(p) for p in warmup.values()) + sum(len(p) for p in prompts.values())
    for c, samples in runs.items():
        wrong = [(s.prompt_tokens, s.completion_tokens) for s in samples
                 if (s.prompt_tokens, s.completion_tokens) != (args.prompt_tokens, args.max_tokens)]
        if wrong:
            raise RuntimeError(f"{setup.name} c={c}: usage (prompt, completion) tokens {wrong[:3]}, expected "
                               f"({args.prompt_tokens}, {args.max_tokens})")
    remote = handoffs["router_prefill_decisions"]
    if setup.remote_prefill and not (remote == sent and handoffs["kv_bytes_prefill"] > 0
                                     and handoffs["kv_bytes_decode"] > 0):
        raise RuntimeError(f"{setup.name}: {remote:.0f}/{sent} requests prefilled remotely, KV bytes moved "
                           f"{handoffs}: the prompts did not all take the prefill worker")
    if not setup.remote_prefill and (remote or handoffs["kv_bytes_decode"]):
        raise RuntimeError(f"{setup.name}: {remote:.0f} remote prefills, KV bytes {handoffs}; expected none")
    return {"setup": asdict(setup), "startup_s": up_s, "handoffs": handoffs, "stage_means_ms": stages,
            "requests_sent": sent,
            **{f"c{c}": summarize(s) for c, s in runs.items()}}, runs


def fmt(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def table(results: dict[str, dict]) -> tuple[str, dict]:
    cols = ("ttft_ms_p50", "ttft_ms_p90", "e2e_ms_mean")
    lines = ["| concurrency | setup | TTFT p50 ms | TTFT p90 ms | e2e mean ms |", "|---:|---|---:|---:|---:|"]
    ratios = {}
    for c in CONCURRENCIES:
        for name, r in results.items():
            lines.append(f"| {c} | {name} | " + " | ".join(fmt(r[f'c{c}'][k]) for k in cols) + " |")
        d, o = results["disaggregated"][f"c{c}"], results["colocated"][f"c{c}"]
        ratios[c] = {k: d[k] / o[k] for k in cols}
        lines.append(f"| {c} | disagg / coloc | " + " | ".join(f"{ratios[c][k]:.2f}x" for k in cols) + " |")
    return "\n".join(lines), ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="Hugging Face-format model dir (default: a tiny random Llama, made "
                                              "on first use)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="workers' dtype (auto: the checkpoint's)")
    p.add_argument("--prompt-tokens", type=int, default=4096, help="tokens of every prompt, as the model tokenizes")
    p.add_argument("--requests", type=int, default=16, help="measured requests per setup and concurrency")
    p.add_argument("--warmup", type=int, default=2, help="untimed full-length requests at each concurrency first "
                                                         "(at least as many as the concurrency, unless 0)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request (ignore_eos)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="share of the GPU of each worker")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="workers' chunked-prefill budget")
    p.add_argument("--threads", type=int, default=2, help="torch threads of all workers of a setup together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/disagg_ttft.json)")
    p.add_argument("--work-dir", type=Path, help="keep the clusters' logs here (default: a temp dir)")
    p.add_argument("--make-llama3-8b", type=Path, metavar="DIR",
                   help="only write a random Llama-3-8B-shaped bf16 checkpoint (bench/engine_gpu.py's shape) to DIR "
                        "with --tokenizer-from's tokenizer and vocabulary, then exit")
    p.add_argument("--tokenizer-from", type=Path, metavar="DIR",
                   help="with --make-llama3-8b: a model dir whose config.json and tokenizer files to use")
    args = p.parse_args(argv)
    if args.make_llama3_8b is not None:
        if args.tokenizer_from is None or not (args.tokenizer_from / "config.json").is_file():
            p.error("--make-llama3-8b needs --tokenizer-from DIR with config.json and tokenizer.json")
        return args
    for name in ("prompt_tokens", "requests", "max_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or not 0 < args.gpu_memory_utilization <= 1:
        p.error("--warmup must be >= 0 and --gpu-memory-utilization in (0, 1]")
    if args.model is not None and not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_llama3_8b is not None:
        make_llama3_8b(args.make_llama3_8b, args.tokenizer_from)
        return 0
    model_dir = (args.model or default_model()).resolve()
    model_cfg = json.loads((model_dir / "config.json").read_text())
    if args.prompt_tokens + args.max_tokens > model_cfg.get("max_position_embeddings", 1 << 30):
        raise RuntimeError(f"{model_dir.name} has {model_cfg['max_position_embeddings']} positions, fewer than "
                           f"--prompt-tokens + --max-tokens")
    tokenizer = Tokenizer.from_dir(model_dir)
    prompts = {c: make_prompts(tokenizer, args.requests, args.prompt_tokens, args.seed + c, f"c{c}")
               for c in CONCURRENCIES}
    warmup = {c: make_prompts(tokenizer, max(args.warmup, c) if args.warmup else 0, args.prompt_tokens,
                              args.seed + 1000 + c, f"warm-up c{c}") for c in CONCURRENCIES}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="baton-bench-disagg-ttft-"))
    started = time.monotonic()
    results, texts = {}, {}
    for setup in SETUPS:
        results[setup.name], runs = bench_setup(setup, args, model_dir, prompts, warmup, work)
        texts[setup.name] = {c: [s.text for s in samples] for c, samples in runs.items()}
    agree = {c: sum(a == b for a, b in zip(texts["disaggregated"][c], texts["colocated"][c])) for c in CONCURRENCIES}
    text, ratios = table(results)
    device = "cpu"
    if args.device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    print(f"\nmodel {model_dir.name} on {device} ({args.dtype}), {args.prompt_tokens}-token prompts, "
          f"{args.max_tokens} output tokens, {args.requests} requests per row; disaggregated = 1 prefill + 1 decode "
          f"worker (KV over ipc), colocated = 1 worker prefilling itself\n")
    print(text)
    print("\ngreedy texts equal in both setups: "
          + ", ".join(f"c={c} {agree[c]}/{args.requests}" for c in CONCURRENCIES))
    doc = {
        "endpoint": "/v1/completions (streaming, prompt as token ids)", "device": device,
        "model": {"dir": model_dir.name, "dtype": args.dtype, **{k: model_cfg.get(k) for k in (
            "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size")}},
        "workload": {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "requests": args.requests,
                     "warmup": {str(c): len(p) for c, p in warmup.items()}, "concurrency": list(CONCURRENCIES),
                     "seed": args.seed},
        "worker_settings": {"gpu_memory_utilization": args.gpu_memory_utilization if args.device == "cuda" else None,
                            "max_num_batched_tokens": args.max_num_batched_tokens, "threads_per_setup": args.threads,
                            "kv_transport": "ipc"},
        "results": results, "ratios_disaggregated_over_colocated": {str(c): r for c, r in ratios.items()},
        "greedy_texts_equal": {str(c): agree[c] for c in CONCURRENCIES},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "wall_s": time.monotonic() - started,
    }
    headline = {"device": args.device, "prompt_tokens": args.prompt_tokens}
    for c in CONCURRENCIES:
        headline.update({f"ttft_p50_ms_disagg_c{c}": round(results["disaggregated"][f"c{c}"]["ttft_ms_p50"], 1),
                         f"ttft_p50_ms_coloc_c{c}": round(results["colocated"][f"c{c}"]["ttft_ms_p50"], 1),
                         f"ttft_ratio_c{c}": round(ratios[c]["ttft_ms_p50"], 3)})
    headline["greedy_equal_c1"] = f"{agree[1]}/{args.requests}"
    emit("disagg_ttft", headline, doc, args.out)
    if agree[1] != args.requests:
        print(f"error: sequential greedy texts differ between the setups for {args.requests - agree[1]} of "
              f"{args.requests} prompts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit(130)
