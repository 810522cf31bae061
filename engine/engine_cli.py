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
    from engine.make_model import make_model

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


def generate_cmd(
    model_dir: pathlib.Path = typer.Argument(..., help="Hugging Face-format model directory."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (tokenized with BOS as the model does)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Comma-separated token ids, fed as given."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens; 0 = off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Per-request seed for reproducible sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past EOS."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: model's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (token_ids, text, ...)."),
) -> None:
    """Generate from one prompt on a single in-process engine."""
    from engine.config import EngineConfig
    from engine.errors import InvalidRequestError, ModelFilesError
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise typer.BadParameter("give exactly one of --prompt or --prompt-ids")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=list(stop), ignore_eos=ignore_eos)
        engine = LLMEngine(EngineConfig(str(model_dir), device=device, dtype=dtype, show_progress=not as_json))
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
    except (InvalidRequestError, ModelFilesError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps({"prompt_ids": ids, "token_ids": tokens, "text": "".join(text),
                               "finish_reason": reason}))
    else:
        typer.echo(f"\n[{len(tokens)} tokens, finish_reason={reason}]", err=True)


def register(app: typer.Typer) -> None:
    app.command("make-model")(make_model_cmd)
    app.command("generate")(generate_cmd)
