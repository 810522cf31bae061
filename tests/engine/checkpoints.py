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


def add_special_tokens(model_dir: pathlib.Path, tokens: tuple[str, ...], *, seed: int = 0) -> pathlib.Path:
    """Adds `tokens` to a generated checkpoint as special added tokens (ids after the last one), the way Hermes-style
    models hold `<tool_call>`: tokenizer.json and tokenizer_config.json learn them, config.json's vocab_size and the
    embedding (and untied lm_head) grow by random rows. Only single-file checkpoints."""
    import json

    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    before = tok.get_vocab_size(with_added_tokens=True)
    if tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens]) != len(tokens):
        raise ValueError(f"some of {tokens} are already in {model_dir}'s vocabulary")
    tok.save(str(model_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    for t in tokens:
        tok_config["added_tokens_decoder"][str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    config = json.loads((model_dir / "config.json").read_text())
    if config["vocab_size"] != before:
        raise ValueError(f"{model_dir}: config vocab_size {config['vocab_size']} != the tokenizer's {before}")
    config["vocab_size"] = vocab
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(str(model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            rows = weights[name]
            extra = torch.randn(vocab - rows.shape[0], rows.shape[1], generator=gen) * 0.02
            weights[name] = torch.cat([rows, extra.to(rows.dtype)])
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir
