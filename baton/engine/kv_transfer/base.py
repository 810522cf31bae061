"""The `KVTransport` seam: moves KV-cache blocks from a prefill engine's cache into a decode engine's cache.

Backends (tcp, nixl, later nvlink) implement `_send` and `endpoint`; the receiver bookkeeping lives here.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import threading
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
from prometheus_client import Counter, Histogram

from baton.engine.config import KV_STORAGE_DTYPES

# Version of the endpoint descriptor and of every backend's hand-off payload; bump on any change.
PROTOCOL_VERSION = 1

KV_TRANSFER_BYTES = Counter("baton_kv_transfer_bytes", "KV-cache bytes moved by this process", ["transport"])
KV_TRANSFER_SECONDS = Histogram(
    "baton_kv_transfer_seconds", "Duration of KV-cache transfers seen by this process", ["transport"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# Transports still open when the interpreter exits are closed first, while their threads can still run: left to
# finalisation, a daemon thread woken inside native code (a socket, a UCX progress thread, a torch op that let the
# GIL go) is ended mid-frame and the process aborts ("terminate called without an active exception").
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_transports() -> None:
    for transport in list(_OPEN):
        try:
            transport.close()
        except Exception:  # noqa: BLE001 - exiting anyway; one bad transport must not keep the others open
            pass


class KVTransferError(ValueError):
    """Caller error: bad block ids, an unusable endpoint, mismatched cache geometry, unknown transfer."""


@dataclass(frozen=True)
class CacheGeometry:
    """Shape of a block-major KV cache [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]."""

    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    # An FP8 pool's per-layer K/V scales, as text (see scales_digest): blocks written under other scales would read
    # back scaled wrong, so they must match too. "" where there are none (a model-dtype pool).
    kv_scales: str = ""

    @staticmethod
    def scales_digest(kv_scales: torch.Tensor | None) -> str:
        """Exact text of the scales (float32 hex), compared as is: equal scales give equal text."""
        if kv_scales is None:
            return ""
        return ",".join(float(x).hex() for x in kv_scales.detach().float().flatten().cpu().tolist())

    @classmethod
    def from_tensor(cls, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None = None) -> CacheGeometry:
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
            raise KVTransferError(
                "kv_cache must have shape [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
                f"got {list(kv_cache.shape)}")
        if not kv_cache.is_contiguous():
            raise KVTransferError("kv_cache must be contiguous so that each block is one span of memory")
        dtype = str(kv_cache.dtype).removeprefix("torch.")
        if dtype not in KV_STORAGE_DTYPES:
            raise KVTransferError(f"kv_cache dtype must be one of {sorted(KV_STORAGE_DTYPES)}, got {dtype}")
        n, layers, _, block_size, heads, head_dim = kv_cache.shape
        return cls(n, layers, block_size, heads, head_dim, dtype, cls.scales_digest(kv_scales))

    @property
    def block_nbytes(self) -> int:
        itemsize = KV_STORAGE_DTYPES[self.dtype].itemsize
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def check_compatible(self, peer: CacheGeometry) -> None:
        """Raise unless a block of ours and a block of the peer's hold the same thing (num_blocks may differ): the
        dtype too, so an FP8 pool and a bf16 one never swap bytes."""
        diffs = [f"{name} {getattr(self, name)} != {getattr(peer, name)}"
                 for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")
                 if getattr(self, name) != getattr(peer, name)]
        if not diffs and self.kv_scales != peer.kv_scales:
            diffs.append("FP8 KV scales differ (give both workers the same checkpoint scales or both "
                         "--calculate-kv-scales)")
        if diffs:
            raise KVTransferError("peer KV cache geometry differs (local != peer): " + ", ".join(diffs))

    def check_block_ids(self, block_ids: Sequence[int], side: str) -> None:
        for b in block_ids:
            if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < self.num_blocks:
                raise KVTransferError(f"{side} block id {b!r} out of range [0, {self.num_blocks})")


@dataclass(frozen=True)
class Endpoint:
    """What a sender needs to reach a receiver: its transport, cache geometry and backend-specific params.

    Travels as opaque bytes (a protobuf `bytes` field); each backend parses `params` into its own typed form.
    """

    transport: str
    geometry: CacheGeometry
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps({"baton_kv": PROTOCOL_VERSION, "transport": self.transport,
                           "geometry": asdict(self.geometry), "params": dict(self.params)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Endpoint:
        try:
            doc = json.loads(bytes(data))
        except (ValueError, TypeError) as e:
            raise KVTransferError(f"peer endpoint is not a Baton KV endpoint descriptor ({e})") from None
        if not isinstance(doc, dict) or "baton_kv" not in doc:
            raise KVTransferError("peer endpoint is not a Baton KV endpoint descriptor")
        if doc["baton_kv"] != PROTOCOL_VERSION:
            raise KVTransferError(
                f"peer endpoint has KV protocol version {doc['baton_kv']}, this process speaks {PROTOCOL_VERSION}")
        try:
            return cls(str(doc["transport"]), CacheGeometry(**doc["geometry"]), dict(doc["params"]))
        except (KeyError, TypeError) as e:
            raise KVTransferError(f"peer endpoint descriptor is malformed ({e})") from None


@dataclass(frozen=True)
class TransferResult:
    """Outcome of one transfer on one side. `seconds`: sender, the send call; receiver, expect() to completion."""

    transfer_id: str
    ok: bool
    nbytes: int = 0
    seconds: float = 0.0
    error: str | None = None


def block_runs(src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Coalesce the pairing src[i] -> dst[i] into (src_start, dst_start, count) runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_block_ids, dst_block_ids):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


class LayerwiseSend(ABC):
    """A hand-off that starts while its prompt is still being computed (`--kv-layerwise`): the engine calls
    `layer_ready(l, block_table)` on its own thread right after layer l of the step that completes the prompt
    has written its KV (all blocks, so earlier chunks' blocks go too); `finish(src_block_ids)` waits for the
    copies, completes the hand-off and returns its result; `abandon()` stops it (the prompt failed or was
    cancelled: the receiver then frees its blocks after the sender's timeout, as for any one-sided write).
    `layer_ready` never raises and never blocks on the copy; a problem is kept for `finish` to report."""

    @abstractmethod
    def layer_ready(self, layer: int, block_table: Sequence[int]) -> None: ...

    @abstractmethod
    def finish(self, src_block_ids: Sequence[int]) -> TransferResult: ...

    @abstractmethod
    def abandon(self) -> None: ...


@dataclass
class _Expected:
    dst_block_ids: tuple[int, ...]
    started: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    claimed: bool = False  # a sender has started writing this transfer


class KVTransport(ABC):
    """One process's end of KV transfers; the same object can send (prefill) and receive (decode).

    Receiver: register_cache → endpoint() to the sender → expect(id, dst ids) → wait(id) or cancel(id).
    Every expect() must be collected by wait()/wait_async() or cancel(). Sender: send(...) blocks until the
    receiver holds the bytes. Caller errors raise KVTransferError; anything that goes wrong on the wire
    comes back as TransferResult(ok=False, error=...). Nothing blocks longer than its timeout.
    """

    name: ClassVar[str]
    # False where a sender writes one-sided (RDMA): after cancel() bytes may still land until the sender's
    # own timeout, so the receiver must not reuse the destination blocks before then.
    cancel_stops_writes: ClassVar[bool] = True

    def __init__(self) -> None:
        self._cache: torch.Tensor | None = None
        self._geometry: CacheGeometry | None = None
        self._endpoint: bytes | None = None
        self._expected: dict[str, _Expected] = {}
        self._lock = threading.Lock()
        self._closed = False
        _OPEN.add(self)

    @property
    def geometry(self) -> CacheGeometry:
        if self._geometry is None:
            raise KVTransferError(f"{self.name} transport has no KV cache; call register_cache() first")
        return self._geometry

    def register_cache(self, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
        """kv_scales: an FP8 pool's per-layer K/V scales [num_layers, 2]; a peer must hold the same ones."""
        if self._cache is not None:
            raise KVTransferError(f"{self.name} transport already has a KV cache registered")
        geometry = CacheGeometry.from_tensor(kv_cache, kv_scales)
        self._register(kv_cache)
        self._cache, self._geometry = kv_cache, geometry

    @abstractmethod
    def _register(self, kv_cache: torch.Tensor) -> None: ...

    def endpoint(self) -> bytes:
        """Opaque, versioned descriptor of this receiver (see Endpoint)."""
        if self._closed:
            raise KVTransferError(f"{self.name} transport is closed")
        if self._endpoint is None:  # fixed once the cache is registered; built once, sent with every request
            self._endpoint = Endpoint(self.name, self.geometry, self._endpoint_params()).to_bytes()
        return self._endpoint

    @abstractmethod
    def _endpoint_params(self) -> dict[str, Any]:
        """What a sender needs to reach this receiver, JSON-serialisable."""

    # ---- receiver side ----

    def expect(self, transfer_id: str, dst_block_ids: Sequence[int]) -> None:
        """Announce that blocks `dst_block_ids` (already allocated by the caller) will receive transfer_id."""
        if self._closed:
            raise KVTransferError(f"{self.name} transport is closed")
        self.geometry.check_block_ids(dst_block_ids, "destination")
        if len(set(dst_block_ids)) != len(dst_block_ids):
            raise KVTransferError("destination block ids must be distinct")
        with self._lock:
            if transfer_id in self._expected:
                raise KVTransferError(f"transfer {transfer_id!r} is already expected")
            self._expected[transfer_id] = _Expected(tuple(dst_block_ids), time.monotonic())
        self._on_expect(transfer_id)

    def _on_expect(self, transfer_id: str) -> None:
        """Hook for backends that may have heard of a transfer before it was expected."""

    def wait(self, transfer_id: str, timeout_s: float) -> TransferResult:
        """Block until transfer_id has arrived, failed, or timeout_s passed; then forget it."""
        future = self._expectation(transfer_id).future
        try:
            future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            self._give_up(transfer_id, f"timed out after {timeout_s:g}s waiting for the sender")
        return self._collect(transfer_id)

    async def wait_async(self, transfer_id: str, timeout_s: float) -> TransferResult:
        future = asyncio.wrap_future(self._expectation(transfer_id).future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            self._give_up(transfer_id, f"timed out after {timeout_s:g}s waiting for the sender")
        return self._collect(transfer_id)

    def cancel(self, transfer_id: str) -> bool:
        """Fail and forget transfer_id; an in-flight sender is cut off. True if it had not finished yet."""
        cancelled = self._give_up(transfer_id, "cancelled by the receiver")
        with self._lock:
            self._expected.pop(transfer_id, None)
        return cancelled

    def _give_up(self, transfer_id: str, error: str) -> bool:
        """Fail a transfer on the receiver's initiative and make sure no more bytes land in its blocks."""
        settled = self._finish(transfer_id, False, 0, error)
        if settled:
            self._abandon(transfer_id)
        return settled

    def _abandon(self, transfer_id: str) -> None:
        """Hook: stop writing into transfer_id's blocks before returning (where the backend can)."""

    def _expectation(self, transfer_id: str) -> _Expected:
        with self._lock:
            expected = self._expected.get(transfer_id)
        if expected is None:
            raise KVTransferError(f"transfer {transfer_id!r} is not expected (never announced, or already collected)")
        return expected

    def _finish(self, transfer_id: str, ok: bool, nbytes: int, error: str | None = None) -> bool:
        """Settle transfer_id once; later calls lose. Returns whether this call settled it."""
        with self._lock:
            expected = self._expected.get(transfer_id)
            if expected is None or expected.future.done():
                return False
            result = TransferResult(transfer_id, ok, nbytes, time.monotonic() - expected.started, error)
            expected.future.set_result(result)
        if ok:
            self._record(result)
        return True

    def _collect(self, transfer_id: str) -> TransferResult:
        with self._lock:
            expected = self._expected.pop(transfer_id)
        return expected.future.result()

    def _is_live(self, transfer_id: str) -> bool:
        with self._lock:
            expected = self._expected.get(transfer_id)
            return expected is not None and not expected.future.done()

    def _record(self, result: TransferResult) -> None:
        KV_TRANSFER_BYTES.labels(self.name).inc(result.nbytes)
        KV_TRANSFER_SECONDS.labels(self.name).observe(result.seconds)

    # ---- sender side ----

    def reaches(self, peer_endpoint: bytes) -> bool:
        """Whether this sender can write to that receiver (same backend; same host and device kind for ipc)."""
        try:
            peer = Endpoint.from_bytes(peer_endpoint)
        except KVTransferError:
            return False
        return peer.transport == self.name and self._reaches(peer)

    def _reaches(self, peer: Endpoint) -> bool:
        return True

    def send(self, peer_endpoint: bytes, transfer_id: str, src_block_ids: Sequence[int],
             dst_block_ids: Sequence[int], timeout_s: float) -> TransferResult:
        """Copy our blocks src_block_ids into the peer's dst_block_ids (pairwise, in order); blocks until done."""
        if self._closed:
            raise KVTransferError(f"{self.name} transport is closed")
        peer = Endpoint.from_bytes(peer_endpoint)
        if peer.transport != self.name:
            raise KVTransferError(f"peer endpoint is for transport {peer.transport!r}, this is {self.name!r}")
        if len(src_block_ids) != len(dst_block_ids):
            raise KVTransferError(
                f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destination blocks")
        if not transfer_id or len(transfer_id.encode()) > 255:
            raise KVTransferError("transfer_id must be a non-empty string of at most 255 bytes")
        self.geometry.check_compatible(peer.geometry)
        self.geometry.check_block_ids(src_block_ids, "source")
        peer.geometry.check_block_ids(dst_block_ids, "destination")
        if len(set(dst_block_ids)) != len(dst_block_ids):
            raise KVTransferError("destination block ids must be distinct")
        started = time.monotonic()
        error = self._send(peer, transfer_id, block_runs(src_block_ids, dst_block_ids), started + timeout_s)
        return self._finished_send(transfer_id, len(src_block_ids) * self.geometry.block_nbytes,
                                   time.monotonic() - started, error)

    @abstractmethod
    def _send(self, peer: Endpoint, transfer_id: str, runs: list[tuple[int, int, int]],
              deadline: float) -> str | None:
        """Move the runs before `deadline` (time.monotonic); return None on success or an error message."""

    # Whether start_layerwise copies layer by layer during the prefill (else the whole send runs at finish).
    supports_layerwise: ClassVar[bool] = False

    def start_layerwise(self, peer_endpoint: bytes, transfer_id: str, skip_blocks: int,
                        dst_block_ids: Sequence[int], timeout_s: float) -> LayerwiseSend:
        """A hand-off of the prompt's blocks from the `skip_blocks`-th on (the receiver has the ones before) into
        the peer's `dst_block_ids`, fed by the engine layer by layer; nothing is written after `timeout_s`."""
        if self._closed:
            raise KVTransferError(f"{self.name} transport is closed")
        peer = Endpoint.from_bytes(peer_endpoint)
        if peer.transport != self.name:
            raise KVTransferError(f"peer endpoint is for transport {peer.transport!r}, this is {self.name!r}")
        self.geometry.check_compatible(peer.geometry)
        peer.geometry.check_block_ids(dst_block_ids, "destination")
        if len(set(dst_block_ids)) != len(dst_block_ids):
            raise KVTransferError("destination block ids must be distinct")
        if skip_blocks < 0:
            raise KVTransferError(f"skip_blocks must be >= 0, got {skip_blocks}")
        return self._start_layerwise(peer_endpoint, peer, transfer_id, skip_blocks, list(dst_block_ids),
                                     time.monotonic() + timeout_s)

    def _start_layerwise(self, peer_endpoint: bytes, peer: Endpoint, transfer_id: str, skip_blocks: int,
                         dst_block_ids: list[int], deadline: float) -> LayerwiseSend:
        return _SendAtFinish(self, peer_endpoint, transfer_id, dst_block_ids, deadline)

    def _finished_send(self, transfer_id: str, nbytes: int, seconds: float, error: str | None) -> TransferResult:
        result = TransferResult(transfer_id, error is None, 0 if error else nbytes, seconds, error)
        if result.ok:
            self._record(result)
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pending = list(self._expected)
        for transfer_id in pending:
            self._give_up(transfer_id, f"{self.name} transport closed")
        self._close()

    @abstractmethod
    def _close(self) -> None: ...

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SendAtFinish(LayerwiseSend):
    """A transport without layer-wise copies: the whole send runs at finish, within the same deadline."""

    def __init__(self, transport: KVTransport, peer_endpoint: bytes, transfer_id: str, dst_block_ids: list[int],
                 deadline: float) -> None:
        self._transport, self._peer_endpoint, self._transfer_id = transport, peer_endpoint, transfer_id
        self._dst, self._deadline = dst_block_ids, deadline

    def layer_ready(self, layer: int, block_table: Sequence[int]) -> None:
        pass

    def finish(self, src_block_ids: Sequence[int]) -> TransferResult:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return TransferResult(self._transfer_id, False, error="deadline passed before the copy started")
        return self._transport.send(self._peer_endpoint, self._transfer_id, src_block_ids, self._dst, remaining)

    def abandon(self) -> None:
        pass
