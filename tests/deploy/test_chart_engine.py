"""The chart's engine values, PodDisruptionBudgets and scrape labels, on rendered manifests: GPU pools run the engine
on the GPU with a memory share, typed values reach router and workers alike (parsed by the real `baton` commands),
budgets select exactly one component's pods, the ServiceMonitor adds no label a component exports itself, and a Hub
model is fetched by an init container and served offline from the model volume."""
from __future__ import annotations

import re
import types

import chart_check
import helm_python
import pytest
import typer.main
from chart_release import Release
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from baton.cli import app
from baton.devtools.make_model import make_model
from baton.engine.llm_engine import LLMEngine
from baton.router.metrics import RouterMetrics
from baton.worker.metrics import EngineCollector
from baton.worker.settings import WorkerSettings

POOLS = ("prefill", "decode")


def parsed(container: dict) -> dict:
    """The settings `baton <command>` reads from a container's args, as click parses them."""
    command, *args = container["args"]
    return typer.main.get_command(app).commands[command].make_context(command, args).params


def test_gpu_pools_run_the_engine_on_the_gpu_with_a_memory_share(default_release):
    for pool in POOLS:
        settings = parsed(default_release.container(pool))
        assert (settings["device"], settings["gpu_memory_utilization"]) == ("cuda", 0.9)
        assert (settings["dtype"], settings["max_num_seqs"], settings["enable_prefix_caching"]) == ("auto", 64, True)
    values = {"prefill": {"engine": {"device": "cuda:1", "gpuMemoryUtilization": 0.45, "maxNumSeqs": 256}},
              "decode": {"gpus": 0}}
    release = Release.render(values)
    prefill = parsed(release.container("prefill"))
    assert (prefill["device"], prefill["gpu_memory_utilization"], prefill["max_num_seqs"]) == ("cuda:1", 0.45, 256)
    cpu = parsed(release.container("decode"))  # no GPU requested: the CPU, and no GPU share to give
    assert cpu["device"] == "cpu" and cpu["gpu_memory_utilization"] is None


def test_shared_engine_values_reach_the_router_and_both_pools(default_release):
    release = Release.render({"engine": {"dtype": "bfloat16", "maxModelLen": 131072, "blockSize": 32,
                                         "enablePrefixCaching": False}})
    router = parsed(release.container("router"))
    assert (router["block_size"], router["max_model_len"]) == (32, 131072)
    for pool in POOLS:
        worker = parsed(release.container(pool))
        assert (worker["dtype"], worker["max_model_len"], worker["block_size"]) == ("bfloat16", 131072, 32)
        assert worker["enable_prefix_caching"] is False
        # Workers register under the name the router serves, or the router never finds them.
        assert worker["model_name"] == router["served_model_name"] == "baton-model"
    assert parsed(default_release.container("decode"))["max_model_len"] is None  # default: the model's own


@pytest.mark.parametrize("values, field", [
    ({"decode": {"engine": {"device": "tpu"}}}, "/decode/engine/device"),
    ({"prefill": {"engine": {"gpuMemoryUtilization": 1.5}}}, "/prefill/engine/gpuMemoryUtilization"),
    ({"engine": {"dtype": "fp8"}}, "/engine/dtype"),
    ({"engine": {"blockSize": 24}}, "/engine/blockSize"),
    ({"router": {"podDisruptionBudget": {"maxUnavailable": "half"}}}, "/router/podDisruptionBudget/maxUnavailable"),
])
def test_bad_engine_values_fail_naming_the_field(values, field):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(field)):
        chart_check.render(values)


def test_disruption_budgets_cover_router_and_pools_one_component_each(default_release):
    budgets = {b["metadata"]["name"]: b["spec"] for b in default_release.all("PodDisruptionBudget")}
    assert set(budgets) == {"baton-router", "baton-prefill", "baton-decode"}
    workloads = [w for w in default_release.docs if w["kind"] in ("Deployment", "StatefulSet")]
    for name, spec in budgets.items():
        selected = [w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for w in workloads
                    if spec["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected == [name.removeprefix("baton-")]
        assert spec["maxUnavailable"] == 1  # drains proceed one pod at a time, even for a single-replica pool
    release = Release.render({"router": {"podDisruptionBudget": {"maxUnavailable": "50%"}},
                              "decode": {"podDisruptionBudget": {"enabled": False}}})
    budgets = {b["metadata"]["name"]: b["spec"] for b in release.all("PodDisruptionBudget")}
    assert set(budgets) == {"baton-router", "baton-prefill"} and budgets["baton-router"]["maxUnavailable"] == "50%"
    assert chart_check.validate([("pdb", b) for b in release.all("PodDisruptionBudget")]) == []


def _label_names(registry) -> set[str]:
    text = generate_latest(registry).decode()
    return {label for family in text_string_to_metric_families(text) for s in family.samples for label in s.labels}


def test_service_monitor_adds_no_label_a_component_exports_itself(tmp_path):
    release = Release.render({"metrics": {"serviceMonitor": {"enabled": True}}})
    relabel = release.all("ServiceMonitor")[0]["spec"]["endpoints"][0]["relabelings"]
    model = make_model(tmp_path / "m", arch="llama", layers=1, hidden=32, heads=2, kv_heads=1, vocab=300)
    settings = WorkerSettings.load(pool="decode", model=str(model), device="cpu", num_kv_blocks=8)
    workers = CollectorRegistry()
    workers.register(EngineCollector(types.SimpleNamespace(settings=settings,
                                                           engine=LLMEngine(settings.engine_config()))))
    exported = {"prefill": _label_names(workers), "decode": _label_names(workers),
                "router": _label_names(RouterMetrics("m").registry)}
    assert "pool" in exported["decode"]
    for component, labels in exported.items():
        pod = release.workload(component)["spec"]["template"]["metadata"]["labels"]
        added = {r["targetLabel"] for r in relabel
                 if any(pod.get(_pod_label(s)) for s in r["sourceLabels"])}
        assert added and not added & labels, f"{component}: the scrape would rename {added & labels} to exported_*"


def _pod_label(meta: str) -> str:
    # __meta_kubernetes_pod_label_baton_io_region -> baton.io/region (the chart's labels are all baton.io/*)
    name = meta.removeprefix("__meta_kubernetes_pod_label_")
    assert name.startswith("baton_io_"), meta
    return "baton.io/" + name.removeprefix("baton_io_")


def test_documented_env_prefixes_are_the_ones_the_code_reads():
    from baton.controlplane.settings import ControlPlaneSettings
    from baton.router.config import RouterConfig

    text = (chart_check.CHART / "values.yaml").read_text()
    documented = set(re.findall(r"\b(BATON_[A-Z_]+?_)\*", text))
    prefixes = {c.model_config["env_prefix"] for c in (RouterConfig, WorkerSettings, ControlPlaneSettings)}
    assert documented == prefixes


HUB = {"model": {"hub": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "v1", "tokenSecret": "hf"},
                 "volume": {"persistentVolumeClaim": None, "emptyDir": {}}}}


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_a_hub_model_is_fetched_by_an_init_container_and_served_offline_from_the_volume():
    release = Release.render(HUB)
    for component in ("router", "prefill", "decode"):
        pod = release.workload(component)["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        fetch = parsed(init)  # the real `baton fetch-model` command
        assert (fetch["model"], fetch["revision"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "v1")
        main = pod["containers"][0]
        serve = parsed(main)
        assert (serve["model"], serve["revision"]) == (fetch["model"], fetch["revision"])
        # The same Hub cache on the same volume: written by the init container, read offline by the server.
        assert _env(init)["HF_HOME"] == _env(main)["HF_HOME"] == "/models/huggingface"
        assert _env(main)["HF_HUB_OFFLINE"] == "1" and "HF_HUB_OFFLINE" not in _env(init)
        assert _env(init)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
        assert "HF_TOKEN" not in _env(main)
        assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]  # writable
        assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    assert chart_check.validate([("hub", d) for d in release.docs]) == []
    assert "initContainers" not in Release.render({}).workload("decode")["spec"]["template"]["spec"]


def test_a_hub_model_needs_a_writable_model_volume():
    with pytest.raises(helm_python.HelmRenderError, match="model.hub.id is set: .*readOnly is true"):
        chart_check.render({"model": {"hub": {"id": "org/name"}}})  # the default claim is mounted read-only
    claim = Release.render({"model": {"hub": {"id": "org/name"}, "createPVC": {"enabled": True}}})
    volumes = claim.workload("prefill")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "baton-models", "readOnly": False}} in volumes
