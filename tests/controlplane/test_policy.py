"""Policy validation: examples load, each kind of mistake names file, line and field; hot reload."""
from __future__ import annotations

import os
import pathlib

import pytest
from typer.testing import CliRunner

from baton.controlplane.policy import PolicyError, PolicyFile, load_policy, parse_policy

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "policies").glob("*.yaml"))

GOOD = """\
clusters:
  - {name: a, region: r1, backend: local, gpus: 4}
models:
  - name: m
    regions:
      r1:
        prefill: {capacity_tokens_per_s: 1000, ttft_p90_ms: 500}
        decode: {capacity_tokens_per_s: 100, itl_p90_ms: 50}
"""


def test_examples_load():
    assert len(EXAMPLES) >= 3
    for path in EXAMPLES:
        policy = load_policy(path)
        assert policy.pool_keys(), path


@pytest.mark.parametrize("old,new,line,field,words", [
    ("gpus: 4}", "gpus: -1}", 2, "clusters[0].gpus", "greater than or equal to 0"),
    ("backend: local", "backend: slurm", 2, "clusters[0].backend", "'kubernetes', 'ray' or 'local'"),
    ("ttft_p90_ms: 500}", "ttft_p90_ms: 500, max_replica: 3}", 7, "models[0].regions.r1.prefill.max_replica",
     "Extra inputs"),
    ("itl_p90_ms: 50}", "itl_p90_ms: fast}", 8, "models[0].regions.r1.decode.itl_p90_ms", "valid number"),
    ("prefill: {capacity_tokens_per_s: 1000, ", "prefill: {", 7,
     "models[0].regions.r1.prefill", "capacity_tokens_per_s is required when the model has no profile"),
    ("      r1:\n", "      r2:\n", 6, "models[0].regions.r2", "has no cluster"),
    ("ttft_p90_ms: 500}", "ttft_p90_ms: 500, min_replicas: 5, max_replicas: 2}", 7,
     "models[0].regions.r1.prefill.max_replicas", "max_replicas 2 < min_replicas 5"),
])
def test_each_mistake_names_file_line_and_field(old, new, line, field, words):
    text = GOOD.replace(old, new)
    assert text != GOOD
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.yaml")
    message = "\n".join(exc.value.errors)
    assert f"p.yaml:{line}: {field}: " in message, message
    assert words in message


def test_embed_pool_is_a_pool_kind():
    text = GOOD + "        embed: {capacity_inputs_per_s: 800, queue_time_p90_ms: 100, min_replicas: 2, max_replicas: 4}\n"
    embed = parse_policy(text, "e.yaml").model("m").regions["r1"].embed
    assert (embed.capacity_inputs_per_s, embed.slo_ms, embed.min_replicas, embed.max_replicas) == (800, 100, 2, 4)
    assert parse_policy(GOOD).model("m").regions["r1"].embed is None  # optional
    with pytest.raises(PolicyError) as exc:
        parse_policy(text.replace("min_replicas: 2", "min_replicas: 5"), "e.yaml")
    assert exc.value.errors == ["e.yaml:9: models[0].regions.r1.embed.max_replicas: max_replicas 4 < min_replicas 5"]
    with pytest.raises(PolicyError) as exc:
        parse_policy(text.replace("queue_time_p90_ms: 100, ", ""), "e.yaml")
    assert "e.yaml:9: models[0].regions.r1.embed.queue_time_p90_ms: Field required" in exc.value.errors


def test_spillover_and_yaml_errors():
    bad = GOOD + "spillover:\n  - {from: r1, to: [nowhere, r1]}\n"
    with pytest.raises(PolicyError) as exc:
        parse_policy(bad, "s.yaml")
    assert exc.value.errors == ["s.yaml:10: spillover[0].to[0]: unknown region 'nowhere'",
                                "s.yaml:10: spillover[0].to[1]: a region cannot spill to itself"]
    with pytest.raises(PolicyError) as exc:
        parse_policy("clusters: [a\n", "y.yaml")
    assert exc.value.errors[0].startswith("y.yaml:2: (document): invalid YAML")


def test_check_cli_reports_every_error(tmp_path):
    from baton.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("gpus: 4}", "gpus: x}").replace("itl_p90_ms: 50}", "itl_p90_ms: 0}"))
    result = CliRunner().invoke(app, ["policy", "check", str(EXAMPLES[0]), str(bad)])
    assert result.exit_code == 2
    assert f"ok: {EXAMPLES[0]}" in result.output
    assert f"{bad}:2: clusters[0].gpus: Input should be a valid integer" in result.output
    assert f"{bad}:8: models[0].regions.r1.decode.itl_p90_ms: Input should be greater than 0" in result.output
    assert "Traceback" not in result.output


def test_hot_reload_keeps_last_good(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    pf = PolicyFile(path)
    assert pf.policy.clusters[0].gpus == 4
    path.write_text(GOOD.replace("gpus: 4", "gpus: 8"))
    os.utime(path, ns=(1, 10**18))  # a distinct mtime even on coarse-grained filesystems
    assert pf.reload_if_changed() and pf.policy.clusters[0].gpus == 8
    path.write_text(GOOD.replace("gpus: 4", "gpus: many"))
    os.utime(path, ns=(1, 2 * 10**18))
    assert not pf.reload_if_changed()
    assert pf.policy.clusters[0].gpus == 8
    assert "clusters[0].gpus" in str(pf.last_error)
    assert not pf.reload_if_changed()  # unchanged file: no re-read, error kept
    assert pf.last_error is not None


PROFILED = GOOD.replace("  - name: m\n", "  - name: m\n    profile: PATH\n").replace(
    "prefill: {capacity_tokens_per_s: 1000, ttft_p90_ms: 500}", "prefill: {ttft_p90_ms: 500}").replace(
    "decode: {capacity_tokens_per_s: 100, itl_p90_ms: 50}", "decode: {itl_p90_ms: 50}")
PROFILE = ROOT / "deploy" / "policies" / "profiles" / "llama-3-8b_h200.json"


def test_profile_path_is_read_relative_to_the_policy_file(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.json").write_text(PROFILE.read_text())
    path = tmp_path / "policy.yaml"
    path.write_text(PROFILED.replace("PATH", "profiles/p.json"))
    policy = load_policy(path)
    assert policy.model("m").profile.device == "NVIDIA H200"
    assert type(policy.capacity_model("m", "r1", "decode")).__name__ == "DecodeModel"


def test_profile_mistakes_name_file_line_and_field(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(PROFILED.replace("PATH", "missing.json"))
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.errors == [(f"{path}:5: models[0].profile: Value error, cannot read profile "
                                 f"{tmp_path / 'missing.json'}: No such file or directory")]

    bad = tmp_path / "bad.json"
    bad.write_text(PROFILE.read_text().replace('"kv_tokens": ', '"kv_tokens": -'))
    path.write_text(PROFILED.replace("PATH", "bad.json"))
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.errors[0].startswith(f"{path}:5: models[0].profile.decode.kv_tokens: Input should be greater")

    # The profile was measured on one GPU per replica; a pool that says 4 is a mistake, not a what-if.
    path.write_text(PROFILED.replace("PATH", str(PROFILE)).replace("ttft_p90_ms: 500}", "ttft_p90_ms: 500, "
                                                                "gpus_per_replica: 4}"))
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.errors == [(f"{path}:8: models[0].regions.r1.prefill.gpus_per_replica: gpus_per_replica 4 "
                                 "but the profile was measured on 1 GPU(s) per replica")]


def test_with_profile_plans_every_model_on_it():
    from baton.controlplane.capacity import read_profile
    from baton.controlplane.policy import with_profile

    policy = with_profile(parse_policy(GOOD), read_profile(PROFILE), str(PROFILE))
    assert policy.model("m").profile.model == "llama-3-8b"
    assert type(policy.capacity_model("m", "r1", "prefill")).__name__ == "PrefillModel"
