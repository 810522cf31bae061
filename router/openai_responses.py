"""Runs one OpenAI request's choices (n or best_of per prompt, for every prompt) through the workers and renders
the response: one JSON body, or SSE chunks as tokens arrive; logprobs in the completions and chat shapes."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from baton.proto.v1 import inference_pb2
from baton.router.openai_protocol import APIError, chat_choice, completion_choice, response_json, usage_json
from baton.router.service import Prepared, RouterService, TextDelta
from baton.router.tool_calls import ToolOutput

log = logging.getLogger(__name__)
_END = object()


class ClientGone(Exception):
    """The HTTP client disconnected before the response was complete."""


@dataclass
class Choice:
    prepared: Prepared
    group: int  # which prompt of the request
    echo: str | None = None  # completions echo: the prompt's text starts the choice
    deltas: list[TextDelta] = field(default_factory=list)

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp for d in self.deltas for lp in d.logprobs)


@dataclass(frozen=True)
class Rendering:
    chat: bool
    stream: bool
    include_usage: bool
    logprobs: bool  # render logprobs (best_of asks workers for them even when the client did not)
    top: int  # alternatives per token
    n: int  # choices returned per prompt (best_of may generate more)
    tools: ToolOutput | None = None  # chat with tools: the answer is read into content and tool_calls


def fan_out(service: RouterService, request_id: str, route: str, prompts: list[tuple[list[int], str | None]],
            sampling: inference_pb2.SamplingParams, samples: int) -> list[Choice]:
    """`samples` sequences per prompt; with a seed, sample j of a prompt uses seed + j (as vLLM), so the whole
    request is reproducible and its choices differ."""
    choices = []
    for group, (prompt_ids, echo) in enumerate(prompts):
        for j in range(samples):
            params = inference_pb2.SamplingParams()
            params.CopyFrom(sampling)
            if params.HasField("seed"):
                params.seed = (params.seed + j) % 2**64
            rid = request_id if len(prompts) * samples == 1 else f"{request_id}-{len(choices)}"
            choices.append(Choice(service.prepare(rid, route, prompt_ids, params), group, echo))
    return choices


class _Run:
    """Runs each choice's stream in its own task, so a client disconnect cancels them (and through them the
    workers' streams) wherever the response is, not only when the next write fails."""

    def __init__(self, request: Request, streams: list[AsyncIterator[TextDelta]]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._live = len(streams)
        self._pumps = [asyncio.create_task(self._feed(i, s)) for i, s in enumerate(streams)]
        self._watch = asyncio.create_task(self._watch_disconnect(request))

    async def _feed(self, index: int, stream: AsyncIterator[TextDelta]) -> None:
        try:
            async for delta in stream:
                self._queue.put_nowait((index, delta))
            self._queue.put_nowait((index, _END))
        except APIError as exc:
            self._queue.put_nowait(exc)
        except asyncio.CancelledError:
            self._queue.put_nowait(ClientGone())
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500, logged here
            log.exception("request stream failed")
            self._queue.put_nowait(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    async def _watch_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for pump in self._pumps:
            pump.cancel()

    async def next(self) -> tuple[int, TextDelta] | None:
        """The next (choice index, delta); None once every choice has finished. Raises APIError or ClientGone."""
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item[1] is not _END:
                return item
            self._live -= 1
            if self._live == 0:
                return None

    def close(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        self._watch.cancel()


async def respond(service: RouterService, request: Request, request_id: str, choices: list[Choice],
                  how: Rendering) -> Response:
    run = _Run(request, [service.stream(c.prepared) for c in choices])
    route = choices[0].prepared.route
    try:
        # Wait for the first delta before answering, so "no worker" is a real 503, not an SSE event.
        first = await run.next()
    except ClientGone:
        run.close()
        service.metrics.request_done(route, 499)
        return Response(status_code=499)
    except APIError:
        run.close()
        raise
    render = _Renderer(service, how, choices)
    if not how.stream:
        try:
            item = first
            while item is not None:
                choices[item[0]].deltas.append(item[1])
                item = await run.next()
        except ClientGone:
            service.metrics.request_done(route, 499)
            return Response(status_code=499)
        finally:
            run.close()
        service.metrics.request_done(route, 200)
        return JSONResponse(render.whole(request_id))

    async def events() -> AsyncIterator[str]:
        item, status = first, 499
        try:
            while item is not None:
                for chunk in render.chunks(request_id, *item):
                    yield _sse(chunk)
                item = await run.next()
            if how.include_usage:
                yield _sse(response_json(request_id, service.model_name, [], render.usage(), chat=how.chat,
                                         chunk=True))
            yield "data: [DONE]\n\n"
            status = 200
        except APIError as exc:
            # Headers are out already: the failure becomes an error event the client raises on.
            status = exc.status
            yield _sse(exc.body())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            run.close()
            service.metrics.request_done(route, status)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Renderer:
    def __init__(self, service: RouterService, how: Rendering, choices: list[Choice]) -> None:
        self.service, self.how, self.choices = service, how, choices
        self._offsets = [0] * len(choices)  # completions text_offset of each choice's next token
        self._started = [False] * len(choices)
        self._tool_streams = [how.tools.stream() for _ in choices] if how.tools is not None and how.stream else None

    def _token(self, token_id: int) -> str:
        return self.service.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- whole responses --------------------------------------------------------------------
    def whole(self, request_id: str) -> dict:
        how, out = self.how, []
        for group in sorted({c.group for c in self.choices}):
            members = [i for i, c in enumerate(self.choices) if c.group == group]
            if len(members) > how.n:  # best_of: the n most likely samples, most likely first
                members = sorted(members, key=lambda i: self.choices[i].cumulative_logprob, reverse=True)[:how.n]
            for rank, i in enumerate(members):
                choice = self.choices[i]
                parts = [self._logprobs(i, d, first=k == 0) for k, d in enumerate(choice.deltas)]
                text = (choice.echo or "") + "".join(d.text for d in choice.deltas)
                finish = choice.deltas[-1].finish_reason
                index = group * how.n + rank
                logprobs = _merge(parts, how.chat) if how.logprobs else None
                out.append(chat_choice(index, text, finish, logprobs, chunk=False) if how.chat
                           else completion_choice(index, text, finish, logprobs))
                if how.tools is not None:
                    how.tools.message(out[-1], text)
        return response_json(request_id, self.service.model_name, out, self.usage(), chat=how.chat, chunk=False)

    def usage(self) -> dict:
        prompt = sum(len(c.prepared.prompt_ids) for c in self._first_of_each_prompt())
        cached = sum(c.deltas[-1].usage.cached_prompt_tokens for c in self._first_of_each_prompt() if c.deltas)
        completion = sum(c.deltas[-1].usage.completion_tokens for c in self.choices if c.deltas)
        return usage_json(prompt, completion, cached)

    def _first_of_each_prompt(self) -> list[Choice]:
        return list({c.group: c for c in reversed(self.choices)}.values())

    # -- stream chunks ----------------------------------------------------------------------
    def chunks(self, request_id: str, index: int, delta: TextDelta) -> list[dict]:
        choice, how = self.choices[index], self.how
        choice.deltas.append(delta)
        out = []
        first = not self._started[index]
        self._started[index] = True
        if how.chat and first:
            out.append(chat_choice(index, "", None, None, chunk=True, first=True))
        text = (choice.echo or "") + delta.text if first else delta.text
        finish, calls = delta.finish_reason, []
        if self._tool_streams is not None:
            text, calls, finish = self._tool_streams[index].feed(text, finish)
        if text or calls or finish or delta.logprobs:
            logprobs = self._logprobs(index, delta, first) if how.logprobs else None
            out.append(chat_choice(index, text, finish, logprobs, chunk=True) if how.chat
                       else completion_choice(index, text, finish, logprobs))
            if calls:
                out[-1]["delta"]["tool_calls"] = calls
        return [response_json(request_id, self.service.model_name, [c], None, chat=how.chat, chunk=True) for c in out]

    # -- logprobs ---------------------------------------------------------------------------
    def _logprobs(self, index: int, delta: TextDelta, first: bool) -> dict | None:
        """One delta's logprobs; the first delta of an echoed completion also scores the prompt."""
        choice, how = self.choices[index], self.how
        entries: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
        if choice.echo is not None and first:
            prompt = choice.prepared.prompt_ids
            entries.append((prompt[0], None, None))
            for token, lp, top in zip(prompt[1:], delta.prompt_logprobs, delta.prompt_top_logprobs):
                entries.append((token, lp, _pairs(top)))
        tops = delta.top_logprobs or [None] * len(delta.logprobs)
        for token, lp, top in zip(delta.token_ids, delta.logprobs, tops):
            entries.append((token, lp, _pairs(top) if top is not None else []))
        if not entries:
            return None
        if how.chat:
            return {"content": [self._chat_entry(token, lp, top) for token, lp, top in entries]}
        tokens, offsets = [], []
        for token, _, _ in entries:
            tokens.append(self._token(token))
            offsets.append(self._offsets[index])
            self._offsets[index] += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else self._top_dict(token, lp, top) for token, lp, top in entries],
                "text_offset": offsets}

    def _top_dict(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, float]:
        # As vLLM: the alternatives plus the chosen token, so the chosen one is always there.
        out = {self._token(t): lp for t, lp in top[:self.how.top]}
        out.setdefault(self._token(token), logprob)
        return out

    def _chat_entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        return {**self._chat_token(token, logprob),
                "top_logprobs": [self._chat_token(t, lp) for t, lp in top[:self.how.top]]}

    def _chat_token(self, token: int, logprob: float) -> dict:
        text = self._token(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _pairs(top: inference_pb2.TopLogprobs) -> list[tuple[int, float]]:
    return list(zip(top.token_ids, top.logprobs))


def _merge(parts: list[dict | None], chat: bool) -> dict | None:
    parts = [p for p in parts if p]
    if not parts:
        return None
    if chat:
        return {"content": [c for p in parts for c in p["content"]]}
    return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
