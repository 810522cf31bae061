"""The wheel installs one import namespace, `baton`, with every package of the source tree and the generated stubs.
Built from a copy of the sources, so neither a stale build/ folder nor the build's own output touches the checkout."""
from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.test_layers import ROOT, package_dirs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    roots = {folder.split("/")[0] for folder in package_dirs().values()}
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for root in roots:
        shutil.copytree(ROOT / root, src / root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("baton-*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def test_only_baton_lands_at_top_level(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and dist_info.pop().startswith("baton-")
    assert tops - {t for t in tops if t.endswith(".dist-info")} == {"baton"}


def test_every_source_package_is_in_the_wheel(wheel):
    dirs = package_dirs()
    folder_to_pkg = {folder: pkg for pkg, folder in dirs.items()}
    names = set(wheel.namelist())
    packages = set()
    for root in {folder.split("/")[0] for folder in dirs.values()}:
        for init in (ROOT / root).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            folder = init.parent.relative_to(ROOT).as_posix()
            # A folder missing from pyproject's explicit list maps nowhere: name where it would have gone.
            pkg = folder_to_pkg.get(folder) or _module_of(folder, folder_to_pkg)
            packages.add(pkg)
            assert f"{pkg.replace('.', '/')}/__init__.py" in names, f"{folder}/ (package {pkg}) is not in the wheel"
            for module in init.parent.glob("*.py"):
                assert f"{pkg.replace('.', '/')}/{module.name}" in names, f"{module.relative_to(ROOT)} is not in the wheel"
    assert {"baton.router.selection.scorers", "baton.engine.kv_transfer", "baton.proto.v1"} <= packages


def test_generated_stubs_are_in_the_wheel(wheel):
    names = set(wheel.namelist())
    protos = sorted((ROOT / "proto" / "v1").glob("*.proto"))
    assert protos
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            assert f"baton/proto/v1/{proto.stem}{suffix}" in names


def test_record_lists_every_file(wheel):
    (record,) = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    listed = {row[0] for row in csv.reader(io.StringIO(wheel.read(record).decode())) if row}
    assert listed == set(wheel.namelist())


def _module_of(folder: str, folder_to_pkg: dict[str, str]) -> str:
    parts = folder.split("/")
    for n in range(len(parts) - 1, 0, -1):
        parent = "/".join(parts[:n])
        if parent in folder_to_pkg:
            return ".".join([folder_to_pkg[parent], *parts[n:]])
    return ".".join(parts)
