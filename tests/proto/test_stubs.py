"""The committed gRPC stubs match the .proto files, and the wire messages round-trip."""
from __future__ import annotations

import pathlib

import pytest

from baton.proto import build
from baton.proto.v1 import inference_pb2, worker_pb2

OWN = ("inference", "worker")


@pytest.mark.parametrize("name", OWN)
def test_committed_stubs_are_fresh(tmp_path: pathlib.Path, name: str) -> None:
    build.generate(tmp_path)
    committed = build.PROTO_DIR / "v1"
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        fresh = (tmp_path / "v1" / f"{name}{suffix}").read_text()
        path = committed / f"{name}{suffix}"
        assert path.exists(), f"{path} missing: run `python -m baton.proto.build`"
        assert path.read_text() == fresh, f"{path} is stale: run `python -m baton.proto.build`"


def test_stubs_import_from_the_proto_package() -> None:
    # protoc sees proto/ as baton/proto, so the stubs import each other by their installed name.
    text = (build.PROTO_DIR / "v1" / "worker_pb2.py").read_text()
    assert "from baton.proto.v1 import inference_pb2" in text


def test_kv_destination_round_trips_with_version() -> None:
    dst = worker_pb2.KVDestination(
        version=worker_pb2.KV_HANDOFF_VERSION_1, transport="tcp", endpoint=b"\x00\x01host:1",
        dst_block_ids=[7, 3, 9], num_cached_tokens=16, transfer_id="r1-0", block_size=16,
        decode_worker_id="d0",
    )
    back = worker_pb2.KVDestination.FromString(dst.SerializeToString())
    assert back == dst
    assert back.version == 1 and list(back.dst_block_ids) == [7, 3, 9] and back.endpoint == b"\x00\x01host:1"
    # An old sender that never set the version reads as UNSPECIFIED, which receivers reject.
    assert worker_pb2.KVDestination().version == worker_pb2.KV_HANDOFF_VERSION_UNSPECIFIED


def test_decode_request_prefill_target_is_optional() -> None:
    local = worker_pb2.DecodeRequest(request_id="a", token_ids=[1, 2])
    assert not local.HasField("prefill")
    remote = worker_pb2.DecodeRequest(request_id="a", prefill=worker_pb2.PrefillTarget(worker_id="p0"))
    assert remote.HasField("prefill")


def test_seed_presence_is_tracked() -> None:
    assert not inference_pb2.SamplingParams().HasField("seed")
    assert inference_pb2.SamplingParams(seed=0).HasField("seed")


def test_services_have_the_contracted_methods() -> None:
    methods = lambda svc: {m.name for m in svc.methods}  # noqa: E731
    inf = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert methods(inf) == {"Generate", "Models", "Health"}
    assert inf.methods_by_name["Generate"].server_streaming
    dec = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"]
    pre = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"]
    assert methods(dec) == {"Generate", "Abort", "Stats", "Health"}
    assert methods(pre) == {"Prefill", "Abort", "Stats", "Health"}
    assert dec.methods_by_name["Generate"].server_streaming
    assert inference_pb2.DESCRIPTOR.package == "baton.v1"
