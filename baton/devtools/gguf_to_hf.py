"""Converts a Llama-architecture GGUF file (byte-level BPE tokenizer) into a Hugging Face-format directory that
Baton loads: fp32 safetensors, config.json, generation_config.json, tokenizer.json and tokenizer_config.json.
Uses the `gguf` package alone to read and dequantize the tensors."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from baton.devtools.tokenizer_training import LLAMA3_SPLIT, byte_level_split

# llama.cpp's tensor names (blk.<layer>.<name>.weight, <name>.weight) -> Hugging Face Llama names.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# llama.cpp's pre-tokenizer names -> the same splits in `tokenizers`.
_PRE_TOKENIZERS = {
    "gpt2": _byte_level,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama-bpe": lambda: byte_level_split(LLAMA3_SPLIT),
}
# gguf.TokenType: CONTROL tokens are special; USER_DEFINED are added tokens the text may contain.
_CONTROL, _USER_DEFINED = 3, 4


class GGUFError(ValueError):
    """The file is not a GGUF this converter handles; the message says which field."""


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path, *, show_progress: bool = True) -> pathlib.Path:
    """Writes the converted checkpoint into `out_dir` (created) and returns it."""
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _Metadata(reader, gguf_path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{gguf_path}: general.architecture = {arch!r}; only 'llama' is supported")
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{gguf_path}: tokenizer.ggml.model = {meta.get('tokenizer.ggml.model')!r}; "
                        "only byte-level BPE ('gpt2') is supported")
    heads = int(meta.get(f"{arch}.attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    names = {t.name for t in reader.tensors}
    config = _config(meta, arch, tied="output.weight" not in names)

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="Dequantizing", unit="tensor", disable=not show_progress):
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # a writable copy
        name = tensor.name.removesuffix(".weight")
        if name.endswith(".attn_q"):
            weights = _unpermute(weights, heads)
        elif name.endswith(".attn_k"):
            weights = _unpermute(weights, kv_heads)
        tensors[_hf_name(tensor.name, gguf_path)] = torch.from_numpy(np.ascontiguousarray(weights))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    # llama.cpp also stops at end-of-turn / end-of-message tokens; Hugging Face lists them all as eos ids.
    stops = [config.get("eos_token_id"), *(meta.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("eot", "eom"))]
    stops = list(dict.fromkeys(int(i) for i in stops if i is not None))
    if len(stops) > 1:
        generation["eos_token_id"] = stops
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_tokenizer(meta, out_dir, config["max_position_embeddings"])
    return out_dir


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's rotary halves (for its RoPE kernel); Hugging Face keeps them as two halves.
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weights.shape)


def _hf_name(name: str, source: pathlib.Path) -> str:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_TENSORS:
        return f"{_TOP_TENSORS[parts[0]]}.{parts[1]}"
    raise GGUFError(f"{source}: tensor {name!r} has no Hugging Face Llama counterpart")


class _Metadata:
    def __init__(self, reader: Any, source: pathlib.Path) -> None:
        self._fields = reader.fields
        self._source = source

    def get(self, key: str, default: Any = ...) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self._source}: metadata field {key!r} is missing")
            return default
        return field.contents()


def _config(meta: _Metadata, arch: str, tied: bool) -> dict[str, Any]:
    hidden = int(meta.get(f"{arch}.embedding_length"))
    heads = int(meta.get(f"{arch}.attention.head_count"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(meta.get("tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": int(meta.get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.get(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get(f"{arch}.context_length")),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    for key, ggml in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        value = meta.get(f"tokenizer.ggml.{ggml}_token_id", None)
        if value is not None:
            config[f"{key}_token_id"] = int(value)
    return config


def _f32(value: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.9999997e-06. The shortest decimal of that float32 is what was written.
    return float(str(np.float32(value)))


def _write_tokenizer(meta: _Metadata, out_dir: pathlib.Path, max_length: int) -> None:
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    kinds: list[int] = meta.get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"tokenizer.ggml.pre = {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})")
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(t, special=k == _CONTROL, normalized=False)
                        for t, k in zip(tokens, kinds) if k in (_CONTROL, _USER_DEFINED)])
    backend.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        return None if index is None else tokens[int(index)]

    config: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_length,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for key, ggml in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        if token(ggml) is not None:
            config[key] = token(ggml)
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
