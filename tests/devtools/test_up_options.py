"""`baton up` passes the vLLM-named engine flags through: the router and worker command lines it builds parse with
the real `baton router` / `baton decode-worker` commands into the settings asked for. No process is started."""
from __future__ import annotations

import pathlib

import pytest
import typer.main
from typer.testing import CliRunner

from baton.cli import app
from baton.devtools.local_cluster import LocalCluster, UpOptions
from baton.devtools.make_model import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return make_model(tmp_path_factory.mktemp("up") / "tiny-up", arch="llama", layers=1, hidden=32, heads=2,
                      kv_heads=1, vocab=300, max_position=256)


def parsed(command: str, args: list[str]) -> dict:
    """The parameters `baton <command>` gets from `args`, as click parses them."""
    click_command = typer.main.get_command(app).commands[command]
    return click_command.make_context(command, list(args)).params


def test_engine_flags_reach_router_and_workers(model_dir, tmp_path):
    opts = UpOptions(model=model_dir, served_model_name="my-model", host="0.0.0.0", chat_template="{{ messages }}",
                     tool_call_parser="llama3_json", block_size=32, max_model_len=200, prefill=1, decode=2, max_decode=3, run_dir=tmp_path,
                     worker_settings={"device": "cpu", "dtype": "half", "max_num_seqs": 8,
                                      "enable_prefix_caching": False, "enforce_eager": True,
                                      "quantization": "fp8", "fp8_all_layers": True, "fp8_lm_head": True,
                                      "row_invariant_verification": True,
                                      "speculative_method": "ngram",
                                      "num_speculative_tokens": 3, "kv_cache_dtype": "fp8",
                                      "calculate_kv_scales": True})
    cluster = LocalCluster(opts)
    cluster.redis_url = "redis://127.0.0.1:1/0"
    assert cluster.url == f"http://127.0.0.1:{opts.port}"
    router = parsed("router", cluster.router_args())
    assert (router["served_model_name"], router["host"], router["block_size"], router["max_model_len"],
            router["chat_template"]) == ("my-model", "0.0.0.0", 32, 200, "{{ messages }}")
    assert router["tool_call_parser"] == "llama3_json"
    worker = parsed("decode-worker", ["--model", str(model_dir), *cluster.worker_args()])
    assert worker["model_name"] == "my-model"
    assert (worker["block_size"], worker["max_model_len"], worker["device"], worker["dtype"]) == (32, 200, "cpu", "half")
    assert (worker["max_num_seqs"], worker["enable_prefix_caching"], worker["enforce_eager"]) == (8, False, True)
    assert (worker["quantization"], worker["speculative_method"], worker["num_speculative_tokens"]) == ("fp8", "ngram", 3)
    assert (worker["kv_cache_dtype"], worker["calculate_kv_scales"]) == ("fp8", True)
    assert (worker["fp8_all_layers"], worker["fp8_lm_head"], worker["row_invariant_verification"]) == (True, True, True)
    # Unless given, the workers the pools may grow to (1 prefill + 3 decode) split 0.9 of a GPU evenly.
    assert worker["gpu_memory_utilization"] == pytest.approx(0.225)
    assert "--chat-template" not in cluster.worker_args()  # the router renders chat prompts


def test_defaults_pass_only_what_router_and_workers_must_agree_on(model_dir, tmp_path):
    cluster = LocalCluster(UpOptions(model=str(model_dir), run_dir=tmp_path))
    assert cluster.model_name == "tiny-up"
    worker = parsed("prefill-worker", ["--model", str(model_dir), *cluster.worker_args()])
    assert (worker["model_name"], worker["block_size"], worker["num_kv_blocks"]) == ("tiny-up", 16, None)
    assert worker["max_model_len"] is None and worker["gpu_memory_utilization"] == pytest.approx(0.45)


def test_up_refuses_an_unknown_model_before_starting_anything(tmp_path):
    result = CliRunner().invoke(app, ["up", "--model", str(tmp_path / "missing"), "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no such directory, and not a Hugging Face Hub id" in result.output
    assert not list(tmp_path.iterdir())  # no Redis, router or control plane was started


def test_embed_workers_get_the_worker_flags_and_an_embedding_only_cluster_needs_them(model_dir, tmp_path):
    opts = UpOptions(model=model_dir, prefill=0, decode=0, embed=2, run_dir=tmp_path,
                     worker_settings={"max_batch_delay_ms": 2.5, "dynamic_batching": False, "max_num_seqs": 128})
    cluster = LocalCluster(opts)
    cluster.redis_url = "redis://127.0.0.1:1/0"
    worker = parsed("embed-worker", ["--model", str(model_dir), *cluster.worker_args()])
    assert (worker["max_batch_delay_ms"], worker["dynamic_batching"], worker["max_num_seqs"]) == (2.5, False, 128)
    assert worker["gpu_memory_utilization"] == pytest.approx(0.45)  # two embed workers share 0.9 of a GPU
    up = parsed("up", ["--decode", "0", "--embed-workers", "2", "--max-batch-delay-ms", "3"])
    assert (up["decode"], up["embed_workers"], up["max_batch_delay_ms"]) == (0, 2, 3.0)
    result = CliRunner().invoke(app, ["up", "--model", str(model_dir), "--decode", "0", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--decode 0 needs --embed N" in result.output


def test_embed_pool_is_a_scaled_pool_of_the_policy(model_dir, tmp_path):
    from baton.controlplane.backends.local import WORKER_ARGV, worker_argv
    from baton.controlplane.policy import load_policy

    up = parsed("up", ["--decode", "0", "--embed", "1", "--max-embed", "3"])
    assert (up["embed_workers"], up["max_embed"]) == (1, 3)
    cluster = LocalCluster(UpOptions(model=model_dir, prefill=0, decode=0, embed=1, max_embed=3, run_dir=tmp_path,
                                     policy_overrides={"embed": {"capacity_inputs_per_s": 7}}))
    cluster.redis_url = "redis://127.0.0.1:1/0"
    policy = load_policy(cluster.write_policy())
    embed = policy.pool(cluster.model_name, "local", "embed")
    assert (embed.min_replicas, embed.max_replicas, embed.capacity_inputs_per_s) == (1, 3, 7)
    assert (cluster.model_name, "local", "embed") in policy.pool_keys()
    # The control plane's local backend starts `baton embed-worker` with the workers' flags.
    argv = worker_argv(policy.clusters[0].worker_command, worker_id="w", pool="embed", model=cluster.model_name,
                       model_dir=str(model_dir), redis_url=cluster.redis_url, region="local")
    assert argv[:4] == [WORKER_ARGV[0], "-m", "baton.cli", "embed-worker"]
    worker = parsed("embed-worker", argv[argv.index("embed-worker") + 1:])
    assert worker["worker_id"] == "w" and worker["gpu_memory_utilization"] == pytest.approx(0.3)
    result = CliRunner().invoke(app, ["up", "--model", str(model_dir), "--max-embed", "2", "--run-dir",
                                      str(tmp_path / "refused")])
    assert result.exit_code == 2 and "--max-embed needs --embed 1 or more" in result.output
    # Without embed workers the policy has no embed pool.
    plain = LocalCluster(UpOptions(model=model_dir, run_dir=tmp_path / "plain"))
    plain.redis_url = cluster.redis_url
    assert all(p != "embed" for _m, _r, p in load_policy(plain.write_policy()).pool_keys())
