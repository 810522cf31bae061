"""Dynamic batching of embedding requests: the inputs of many requests are packed into one forward up to a token
and input budget, after a bounded wait for more to arrive. Every forward takes inputs from each waiting request in
turn (round robin), so a request of thousands of inputs is spread over many forwards and a one-sentence request
that arrives meanwhile rides in the next one. With batching off, a forward holds one request's inputs only, in
arrival order: the baseline the benchmark compares against."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Job:
    inputs: list[list[int]]
    future: asyncio.Future
    arrived: float
    # Input indices in the order they are taken: by length, so consecutive forwards see similar lengths.
    order: list[int] = field(init=False)
    taken: int = 0
    done: int = 0
    started: float | None = None  # when its first input entered a forward
    out: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.inputs)), key=lambda i: len(self.inputs[i]))

    @property
    def remaining(self) -> int:
        return len(self.inputs) - self.taken

    def next_len(self) -> int:
        return len(self.inputs[self.order[self.taken]])


@dataclass(frozen=True)
class BatchStats:
    forwards: int
    inputs: int
    tokens: int
    waiting_requests: int
    waiting_inputs: int
    waiting_tokens: int


class EmbeddingBatcher:
    """`embed_fn(inputs) -> float32 [len(inputs), dim]` runs on one thread, one forward at a time."""

    def __init__(self, embed_fn: Callable[[list[list[int]]], np.ndarray], *, max_batch_tokens: int,
                 max_batch_inputs: int, max_batch_delay_s: float, dynamic: bool = True) -> None:
        if max_batch_tokens <= 0 or max_batch_inputs <= 0 or max_batch_delay_s < 0:
            raise ValueError("max_batch_tokens and max_batch_inputs must be positive, max_batch_delay_s >= 0")
        self._embed_fn = embed_fn
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_inputs = max_batch_inputs
        self.max_batch_delay_s = max_batch_delay_s
        self.dynamic = dynamic
        self._jobs: list[_Job] = []  # in arrival order
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="embed-forward")
        self._task: asyncio.Task | None = None
        self._forwards = self._inputs = self._tokens = 0
        self.on_forward: Callable[[int, int, float], None] | None = None  # (inputs, tokens, seconds), for metrics

    # -- the request side -------------------------------------------------------------------
    async def embed(self, inputs: list[list[int]]) -> tuple[np.ndarray, float]:
        """(vectors [len(inputs), dim] in input order, seconds queued before the first forward). A cancelled
        caller's remaining inputs are dropped from the queue."""
        if not inputs:
            raise ValueError("no inputs")
        loop = asyncio.get_running_loop()
        job = _Job(inputs, loop.create_future(), time.perf_counter())
        self._jobs.append(job)
        self._wakeup.set()
        try:
            out = await job.future
        except asyncio.CancelledError:
            if job in self._jobs:
                self._jobs.remove(job)
            raise
        return out, (job.started or job.arrived) - job.arrived

    def stats(self) -> BatchStats:
        return BatchStats(self._forwards, self._inputs, self._tokens, len(self._jobs),
                          sum(j.remaining for j in self._jobs),
                          sum(len(j.inputs[i]) for j in self._jobs for i in j.order[j.taken:]))

    # -- the forward loop -------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="embedding-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the embedding worker is stopping"))
        self._jobs.clear()
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not any(j.remaining for j in self._jobs):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.dynamic:
                await self._gather_more()
            batch = self._take()
            if not batch:
                continue
            inputs = [job.inputs[i] for job, i in batch]
            started = time.perf_counter()
            for job, _ in batch:
                if job.started is None:
                    job.started = started
            try:
                vectors = await loop.run_in_executor(self._executor, self._embed_fn, inputs)
            except Exception as exc:  # the forward failed: every request with an input in it fails
                for job in {id(j): j for j, _ in batch}.values():
                    self._finish(job, exc)
                continue
            seconds = time.perf_counter() - started
            tokens = sum(len(x) for x in inputs)
            self._forwards += 1
            self._inputs += len(inputs)
            self._tokens += tokens
            if self.on_forward is not None:
                self.on_forward(len(inputs), tokens, seconds)
            for row, (job, i) in enumerate(batch):
                if job.future.done():
                    continue  # cancelled meanwhile
                if job.out is None:
                    job.out = np.empty((len(job.inputs), vectors.shape[1]), dtype=np.float32)
                job.out[i] = vectors[row]
                job.done += 1
                if job.done == len(job.inputs):
                    self._finish(job, None)

    def _finish(self, job: _Job, error: Exception | None) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        if not job.future.done():
            if error is None:
                job.future.set_result(job.out)
            else:
                job.future.set_exception(error)

    async def _gather_more(self) -> None:
        """Waits until a forward's worth of tokens or inputs is queued, or the oldest untaken input has waited
        max_batch_delay_s."""
        while True:
            waiting = [j for j in self._jobs if j.remaining]
            if not waiting:
                return
            inputs = sum(j.remaining for j in waiting)
            tokens = sum(len(j.inputs[i]) for j in waiting for i in j.order[j.taken:j.taken + self.max_batch_inputs])
            left = min(j.arrived for j in waiting) + self.max_batch_delay_s - time.perf_counter()
            if left <= 0 or inputs >= self.max_batch_inputs or tokens >= self.max_batch_tokens:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[tuple[_Job, int]]:
        """The next forward's (request, input index) pairs. One input over the token budget runs alone."""
        batch: list[tuple[_Job, int]] = []
        tokens = 0
        jobs = [j for j in self._jobs if j.remaining]
        if not self.dynamic:
            jobs = jobs[:1]
        while jobs and len(batch) < self.max_batch_inputs:
            for job in list(jobs):
                n = job.next_len()
                if batch and tokens + n > self.max_batch_tokens:
                    jobs.remove(job)  # its shortest remaining input does not fit: the others may
                    continue
                batch.append((job, job.order[job.taken]))
                job.taken += 1
                tokens += n
                if not job.remaining:
                    jobs.remove(job)
                if len(batch) >= self.max_batch_inputs:
                    break
        return batch
