"""DecodeWorker gRPC service: reserve blocks, have a prefill worker fill them (or prefill locally), stream tokens."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from baton.engine.errors import InvalidRequestError, NoCapacityError
from baton.engine.llm_engine import RequestOutput
from baton.engine.sampling_params import SamplingParams
from baton.grpc_channels import ChannelCache, abort
from baton.proto.finish_reason import finish_reason_to_wire
from baton.proto.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from baton.worker.proto_convert import sampling_from_proto, top_logprobs_to_proto
from baton.worker.server import WorkerRPCs, WorkerRuntime

log = logging.getLogger(__name__)
DecodeError = worker_pb2.DecodeError
_CONNECT_TIMEOUT_S = 3.0


def _error(kind, message: str, *, retryable: bool, prefill_worker_id: str = "") -> worker_pb2.DecodeChunk:
    return worker_pb2.DecodeChunk(error=DecodeError(kind=kind, message=message, retryable=retryable,
                                                    prefill_worker_id=prefill_worker_id),
                                  finish_reason=inference_pb2.FINISH_REASON_ERROR)


class DecodeService(WorkerRPCs, worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime
        self._channels = ChannelCache()

    def _prefill_stub(self, address: str) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self._channels.open(address))

    async def Generate(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        arrived = time.perf_counter()
        rid, prompt = request.request_id, list(request.token_ids)
        try:
            params = sampling_from_proto(request.sampling)
        except InvalidRequestError as exc:
            yield _error(DecodeError.KIND_INVALID_REQUEST, str(exc), retryable=False)
            return
        generated = list(request.generated_token_ids)
        if generated and request.prefill.grpc_address:
            yield _error(DecodeError.KIND_INVALID_REQUEST, "a resumed request (generated_token_ids) is prefilled "
                                                           "on the decode worker: leave prefill unset", retryable=False)
            return
        prefill_stats = handed_off = None
        if request.prefill.grpc_address:
            remote = await self._remote_prefill(request, prompt, params, arrived)
            if isinstance(remote, worker_pb2.DecodeChunk):
                yield remote
                return
            first, prefill_stats, handed_off = remote
            stream = self.rt.aengine.resume_remote(rid, first.first_token_id, first.first_logprob)
        else:
            stream = self.rt.aengine.generate(rid, prompt, params, generated_ids=generated)
        try:
            async for out in stream:
                chunk = self._chunk(out, params)
                if out.finished:
                    log.info("request %s finished: %s", rid, out.finish_reason, extra={
                        "request_id": rid, "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
                        "completion_tokens": out.num_output_tokens, "cached_tokens": out.num_cached_tokens,
                        "prefill_worker": request.prefill.worker_id or "local"})
                if arrived is not None:  # the first chunk
                    now = time.perf_counter()
                    self.rt.metrics.ttft.observe(now - arrived)
                    if handed_off is not None:
                        self.rt.metrics.stage("first_token", now - handed_off)
                    arrived = None
                if prefill_stats is not None:
                    chunk.prefill.CopyFrom(prefill_stats)
                    prefill_stats = None
                yield chunk
        except InvalidRequestError as exc:
            yield _error(DecodeError.KIND_INVALID_REQUEST, str(exc), retryable=False)

    async def _remote_prefill(self, request, prompt: list[int], params: SamplingParams, arrived: float):
        """Reserves blocks and has the prefill worker fill them; returns (response, stats, when the hand-off was
        seen complete) or an error chunk. Times each stage from `arrived` on (DECODE_STAGES)."""
        rt, rid, target = self.rt, request.request_id, request.prefill
        mark = arrived

        def stage(name: str) -> float:
            nonlocal mark
            now = time.perf_counter()
            rt.metrics.stage(name, now - mark)
            mark = now
            return now

        try:
            res = await rt.aengine.call(lambda e: e.reserve_remote(rid, prompt, params))
        except InvalidRequestError as exc:
            return _error(DecodeError.KIND_INVALID_REQUEST, str(exc), retryable=False)
        except NoCapacityError as exc:
            return _error(DecodeError.KIND_OUT_OF_CAPACITY, str(exc), retryable=True)
        stage("reserve")
        skip = res.num_cached_tokens // rt.block_size
        dst = res.block_ids[skip:]
        transfer_id = f"{rid}-{uuid.uuid4().hex[:12]}"
        # Every transport of ours expects the transfer; the prefill worker writes through the first it reaches.
        for transport in rt.transports:
            transport.expect(transfer_id, dst)
        used = None
        called = False  # a prefill worker may be writing only once it has been asked to
        committed = False
        try:
            # A failed first connect leaves a channel in reconnect back-off, where calls fail at once; give
            # a live prefill worker a moment to accept, and a dead one a short deadline to be found out. A ready
            # channel (every request but the first) skips the wait and its timer task.
            channel = self._channels.open(target.grpc_address)
            try:
                if channel.get_state() != grpc.ChannelConnectivity.READY:
                    await asyncio.wait_for(channel.channel_ready(), _CONNECT_TIMEOUT_S)
            except asyncio.TimeoutError:
                name = target.worker_id or target.grpc_address
                return _error(DecodeError.KIND_PREFILL_FAILED,
                              f"prefill worker {name} not reachable within {_CONNECT_TIMEOUT_S:.0f}s",
                              retryable=True, prefill_worker_id=target.worker_id)
            stage("connect")
            called = True
            call = self._prefill_stub(target.grpc_address).Prefill(
                worker_pb2.PrefillRequest(
                    request_id=rid, token_ids=prompt, sampling=request.sampling,
                    kv=worker_pb2.KVDestination(
                        version=worker_pb2.KV_HANDOFF_VERSION_2, dst_block_ids=dst,
                        offers=[worker_pb2.KVOffer(transport=t.name, endpoint=t.endpoint()) for t in rt.transports],
                        num_cached_tokens=res.num_cached_tokens, transfer_id=transfer_id, block_size=rt.block_size,
                        decode_worker_id=rt.settings.worker_id)),
                timeout=rt.settings.prefill_timeout_s + rt.settings.transfer_timeout_s)
            try:
                response = await call
            except asyncio.CancelledError:
                call.cancel()
                asyncio.ensure_future(abort(self._prefill_stub(target.grpc_address), rid,
                                            target.worker_id or target.grpc_address))
                raise
            stage("prefill_call")
            used = next((t for t in rt.transports if t.name == response.transport), None)
            if used is None:
                return _error(DecodeError.KIND_KV_TRANSFER_FAILED,
                              f"prefill worker wrote through {response.transport!r}, which was not offered",
                              retryable=True, prefill_worker_id=target.worker_id)
            for other in rt.transports:
                if other is not used:
                    other.cancel(transfer_id)
            result = await used.wait_async(transfer_id, rt.settings.transfer_timeout_s)
            if not result.ok:
                return _error(DecodeError.KIND_KV_TRANSFER_FAILED, f"KV transfer failed: {result.error}",
                              retryable=True, prefill_worker_id=target.worker_id)
            committed = True
            return response, response.stats, stage("kv_wait")
        except grpc.aio.AioRpcError as exc:
            kind = DecodeError.KIND_PREFILL_FAILED
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return _error(DecodeError.KIND_INVALID_REQUEST, exc.details() or "invalid request", retryable=False)
            return _error(kind, f"prefill worker {target.worker_id or target.grpc_address} failed: "
                                f"{exc.code().name}: {exc.details()}", retryable=True,
                          prefill_worker_id=target.worker_id)
        finally:
            if not committed:
                for transport in rt.transports:
                    transport.cancel(transfer_id)
                # A one-sided writer (ipc, nixl) may still land bytes after a cancel.
                if not called or all(t.cancel_stops_writes for t in ([used] if used is not None else rt.transports)):
                    await asyncio.shield(rt.aengine.call(lambda e: e.abort(rid)))
                else:
                    # The prefill worker may still be writing; hold the blocks until its send times out.
                    seq = await asyncio.shield(rt.aengine.call(lambda e: e.detach_remote(rid)))
                    if seq is not None:
                        asyncio.get_running_loop().call_later(
                            rt.settings.transfer_timeout_s + 5,
                            lambda: asyncio.ensure_future(rt.aengine.call(lambda e: e.free_detached(seq))))

    @staticmethod
    def _chunk(out: RequestOutput, params: SamplingParams) -> worker_pb2.DecodeChunk:
        chunk = worker_pb2.DecodeChunk(token_ids=out.new_token_ids, text=out.text,
                                       logprobs=out.new_logprobs if params.logprobs else [],
                                       top_logprobs=top_logprobs_to_proto(out.new_top_logprobs))
        if out.prompt_logprobs is not None:
            chunk.prompt_logprobs.extend(out.prompt_logprobs)
            chunk.prompt_top_logprobs.extend(top_logprobs_to_proto(out.prompt_top_logprobs))
        if out.finished:
            chunk.finish_reason = finish_reason_to_wire(out.finish_reason)
            chunk.usage.CopyFrom(inference_pb2.Usage(prompt_tokens=out.num_prompt_tokens,
                                                      completion_tokens=out.num_output_tokens,
                                                      cached_prompt_tokens=out.num_cached_tokens))
        return chunk


def add_service(server: grpc.aio.Server, runtime: WorkerRuntime) -> None:
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeService(runtime), server)
