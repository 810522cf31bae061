"""Random-weight embedding checkpoints: a decoder body saved by transformers itself (`LlamaModel`, `Qwen3Model`:
bare tensor names, no LM head), plus the sentence-transformers files that choose pooling and normalisation."""
from __future__ import annotations

import json
import pathlib

import torch

from tests.engine.checkpoints import ARCH_CONFIGS

_POOLING_FLAG = {"last": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


def write_sentence_transformers_files(out_dir: pathlib.Path, pooling: str, normalize: bool,
                                      prompts: dict[str, str] | None = None, default_prompt: str | None = None) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out_dir / "modules.json").write_text(json.dumps(modules))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    flags = {flag: flag == _POOLING_FLAG[pooling] for flag in _POOLING_FLAG.values()}
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 0, **flags}))
    if prompts is not None:
        (out_dir / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts, "default_prompt_name": default_prompt}))


def make_embedding_checkpoint(out_dir: pathlib.Path, arch: str, *, pooling: str = "last", normalize: bool = True,
                              seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                              vocab: int = 256, max_position: int = 256) -> pathlib.Path:
    import transformers

    spec = ARCH_CONFIGS[arch]
    config = getattr(transformers, spec["cls"])(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position,
        bos_token_id=1, eos_token_id=2, **spec["kwargs"])
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.02 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    write_sentence_transformers_files(out_dir, pooling, normalize)
    return out_dir
