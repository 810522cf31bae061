"""`baton make-model` and `baton generate`: checkpoints made offline, and one-shot generation on the engine."""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Optional

import typer


def make_model_cmd(
    out_dir: pathlib.Path = typer.Argument(..., help="Directory to write the checkpoint into."),
    arch: str = typer.Option("llama", "--arch", help="llama | qwen2 | qwen3 | mistral"),
    layers: int = typer.Option(2, "--layers", min=1, help="Decoder layers."),
    hidden: int = typer.Option(64, "--hidden", min=8, help="Hidden size."),
    heads: int = typer.Option(4, "--heads", min=1, help="Attention heads."),
    kv_heads: int = typer.Option(2, "--kv-heads", min=1, help="Key/value heads (GQA)."),
    vocab: int = typer.Option(512, "--vocab", min=300, help="Vocabulary size, special tokens included."),
    intermediate: Optional[int] = typer.Option(None, "--intermediate", help="MLP size (default 3x hidden)."),
    max_position: int = typer.Option(2048, "--max-position", help="max_position_embeddings."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    tie: bool = typer.Option(False, "--tie/--no-tie", help="Tie input and output embeddings."),
    seed: int = typer.Option(0, "--seed", help="Weight and tokenizer seed."),
    shards: int = typer.Option(1, "--shards", min=1, help="Number of safetensors shards."),
) -> None:
    """Write a random-weight Hugging Face-format checkpoint with a real BPE tokenizer (no download)."""
    from baton.devtools.make_model import make_model

    try:
        path = make_model(out_dir, arch=arch, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                          vocab=vocab, intermediate=intermediate, max_position=max_position, dtype=dtype,
                          tie_embeddings=tie, seed=seed, shards=shards)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {arch} checkpoint to {path}")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter("--prompt-ids takes comma-separated integers, e.g. 1,2,3") from None


def _check_kv_cache_dtype(value: str, calculate_kv_scales: bool = False) -> None:
    """One line naming the flag and exit 2, before any model is loaded or process started."""
    from baton.engine.config import KV_CACHE_DTYPES

    if value not in KV_CACHE_DTYPES:
        typer.echo(f"error: --kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}", err=True)
        raise typer.Exit(2)
    if calculate_kv_scales and KV_CACHE_DTYPES[value] is None:
        typer.echo(f"error: --calculate-kv-scales needs --kv-cache-dtype fp8 (the scales are an FP8 KV cache's), "
                   f"got {value!r}", err=True)
        raise typer.Exit(2)


def generate_cmd(
    model: str = typer.Argument(..., help="A model directory, a Hugging Face Hub id, or smollm2."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (tokenized with BOS as the model does)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Comma-separated token ids, fed as given."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens; 0 = off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Per-request seed for reproducible sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past EOS."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when a GPU is visible) | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's) | half | float16 | bfloat16 | float | "
                              "float32."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype", help="auto (the model's dtype) | fp8 | fp8_e4m3 "
                                       "(float8 e4m3 KV cache, per-layer scales)."),
    calculate_kv_scales: bool = typer.Option(False, "--calculate-kv-scales", help="With --kv-cache-dtype fp8 and "
                                             "no scales in the checkpoint: measure each layer's K and V scale at "
                                             "start-up on a built-in calibration text."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (token_ids, text, ...)."),
) -> None:
    """Generate from one prompt on a single in-process engine."""
    from baton.devtools.fetch_model import resolve_any_model
    from baton.engine.config import EngineConfig
    from baton.engine.errors import InvalidRequestError, ModelFilesError
    from baton.engine.llm_engine import LLMEngine
    from baton.engine.model_files import check_model_dir
    from baton.engine.sampling_params import SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise typer.BadParameter("give exactly one of --prompt or --prompt-ids")
    _check_kv_cache_dtype(kv_cache_dtype, calculate_kv_scales)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=list(stop), ignore_eos=ignore_eos)
        model_dir, _ = resolve_any_model(model)
        check_model_dir(model_dir)
        engine = LLMEngine(EngineConfig(str(model_dir), device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                                        calculate_kv_scales=calculate_kv_scales, show_progress=not as_json))
        if prompt_ids is not None:
            ids = _parse_ids(prompt_ids)
        else:
            if engine.tokenizer is None:
                raise InvalidRequestError(f"{model_dir} has no tokenizer.json; use --prompt-ids")
            ids = engine.tokenizer.encode(prompt)
        engine.add_request("cli", ids, params)
        text, tokens, reason = [], [], None
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
                text.append(out.text)
                if not as_json:
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
                reason = out.finish_reason or reason
    except (InvalidRequestError, ModelFilesError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps({"prompt_ids": ids, "token_ids": tokens, "text": "".join(text),
                               "finish_reason": reason}))
    else:
        typer.echo(f"\n[{len(tokens)} tokens, finish_reason={reason}]", err=True)


def fetch_model_cmd(
    model: str = typer.Argument("smollm2", help="smollm2 (SmolLM2-135M-Instruct) or a Hugging Face Hub id."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit of a Hub id."),
) -> None:
    """Download a model once and print its directory: smollm2 is converted into ~/.cache/baton/models, a Hub id goes
    into the Hugging Face cache (HF_HOME), where --model ID then finds it, offline too."""
    from baton.devtools.fetch_model import resolve_any_model
    from baton.engine.errors import ModelFilesError

    try:
        path, _ = resolve_any_model(model, revision)
    except (ModelFilesError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(str(path))


def up_cmd(
    model: str = typer.Option("smollm2", "--model", help="smollm2 (SmolLM2-135M-Instruct, fetched and converted "
                              "on first use), a model directory, or a Hugging Face Hub id."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit of a Hub id."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model id clients send "
                                                    "(default: the Hub id or the directory name)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Router bind address (0.0.0.0: all interfaces)."),
    device: str = typer.Option("auto", "--device", help="Workers' device: auto (cuda when a GPU is visible) | cpu | "
                               "cuda | cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's) | half | float16 | bfloat16 | "
                              "float | float32."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype", help="Workers' KV cache: auto (the model's "
                                       "dtype) | fp8 | fp8_e4m3 (float8 e4m3, per-layer scales; half the bytes)."),
    calculate_kv_scales: bool = typer.Option(False, "--calculate-kv-scales", help="With --kv-cache-dtype fp8 and "
                                             "no scales in the checkpoint: workers measure each layer's K and V "
                                             "scale at start-up on a built-in calibration text."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1, help="Context length in tokens "
                                                "(default: the model's)."),
    gpu_memory_utilization: Optional[float] = typer.Option(
        None, "--gpu-memory-utilization", help="Share of the GPU each worker may take (default: 0.9 split evenly "
        "over the most workers the pools may run)."),
    block_size: int = typer.Option(16, "--block-size", help="KV block size in tokens."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", min=1, help="Max requests in a worker's "
                                               "batch (default: 64)."),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching",
                                               help="Reuse KV blocks of prompts that share a prefix."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="No CUDA graphs for decode steps."),
    quantization: str = typer.Option("none", "--quantization", help="fp8: decoder projections in FP8 (e4m3, "
                                     "per-channel scales), quantized at load; none: the checkpoint's weights."),
    fp8_all_layers: bool = typer.Option(False, "--fp8-all-layers", help="With --quantization fp8: the first and "
                                        "last decoder layers in FP8 too (kept in the model dtype by default)."),
    fp8_lm_head: bool = typer.Option(False, "--fp8-lm-head", help="With --quantization fp8: the LM head in FP8 too."),
    fp8_weight_only: bool = typer.Option(False, "--fp8-weight-only", help="FP8 layers keep bf16 activations in "
                                         "prefill and larger batches too (W8A16: quality over prefill speed)."),
    speculative_method: str = typer.Option("off", "--speculative-method", help="Decode workers' default "
                                           "speculation for requests that don't choose: ngram | draft | off."),
    num_speculative_tokens: int = typer.Option(4, "--num-speculative-tokens", min=1, max=16,
                                               help="Tokens proposed per speculative step."),
    speculative_model: Optional[str] = typer.Option(None, "--speculative-model", help="Draft model directory "
                                                    "(same tokenizer) for --speculative-method draft."),
    row_invariant_verification: bool = typer.Option(
        False, "--row-invariant-verification", help="GPU: decode steps of up to 8 rows compute every row alike, so "
        "bf16 greedy output with speculation equals greedy output without it (slower decode at batches 2-8)."),
    speculative_disable_by_batch_size: Optional[int] = typer.Option(
        None, "--speculative-disable-by-batch-size", min=1, help="Steps of a batch of more running requests than "
        "this do not speculate (default: any batch does)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Jinja chat template, or a file "
                                                "holding one; replaces the model's own."),
    tool_call_parser: Optional[str] = typer.Option(None, "--tool-call-parser", help="How chat answers hold tool "
                                                   "calls: hermes (default) | llama3_json."),
    prefill: int = typer.Option(1, "--prefill", min=0, help="Prefill workers."),
    decode: int = typer.Option(1, "--decode", min=0, help="Decode workers (0: an embedding-only cluster)."),
    embed_workers: int = typer.Option(0, "--embed", "--embed-workers", min=0, help="Embedding workers "
                                      "(POST /v1/embeddings)."),
    max_batch_delay_ms: Optional[float] = typer.Option(None, "--max-batch-delay-ms", min=0, help="Embedding "
                                                       "workers: longest wait for more inputs per forward (5)."),
    max_prefill: Optional[int] = typer.Option(None, "--max-prefill", help="Let the control plane scale prefill "
                                              "up to this many workers (default: --prefill)."),
    max_decode: Optional[int] = typer.Option(None, "--max-decode", help="Likewise for decode workers."),
    max_embed: Optional[int] = typer.Option(None, "--max-embed", help="Likewise for embedding workers."),
    port: int = typer.Option(8000, "--port", help="Router HTTP port (OpenAI API)."),
    grpc_port: int = typer.Option(50051, "--grpc-port", help="Router gRPC port."),
    controlplane_port: int = typer.Option(8090, "--controlplane-port", help="Control plane admin HTTP port."),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="Use this Redis instead of starting one."),
    routing: str = typer.Option("kv_aware", "--routing", help="kv_aware | least_load | round_robin"),
    kv_transport: str = typer.Option("auto", "--kv-transport",
                                     help="workers' KV transports in order of preference (ipc,tcp,nixl); "
                                          "auto = ipc on the same host, else tcp"),
    kv_layerwise: bool = typer.Option(False, "--kv-layerwise", help="Prefill workers copy each layer's KV into "
                                      "the decode worker while later layers still run (ipc transport)."),
    local_prefill_threshold: int = typer.Option(64, "--local-prefill-threshold",
                                                help="Prompts with fewer uncached tokens prefill on the decode "
                                                     "worker."),
    ray: bool = typer.Option(False, "--ray", help="Run the workers as Ray actors on a local Ray cluster."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster instead."),
    run_dir: Optional[pathlib.Path] = typer.Option(None, "--run-dir", help="Where logs and the policy go."),
) -> None:
    """Start a whole local cluster (Redis, router, control plane, prefill + decode workers) and serve."""
    import signal
    import threading

    from baton.devtools.local_cluster import LocalCluster, UpOptions
    from baton.engine.errors import ModelFilesError
    from baton.engine.model_files import check_model_dir

    _check_kv_cache_dtype(kv_cache_dtype, calculate_kv_scales)
    workers = {"device": device, "dtype": dtype, "max_num_seqs": max_num_seqs,
               "enable_prefix_caching": enable_prefix_caching, "enforce_eager": enforce_eager}
    if quantization != "none":
        workers["quantization"] = quantization
    for flag, on in (("--fp8-all-layers", fp8_all_layers), ("--fp8-lm-head", fp8_lm_head)):
        if on and quantization != "fp8":
            typer.echo(f"error: {flag} needs --quantization fp8, got {quantization!r}", err=True)
            raise typer.Exit(2)
        if on:
            workers[flag[2:].replace("-", "_")] = True
    if fp8_weight_only:  # an FP8 checkpoint needs no --quantization: the worker refuses a model without FP8 layers
        workers["fp8_weight_only"] = True
    if kv_cache_dtype != "auto":
        workers["kv_cache_dtype"] = kv_cache_dtype
    if calculate_kv_scales:
        workers["calculate_kv_scales"] = True
    if speculative_method != "off":
        workers |= {"speculative_method": speculative_method, "num_speculative_tokens": num_speculative_tokens,
                    "speculative_model": speculative_model}
    if speculative_disable_by_batch_size is not None:
        workers["speculative_disable_by_batch_size"] = speculative_disable_by_batch_size
    if row_invariant_verification:
        workers["row_invariant_verification"] = True
    if gpu_memory_utilization is not None:
        workers["gpu_memory_utilization"] = gpu_memory_utilization
    if kv_layerwise:
        workers["kv_layerwise"] = True
    if max_batch_delay_ms is not None:
        workers["max_batch_delay_ms"] = max_batch_delay_ms
    if max_embed and not embed_workers:
        typer.echo("error: --max-embed needs --embed 1 or more (embed workers report the pool's load themselves)",
                   err=True)
        raise typer.Exit(2)
    if decode == 0 and embed_workers == 0:
        typer.echo("error: --decode 0 needs --embed N (a cluster must serve something)", err=True)
        raise typer.Exit(2)
    try:
        cluster = LocalCluster(UpOptions(
            model=model, revision=revision, served_model_name=served_model_name, host=host,
            chat_template=chat_template, tool_call_parser=tool_call_parser, block_size=block_size,
            max_model_len=max_model_len, worker_settings=workers,
            prefill=prefill, decode=decode, embed=embed_workers, max_prefill=max_prefill, max_decode=max_decode,
            max_embed=max_embed,
            port=port,
            grpc_port=grpc_port, controlplane_port=controlplane_port, redis_url=redis_url, routing=routing,
            kv_transport=kv_transport, local_prefill_threshold=local_prefill_threshold, ray=ray or bool(ray_address),
            ray_address=ray_address, run_dir=run_dir))
        check_model_dir(cluster.model_dir)  # before any process starts: one line, not a worker failing later
    except (ModelFilesError, RuntimeError, ValueError) as exc:  # an unknown model, no package index or Hub
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        typer.echo(f"[baton] starting: {prefill} prefill + {decode} decode + {embed_workers} embed workers, "
                   f"model {cluster.model_dir}, logs in {cluster.run_dir}")
        cluster.start()
        example = (f'/v1/chat/completions -H \'Content-Type: application/json\' -d \'{{"model": \\\n    '
                   f'"{cluster.model_name}", "messages": [{{"role": "user", "content": "What is the capital of France?"'
                   f'}}]}}\'' if decode else
                   f'/v1/embeddings -H \'Content-Type: application/json\' -d \'{{"model": \\\n    '
                   f'"{cluster.model_name}", "input": ["What is the capital of France?"]}}\'')
        typer.echo(f"""[baton] ready at {cluster.url}  (OpenAI API; gRPC on :{grpc_port}; control plane on \
:{controlplane_port}, token in BATON_CONTROLPLANE_TOKEN={cluster.admin_token})
  curl {cluster.url}{example}
Press Ctrl-C to stop.""")
        stop.wait()
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    finally:
        typer.echo("[baton] stopping...")
        cluster.stop()


def register(app: typer.Typer) -> None:
    app.command("make-model")(make_model_cmd)
    app.command("generate")(generate_cmd)
    app.command("fetch-model")(fetch_model_cmd)
    app.command("up")(up_cmd)
