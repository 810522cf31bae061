"""Generates the Python gRPC stubs from proto/v1/*.proto (python -m baton.proto.build [--out DIR]).

protoc sees this folder as `baton/proto` (a virtual include path), so the stubs it writes import each other
as `baton.proto.v1.x_pb2`: the installed name, with no rewriting afterwards."""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parent
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_DIR / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc on every .proto and writes the stubs to out_dir/v1; returns the written files."""
    files = proto_files()
    if not files:
        return []
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-Ibaton/proto={PROTO_DIR}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                *(f"baton/proto/{f.relative_to(PROTO_DIR).as_posix()}" for f in files)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(f.name for f in files))
        target = out_dir / "v1"
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted((pathlib.Path(tmp) / "baton" / "proto" / "v1").iterdir()):
            if path.name.endswith(STUB_SUFFIXES):
                written.append(pathlib.Path(shutil.copy(path, target / path.name)))
    (target / "__init__.py").touch()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=PROTO_DIR, help="output root (default: proto/)")
    args = parser.parse_args(argv)
    written = generate(args.out)
    print(f"generated {len(written)} stub files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
