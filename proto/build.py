"""Generates the Python gRPC stubs from proto/baton/v1/*.proto (python -m proto.build [--out DIR])."""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_DIR / "baton" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc on every .proto into out_dir/baton/v1 and returns the written files."""
    files = proto_files()
    if not files:
        return []
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    target = out_dir / "baton" / "v1"
    target.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *map(str, files),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(f.name for f in files))
    written = sorted(p for p in target.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))
    # protoc emits absolute `from baton.v1 import x_pb2`; our stubs live under the `proto` package.
    for path in written:
        text = path.read_text()
        text = re.sub(r"^from baton\.v1 import", "from proto.baton.v1 import", text, flags=re.M)
        path.write_text(text)
    for pkg in (out_dir / "baton", target):
        (pkg / "__init__.py").touch()
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
