"""Write a random-weight Hugging Face-format checkpoint (config, safetensors, real tokenizer) with no
download, so every part of Baton can run and be tested offline. `transformers` is not imported here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from baton.devtools.tokenizer_training import write_tokenizer_files
from baton.engine.config import DTYPES

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# Published defaults for each family, so a loader that ignores a field gets different numbers.
_ROPE_THETA = {"llama": 500000.0, "mistral": 1000000.0, "qwen2": 1000000.0, "qwen3": 1000000.0}
_RMS_EPS = {"llama": 1e-5, "mistral": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6}
# Llama-3.1's published scaling factors, used when rope_scaling="llama3".
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _rope_scaling(rope_scaling, max_position: int) -> dict | None:
    if rope_scaling is None:
        return None
    if rope_scaling == "llama3":
        # A quarter of the context, so that a tiny model still has frequencies in every band
        # (kept, smoothed, scaled) and a loader that ignores scaling gets different logits.
        return {**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": max(1, max_position // 4)}
    if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type") == "llama3":
        missing = {*LLAMA3_ROPE_SCALING, "original_max_position_embeddings"} - set(rope_scaling)
        if missing:
            raise ValueError(f"rope_scaling is missing {sorted(missing)}")
        if rope_scaling["original_max_position_embeddings"] >= max_position:
            raise ValueError(
                f"rope_scaling original_max_position_embeddings={rope_scaling['original_max_position_embeddings']} "
                f"must be less than max_position={max_position}"
            )
        return dict(rope_scaling)
    raise ValueError(f"rope_scaling must be None, 'llama3' or a dict with rope_type 'llama3', got {rope_scaling!r}")


def _config(arch, layers, hidden, heads, kv_heads, vocab, intermediate, head_dim, max_position, dtype,
            tie_embeddings, rope_theta, rope_scaling, rope_style, special_ids) -> dict:
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _RMS_EPS[arch],
        "max_position_embeddings": max_position,
        "vocab_size": vocab,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": special_ids["bos_token_id"],
        "eos_token_id": special_ids["eos_token_id"],
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "sliding_window": None,
    }
    if arch in ("llama", "qwen3"):
        config["attention_bias"] = False
    if arch == "llama":
        config["mlp_bias"] = False
    if arch in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
        config["max_window_layers"] = layers
    if rope_style == "classic":
        config["rope_theta"] = rope_theta
        config["rope_scaling"] = rope_scaling
        config["torch_dtype"] = dtype
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
        config["dtype"] = dtype
    return config


def _weights(arch, layers, hidden, heads, kv_heads, vocab, intermediate, head_dim, tie_embeddings, seed,
             dtype) -> dict[str, torch.Tensor]:
    """HF parameter names → tensors: matrices and biases ~ N(0, 0.02), norm weights 1 + 0.1·N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def matrix(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def norm(size):
        # Not all ones: a loader that skips or misplaces a norm weight must change the logits.
        return (1.0 + 0.1 * torch.randn(size, generator=gen)).to(dtype)

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    tensors = {"model.embed_tokens.weight": matrix(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = matrix(q_out, hidden)
        tensors[p + "self_attn.k_proj.weight"] = matrix(kv_out, hidden)
        tensors[p + "self_attn.v_proj.weight"] = matrix(kv_out, hidden)
        if arch == "qwen2":
            tensors[p + "self_attn.q_proj.bias"] = matrix(q_out)
            tensors[p + "self_attn.k_proj.bias"] = matrix(kv_out)
            tensors[p + "self_attn.v_proj.bias"] = matrix(kv_out)
        tensors[p + "self_attn.o_proj.weight"] = matrix(hidden, q_out)
        if arch == "qwen3":
            tensors[p + "self_attn.q_norm.weight"] = norm(head_dim)
            tensors[p + "self_attn.k_norm.weight"] = norm(head_dim)
        tensors[p + "mlp.gate_proj.weight"] = matrix(intermediate, hidden)
        tensors[p + "mlp.up_proj.weight"] = matrix(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = matrix(hidden, intermediate)
        tensors[p + "input_layernorm.weight"] = norm(hidden)
        tensors[p + "post_attention_layernorm.weight"] = norm(hidden)
    tensors["model.norm.weight"] = norm(hidden)
    if not tie_embeddings:
        tensors["lm_head.weight"] = matrix(vocab, hidden)
    return tensors


def _save_weights(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return
    if shards > len(tensors):
        raise ValueError(f"shards={shards} is more than the {len(tensors)} tensors in this model")
    # Contiguous runs of roughly equal bytes in parameter order, like HF's save_pretrained.
    names = list(tensors)
    cumulative = [0]
    for name in names:
        cumulative.append(cumulative[-1] + tensors[name].numel() * tensors[name].element_size())
    total = cumulative[-1]
    groups, start = [], 0
    for k in range(1, shards):
        end = start + 1
        # Stop early enough that every later shard still gets at least one tensor.
        while end < len(names) - (shards - k) and cumulative[end] < total * k / shards:
            end += 1
        groups.append(names[start:end])
        start = end
    groups.append(names[start:])
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        filename = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(group, filename))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_model(
    out_dir: str | Path,
    arch: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    intermediate: int | None = None,
    head_dim: int | None = None,
    max_position: int = 2048,
    dtype: str = "float32",
    tie_embeddings: bool = False,
    seed: int = 0,
    shards: int = 1,
    rope_scaling: dict | str | None = None,
    rope_style: str = "classic",
    rope_theta: float | None = None,
    chat_template_file: bool | None = None,
) -> Path:
    """Write a checkpoint to `out_dir` and return its path.

    `rope_style="classic"` writes `rope_theta`/`rope_scaling` (most published checkpoints);
    `"parameters"` writes the newer `rope_parameters`. `rope_scaling="llama3"` adds Llama-3.1
    scaling. qwen3 gets an explicit `head_dim` of twice hidden/heads unless given, so code that
    derives it from hidden/heads fails. The chat template goes to chat_template.jinja for qwen3 and
    into tokenizer_config.json otherwise, unless `chat_template_file` says which.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    for name, value in (("layers", layers), ("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads),
                        ("max_position", max_position), ("shards", shards)):
        _positive(name, value)
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if rope_style not in ("classic", "parameters"):
        raise ValueError(f"rope_style must be 'classic' or 'parameters', got {rope_style!r}")
    if (head_dim is None or arch == "llama") and hidden % heads:
        raise ValueError(f"hidden={hidden} must be a multiple of heads={heads}")
    if head_dim is None:
        head_dim = 2 * (hidden // heads) if arch == "qwen3" else hidden // heads
    _positive("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    intermediate = 3 * hidden if intermediate is None else intermediate
    _positive("intermediate", intermediate)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rope_theta = _ROPE_THETA[arch] if rope_theta is None else float(rope_theta)
    if not math.isfinite(rope_theta) or rope_theta <= 0:
        raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
    scaling = _rope_scaling(rope_scaling, max_position)
    if chat_template_file is None:
        chat_template_file = arch == "qwen3"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    special_ids = write_tokenizer_files(out, arch, vocab, chat_template_file)
    config = _config(arch, layers, hidden, heads, kv_heads, vocab, intermediate, head_dim, max_position,
                     dtype, tie_embeddings, rope_theta, scaling, rope_style, special_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": special_ids["bos_token_id"],
        "eos_token_id": special_ids["gen_eos_token_ids"],
        "pad_token_id": special_ids["pad_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = _weights(arch, layers, hidden, heads, kv_heads, vocab, intermediate, head_dim, tie_embeddings,
                       seed, DTYPES[dtype])
    _save_weights(out, tensors, shards)
    return out
