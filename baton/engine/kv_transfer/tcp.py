"""TCP KV transport: the receiver runs a socket server that reads blocks straight into its cache tensor.

Wire (one connection per transfer): header → receiver's go/reject → block runs → receiver's final ack.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import torch

from baton.engine.kv_transfer.base import PROTOCOL_VERSION, Endpoint, KVTransferError, KVTransport

MAGIC = b"BTKV"
# magic, version, transfer-id length, number of runs, block size in bytes
_HEADER = struct.Struct("!4sHHIQ")
_RUN = struct.Struct("!II")  # dst_start, count
_STATUS = struct.Struct("!BH")  # 0 = ok, 1 = error; message length
_CHUNK = 8 << 20  # bytes between liveness checks while receiving
_SOCK_BUF = 4 << 20


def encode_header(transfer_id: str, block_nbytes: int, dst_runs: list[tuple[int, int]]) -> bytes:
    tid = transfer_id.encode()
    return (_HEADER.pack(MAGIC, PROTOCOL_VERSION, len(tid), len(dst_runs), block_nbytes) + tid
            + b"".join(_RUN.pack(d, n) for d, n in dst_runs))


def _status(error: str | None) -> bytes:
    msg = (error or "").encode()[:4096]
    return _STATUS.pack(0 if error is None else 1, len(msg)) + msg


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _recv_status(sock: socket.socket) -> str | None:
    code, length = _STATUS.unpack(_recv_exact(sock, _STATUS.size))
    message = _recv_exact(sock, length).decode(errors="replace")
    return None if code == 0 else message or "receiver reported an unnamed error"


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)


class TcpTransport(KVTransport):
    """Works anywhere two processes can open a TCP connection; CUDA caches are staged through host memory."""

    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                 io_timeout_s: float = 10.0) -> None:
        super().__init__()
        self._bind = (host, port)
        self._advertise_host = advertise_host or host
        self._io_timeout_s = io_timeout_s
        self._blocks: torch.Tensor | None = None  # [num_blocks, block_nbytes] uint8 view of the cache
        self._server: socket.socket | None = None
        self._server_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        # transfer id -> (its connection, lock held while bytes may still land in its blocks)
        self._receiving: dict[str, tuple[socket.socket, threading.Lock]] = {}

    def _register(self, kv_cache: torch.Tensor) -> None:
        self._blocks = kv_cache.view(torch.uint8).reshape(kv_cache.shape[0], -1)

    def _endpoint_params(self) -> dict[str, Any]:
        with self._server_lock:
            if self._server is None:  # only receivers listen
                self._start_server()
            return {"host": self._advertise_host, "port": self._server.getsockname()[1]}

    # ---- receiver ----

    def _start_server(self) -> None:
        server = socket.create_server(self._bind, backlog=64)
        server.settimeout(0.2)  # so the accept loop notices close()
        self._server = server
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(server,), name="kv-tcp-accept",
                                               daemon=True)
        self._accept_thread.start()

    def _accept_loop(self, server: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="kv-tcp-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._server_lock:
            self._conns.add(conn)
        transfer_id = None
        try:
            _tune(conn)
            conn.settimeout(self._io_timeout_s)
            transfer_id, runs, error = self._accept_header(conn)
            conn.sendall(_status(error))
            if error is None and transfer_id is not None:
                self._receive_runs(conn, transfer_id, runs)
        except (OSError, ConnectionError, struct.error) as e:
            if transfer_id is not None:
                self._finish(transfer_id, False, 0, f"connection to sender failed: {e}")
        finally:
            with self._server_lock:
                self._conns.discard(conn)
            conn.close()

    def _accept_header(self, conn: socket.socket) -> tuple[str | None, list[tuple[int, int]], str | None]:
        magic, version, tid_len, n_runs, block_nbytes = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
        if magic != MAGIC:
            return None, [], "not a Baton KV transfer"
        if version != PROTOCOL_VERSION:
            return None, [], f"KV protocol version {version} not supported (receiver speaks {PROTOCOL_VERSION})"
        transfer_id = _recv_exact(conn, tid_len).decode(errors="replace")
        raw = _recv_exact(conn, n_runs * _RUN.size)
        runs = [_RUN.unpack_from(raw, i * _RUN.size) for i in range(n_runs)]
        dst = tuple(b for d, n in runs for b in range(d, d + n))
        with self._lock:
            expected = self._expected.get(transfer_id)
            if expected is None or expected.future.done():
                return None, [], f"transfer {transfer_id!r} is not expected by the receiver"
            if expected.claimed:
                return None, [], f"transfer {transfer_id!r} is already being received"
            error = None
            if block_nbytes != self.geometry.block_nbytes:
                error = f"block size {block_nbytes} B != receiver's {self.geometry.block_nbytes} B"
            elif dst != expected.dst_block_ids:
                error = f"transfer {transfer_id!r}: destination blocks differ from the receiver's"
            expected.claimed = error is None
        if error is not None:
            # The sender that owns this transfer got it wrong, so waiting longer cannot help.
            self._finish(transfer_id, False, 0, f"sender's request was refused: {error}")
        return transfer_id, runs, error

    def _receive_runs(self, conn: socket.socket, transfer_id: str, runs: list[tuple[int, int]]) -> None:
        writing = threading.Lock()
        with writing:
            with self._server_lock:
                self._receiving[transfer_id] = (conn, writing)
            try:
                self._write_runs(conn, transfer_id, runs)
            finally:
                with self._server_lock:
                    self._receiving.pop(transfer_id, None)

    def _abandon(self, transfer_id: str) -> None:
        with self._server_lock:
            conn, writing = self._receiving.get(transfer_id, (None, None))
        if conn is None:
            return
        try:
            conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv_into
        except OSError:
            pass
        if writing.acquire(timeout=self._io_timeout_s):
            writing.release()

    def _write_runs(self, conn: socket.socket, transfer_id: str, runs: list[tuple[int, int]]) -> None:
        blocks, block_nbytes = self._blocks, self.geometry.block_nbytes
        total = sum(n for _, n in runs) * block_nbytes
        got = 0
        for d, n in runs:
            if blocks.is_cuda:
                staging = torch.empty(n * block_nbytes, dtype=torch.uint8, pin_memory=True)
                view = memoryview(staging.numpy())
            else:
                view = memoryview(blocks[d:d + n].numpy()).cast("B")
            off = 0
            while off < len(view):
                if not self._is_live(transfer_id):
                    conn.sendall(_status("transfer was cancelled or timed out at the receiver"))
                    return
                k = conn.recv_into(view[off:off + _CHUNK])
                if k == 0:
                    self._finish(transfer_id, False, 0,
                                 f"sender disconnected after {got + off} of {total} bytes")
                    return
                off += k
            if blocks.is_cuda:
                blocks[d:d + n].copy_(staging.view(n, block_nbytes))
            got += off
        if blocks.is_cuda:
            torch.cuda.synchronize(blocks.device)
        settled = self._finish(transfer_id, True, got)
        conn.sendall(_status(None if settled else "transfer was cancelled or timed out at the receiver"))

    # ---- sender ----

    def _send(self, peer: Endpoint, transfer_id: str, runs: list[tuple[int, int, int]],
              deadline: float) -> str | None:
        try:
            host, port = str(peer.params["host"]), int(peer.params["port"])
        except (KeyError, ValueError, TypeError):
            raise KVTransferError("tcp endpoint lacks a host and port") from None
        phase = "connecting to"
        try:
            with socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.001)) as sock:
                _tune(sock)
                phase = "handshaking with"
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                header = encode_header(transfer_id, self.geometry.block_nbytes, [(d, n) for _, d, n in runs])
                sock.sendall(header)
                error = _recv_status(sock)
                if error is not None:
                    return f"receiver rejected the transfer: {error}"
                phase = "streaming blocks to"
                for s, _, n in runs:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    chunk = self._blocks[s:s + n]
                    sock.sendall(memoryview((chunk.cpu() if chunk.is_cuda else chunk).numpy()).cast("B"))
                phase = "waiting for the acknowledgement of"
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                error = _recv_status(sock)
        except TimeoutError:
            return f"timed out {phase} the receiver at {host}:{port}"
        except (OSError, ConnectionError, struct.error) as e:
            return f"failed {phase} the receiver at {host}:{port}: {e}"
        return None if error is None else f"receiver failed the transfer: {error}"

    def _close(self) -> None:
        with self._server_lock:
            server, self._server = self._server, None
            conns = list(self._conns)
        if server is not None:
            server.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # Wait (bounded) for the accept loop to see the close: a daemon thread still inside accept() when the
        # interpreter finalises is ended mid-call, which can abort the process.
        thread = getattr(self, "_accept_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
