"""The vLLM-named engine flags of `baton prefill-worker` / `decode-worker` and `baton router`, through the real
command lines, down to the engine config and the router's tokenizer. No server is started."""
from __future__ import annotations

import json
import pathlib

import pytest
from typer.testing import CliRunner

from baton.cli import app
from baton.devtools.make_model import make_model
from baton.engine.config import EngineConfig
from baton.process_settings import ConfigError
from baton.router.config import RouterConfig
from baton.router.server import Router
from baton.worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return make_model(tmp_path_factory.mktemp("flags") / "tiny-flags", arch="qwen2", layers=1, hidden=32, heads=2,
                      kv_heads=1, vocab=300, max_position=256)


@pytest.fixture
def served(monkeypatch) -> list[WorkerSettings]:
    """What the worker command would serve: `serve` records its settings instead of starting."""
    seen = []

    async def serve(settings, add_service):
        seen.append(settings)

    monkeypatch.setattr("baton.worker.server.serve", serve)
    return seen


def test_worker_flags_reach_the_engine_config(model_dir, served):
    result = CliRunner().invoke(app, [
        "decode-worker", "--model", str(model_dir), "--served-model-name", "smol", "--device", "cpu", "--dtype", "auto",
        "--max-model-len", "128", "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5",
        "--max-num-seqs", "4", "--block-size", "32"])
    assert result.exit_code == 0, result.output
    settings = served[0]
    assert settings.served_model_name == "smol"
    config = settings.engine_config()
    assert (config.dtype, config.max_model_len, config.enable_prefix_caching) == (None, 128, False)  # auto: the model's
    assert (config.gpu_memory_utilization, config.max_num_seqs, config.block_size) == (0.5, 4, 32)
    assert config.model_dir == str(model_dir)


@pytest.mark.parametrize("given, dtype", [("auto", None), ("half", "float16"), ("float", "float32"),
                                          ("bfloat16", "bfloat16"), ("float32", "float32")])
def test_dtype_takes_vllm_spellings(model_dir, given, dtype):
    settings = WorkerSettings.load(pool="prefill", model=str(model_dir), dtype=given)
    assert settings.engine_config().dtype == dtype
    assert EngineConfig(str(model_dir), device="cpu", dtype=given).dtype == dtype


def test_a_bad_dtype_is_refused_naming_the_flag_not_with_a_traceback(model_dir):
    result = CliRunner().invoke(app, ["prefill-worker", "--model", str(model_dir), "--dtype", "fp8"])
    assert result.exit_code == 2 and "setting 'dtype' (flag --dtype)" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(ValueError, match="dtype must be one of auto, half, float, float32"):
        EngineConfig(str(model_dir), device="cpu", dtype="fp8")


@pytest.mark.parametrize("given", ["auto", "fp8", "fp8_e4m3"])
def test_kv_cache_dtype_flag_reaches_the_engine_config(model_dir, served, given):
    result = CliRunner().invoke(app, ["decode-worker", "--model", str(model_dir), "--kv-cache-dtype", given])
    assert result.exit_code == 0, result.output
    assert served[0].engine_config().kv_cache_dtype == given


def test_a_bad_kv_cache_dtype_is_one_line_naming_the_flag(model_dir):
    result = CliRunner().invoke(app, ["prefill-worker", "--model", str(model_dir), "--kv-cache-dtype", "fp16"])
    assert result.exit_code == 2 and "setting 'kv_cache_dtype' (flag --kv-cache-dtype)" in result.output
    assert "Traceback" not in result.output
    for command in (["generate", str(model_dir), "--prompt-ids", "1,2"], ["up", "--model", str(model_dir)]):
        result = CliRunner().invoke(app, [*command, "--kv-cache-dtype", "e5m2"])
        assert result.exit_code == 2
        assert result.output.strip() == "error: --kv-cache-dtype must be one of auto, fp8, fp8_e4m3, got 'e5m2'"


def test_router_chat_template_replaces_the_models_own(model_dir, tmp_path):
    default = Router(RouterConfig.load(model=str(model_dir))).service.tokenizer
    assert default.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|im_start|>")
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    for value in (str(path), path.read_text()):  # a file, or the template itself, as vLLM takes it
        config = RouterConfig.load(model=str(model_dir), chat_template=value)
        tokenizer = Router(config).service.tokenizer
        assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    with pytest.raises(ConfigError, match="setting 'chat_template' .flag --chat-template.: .*neither a file nor"):
        RouterConfig.load(model=str(model_dir), chat_template=str(tmp_path / "missing.jinja"))


def test_calculate_kv_scales_flag_reaches_the_engine_config_and_needs_fp8(model_dir, served):
    result = CliRunner().invoke(app, ["decode-worker", "--model", str(model_dir), "--kv-cache-dtype", "fp8",
                                      "--calculate-kv-scales"])
    assert result.exit_code == 0, result.output
    config = served[0].engine_config()
    assert (config.kv_cache_dtype, config.calculate_kv_scales) == ("fp8", True)
    result = CliRunner().invoke(app, ["prefill-worker", "--model", str(model_dir), "--calculate-kv-scales"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == ("error: baton worker setting 'calculate_kv_scales' (flag --calculate-kv-scales): "
                                     "Value error, needs --kv-cache-dtype fp8 (the scales are an FP8 KV cache's), "
                                     "got 'auto'")
    for command in (["generate", str(model_dir), "--prompt-ids", "1,2"], ["up", "--model", str(model_dir)]):
        result = CliRunner().invoke(app, [*command, "--calculate-kv-scales"])
        assert result.exit_code == 2
        assert result.output.strip() == ("error: --calculate-kv-scales needs --kv-cache-dtype fp8 (the scales are "
                                         "an FP8 KV cache's), got 'auto'")


def test_fp8_layer_flags_reach_the_engine_config_and_need_fp8(model_dir, served):
    result = CliRunner().invoke(app, ["decode-worker", "--model", str(model_dir), "--quantization", "fp8",
                                      "--fp8-all-layers", "--fp8-lm-head", "--fp8-weight-only"])
    assert result.exit_code == 0, result.output
    config = served[0].engine_config()
    assert (config.quantization, config.fp8_all_layers, config.fp8_lm_head, config.fp8_weight_only) == \
        ("fp8", True, True, True)
    for flag in ("--fp8-all-layers", "--fp8-lm-head"):
        setting = flag[2:].replace("-", "_")
        result = CliRunner().invoke(app, ["decode-worker", "--model", str(model_dir), flag])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.output.strip() == (f"error: baton worker setting '{setting}' (flag {flag}): Value error, "
                                         "needs --quantization fp8")
        result = CliRunner().invoke(app, ["up", "--model", str(model_dir), flag])
        assert (result.exit_code, result.output.strip()) == (2, f"error: {flag} needs --quantization fp8, got 'none'")


def test_generate_with_calculated_kv_scales(model_dir):
    result = CliRunner().invoke(app, ["generate", str(model_dir), "--prompt-ids", "5,6,7", "--max-tokens", "3",
                                      "--device", "cpu", "--kv-cache-dtype", "fp8", "--calculate-kv-scales", "--json"])
    assert result.exit_code == 0, result.output
    doc = next(line for line in result.output.splitlines() if line.startswith("{"))  # stderr may hold log lines
    assert len(json.loads(doc)["token_ids"]) == 3
