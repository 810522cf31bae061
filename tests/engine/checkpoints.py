"""Small random-weight Hugging Face checkpoints made with transformers itself (the reference we match)."""
from __future__ import annotations

import pathlib

import torch

ARCH_CONFIGS = {
    "llama": dict(
        cls="LlamaConfig",
        kwargs=dict(rope_theta=10000.0),
    ),
    "llama3": dict(
        cls="LlamaConfig",
        kwargs=dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=64)),
    ),
    "mistral": dict(cls="MistralConfig", kwargs=dict(sliding_window=None)),
    "qwen2": dict(cls="Qwen2Config", kwargs=dict(use_sliding_window=False)),
    "qwen3": dict(cls="Qwen3Config", kwargs=dict(head_dim=24, use_sliding_window=False)),
}


def make_hf_checkpoint(out_dir: pathlib.Path, arch: str, *, seed: int = 0, tie: bool = False, layers: int = 2,
                       hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 256,
                       max_position: int = 1024, dtype: torch.dtype = torch.float32) -> pathlib.Path:
    import transformers

    spec = ARCH_CONFIGS[arch]
    config_cls = getattr(transformers, spec["cls"])
    config = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, **spec["kwargs"],
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norms so a norm bug cannot hide
            elif "bias" in name:
                p.copy_(0.02 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return out_dir
