"""Loading Hugging Face directories: sharded, dtypes, rope styles, and one clear error per broken input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from baton.devtools.make_model import make_model
from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.errors import ModelFilesError
from baton.engine.llm_engine import LLMEngine
from baton.engine.loader import load_model
from baton.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def tokens(model_dir, prompt=(5, 6, 7, 8, 9, 10, 11), **kw):
    engine = LLMEngine(EngineConfig(str(model_dir), num_kv_blocks=32, show_progress=False, **kw))
    return engine.generate([list(prompt)], GREEDY)[0].output_ids


def test_sharded_equals_single_file_and_rope_parameters_style(tmp_path):
    single = make_model(tmp_path / "one", arch="qwen3", seed=4)
    sharded = make_model(tmp_path / "three", arch="qwen3", seed=4, shards=3, rope_style="parameters")
    assert json.loads((sharded / "config.json").read_text()).get("rope_parameters")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert tokens(single) == tokens(sharded)


def test_llama3_rope_scaling_is_read(tmp_path):
    plain = make_model(tmp_path / "plain", arch="llama", seed=2, max_position=4096)
    scaled = make_model(tmp_path / "scaled", arch="llama", seed=2, max_position=4096, rope_scaling="llama3")
    mc = ModelConfig.from_dir(scaled)
    assert mc.rope.kind == "llama3" and mc.rope.factor > 1
    freq = lambda d: load_model(EngineConfig(str(d), show_progress=False)).rotary.inv_freq  # noqa: E731
    f_plain, f_scaled = freq(plain), freq(scaled)
    assert torch.equal(f_plain[:2], f_scaled[:2])  # high frequencies untouched
    assert torch.all(f_scaled[-2:] < f_plain[-2:])  # low frequencies stretched by the factor


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_and_run(tmp_path, dtype):
    model_dir = make_model(tmp_path / dtype, arch="llama", seed=1, dtype=dtype)
    model = load_model(EngineConfig(str(model_dir), dtype=dtype, show_progress=False))
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    out = tokens(model_dir, dtype=dtype)
    assert len(out) == 12
    assert tokens(model_dir) == tokens(model_dir)  # default on CPU: upcast to float32, deterministic


def test_tied_embeddings_share_the_output_matrix(tmp_path):
    model_dir = make_model(tmp_path / "tied", arch="qwen2", tie_embeddings=True, seed=3)
    model = load_model(EngineConfig(str(model_dir), show_progress=False))
    assert model.lm_head is None


def _break(model_dir, mutate):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("case,match", [
    ("no_config", r"config\.json: missing"),
    ("arch", r"architectures.*not supported"),
    ("field", r"required field 'hidden_size'"),
    ("no_weights", r"no model\.safetensors"),
    ("shape", r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape"),
    ("missing_tensor", r"lacks 1 tensor\(s\): model\.norm\.weight"),
    ("extra_tensor", r"unexpected tensor 'model\.layers\.0\.bogus'"),
    ("bad_index", r"lists shard\(s\) that do not exist"),
])
def test_broken_directories_give_one_clear_error(tmp_path, case, match):
    model_dir = make_model(tmp_path / case, arch="llama", seed=0)
    config = model_dir / "config.json"
    raw = json.loads(config.read_text())
    if case == "no_config":
        config.unlink()
    elif case == "arch":
        raw["architectures"] = ["GPT2LMHeadModel"]
        config.write_text(json.dumps(raw))
    elif case == "field":
        del raw["hidden_size"]
        config.write_text(json.dumps(raw))
    elif case == "no_weights":
        (model_dir / "model.safetensors").unlink()
    elif case == "shape":
        _break(model_dir, lambda t: t.update({"model.layers.0.mlp.up_proj.weight":
                                              t["model.layers.0.mlp.up_proj.weight"][:-1].clone()}))
    elif case == "missing_tensor":
        _break(model_dir, lambda t: t.pop("model.norm.weight"))
    elif case == "extra_tensor":
        _break(model_dir, lambda t: t.update({"model.layers.0.bogus": torch.zeros(2)}))
    elif case == "bad_index":
        (model_dir / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelFilesError, match=match):
        LLMEngine(EngineConfig(str(model_dir), show_progress=False))


def test_generate_cli_json_and_errors(tmp_path):
    model_dir = make_model(tmp_path / "cli", arch="mistral", seed=5)
    run = lambda *a: subprocess.run([sys.executable, "-m", "baton.cli", "generate", str(model_dir), *a],  # noqa
                                    capture_output=True, text=True)
    out = run("--prompt-ids", "5,6,7,8,9,10,11", "--max-tokens", "12", "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["token_ids"] == tokens(model_dir)
    assert doc["prompt_ids"] == [5, 6, 7, 8, 9, 10, 11] and isinstance(doc["text"], str)
    text = run("--prompt", "Hello there", "--max-tokens", "4", "--json")
    assert text.returncode == 0 and len(json.loads(text.stdout.strip().splitlines()[-1])["token_ids"]) <= 4
    bad = run("--prompt-ids", "1,2", "--max-tokens", "0")
    assert bad.returncode == 2 and "max_tokens" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "baton.cli", "generate", str(tmp_path / "nope"),
                              "--prompt-ids", "1"], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope" in missing.stderr and "no such directory" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
