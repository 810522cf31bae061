"""PrefillWorker gRPC service: run the prompt, write its KV blocks into the decode worker, return token one."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from baton.engine.errors import InvalidRequestError
from baton.engine.kv_transfer.base import KVTransferError, KVTransport
from baton.proto.v1 import worker_pb2, worker_pb2_grpc
from baton.worker.proto_convert import sampling_from_proto
from baton.worker.server import WorkerRPCs, WorkerRuntime

log = logging.getLogger(__name__)


class PrefillService(WorkerRPCs, worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime
        self._releases: set[asyncio.Task] = set()

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        arrived = time.perf_counter()
        kv, rt, rid = request.kv, self.rt, request.request_id
        if kv.version == worker_pb2.KV_HANDOFF_VERSION_1:
            offers = [worker_pb2.KVOffer(transport=kv.transport, endpoint=kv.endpoint)]
        elif kv.version == worker_pb2.KV_HANDOFF_VERSION_2:
            offers = list(kv.offers)
        else:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"unsupported KV hand-off version {kv.version}")
        if kv.block_size != rt.block_size:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"block_size {kv.block_size} != this worker's {rt.block_size}")
        chosen = pick_transport(rt.transports, offers)
        if chosen is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no common KV transport: the decode worker offers {[o.transport for o in offers]}, "
                                f"this worker has {[t.name for t in rt.transports]}")
        transport, endpoint = chosen
        try:
            params = sampling_from_proto(request.sampling)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        skip = kv.num_cached_tokens // rt.block_size
        dst = list(kv.dst_block_ids)
        sink = None
        if rt.settings.kv_layerwise and transport.supports_layerwise:
            # Writes may start during the prompt: never past the decode worker's deadline for this call (it keeps
            # the destination blocks only a hand-off timeout past it).
            remaining = context.time_remaining()
            budget = rt.settings.prefill_timeout_s + rt.settings.transfer_timeout_s
            try:
                sink = transport.start_layerwise(endpoint, kv.transfer_id, skip, dst,
                                                 budget if remaining is None else min(budget, remaining))
            except KVTransferError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        started = time.perf_counter()
        first = None
        released = False
        try:
            try:
                async for out in rt.aengine.generate(rid, list(request.token_ids), params, prefill_only=True,
                                                     kv_sink=sink):
                    first = out
            except InvalidRequestError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            computed = time.perf_counter()
            prefill_s = computed - started
            src = first.block_ids[skip:]
            if len(src) != len(dst):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{len(dst)} destination blocks for {len(src)} uncached prompt blocks")
            if sink is not None:
                send = asyncio.get_running_loop().run_in_executor(None, sink.finish, src)
            else:
                # Never write after the decode worker's deadline for this call: it keeps the destination blocks
                # only a hand-off timeout past it, and a worker stalled longer (stopped, swapping) must not write
                # into blocks that another request may hold by then.
                remaining = context.time_remaining()
                timeout_s = rt.settings.transfer_timeout_s if remaining is None else min(
                    rt.settings.transfer_timeout_s, remaining)
                if timeout_s <= 0:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the decode worker's deadline passed "
                                                                           "before the KV hand-off started")
                send = asyncio.get_running_loop().run_in_executor(
                    None, transport.send, endpoint, kv.transfer_id, src, dst, timeout_s)
            sink = None  # finish() owns it now
            try:
                result = await asyncio.shield(send)
            except asyncio.CancelledError:
                await asyncio.wait([send])  # never free blocks that are still being read
                raise
            sent = time.perf_counter()
            if result.ok:
                # The decode worker waits for this reply, not for these blocks to be freed: an engine busy with
                # another prompt's step would hold the reply back that long.
                self._release_soon(rid)
                released = True
        finally:
            if sink is not None:  # the prompt failed or was cancelled before its hand-off completed
                await asyncio.get_running_loop().run_in_executor(None, sink.abandon)
            if not released:
                await asyncio.shield(rt.aengine.call(lambda e: e.release(rid)))
        rt.metrics.stage("prefill", computed - arrived)
        rt.metrics.stage("kv_send", sent - computed)
        if not result.ok:
            log.warning("request %s: KV transfer to %s failed: %s", rid, kv.decode_worker_id, result.error,
                        extra={"request_id": rid, "decode_worker": kv.decode_worker_id})
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {result.error}")
        log.info("request %s prefilled and shipped to %s", rid, kv.decode_worker_id, extra={
            "request_id": rid, "decode_worker": kv.decode_worker_id, "prompt_tokens": len(request.token_ids),
            "cached_tokens": first.num_cached_tokens, "kv_bytes": result.nbytes, "prefill_s": round(prefill_s, 4),
            "transfer_s": round(result.seconds, 4), "transport": transport.name})
        return worker_pb2.PrefillResponse(
            transport=transport.name,
            first_token_id=first.new_token_ids[0], first_logprob=first.new_logprobs[0],
            stats=worker_pb2.PrefillStats(
                computed_tokens=len(request.token_ids) - first.num_cached_tokens,
                cached_tokens=max(first.num_cached_tokens, kv.num_cached_tokens), kv_bytes=result.nbytes,
                prefill_seconds=prefill_s, transfer_seconds=result.seconds))

    def _release_soon(self, rid: str) -> None:
        task = asyncio.ensure_future(self.rt.aengine.call(lambda e: e.release(rid)))
        self._releases.add(task)  # held until done: the loop keeps only weak references to tasks

        def done(task: asyncio.Task) -> None:
            self._releases.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("request %s: releasing its prefilled blocks failed: %r", rid, task.exception(),
                            extra={"request_id": rid})

        task.add_done_callback(done)


def pick_transport(transports: list[KVTransport], offers) -> tuple[KVTransport, bytes] | None:
    """The decode worker's first offer that one of our transports reaches (its order is its preference)."""
    ours = {t.name: t for t in transports}
    for offer in offers:
        transport = ours.get(offer.transport)
        if transport is not None and transport.reaches(offer.endpoint):
            return transport, offer.endpoint
    return None


def add_service(server: grpc.aio.Server, runtime: WorkerRuntime) -> None:
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillService(runtime), server)
