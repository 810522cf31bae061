"""Dockerfiles copy only existing paths that .dockerignore lets through and run everything via `baton`;
the Grafana dashboard queries exactly the documented metrics. No docker engine runs here, so no build."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex

import chart_check
import pytest
import tomllib
from chart_release import Release

ROOT = chart_check.ROOT
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def docker_context_allows(path: str) -> bool:
    """Whether .dockerignore (last matching rule wins, `!` re-includes) keeps `path` in the build context."""
    allowed = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_existing_paths_through_dockerignore(name):
    copies = [shlex.split(args) for word, args in instructions(name) if word == "COPY"]
    assert copies
    sources = [src for args in copies for src in args[:-1] if not src.startswith("--")]
    for src in sources:
        assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"
        assert docker_context_allows(src), f"{name}: COPY {src}: excluded by .dockerignore"
    # Everything setuptools packages must be copied, or the installed `baton` misses a package.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {"baton", *pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= set(sources) and "pyproject.toml" in sources


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_components_through_the_baton_cli(name):
    steps = instructions(name)
    assert steps[0][0] == "FROM"
    base = steps[0][1]
    assert base.startswith("nvidia/cuda:") if name == "Dockerfile" else re.match(r"python:3\.\d+-slim$", base)
    assert dict(steps)["ENTRYPOINT"] == '["baton"]'
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "baton" in pyproject["project"]["scripts"]
    run = " ".join(args for word, args in steps if word == "RUN")
    assert "python proto/build.py" in run and (ROOT / "proto" / "build.py").exists()
    for extras in re.findall(r'"\.\[([a-z,]+)\]"', run):
        assert set(extras.split(",")) <= pyproject["project"]["optional-dependencies"].keys()
    if name == "Dockerfile.cpu":
        assert "download.pytorch.org/whl/cpu" in run  # else pip pulls the CUDA build
    # The chart's pods run as this uid with runAsNonRoot; the image must not need root.
    uid = Release.render({}).workload("router")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert dict(steps)["USER"] == str(uid)


def test_images_expose_the_documented_ports():
    documented = set()
    for row in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        if row.startswith("| ") and "`baton " in row and "loopback" not in row:
            documented |= {int(p) for p in re.findall(r"\b(\d{4,5})\b", row.rsplit("|", 2)[1])}
    assert len(documented) == 10
    for name in DOCKERFILES:
        exposed = {int(p) for word, args in instructions(name) if word == "EXPOSE" for p in args.split()}
        assert exposed == documented, name


def documented_metrics() -> set[str]:
    section = (ROOT / "docs" / "architecture.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(baton_[a-z_]+)", section))


def test_dashboard_queries_exactly_the_documented_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "baton-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            names = re.findall(r"\b(baton_[a-z_]+)", target["expr"])
            assert names, target["expr"]
            used |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
            if "histogram_quantile" in target["expr"]:
                assert "_bucket" in target["expr"]
    documented = documented_metrics()
    assert len(documented) >= 20
    assert used - documented == set(), "dashboard queries undocumented metrics"
    assert documented - used == set(), "documented metrics missing from the dashboard"
