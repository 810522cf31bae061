"""Same-host KV transport: the receiver exports its KV pool once (CUDA IPC on a GPU, POSIX shared memory on the
CPU), each sender maps it once and copies every (source, destination) block pair itself, in one kernel launch
on a GPU; one datagram per hand-off then tells the receiver it is complete.

A sender writes one-sided into the receiver's memory, so a cancelled transfer cannot be stopped mid-copy: the
receiver keeps the destination blocks until the sender's timeout (cancel_stops_writes = False), as for nixl.
"""
from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import json
import logging
import queue
import socket
import threading
import time
import uuid
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch
from prometheus_client import Counter

from baton.engine.config import KV_STORAGE_DTYPES
from baton.engine.kv_transfer.base import Endpoint, KVTransferError, KVTransport, LayerwiseSend, TransferResult, \
    block_runs

log = logging.getLogger(__name__)
# Pools exported by this process, by pool id: CUDA cannot open an IPC handle in the process that made it, so a
# sender and receiver that share a process (tests, a colocated pair) use the tensor itself.
_OWN_POOLS: dict[str, torch.Tensor] = {}
KV_IPC_PEER_MAPPINGS = Counter("baton_kv_ipc_peer_mappings", "Peer KV pools this process mapped (once per peer)")
KV_LAYERWISE_HANDOFFS = Counter("baton_kv_layerwise_handoffs", "KV hand-offs copied layer by layer while their "
                                "prompt was computed (--kv-layerwise)")


@functools.cache  # asked twice per hand-off (the offer, then the send); fixed for the process's life
def host_id() -> str:
    """Same value in every process of one machine (and boot): where CUDA IPC and shared memory reach."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _local_cuda_index(device_uuid: str) -> int | None:
    """This process's index of the GPU with that uuid (CUDA_VISIBLE_DEVICES may number GPUs differently)."""
    for i in range(torch.cuda.device_count()):
        if _device_uuid(torch.device("cuda", i)) == device_uuid:
            return i
    return None


def _ids_digest(block_ids) -> str:
    """Names a destination list in a notification of fixed size, however long the prompt."""
    return hashlib.blake2b(json.dumps(list(block_ids)).encode(), digest_size=16).hexdigest()


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not yet named in every Python's mmap module


def _populate(pool: torch.Tensor) -> None:
    """Fault a mapped pool in: else every first write to a page of a new block costs a page fault (about 10x the
    copy itself on a scattered 5k-token hand-off). Content is left as it is, so copies may run meanwhile; the GIL
    is released throughout (ctypes; mmap.madvise would hold it)."""
    view = pool.view(-1).view(torch.uint8)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(view.data_ptr()), ctypes.c_size_t(view.numel()), _MADV_POPULATE_WRITE) == 0:
            return
    except (OSError, AttributeError):
        pass
    int(view[::4096].sum())  # a read fault maps each shared page too


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class IpcTransport(KVTransport):
    name = "ipc"
    cancel_stops_writes = False

    def __init__(self) -> None:
        super().__init__()
        self.pool_id = uuid.uuid4().hex
        self._shm: shared_memory.SharedMemory | None = None
        self._export: dict[str, Any] = {}
        self._peers: dict[str, torch.Tensor] = {}  # pool id -> the peer's pool, mapped once
        self._peer_lock = threading.Lock()
        self._populating: list[threading.Thread] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._address = f"\0baton-kv-{self.pool_id}"  # abstract namespace: no file to clean up
        self._sock.bind(self._address)
        self._listener: threading.Thread | None = None

    # ---- receiver ----

    def _register(self, kv_cache: torch.Tensor) -> None:
        if kv_cache.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            _, args = reduce_tensor(kv_cache)
            (_, size, stride, offset, _, _, device, handle, storage_bytes, storage_offset, _, ref_handle,
             ref_offset, event_handle, event_sync) = args
            self._export = {"kind": "cuda", "device_uuid": _device_uuid(kv_cache.device), "device": device,
                            "size": list(size), "stride": list(stride), "offset": offset,
                            "handle": _b64(handle), "storage_bytes": storage_bytes,
                            "storage_offset": storage_offset, "ref_handle": _b64(ref_handle),
                            "ref_offset": ref_offset, "event_handle": _b64(event_handle or b""),
                            "event_sync": bool(event_sync)}
        else:
            # Move the pool into a named shared-memory segment, in place: the engine keeps its tensor object.
            nbytes = kv_cache.numel() * kv_cache.element_size()
            self._shm = shared_memory.SharedMemory(name=f"baton-kv-{self.pool_id}", create=True, size=nbytes)
            shared = torch.frombuffer(self._shm.buf, dtype=kv_cache.dtype, count=kv_cache.numel())
            shared.copy_(kv_cache.reshape(-1))
            with torch.no_grad():
                kv_cache.set_(shared.untyped_storage(), 0, kv_cache.shape, kv_cache.stride())
            self._export = {"kind": "shm", "name": self._shm.name, "nbytes": nbytes}
        _OWN_POOLS[self.pool_id] = kv_cache
        self._listener = threading.Thread(target=self._listen, name="kv-ipc-notify", daemon=True)
        self._listener.start()

    def _endpoint_params(self) -> dict[str, Any]:
        return {"host": host_id(), "pool_id": self.pool_id, "notify": _b64(self._address.encode()), **self._export}

    def _listen(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return  # closed
            try:
                note = json.loads(data)
                transfer_id, dst, nbytes = str(note["id"]), str(note["dst"]), int(note["nbytes"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed KV hand-off notification")
                continue
            with self._lock:
                expected = self._expected.get(transfer_id)
            if expected is None:
                continue  # cancelled or timed out already
            if dst != _ids_digest(expected.dst_block_ids):
                self._finish(transfer_id, False, 0, "sender wrote blocks that differ from the expected destination")
            else:
                self._finish(transfer_id, True, nbytes)

    # ---- sender ----

    def _reaches(self, peer: Endpoint) -> bool:
        """Same host, and the same device kind as our pool (a GPU of ours sees the receiver's GPU)."""
        p, device = peer.params, self._cache.device
        if p.get("host") != host_id():
            return False
        if p.get("kind") == "cuda":
            return device.type == "cuda" and _local_cuda_index(str(p.get("device_uuid"))) is not None
        return p.get("kind") == "shm" and device.type == "cpu"

    def _peer_pool(self, peer: Endpoint) -> torch.Tensor:
        p = peer.params
        with self._peer_lock:
            pool = self._peers.get(p["pool_id"])
            if pool is not None:
                return pool
            g = peer.geometry
            shape = (g.num_blocks, g.num_layers, 2, g.block_size, g.num_kv_heads, g.head_dim)
            dtype = KV_STORAGE_DTYPES[g.dtype]
            if p["pool_id"] in _OWN_POOLS:
                pool = _OWN_POOLS[p["pool_id"]]
            elif p.get("kind") == "cuda":
                from torch.multiprocessing.reductions import rebuild_cuda_tensor

                index = _local_cuda_index(p["device_uuid"])
                if index is None:
                    raise KVTransferError("the receiver's GPU is not visible to this process")
                pool = rebuild_cuda_tensor(
                    torch.Tensor, torch.Size(p["size"]), tuple(p["stride"]), p["offset"], torch.storage.TypedStorage,
                    dtype, index, base64.b64decode(p["handle"]), p["storage_bytes"], p["storage_offset"], False,
                    base64.b64decode(p["ref_handle"]), p["ref_offset"], base64.b64decode(p["event_handle"]) or None,
                    p["event_sync"])
            else:
                shm = shared_memory.SharedMemory(name=p["name"], create=False)
                # Attaching registers the segment with this process's resource tracker, which would unlink it
                # (the receiver's pool) when this process exits; the receiver owns it.
                resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
                pool = torch.frombuffer(shm.buf, dtype=dtype, count=int(torch.Size(shape).numel())).view(shape)
                pool._baton_shm = shm  # keeps the mapping alive as long as the tensor
                # Beside the first hand-off, not before it: a 0.5 GB pool takes ~120 ms to fault in, which that
                # request's time to first token would pay; its own blocks fault in as it writes them.
                thread = threading.Thread(target=_populate, args=(pool,), name="kv-ipc-populate", daemon=True)
                thread.start()
                self._populating.append(thread)
            if tuple(pool.shape) != shape:
                raise KVTransferError(f"peer pool has shape {tuple(pool.shape)}, its endpoint says {shape}")
            self._peers[p["pool_id"]] = pool
            KV_IPC_PEER_MAPPINGS.inc()
            return pool

    def _send(self, peer: Endpoint, transfer_id: str, runs: list[tuple[int, int, int]],
              deadline: float) -> str | None:
        src = self._cache
        if not self._reaches(peer):
            return "the receiver is not on this host and device kind (use tcp or nixl)"
        try:
            dst = self._peer_pool(peer)
        except (OSError, RuntimeError, KVTransferError) as exc:
            return f"cannot map the receiver's KV pool (receiver gone?): {exc}"
        if time.monotonic() > deadline:
            return "deadline passed before the copy started"
        src_ids = [s + i for s, _, n in runs for i in range(n)]
        dst_ids = [d + i for _, d, n in runs for i in range(n)]
        if src_ids:
            if src.is_cuda and dst.device == src.device:
                from baton.kernels.kv_block_copy import copy_kv_blocks

                ids = torch.tensor([src_ids, dst_ids], dtype=torch.int32).to(src.device, non_blocking=True)
                copy_kv_blocks(src, dst, ids[0], ids[1])
                torch.cuda.current_stream(src.device).synchronize()
            else:  # CPU shared memory, or a peer GPU of this host: runs of consecutive blocks as bulk copies
                for s, d, n in runs:
                    dst[d:d + n].copy_(src[s:s + n], non_blocking=dst.is_cuda)
                if dst.is_cuda:
                    torch.cuda.synchronize(dst.device)
        return self._notify(peer, transfer_id, dst_ids)

    def _notify(self, peer: Endpoint, transfer_id: str, dst_ids: list[int]) -> str | None:
        """Tells the receiver that every block of the hand-off has landed: the one message per hand-off."""
        note = json.dumps({"id": transfer_id, "dst": _ids_digest(dst_ids),
                           "nbytes": len(dst_ids) * self.geometry.block_nbytes}).encode()
        try:
            self._sock.sendto(note, base64.b64decode(peer.params["notify"]).decode())
        except OSError as exc:
            return f"the receiver is gone (notification failed: {exc})"
        return None

    supports_layerwise = True

    def _start_layerwise(self, peer_endpoint: bytes, peer: Endpoint, transfer_id: str, skip_blocks: int,
                         dst_block_ids: list[int], deadline: float) -> LayerwiseSend:
        return _IpcLayerwiseSend(self, peer_endpoint, peer, transfer_id, skip_blocks, dst_block_ids, deadline)

    def _close(self) -> None:
        for thread in self._populating:  # never left inside the syscall while the interpreter finalises
            thread.join(timeout=10)
        self._sock.close()
        self._peers.clear()
        _OWN_POOLS.pop(self.pool_id, None)
        if self._shm is not None:
            try:
                self._shm.unlink()  # the mapping itself stays valid for the engine until the process ends
            except FileNotFoundError:
                pass


class _IpcLayerwiseSend(LayerwiseSend):
    """Copies layer l of every block into the mapped peer pool as soon as the engine has written it: on a GPU one
    launch per layer on a side stream that waits for the layer (an event), so the copy runs beside the later
    layers; on the CPU a thread copies while the engine computes on. `finish` waits for the copies and sends the
    hand-off's one notification."""

    def __init__(self, transport: IpcTransport, peer_endpoint: bytes, peer: Endpoint, transfer_id: str,
                 skip_blocks: int, dst_block_ids: list[int], deadline: float) -> None:
        self._t, self._peer_endpoint, self._peer, self._transfer_id = transport, peer_endpoint, peer, transfer_id
        self._skip, self._dst, self._deadline = skip_blocks, dst_block_ids, deadline
        self._src: list[int] | None = None
        self._layers: set[int] = set()
        self._error: str | None = None
        self._started = time.monotonic()
        src = transport._cache
        self._dst_pool: torch.Tensor | None = None
        if not transport._reaches(peer):
            self._error = "the receiver is not on this host and device kind (use tcp or nixl)"
            return
        try:
            self._dst_pool = transport._peer_pool(peer)
        except (OSError, RuntimeError, KVTransferError) as exc:
            self._error = f"cannot map the receiver's KV pool (receiver gone?): {exc}"
            return
        self._cuda = src.is_cuda and self._dst_pool.device == src.device
        if self._cuda:
            self._stream = torch.cuda.Stream(src.device)
        else:
            self._queue: queue.Queue = queue.Queue()
            self._thread = threading.Thread(target=self._copy_layers, name=f"kv-layerwise-{transfer_id[:8]}",
                                            daemon=True)
            self._thread.start()

    def layer_ready(self, layer: int, block_table) -> None:
        if self._error is not None:
            return
        try:
            if time.monotonic() > self._deadline:
                self._error = "deadline passed while the prompt was still being computed"
                return
            if self._src is None:
                src = list(block_table[self._skip:])
                if len(src) != len(self._dst):
                    self._error = f"{len(self._dst)} destination blocks for {len(src)} uncached prompt blocks"
                    return
                self._t.geometry.check_block_ids(src, "source")
                self._src, self._runs = src, block_runs(src, self._dst)
                if self._cuda:
                    device = self._t._cache.device
                    self._ids = torch.tensor([src, self._dst], dtype=torch.int32).to(device, non_blocking=True)
            if self._cuda:
                from baton.kernels.kv_block_copy import copy_kv_block_layers

                written = torch.cuda.Event()
                written.record()  # on the engine's stream, after this layer's KV writes
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(written)
                    copy_kv_block_layers(self._t._cache, self._dst_pool, self._ids[0], self._ids[1], layer, layer + 1)
            else:
                self._queue.put(layer)
            self._layers.add(layer)
        except Exception as exc:  # never into the engine's step
            self._error = f"layer-wise copy failed: {exc!r}"

    def _copy_layers(self) -> None:
        src_pool, dst_pool = self._t._cache, self._dst_pool
        while True:
            layer = self._queue.get()
            try:
                if layer is None:
                    return
                if self._error is None and time.monotonic() <= self._deadline:
                    for s, d, n in self._runs:
                        dst_pool[d:d + n, layer].copy_(src_pool[s:s + n, layer])
            except Exception as exc:
                self._error = f"layer-wise copy failed: {exc!r}"
            finally:
                self._queue.task_done()

    def _drain(self) -> None:
        if self._dst_pool is None:
            return
        if self._cuda:
            self._stream.synchronize()
        else:
            self._queue.join()

    def finish(self, src_block_ids) -> TransferResult:
        started = time.monotonic()
        src_block_ids = list(src_block_ids)
        self._drain()
        error = self._error
        if error is None and (self._src != src_block_ids or len(self._layers) != self._t.geometry.num_layers):
            # Some layers were not fed (a step that skipped the hook): copy everything now, the plain way.
            self._stop()
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                return TransferResult(self._transfer_id, False, error="deadline passed before the copy started")
            return self._t.send(self._peer_endpoint, self._transfer_id, src_block_ids, self._dst,
                                remaining)
        self._stop()
        if error is None and time.monotonic() > self._deadline:
            error = "deadline passed during the copy"
        if error is None:
            error = self._t._notify(self._peer, self._transfer_id, self._dst)
        if error is None:
            KV_LAYERWISE_HANDOFFS.inc()
        return self._t._finished_send(self._transfer_id, len(self._dst) * self._t.geometry.block_nbytes,
                                      time.monotonic() - started, error)

    def _stop(self) -> None:
        if self._dst_pool is not None and not self._cuda:
            self._queue.put(None)
            self._thread.join(timeout=10)

    def abandon(self) -> None:
        self._error = self._error or "abandoned"
        self._drain()
        self._stop()
