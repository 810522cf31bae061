"""The router's core, shared by the HTTP and gRPC fronts: tokenize once, validate against the
context, stream a request through the workers (which detokenize and apply stop strings), count and time it."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from baton.contracts.worker_registry import WorkerRegistry
from baton.proto.finish_reason import finish_reason_name
from baton.proto.v1 import inference_pb2
from baton.router.config import RouterConfig
from baton.router.dispatch import Dispatcher, OutOfCapacity, WorkerFailed
from baton.router.generation_defaults import GenerationDefaults
from baton.router.limits import Admission
from baton.router.metrics import RouterMetrics
from baton.router.openai_protocol import APIError
from baton.router.prefix_index import PrefixIndex
from baton.router.selection import NoWorkerAvailable
from baton.router.traffic import Traffic

log = logging.getLogger(__name__)

@dataclass
class Prepared:
    """A validated, tokenized request ready for the workers."""

    request_id: str
    prompt_ids: list[int]
    sampling: inference_pb2.SamplingParams
    route: str  # metrics label: "/v1/completions", "grpc", ...


@dataclass
class TextDelta:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[inference_pb2.TopLogprobs] = field(default_factory=list)
    # On the first delta when sampling.prompt_logprobs is set: entry i scores prompt token i + 1.
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[inference_pb2.TopLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    usage: inference_pb2.Usage | None = None  # set on the last delta


class RouterService:
    def __init__(self, config: RouterConfig, tokenizer, registry: WorkerRegistry, metrics: RouterMetrics,
                 index: PrefixIndex | None = None, traffic: Traffic | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.registry = registry
        self.metrics = metrics
        self.traffic = traffic
        self.dispatcher = Dispatcher(config, registry, metrics, index, traffic)
        self.admission = Admission(config.max_inflight_requests, config.retry_after_s)
        self.model_name = config.model_name
        self.max_model_len = config.context_length()
        self.vocab_size = tokenizer.vocab_size
        self.defaults = GenerationDefaults.from_dir(config.model_dir)

    # -- validation -------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this router serves '{self.model_name}'.",
                           param="model", code="model_not_found", type="not_found_error")

    def tokenize(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        self._check_ids(prompt, "prompt")
        return list(prompt)

    def tokenize_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt, **template_kwargs)
        except (ValueError, TypeError) as exc:  # roles out of order, no template: the client can't chat with this model
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None

    def _check_ids(self, ids, param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                           param=param)

    def prepare(self, request_id: str, route: str, prompt_ids: list[int],
                sampling: inference_pb2.SamplingParams) -> Prepared:
        """Checks the request against the context, vocabulary and max_tokens_limit; max_tokens 0 becomes what the
        context leaves (capped by the model's max_new_tokens and max_tokens_limit)."""
        n = len(prompt_ids)
        if n == 0:
            raise APIError(400, "the prompt is empty after tokenization", param="prompt")
        if n >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"your prompt has {n} tokens; it must leave room for at least one new token.",
                           param="prompt", code="context_length_exceeded")
        sampling, given = inference_pb2.SamplingParams(), sampling
        sampling.CopyFrom(given)
        cap = self.config.max_tokens_limit
        if cap is not None and sampling.max_tokens > cap:
            raise APIError(400, f"max_tokens ({sampling.max_tokens}) exceeds this server's limit of {cap}",
                           param="max_tokens")
        if sampling.max_tokens == 0:
            sampling.max_tokens = min(self.max_model_len - n, self.defaults.max_tokens or self.max_model_len,
                                      cap or self.max_model_len)
        elif n + sampling.max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {n + sampling.max_tokens} tokens ({n} in the prompt, "
                                f"{sampling.max_tokens} for the completion).", param="max_tokens",
                           code="context_length_exceeded")
        if sampling.min_tokens > sampling.max_tokens:
            raise APIError(400, f"min_tokens ({sampling.min_tokens}) must not exceed max_tokens "
                                f"({sampling.max_tokens})", param="min_tokens")
        if any(not s for s in sampling.stop):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        self._check_ids(sampling.stop_token_ids, "stop_token_ids")
        self._check_ids(sampling.logit_bias.keys(), "logit_bias")
        return Prepared(request_id, prompt_ids, sampling, route)

    # -- streaming --------------------------------------------------------------------------
    async def stream(self, prepared: Prepared) -> AsyncIterator[TextDelta]:
        """Text deltas of one sequence; raises APIError (503/500/400) if it cannot complete. The caller counts
        the request (one HTTP request may run several sequences)."""
        start = time.perf_counter()
        last_token_at: float | None = None
        completion_tokens = 0
        cached = 0
        chunks = self.dispatcher.generate(prepared.request_id, prepared.prompt_ids, prepared.sampling)
        try:
            async for chunk in chunks:
                now = time.perf_counter()
                if chunk.HasField("prefill"):
                    cached = chunk.prefill.cached_tokens
                if chunk.token_ids:
                    gap = None
                    if last_token_at is None:
                        self.metrics.ttft.observe(now - start)
                        if self.traffic is not None:
                            self.traffic.first_token(len(prepared.prompt_ids), now - start)
                    else:
                        # Tokens batched into one chunk share the gap, as they came from one step each.
                        gap = (now - last_token_at) / len(chunk.token_ids)
                        for _ in chunk.token_ids:
                            self.metrics.itl.observe(gap)
                    if self.traffic is not None:
                        self.traffic.tokens(len(chunk.token_ids), gap)
                    last_token_at = now
                # The decode worker detokenizes and applies stop strings (it must stop generating anyway).
                completion_tokens += len(chunk.token_ids)
                delta = TextDelta(text=chunk.text, token_ids=list(chunk.token_ids),
                                  logprobs=list(chunk.logprobs) if prepared.sampling.logprobs else [],
                                  top_logprobs=list(chunk.top_logprobs), prompt_logprobs=list(chunk.prompt_logprobs),
                                  prompt_top_logprobs=list(chunk.prompt_top_logprobs))
                if chunk.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED:
                    yield delta
                    continue
                if chunk.HasField("usage") and chunk.usage.cached_prompt_tokens:
                    cached = chunk.usage.cached_prompt_tokens
                delta.finish_reason = finish_reason_name(chunk.finish_reason)
                delta.usage = inference_pb2.Usage(prompt_tokens=len(prepared.prompt_ids),
                                                  completion_tokens=completion_tokens, cached_prompt_tokens=cached)
                self.metrics.e2e.observe(time.perf_counter() - start)
                self.metrics.finished(delta.finish_reason)
                yield delta
                return
        except OutOfCapacity as exc:
            raise self.admission.out_of_capacity(str(exc)) from None
        except NoWorkerAvailable as exc:
            raise APIError(503, str(exc), type="service_unavailable", code="no_worker_available") from None
        except WorkerFailed as exc:
            raise APIError(400 if exc.invalid_request else 500, str(exc), type="invalid_request_error"
                           if exc.invalid_request else "server_error", code="worker_failed") from None
        finally:
            # Closing the worker stream here (not at garbage collection) makes a stop string or a
            # client disconnect abort the request on the workers right away.
            await chunks.aclose()
