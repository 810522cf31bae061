"""OpenAI-compatible request/response shapes for /v1/completions, /v1/chat/completions, /tokenize and /detokenize.

Every request field is applied or refused: an unknown field is a 400 naming it, except the few that clients send
routinely and that cannot change the output (`user`, `metadata`, ...), which are logged at debug. An explicit
null means the field's default, as in OpenAI's API."""
from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from baton.engine.errors import InvalidRequestError
from baton.engine.grammar import StructuredOutput, check_schema
from baton.proto.v1 import inference_pb2
from baton.router.generation_defaults import GenerationDefaults
from baton.router.tool_calls import ToolRequestError, ToolUse

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MAX_CHOICES = 128
# Sent by stock clients and SDKs; none of them can change what the model generates.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})


class APIError(Exception):
    """An error returned to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class FieldError(ValueError):
    """A check across fields, raised in a model validator; the 400 names `param` (pydantic cannot)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _or(value, default):
    return default if value is None else value


def _drop_nulls(data: Any) -> Any:
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _check_unicode(data: Any) -> None:
    """JSON's \\uD800-style escapes can carry lone UTF-16 surrogates, which no tokenizer or wire can encode:
    refuse them by field instead of failing later (iterative: bodies may nest deeply)."""
    stack = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise FieldError(path or "body", f"Invalid value for '{path or 'body'}': the string holds a "
                                                     "lone UTF-16 surrogate, which is not valid Unicode") from None
        elif isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in value.items())
            stack.extend((k, path or "body") for k in value if isinstance(k, str) and not k.isascii())
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value))


class _Request(BaseModel):
    # Unknown fields are refused (http_server turns pydantic's "extra_forbidden" into "'x' is not supported").
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _nulls_and_ignored_fields(cls, data: Any) -> Any:
        _check_unicode(data)
        data = _drop_nulls(data)
        if isinstance(data, dict):
            ignored = [k for k in data if k in IGNORED_FIELDS and k not in cls.model_fields]
            if ignored:
                log.debug("ignoring request fields that cannot change the output: %s", ", ".join(ignored))
                data = {k: v for k, v in data.items() if k not in ignored}
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = True  # `stream_options: {}` asks for usage (as vLLM)


UINT32_MAX = 2**32 - 1  # the wire's counts and token ids are uint32: larger values are refused here, by name
TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
Bias = Annotated[float, Field(ge=-100, le=100)]


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the engine always enforces the schema


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: "text" (free), "json_object" (any object) or "json_schema"."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("response_format", "response_format of type 'json_schema' needs a 'json_schema' field")
        if self.type != "json_schema" and self.json_schema is not None:
            raise FieldError("response_format", f"response_format of type {self.type!r} takes no 'json_schema'")
        return self

    def wire(self) -> inference_pb2.StructuredOutput | None:
        """None for free text; raises FieldError for a schema the engine's grammar backend cannot enforce."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return inference_pb2.StructuredOutput(kind="json_object")
        schema = json.dumps(self.json_schema.schema_)
        try:
            check_schema(schema)
        except InvalidRequestError as exc:
            raise FieldError("response_format", f"response_format.json_schema.schema: {exc}") from None
        return inference_pb2.StructuredOutput(kind="json_schema", json_schema=schema)


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extra: exactly one of `regex` (the output fully matches it) or `choice`."""

    model_config = ConfigDict(extra="forbid")

    regex: str | None = None
    choice: list[str] | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        if (self.regex is None) == (self.choice is None):
            raise FieldError("structured_outputs", "structured_outputs takes exactly one of 'regex' and 'choice'")
        return self

    def wire(self) -> inference_pb2.StructuredOutput:
        try:
            if self.regex is not None:
                StructuredOutput("regex", regex=self.regex)
                return inference_pb2.StructuredOutput(kind="regex", regex=self.regex)
            StructuredOutput("choice", choices=tuple(self.choice))
            return inference_pb2.StructuredOutput(kind="choice", choice=self.choice)
        except InvalidRequestError as exc:
            raise FieldError("structured_outputs", f"structured_outputs: {exc}") from None


class Speculative(BaseModel):
    """A vLLM-style extra: speculative decoding for this request (ngram prompt lookup, the draft model, or off)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram", "draft", "off"] = "ngram"
    num_tokens: int | None = Field(None, ge=1, le=16)  # None: the decode worker's --num-speculative-tokens

    def wire(self) -> inference_pb2.SpeculativeDecoding:
        return inference_pb2.SpeculativeDecoding(method=self.method, num_tokens=self.num_tokens or 0)


class _Sampling(_Request):
    """Fields shared by completions and chat; None means the model's generation_config.json or OpenAI's default."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[TokenId, Bias] = Field(default_factory=dict)  # JSON keys are token ids as strings
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] = Field(default_factory=list)
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    min_tokens: int = Field(0, ge=0, le=UINT32_MAX)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra
    speculative: Speculative | None = None  # extra: per-request speculative decoding
    skip_special_tokens: bool = True  # vLLM's extra; false: special tokens stay in the text, EOS excepted
    _structured_output: inference_pb2.StructuredOutput | None = PrivateAttr(None)  # checked response_format

    @model_validator(mode="after")
    def _consistent(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.response_format is not None and self.structured_outputs is not None:
            raise FieldError("structured_outputs", "give response_format or structured_outputs, not both")
        constraint = self.structured_outputs or self.response_format
        self._structured_output = constraint.wire() if constraint is not None else None
        limit = self.output_limit
        if limit is not None and self.min_tokens > limit:
            raise FieldError("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({limit})")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, defaults: GenerationDefaults, *, logprobs: bool, top_logprobs: int,
                 prompt_logprobs: int | None = None) -> inference_pb2.SamplingParams:
        """The wire parameters; max_tokens 0 means as many as the context leaves (RouterService.prepare)."""
        params = inference_pb2.SamplingParams(
            max_tokens=self.output_limit or 0,
            temperature=_or(self.temperature, defaults.temperature),
            top_p=_or(self.top_p, defaults.top_p),
            top_k=_or(self.top_k, defaults.top_k),
            min_p=_or(self.min_p, defaults.min_p),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=_or(self.repetition_penalty, defaults.repetition_penalty),
            logit_bias=self.logit_bias,
            stop=self.stop_strings(),
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        if self.seed is not None:
            params.seed = self.seed
        if prompt_logprobs is not None:
            params.prompt_logprobs = prompt_logprobs
        if self._structured_output is not None:
            params.structured_output.CopyFrom(self._structured_output)
        if self.speculative is not None:
            params.speculative.CopyFrom(self.speculative.wire())
        if not self.skip_special_tokens:
            params.skip_special_tokens = False
        return params


Prompt = str | list[TokenId]


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int = Field(16, ge=1, le=UINT32_MAX)  # OpenAI's and vLLM's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with alternatives: how many
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @model_validator(mode="after")
    def _prompts_and_best_of(self) -> CompletionRequest:
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise FieldError("prompt", "prompt must not be empty")
        if len(prompts) * self.num_samples > MAX_CHOICES:  # one request must not bypass admission control
            raise FieldError("prompt", f"{len(prompts)} prompts x {self.num_samples} samples each is more than "
                                       f"{MAX_CHOICES} sequences in one request")
        if self.best_of is not None and self.best_of < self.n:
            raise FieldError("best_of", f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.stream and self.num_samples > self.n:
            raise FieldError("best_of", "best_of > n cannot be streamed")
        return self

    def prompts(self) -> list[Prompt]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def num_samples(self) -> int:
        """Sequences generated per prompt: best_of of them, of which the n most likely are returned."""
        return self.best_of or self.n

    def wire_sampling(self, defaults: GenerationDefaults) -> inference_pb2.SamplingParams:
        k = self.logprobs or 0
        # best_of ranks samples by their cumulative logprob, so they need logprobs even when the client doesn't.
        return self.sampling(defaults, logprobs=self.logprobs is not None or self.num_samples > self.n,
                             top_logprobs=k, prompt_logprobs=k if self.echo and self.logprobs is not None else None)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Every field reaches the chat template (`name`, `tool_calls`, `tool_call_id`, ...): a template that uses a
    # field applies it, and one that does not cannot change the prompt with it.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _drop_nulls(data)

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        content = self.text()
        out["content"] = content if content is not None or self.tool_calls else ""
        return out


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; none: no arguments
    strict: bool | None = None  # the engine enforces the schema whenever a call is required or named


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = Field(None, min_length=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    _tool_use: ToolUse | None = PrivateAttr(None)  # checked tools; None when they play no part

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _checked_tools(self) -> ChatCompletionRequest:
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        try:
            self._tool_use = ToolUse.of([t.model_dump(exclude_none=True) for t in self.tools or []],
                                        None if named else self.tool_choice, named, self.parallel_tool_calls)
        except ToolRequestError as exc:
            raise FieldError(exc.param, str(exc)) from None
        if self._tool_use is not None and self._tool_use.grammar is not None:
            if self._structured_output is not None:  # set by _Sampling's validator, which runs first
                raise FieldError("tool_choice", "a required or named tool_choice constrains the output itself: give "
                                                "no response_format or structured_outputs with it")
            self._structured_output = self._tool_use.grammar
        return self

    @property
    def tool_use(self) -> ToolUse | None:
        return self._tool_use

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def wire_sampling(self, defaults: GenerationDefaults) -> inference_pb2.SamplingParams:
        return self.sampling(defaults, logprobs=self.logprobs, top_logprobs=self.top_logprobs)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_dict() for m in self.messages]


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


def usage_json(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None, *, chunk: bool,
                first: bool = False) -> dict:
    if chunk:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def response_json(request_id: str, model: str, choices: list[dict], usage: dict | None, *, chat: bool,
                  chunk: bool) -> dict:
    if chat:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    body = {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None or not chunk:
        body["usage"] = usage
    return body
