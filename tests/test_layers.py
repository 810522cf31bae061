"""Who may import whom (STYLE.md, docs/architecture.md): every import in the installed source, lazy ones included,
checked against the floors. Files map to modules through pyproject's package-dir, as the wheel installs them."""
from __future__ import annotations

import ast
import pathlib

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]

TOP = {"baton.cli", "baton.engine_cli", "baton.devtools"}
PROCESSES = {"baton.router", "baton.controlplane", "baton.prefill_worker", "baton.decode_worker",
             "baton.embed_worker"}
WORKER_HOST = "baton.worker"
RUNTIME = {"baton.engine", "baton.kernels"}
# Everything else under baton is the bottom: contracts, proto and the plumbing every process shares.
# The runtime knows no server and no Redis: bottom modules that use one are closed to it.
SERVERS_AND_REDIS = {"redis", "grpc", "uvicorn", "fastapi", "starlette"}


def package_dirs(root: pathlib.Path = ROOT) -> dict[str, str]:
    """Package -> folder, as setuptools reads pyproject: under the longest package-dir entry that is the package
    or one of its parents (baton.router.selection -> router/selection), else the package's own path."""
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = tool.get("package-dir", {})
    dirs = {}
    for pkg in tool["packages"]:
        parts = pkg.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in mapped:
                dirs[pkg] = "/".join([mapped[".".join(parts[:n])], *parts[n:]])
                break
        else:
            dirs[pkg] = "/".join(parts)
    return dirs


def source_files(root: pathlib.Path, dirs: dict[str, str]) -> dict[pathlib.Path, str]:
    """Every hand-written .py file of the packages, with its module name; generated stubs are left out."""
    files = {}
    for pkg, folder in dirs.items():
        assert (root / folder / "__init__.py").is_file(), f"package {pkg}: no {folder}/__init__.py"
        for path in sorted((root / folder).glob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            files[path] = pkg if path.name == "__init__.py" else f"{pkg}.{path.stem}"
    return files


def unit(module: str) -> str:
    """The layer unit a module belongs to: baton.<first part> (baton itself for its __init__)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def floor(u: str) -> str:
    if u in TOP:
        return "top"
    if u in PROCESSES:
        return "process"
    if u == WORKER_HOST:
        return "worker host"
    if u in RUNTIME:
        return "runtime"
    return "bottom"


def imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth; `from a import b` yields a.b
    (a module or a name in a; both land on the same unit)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return out


def open_to_runtime(files: dict[pathlib.Path, str]) -> set[str]:
    """Bottom modules that use no server and no Redis, not even through another bottom module."""
    bottom = {m: p for p, m in files.items() if floor(unit(m)) == "bottom"}
    deps = {m: {t for _, t in imports(p, m)} for m, p in bottom.items()}

    def uses_servers(m: str, seen: frozenset = frozenset()) -> bool:
        for t in deps.get(m, ()):
            if t.split(".")[0] in SERVERS_AND_REDIS:
                return True
            target = next((b for b in (t, t.rpartition(".")[0]) if b in deps), None)
            if target and target not in seen and uses_servers(target, seen | {m}):
                return True
        return False

    return {m for m in bottom if not uses_servers(m)}


def violations(files: dict[pathlib.Path, str], root: pathlib.Path = ROOT) -> list[str]:
    pure_bottom = open_to_runtime(files)
    found = []
    for path, module in files.items():
        src = unit(module)
        src_floor = floor(src)
        for line, target in imports(path, module):
            where = f"{path.relative_to(root)}:{line}: {module} imports {target}"
            top_level = target.split(".")[0]
            if src_floor == "runtime" and top_level in SERVERS_AND_REDIS:
                found.append(f"{where} (the runtime knows no server and no Redis)")
            if top_level != "baton":
                continue
            dst = unit(target)
            dst_floor = floor(dst)
            if dst == src or src_floor == "top":
                continue
            if dst_floor == "top":
                found.append(f"{where} (only the top may import the CLI and dev tools)")
            elif src_floor == "bottom" and dst_floor != "bottom":
                found.append(f"{where} (the bottom imports only the bottom)")
            elif src_floor == "runtime" and dst_floor not in ("runtime", "bottom"):
                found.append(f"{where} (the runtime imports only the runtime and the bottom)")
            elif src_floor == "runtime" and dst_floor == "bottom" and not _is_pure(target, pure_bottom):
                found.append(f"{where} (a Redis or server user, closed to the runtime)")
            elif src_floor == "worker host" and dst_floor not in ("runtime", "bottom"):
                found.append(f"{where} (the worker host imports only the runtime and the bottom)")
            elif src_floor == "process" and dst_floor == "process":
                found.append(f"{where} (a process package never imports a sibling)")
            elif src_floor == "process" and dst == WORKER_HOST and src not in ("baton.prefill_worker",
                                                                               "baton.decode_worker",
                                                                               "baton.embed_worker"):
                found.append(f"{where} (only the workers build on the worker host)")
    return found


def _is_pure(target: str, pure_bottom: set[str]) -> bool:
    return target in pure_bottom or target.rpartition(".")[0] in pure_bottom


def test_every_import_respects_the_layers():
    files = source_files(ROOT, package_dirs())
    assert len(files) > 50 and "baton.router.dispatch" in files.values() and "baton.engine.llm_engine" in files.values()
    problems = violations(files)
    assert not problems, "\n".join(problems)


def test_the_runtime_may_use_the_block_hash_but_not_the_worker_registry():
    pure = open_to_runtime(source_files(ROOT, package_dirs()))
    assert "baton.contracts.block_hash" in pure
    assert "baton.contracts.worker_registry" not in pure  # Redis
    assert "baton.grpc_channels" not in pure  # gRPC


@pytest.mark.parametrize(("module", "source", "reason"), [
    ("baton.engine.planted", "from baton.router.dispatch import Dispatcher\n", "runtime imports only"),
    ("baton.engine.planted", "def later():\n    import baton.worker.server\n", "runtime imports only"),
    ("baton.engine.planted", "from baton.contracts.worker_registry import POOLS\n", "closed to the runtime"),
    ("baton.engine.planted", "import redis\n", "knows no server and no Redis"),
    ("baton.kernels.planted", "from baton.controlplane import policy\n", "runtime imports only"),
    ("baton.router.planted", "from baton.controlplane.policy import POOLS\n", "never imports a sibling"),
    ("baton.router.planted", "from baton.worker.server import serve\n", "only the workers build"),
    ("baton.decode_worker.planted", "from ..prefill_worker import service\n", "never imports a sibling"),
    ("baton.contracts.planted", "from baton.engine.config import DTYPES\n", "bottom imports only"),
    ("baton.worker.planted", "from baton.router import dispatch\n", "worker host imports only"),
    ("baton.controlplane.planted", "from baton.devtools.local_cluster import LocalCluster\n", "only the top"),
])
def test_the_scanner_catches_a_planted_import(tmp_path, module, source, reason):
    path = tmp_path / "planted.py"
    path.write_text(source)
    files = {**source_files(ROOT, package_dirs()), path: module}
    problems = _violations_for(files, path)
    assert len(problems) == 1 and reason in problems[0], problems


@pytest.mark.parametrize(("module", "source"), [
    ("baton.engine.planted", "from baton.contracts.block_hash import hash_blocks\nfrom baton.kernels import rope\n"),
    ("baton.decode_worker.planted", "from baton.worker.server import serve\nfrom baton.engine import config\n"),
    ("baton.devtools.planted", "from baton.router.dispatch import Dispatcher\n"),
    ("baton.contracts.planted", "from . import keys\nfrom baton.proto.v1 import worker_pb2\n"),
])
def test_the_scanner_lets_allowed_imports_pass(tmp_path, module, source):
    path = tmp_path / "planted.py"
    path.write_text(source)
    files = {**source_files(ROOT, package_dirs()), path: module}
    assert _violations_for(files, path) == []


def _violations_for(files: dict[pathlib.Path, str], planted: pathlib.Path) -> list[str]:
    """What the scan reports about the planted file (the rest of the tree is clean, as the first test shows)."""
    root = pathlib.Path(planted.anchor)
    return [v for v in violations(files, root=root) if v.startswith(str(planted.relative_to(root)) + ":")]
