"""gRPC client side of the worker RPCs, shared by the router (to decode workers) and the decode worker (to prefill
workers): one reused channel per address, and Abort."""
from __future__ import annotations

import logging

import grpc

from baton.proto.v1 import worker_pb2

log = logging.getLogger(__name__)
ABORT_TIMEOUT_S = 2.0
MAX_RECEIVE_BYTES = 256 << 20


class ChannelCache(dict[str, grpc.aio.Channel]):
    """Address -> open channel. A plain dict otherwise, so an owner can retire single channels its own way."""

    def open(self, address: str) -> grpc.aio.Channel:
        channel = self.get(address)
        if channel is None:
            # Embedding responses are large (2048 vectors of a 4096-wide model: 32 MiB), past gRPC's default 4 MiB.
            channel = self[address] = grpc.aio.insecure_channel(
                address, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
        return channel

    async def close(self) -> None:
        channels = list(self.values())
        self.clear()
        for channel in channels:
            await channel.close()


async def abort(stub, request_id: str, worker: str, timeout_s: float = ABORT_TIMEOUT_S) -> None:
    """Asks a worker (`stub`: a DecodeWorker or PrefillWorker stub) to drop a request. A failure is logged, not
    raised: the caller is giving up on the request either way."""
    try:
        await stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        log.warning("abort of %s on %s failed: %s", request_id, worker, exc.code().name)
