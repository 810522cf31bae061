"""Runs an LLMEngine on its own thread and exposes it to asyncio: streams per request, calls between steps."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import AsyncIterator, Callable, TypeVar

from baton.engine.llm_engine import LLMEngine, RequestOutput
from baton.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    """All engine state is touched only on the engine thread; asyncio code talks to it through call()."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable, concurrent.futures.Future]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # ---- asyncio side --------------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs fn(engine) on the engine thread between steps and returns its result (or raises its error)."""
        if not self.alive:
            raise EngineDeadError(f"engine thread is not running: {self._error!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 prefill_only: bool = False, generated_ids: list[int] = (), kv_sink=None) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; leaving the iteration early (cancel, break) aborts it."""
        return self._stream(request_id, lambda e: e.add_request(request_id, prompt_ids, params,
                                                                 prefill_only=prefill_only,
                                                                 generated_ids=generated_ids, kv_sink=kv_sink))

    def resume_remote(self, request_id: str, first_token: int, first_logprob: float) -> AsyncIterator[RequestOutput]:
        """After a KV transfer into reserved blocks: commit the request and stream from its first token."""

        def commit(e: LLMEngine) -> None:
            # Dispatched from the engine thread so the first token is queued before any later step's.
            self._dispatch([e.commit_remote(request_id, first_token, first_logprob)])

        return self._stream(request_id, commit)

    async def _stream(self, request_id: str, start: Callable[[LLMEngine], object]) -> AsyncIterator[RequestOutput]:
        """Opens the request's output queue, runs `start` on the engine thread, then streams until it finishes;
        leaving early aborts the request."""
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        try:
            await self.call(start)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finished = False
        try:
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.alive:
                await asyncio.shield(self.call(lambda e: e.abort(request_id)))

    # ---- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop:
                self._run_commands()
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as exc:  # the engine is broken: fail every waiter rather than hang them
            log.exception("engine thread died")
            self._error = exc
            for loop, stream in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, EngineDeadError(str(exc)))
            self._fail_commands(exc)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.engine))
            except Exception as exc:  # the caller gets it; the engine goes on
                fut.set_exception(exc)

    def _fail_commands(self, exc: BaseException) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDeadError(str(exc)))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                loop, stream = target
                loop.call_soon_threadsafe(stream.put_nowait, out)
