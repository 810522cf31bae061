"""NIXL KV transport: the sender WRITEs blocks one-sidedly into the receiver's registered cache (UCX backend).

The receiver learns completion from the NIXL notification that rides on the transfer. DRAM on CPU, VRAM on CUDA.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import nixl._api as nixl_api
import torch

from baton.engine.kv_transfer.base import Endpoint, KVTransferError, KVTransport

# NIXL logs every agent creation at INFO to stdout, which is where our CLI and workers print.
if not os.environ.get("NIXL_LOG_LEVEL"):
    logging.getLogger("nixl").setLevel(logging.WARNING)

_NIXL_ERRORS = tuple(getattr(nixl_api.nixlBind, n) for n in dir(nixl_api.nixlBind)
                     if n.startswith("nixl") and n.endswith("Error"))
_TAG = b"baton-kv1:"


def _note(status: str, transfer_id: str, detail: str) -> bytes:
    return _TAG + json.dumps({"status": status, "id": transfer_id, "detail": detail}).encode()


def _dst_digest(dst_block_ids) -> str:
    """Lets the receiver check that the sender wrote exactly the blocks it allocated."""
    return hashlib.blake2b(",".join(map(str, dst_block_ids)).encode(), digest_size=8).hexdigest()


def _mem(kv_cache: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", kv_cache.device.index or 0) if kv_cache.is_cuda else ("DRAM", 0)


class NixlTransport(KVTransport):
    """One NIXL agent per transport instance, named uniquely (host, pid, random suffix).

    A one-sided WRITE cannot be refused by the receiver: a sender that outlives the receiver's wait() may still
    land bytes in blocks the receiver has freed. Keep the sender's timeout shorter than the receiver's.
    """

    name = "nixl"
    cancel_stops_writes = False

    def __init__(self, agent_name: str | None = None, backends: tuple[str, ...] = ("UCX",),
                 poll_interval_s: float = 0.0005) -> None:
        super().__init__()
        self.agent_name = agent_name or f"baton-kv-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        config = nixl_api.nixl_agent_config(backends=list(backends))
        self._agent = nixl_api.nixl_agent(self.agent_name, config)
        missing = [b for b in backends if b not in self._agent.backends]
        if missing:
            raise KVTransferError(f"NIXL backend(s) {missing} unavailable; plugins here: {self._agent.plugin_list}")
        # Agents run without NIXL's own locking (no listen thread), so every call goes through this lock.
        self._agent_lock = threading.Lock()
        self._poll_interval_s = poll_interval_s
        self._reg = None
        self._mem_type, self._dev_id, self._base_addr = "DRAM", 0, 0
        self._peers: dict[str, str] = {}  # endpoint agent name -> name NIXL knows it by
        self._poller: threading.Thread | None = None
        self._wake = threading.Event()

    def _register(self, kv_cache: torch.Tensor) -> None:
        mem_type, dev_id = _mem(kv_cache)
        with self._agent_lock:
            try:
                self._reg = self._agent.register_memory(
                    [(kv_cache.data_ptr(), kv_cache.numel() * kv_cache.element_size(), dev_id, "")], mem_type)
            except _NIXL_ERRORS as e:
                raise KVTransferError(f"NIXL could not register the KV cache as {mem_type}: {e!r}") from None
        self._mem_type, self._dev_id, self._base_addr = mem_type, dev_id, kv_cache.data_ptr()

    def _endpoint_params(self) -> dict[str, Any]:
        with self._agent_lock:
            metadata = self._agent.get_agent_metadata()
        return {"agent": self.agent_name, "metadata": base64.b64encode(metadata).decode(),
                "base_addr": self._base_addr, "dev_id": self._dev_id, "mem_type": self._mem_type}

    # ---- receiver ----

    def _on_expect(self, transfer_id: str) -> None:
        with self._agent_lock:
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll_notifs, name="kv-nixl-notifs", daemon=True)
                self._poller.start()
        self._wake.set()

    def _poll_notifs(self) -> None:
        while not self._closed:
            with self._lock:
                idle = all(e.future.done() for e in self._expected.values())
            if idle:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            with self._agent_lock:
                try:
                    notifs = self._agent.get_new_notifs()
                except _NIXL_ERRORS:
                    notifs = {}
            for messages in notifs.values():
                for message in messages:
                    self._on_notif(bytes(message))
            time.sleep(self._poll_interval_s)

    def _on_notif(self, message: bytes) -> None:
        if not message.startswith(_TAG):
            return
        try:
            note = json.loads(message[len(_TAG):])
            status, transfer_id, detail = note["status"], note["id"], note["detail"]
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            expected = self._expected.get(transfer_id)
        if expected is None:
            return  # a transfer we never expected or already gave up on
        if status != "ok":
            self._finish(transfer_id, False, 0, f"sender failed the transfer: {detail}")
        elif detail != _dst_digest(expected.dst_block_ids):
            self._finish(transfer_id, False, 0, "sender wrote destination blocks that differ from the receiver's")
        else:
            self._finish(transfer_id, True, len(expected.dst_block_ids) * self.geometry.block_nbytes)

    # ---- sender ----

    def _peer_name(self, peer: Endpoint) -> str:
        try:
            agent = str(peer.params["agent"])
            metadata = base64.b64decode(peer.params["metadata"])
        except (KeyError, ValueError, TypeError):
            raise KVTransferError("nixl endpoint lacks agent metadata") from None
        if agent not in self._peers:
            name = self._agent.add_remote_agent(metadata)
            self._peers[agent] = name.decode() if isinstance(name, bytes) else name
        return self._peers[agent]

    def _send(self, peer: Endpoint, transfer_id: str, runs: list[tuple[int, int, int]],
              deadline: float) -> str | None:
        try:
            peer_base, peer_dev, peer_mem = int(peer.params["base_addr"]), int(peer.params["dev_id"]), \
                str(peer.params["mem_type"])
        except (KeyError, ValueError, TypeError):
            raise KVTransferError("nixl endpoint lacks the peer cache address") from None
        bn = self.geometry.block_nbytes
        local = [(self._base_addr + s * bn, n * bn, self._dev_id) for s, _, n in runs]
        remote = [(peer_base + d * bn, n * bn, peer_dev) for _, d, n in runs]
        dst_ids = [b for _, d, n in runs for b in range(d, d + n)]
        notif = _note("ok", transfer_id, _dst_digest(dst_ids))
        with self._agent_lock:
            try:
                peer_name = self._peer_name(peer)
            except _NIXL_ERRORS as e:
                return f"NIXL could not reach the receiver's agent {peer.params.get('agent')!r}: {e!r}"
            if not runs:  # nothing to write (the receiver had every block cached): just tell it so
                try:
                    self._agent.send_notif(peer_name, notif)
                except _NIXL_ERRORS as e:
                    return f"NIXL could not notify {peer_name}: {e!r}"
                return None
            try:
                handle = self._agent.initialize_xfer(
                    "WRITE", self._agent.get_xfer_descs(local, self._mem_type),
                    self._agent.get_xfer_descs(remote, peer_mem), peer_name, notif)
                state = self._agent.transfer(handle)
            except _NIXL_ERRORS as e:
                return f"NIXL could not start the transfer to {peer_name}: {e!r}"
        error = None
        while state == "PROC":
            if time.monotonic() > deadline:
                error = "timed out writing blocks to the receiver"
                break
            time.sleep(0.0002)
            with self._agent_lock:
                if self._agent is None:
                    return "nixl transport closed during the transfer"
                try:
                    state = self._agent.check_xfer_state(handle)
                except _NIXL_ERRORS as e:
                    state = f"ERR ({e!r})"
        if error is None and state != "DONE":
            error = f"NIXL transfer to {peer_name} failed: {state}"
        with self._agent_lock:
            if self._agent is None:
                return error or "nixl transport closed during the transfer"
            try:
                handle.release()  # aborts the transfer if it is still running
            except _NIXL_ERRORS:
                pass
            if error is not None:
                try:
                    self._agent.send_notif(peer_name, _note("failed", transfer_id, error))
                except _NIXL_ERRORS:
                    pass  # the receiver still fails by its own timeout
                self._forget_peer(peer)
        return error

    def _forget_peer(self, peer: Endpoint) -> None:
        """After a failure the peer may be gone; reload its metadata next time rather than reuse a dead link."""
        name = self._peers.pop(str(peer.params.get("agent")), None)
        if name is not None:
            try:
                self._agent.remove_remote_agent(name)
            except _NIXL_ERRORS:
                pass

    def _close(self) -> None:
        self._wake.set()
        if self._poller is not None:
            self._poller.join(timeout=1.0)
        with self._agent_lock:
            for name in self._peers.values():
                try:
                    self._agent.remove_remote_agent(name)
                except _NIXL_ERRORS:
                    pass
            if self._reg is not None:
                self._agent.deregister_memory(self._reg)
                self._reg = None
            # Dropping the agent tears down its UCX worker, so peers holding our metadata can no longer write.
            self._agent = None
