"""Lints and renders the Helm chart (defaults and every deploy/examples values file) and validates
each manifest against the Kubernetes schemas offline; exits non-zero on any finding. CI runs it."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import subprocess
import sys
import tempfile

import helm_python
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "baton"
EXAMPLES = ROOT / "deploy" / "examples"
KUBE_VERSION = "1.30.0"
# CRDs have no schema in kubernetes-validate; anything else without a schema is a typo'd kind.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
LINT_WARNING = 2


@dataclasses.dataclass
class Case:
    """One release to render: a name and the values files layered over the chart defaults."""

    name: str
    values: dict


def example_files() -> list[pathlib.Path]:
    return sorted(EXAMPLES.rglob("*.yaml"))


def load_values(path: pathlib.Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path}: values must be a mapping, got {type(data).__name__}")
    return data or {}


def cases() -> list[Case]:
    found = [Case("default", {})]
    found += [Case(str(p.relative_to(ROOT)), load_values(p)) for p in example_files()]
    return found


def lint(values: dict | None = None) -> list[str]:
    """helm lint's warnings and errors (info-level hints such as 'icon is recommended' pass)."""
    report = helm_python.lint(CHART, values or {}, kube_version=f"v{KUBE_VERSION}")
    findings = [f"lint {m['severity']}: {m['path']}: {m['error']}" for m in report["messages"]
                if m["severity"] >= LINT_WARNING]
    return findings + [f"lint error: {e}" for e in report["errors"]]


def render(values: dict | None = None, *, name: str = "baton", namespace: str = "baton") -> dict[str, str]:
    """Template path -> rendered text, exactly as `helm template` would install it."""
    return helm_python.Chart.load(CHART).render(values or {}, name=name, namespace=namespace, is_install=True)


def manifests(rendered: dict[str, str]) -> list[tuple[str, dict]]:
    """(template path, document) for every non-empty Kubernetes document in the rendering."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def validate(docs: list[tuple[str, dict]]) -> list[str]:
    findings = []
    for path, doc in docs:
        where = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if (doc.get("apiVersion"), doc.get("kind")) not in CRD_KINDS:
                findings.append(f"{where}: no Kubernetes {KUBE_VERSION} schema for {doc.get('apiVersion')} {doc.get('kind')}")
        except kubernetes_validate.ValidationError as exc:
            field = ".".join(str(p) for p in exc.path) or "(root)"
            findings.append(f"{where}: {field}: {exc.message}")
    return findings


def policies(docs: list[tuple[str, dict]]) -> list[str]:
    """The policy.yaml texts of the rendered control-plane ConfigMaps."""
    return [doc["data"]["policy.yaml"] for _, doc in docs
            if doc.get("kind") == "ConfigMap" and "policy.yaml" in doc.get("data", {})]


def check_policy(text: str) -> tuple[bool, str]:
    """Runs `baton policy check` on one policy; (ok, message). Not ok only on a real finding."""
    baton = shutil.which("baton", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("baton")
    if baton is None:
        return True, "skipped: no `baton` executable"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="policy-", delete=False) as f:
        f.write(text)
    try:
        proc = subprocess.run([baton, "policy", "check", f.name], capture_output=True, text=True, timeout=60)
    finally:
        pathlib.Path(f.name).unlink()
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and "No such command" in out:
        return True, "skipped: `baton policy check` is not available in this build"
    return proc.returncode == 0, out


@dataclasses.dataclass
class Result:
    findings: list[str]
    notes: list[str]
    manifests: int


def check_case(case: Case) -> Result:
    result = Result(lint(case.values), [], 0)
    try:
        docs = manifests(render(case.values))
    except helm_python.HelmError as exc:
        result.findings.append(f"render: {exc}")
        return result
    result.manifests = len(docs)
    result.findings += validate(docs)
    for text in policies(docs):
        ok, message = check_policy(text)
        (result.notes if ok else result.findings).append(f"policy: {message}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("values", nargs="*", type=pathlib.Path,
                        help="values files to check instead of the defaults and deploy/examples")
    args = parser.parse_args(argv)
    try:
        todo = [Case(str(p), load_values(p)) for p in args.values] if args.values else cases()
    except (OSError, ValueError) as exc:
        print(f"chart_check: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for case in todo:
        result = check_case(case)
        status = "ok" if not result.findings else f"{len(result.findings)} finding(s)"
        print(f"{case.name}: {result.manifests} manifests, {status}")
        for line in result.findings + result.notes:
            print(f"  {line}")
        failed += bool(result.findings)
    print(f"chart_check: {len(todo)} case(s), {failed} failed (Kubernetes {KUBE_VERSION} schemas, strict)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
