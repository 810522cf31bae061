"""KV transfer backends (tcp, nixl) move blocks bit-exactly between real caches, in and across processes."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from baton.engine.kv_transfer import (
    CacheGeometry,
    Endpoint,
    KVTransferError,
    TransferResult,
    block_runs,
    create_transport,
)
from baton.engine.kv_transfer.base import KV_TRANSFER_BYTES
from baton.engine.kv_transfer.tcp import _STATUS, encode_header

REPO = Path(__file__).resolve().parents[2]
HAS_NIXL = importlib.util.find_spec("nixl") is not None
BACKENDS = ["tcp", "ipc", pytest.param("nixl", marks=pytest.mark.skipif(not HAS_NIXL, reason="nixl is not installed"))]
# [num_layers, 2, block_size, num_kv_heads, head_dim]: 4 * 2 * 16 * 2 * 32 * 4 B = 32 KiB per float32 block
BLOCK = (4, 2, 16, 2, 32)
SRC = [5, 6, 7, 30, 2, 11, 12]
DST = [40, 41, 42, 3, 17, 9, 10]


def cache(num_blocks: int, dtype=torch.float32, seed: int | None = None, block=BLOCK) -> torch.Tensor:
    if seed is None:
        return torch.full((num_blocks, *block), -7.0, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_blocks, *block), generator=g).to(dtype)


def assert_moved(src: torch.Tensor, dst: torch.Tensor, src_ids, dst_ids) -> None:
    for s, d in zip(src_ids, dst_ids):
        assert torch.equal(src[s].view(torch.uint8), dst[d].view(torch.uint8)), f"block {s} -> {d} differs"
    untouched = sorted(set(range(dst.shape[0])) - set(dst_ids))
    assert bool((dst[untouched].float() == -7.0).all()), "a block outside the destination list was written"


def test_block_runs_coalesce_only_when_both_sides_are_consecutive():
    assert block_runs([5, 6, 7, 30, 2], [40, 41, 42, 3, 4]) == [(5, 40, 3), (30, 3, 1), (2, 4, 1)]
    assert block_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("backend", BACKENDS)
def test_moves_scattered_blocks_bit_exactly(pair, backend, dtype):
    """An FP8 pool's blocks go as they are: a quarter of float32's bytes, half of bf16's."""
    src, dst = cache(32, dtype, seed=1), cache(48, dtype)
    sender, receiver = pair(backend, src, dst)
    tid = "req|1 \"é\""  # ids travel inside wire headers and notifications
    receiver.expect(tid, DST)
    sent = sender.send(receiver.endpoint(), tid, SRC, DST, timeout_s=10)
    got = receiver.wait(tid, timeout_s=10)
    assert sent.ok and got.ok, (sent, got)
    assert sent.nbytes == got.nbytes == len(SRC) * src[0].numel() * src.element_size()
    assert_moved(src, dst, SRC, DST)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_moves_blocks_between_cuda_caches(pair, backend):
    src, dst = cache(32, torch.bfloat16, seed=12).cuda(), cache(48, torch.bfloat16).cuda()
    sender, receiver = pair(backend, src, dst)
    receiver.expect("gpu", DST)
    sent = sender.send(receiver.endpoint(), "gpu", SRC, DST, timeout_s=10)
    got = receiver.wait("gpu", timeout_s=10)
    assert sent.ok and got.ok, (sent, got)
    assert_moved(src.cpu(), dst.cpu(), SRC, DST)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_transfers_into_one_receiver(pair, backend):
    src, dst = cache(64, seed=2), cache(64)
    sender, receiver = pair(backend, src, dst)
    endpoint = receiver.endpoint()
    jobs = [(f"req-{i}", list(range(i * 8, i * 8 + 8)), list(range(63 - i, 63 - i - 64, -8))) for i in range(8)]
    for tid, _, dst_ids in jobs:
        receiver.expect(tid, dst_ids)
    results: dict[str, TransferResult] = {}
    threads = [threading.Thread(target=lambda j=j: results.__setitem__(j[0], sender.send(endpoint, *j, 10)))
               for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert all(results[tid].ok and receiver.wait(tid, 10).ok for tid, _, _ in jobs), results
    assert_moved(src, dst, [b for _, s, _ in jobs for b in s], [b for _, _, d in jobs for b in d])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_transfer_completes_on_both_sides(pair, backend):
    """A prompt whose blocks the decode side already had cached still needs a definite hand-off."""
    sender, receiver = pair(backend, cache(4, seed=13), cache(4))
    receiver.expect("cached", [])
    sent = sender.send(receiver.endpoint(), "cached", [], [], timeout_s=5)
    got = receiver.wait("cached", timeout_s=5)
    assert sent.ok and got.ok and got.nbytes == 0, (sent, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_geometry_is_a_clear_error(pair, backend):
    sender, receiver = pair(backend, cache(8, seed=3), cache(8, block=(4, 2, 16, 2, 64)))
    receiver.expect("req", [0])
    with pytest.raises(KVTransferError, match="head_dim 32 != 64"):
        sender.send(receiver.endpoint(), "req", [0], [0], timeout_s=5)
    other = create_transport(backend)
    try:
        other.register_cache(cache(8, torch.bfloat16))
        with pytest.raises(KVTransferError, match="dtype bfloat16 != float32"):
            other.send(sender.endpoint(), "req", [0], [0], timeout_s=5)
    finally:
        other.close()
    # An FP8 pool and a bf16 one of the same shape: refused by the sender, and by the layer-wise hand-off.
    fp8, bf16 = create_transport(backend), create_transport(backend)
    try:
        fp8.register_cache(cache(8, torch.float8_e4m3fn, seed=4))
        bf16.register_cache(cache(8, torch.bfloat16))
        bf16.expect("fp8", [1])
        with pytest.raises(KVTransferError, match="dtype float8_e4m3fn != bfloat16"):
            fp8.send(bf16.endpoint(), "fp8", [0], [1], timeout_s=5)
        with pytest.raises(KVTransferError, match="dtype float8_e4m3fn != bfloat16"):
            fp8.start_layerwise(bf16.endpoint(), "fp8", 0, [1], timeout_s=5)
        assert bf16.cancel("fp8")
    finally:
        fp8.close()
        bf16.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_that_never_arrives_times_out_and_cancel_forgets(pair, backend):
    sender, receiver = pair(backend, cache(8, seed=4), cache(8))
    receiver.expect("late", [1, 2])
    started = time.monotonic()
    result = receiver.wait("late", timeout_s=0.3)
    assert not result.ok and "timed out" in result.error
    assert time.monotonic() - started < 2
    with pytest.raises(KVTransferError, match="not expected"):
        receiver.wait("late", timeout_s=0.1)
    receiver.expect("gone", [3])
    assert receiver.cancel("gone") is True
    with pytest.raises(KVTransferError, match="not expected"):
        receiver.wait("gone", timeout_s=0.1)
    # The receiver stays usable after both.
    receiver.expect("next", [4])
    assert sender.send(receiver.endpoint(), "next", [1], [4], timeout_s=5).ok
    assert receiver.wait("next", timeout_s=5).ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_writing_other_blocks_than_expected_fails_the_receiver(pair, backend):
    sender, receiver = pair(backend, cache(8, seed=5), cache(8))
    receiver.expect("req", [1, 2])
    sent = sender.send(receiver.endpoint(), "req", [0, 1], [2, 3], timeout_s=5)
    got = receiver.wait("req", timeout_s=5)
    assert not got.ok and "differ" in got.error
    if backend == "tcp":  # tcp refuses before any byte moves; one-sided nixl / ipc writes cannot be refused
        assert not sent.ok and "differ" in sent.error


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_rejected_with_clear_errors(pair, backend):
    sender, receiver = pair(backend, cache(8, seed=6), cache(8))
    endpoint = receiver.endpoint()
    cases = [
        (lambda: sender.send(endpoint, "a", [0, 1], [0], 1), "2 source blocks but 1 destination"),
        (lambda: sender.send(endpoint, "a", [8], [0], 1), r"source block id 8 out of range \[0, 8\)"),
        (lambda: sender.send(endpoint, "a", [0], [-1], 1), "destination block id -1 out of range"),
        (lambda: sender.send(endpoint, "a", [0, 1], [2, 2], 1), "must be distinct"),
        (lambda: sender.send(b"garbage", "a", [0], [0], 1), "not a Baton KV endpoint"),
        (lambda: sender.send(endpoint.replace(b'"baton_kv": 1', b'"baton_kv": 9'), "a", [0], [0], 1),
         "version 9"),
        (lambda: receiver.expect("a", [0, 9]), "destination block id 9 out of range"),
        (lambda: receiver.wait("never-expected", 1), "not expected"),
        (lambda: create_transport(backend).register_cache(torch.zeros(4, 4)), "must have shape"),
    ]
    for call, message in cases:
        with pytest.raises(KVTransferError, match=message):
            call()
    receiver.expect("dup", [0])
    with pytest.raises(KVTransferError, match="already expected"):
        receiver.expect("dup", [1])
    receiver.cancel("dup")
    wrong = "nixl" if backend == "tcp" else "tcp"
    foreign = Endpoint(wrong, CacheGeometry.from_tensor(cache(8)), {}).to_bytes()
    with pytest.raises(KVTransferError, match=f"endpoint is for transport '{wrong}'"):
        sender.send(foreign, "a", [0], [0], 1)


def test_unknown_transport_lists_the_known_ones():
    with pytest.raises(KVTransferError, match="unknown KV transport 'carrier-pigeon'; known: ipc, nixl, tcp"):
        create_transport("carrier-pigeon")


def test_wait_async_from_asyncio_and_metrics_count_bytes(pair):
    src, dst = cache(16, seed=7), cache(16)
    sender, receiver = pair("tcp", src, dst)
    before = KV_TRANSFER_BYTES.labels("tcp")._value.get()

    async def main():
        receiver.expect("req", [9, 3])
        send = asyncio.create_task(asyncio.to_thread(sender.send, receiver.endpoint(), "req", [1, 2], [9, 3], 5))
        return await receiver.wait_async("req", timeout_s=5), await send

    got, sent = asyncio.run(main())
    assert got.ok and sent.ok
    assert_moved(src, dst, [1, 2], [9, 3])
    assert KV_TRANSFER_BYTES.labels("tcp")._value.get() - before == 2 * got.nbytes  # both sides count


def _raw_tcp_sender(endpoint: bytes, transfer_id: str, dst_ids: list[int], block_nbytes: int) -> socket.socket:
    """A hand-driven sender speaking the real wire format, to stop or stall at exact points."""
    params = Endpoint.from_bytes(endpoint).params
    sock = socket.create_connection((params["host"], params["port"]), timeout=5)
    sock.sendall(encode_header(transfer_id, block_nbytes, [(d, 1) for d in dst_ids]))
    code, length = _STATUS.unpack(sock.recv(_STATUS.size))
    assert code == 0, sock.recv(length)
    return sock


def test_tcp_sender_dying_mid_transfer_fails_the_receiver_fast(pair):
    src, dst = cache(8, seed=8), cache(8)
    _, receiver = pair("tcp", src, dst)
    receiver.expect("req", [1, 2])
    sock = _raw_tcp_sender(receiver.endpoint(), "req", [1, 2], receiver.geometry.block_nbytes)
    sock.sendall(b"\0" * (receiver.geometry.block_nbytes + 100))
    sock.close()
    started = time.monotonic()
    got = receiver.wait("req", timeout_s=10)
    assert not got.ok and f"sender disconnected after {receiver.geometry.block_nbytes + 100} of" in got.error
    assert time.monotonic() - started < 2


def test_tcp_cancel_cuts_off_a_sender_mid_stream(pair):
    _, receiver = pair("tcp", cache(8, seed=9), dst := cache(8))
    receiver.expect("req", [1, 2])
    block_nbytes = receiver.geometry.block_nbytes
    sock = _raw_tcp_sender(receiver.endpoint(), "req", [1, 2], block_nbytes)
    sock.sendall(b"\x11" * 100)
    deadline = time.monotonic() + 5
    while dst[1].reshape(-1).view(torch.uint8)[99] != 0x11 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert receiver.cancel("req") is True
    assert time.monotonic() - started < 2, "cancel() waited for the stalled sender instead of cutting it off"
    # Once cancel() has returned, nothing more may land in the (now free) destination blocks.
    try:
        sock.sendall(b"\x22" * (2 * block_nbytes - 100))
        status = sock.recv(4096)
    except ConnectionError:
        status = b""
    sock.close()
    assert status == b"" or b"cancelled" in status
    time.sleep(0.05)
    written = dst[1:3].reshape(-1).view(torch.uint8)
    assert bool((written[:100] == 0x11).all())
    assert not bool((written[100:] == 0x22).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_to_a_vanished_receiver_fails_within_its_timeout(pair, backend):
    sender, receiver = pair(backend, cache(8, seed=10), cache(8))
    endpoint = receiver.endpoint()
    receiver.close()
    started = time.monotonic()
    result = sender.send(endpoint, "req", [0], [0], timeout_s=2)
    assert not result.ok and "receiver" in result.error
    assert time.monotonic() - started < 3


CHILD = r"""
import sys, threading, torch
from baton.engine.kv_transfer import create_transport
backend, endpoint, mode = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
shape, device = [int(x) for x in sys.argv[4].split(",")], sys.argv[5]
src = torch.randn(shape, generator=torch.Generator().manual_seed(11)) if mode == "ok" else torch.ones(shape)
src = src.to(device)
t = create_transport(backend)
t.register_cache(src)
ids = list(range(shape[0]))
if mode == "ok":
    print("RESULT", t.send(endpoint, "xproc", ids[::-2], ids[1::2], 20).ok, flush=True)
else:
    print("sending", flush=True)
    t.send(endpoint, "xproc", ids, ids, 20)
    print("finished", flush=True)
"""


def _spawn_sender(backend: str, endpoint: bytes, mode: str, shape: tuple[int, ...],
                  device: str = "cpu") -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    return subprocess.Popen([sys.executable, "-c", CHILD, backend, endpoint.hex(), mode, ",".join(map(str, shape)),
                             device],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": path})


@pytest.mark.parametrize("backend,device", [
    ("tcp", "cpu"), ("ipc", "cpu"),
    pytest.param("nixl", "cpu", marks=pytest.mark.skipif(not HAS_NIXL, reason="nixl is not installed")),
    pytest.param("ipc", "cuda", marks=[pytest.mark.gpu,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_cross_process_transfer_is_bit_exact(backend, device):
    dst = cache(16).to(device)
    receiver = create_transport(backend)
    try:
        receiver.register_cache(dst)
        src_ids, dst_ids = list(range(16))[::-2], list(range(16))[1::2]
        receiver.expect("xproc", dst_ids)
        child = _spawn_sender(backend, receiver.endpoint(), "ok", tuple(dst.shape), device)
        got = receiver.wait("xproc", timeout_s=20)
        out, _ = child.communicate(timeout=20)
        assert got.ok, got
        assert "RESULT True" in out
        src = torch.randn(dst.shape, generator=torch.Generator().manual_seed(11))
        assert_moved(src, dst.cpu(), src_ids, dst_ids)
    finally:
        receiver.close()


@pytest.mark.skipif(not HAS_NIXL, reason="nixl is not installed")
def test_nixl_sender_killed_during_transfer_fails_the_receiver():
    """SIGKILL lands before or during a 256 MiB WRITE; either way no notification, so the receiver times out."""
    shape = (64, 8, 2, 16, 8, 128)  # 4 MiB blocks
    receiver = create_transport("nixl")
    try:
        receiver.register_cache(torch.empty(shape))
        receiver.expect("xproc", list(range(64)))
        child = _spawn_sender("nixl", receiver.endpoint(), "die", shape)
        assert child.stdout.readline().strip() == "sending"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        got = receiver.wait("xproc", timeout_s=1.5)
        assert not got.ok and "timed out" in got.error, got
    finally:
        receiver.close()


def test_tcp_refuses_a_transfer_the_receiver_did_not_announce(pair):
    """The receiver writes into its cache only for transfers it expect()ed, with the destination it announced:
    an unknown id, a finished one or a second sender of the same id is refused before any byte lands.
    (ipc and nixl write one-sided into memory the receiver exported; there the receiver's checks cover only the
    completion notice, and who may write is whoever holds the mapping or registration.)"""
    src, dst = cache(8, seed=10), cache(8)
    sender, receiver = pair("tcp", src, dst)
    before = dst.clone()
    refused = sender.send(receiver.endpoint(), "never-announced", [1, 2], [3, 4], timeout_s=5)
    assert not refused.ok and "not expected by the receiver" in refused.error
    receiver.expect("once", [5])
    assert sender.send(receiver.endpoint(), "once", [1], [5], timeout_s=5).ok
    assert receiver.wait("once", timeout_s=5).ok
    again = sender.send(receiver.endpoint(), "once", [2], [5], timeout_s=5)  # collected: no longer expected
    assert not again.ok and "not expected by the receiver" in again.error
    receiver.expect("claimed", [6])
    first = _raw_tcp_sender(receiver.endpoint(), "claimed", [6], receiver.geometry.block_nbytes)
    try:
        second = sender.send(receiver.endpoint(), "claimed", [3], [6], timeout_s=5)
        assert not second.ok and "already being received" in second.error
    finally:
        first.close()
    receiver.cancel("claimed")
    untouched = [b for b in range(8) if b != 5]
    assert torch.equal(dst[untouched], before[untouched]), "a refused transfer wrote into the cache"
    assert_moved(src, dst, [1], [5])
