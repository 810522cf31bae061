"""Per-request sampling parameters, validated on construction so bad input never reaches the engine."""
from __future__ import annotations

from dataclasses import dataclass, field

from baton.engine.errors import InvalidRequestError
from baton.engine.grammar import StructuredOutput

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
SPECULATION_METHODS = ("ngram", "draft", "off")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculationParams:
    """A request's speculative decoding: ngram (prompt lookup), draft (the server's draft model) or off.
    num_tokens None: the server's --num-speculative-tokens."""

    method: str = "ngram"
    num_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATION_METHODS:
            raise InvalidRequestError(f"speculative.method must be one of {', '.join(SPECULATION_METHODS)}, "
                                      f"got {self.method!r}")
        n = self.num_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SPECULATIVE_TOKENS):
            raise InvalidRequestError(f"speculative.num_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {n!r}")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0  # 0: disabled
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: disabled
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0  # EOS and stop token ids are masked (and stop strings unchecked) until this many
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # most likely alternatives returned per sampled token
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob plus k alternatives
    structured_output: StructuredOutput | None = None  # the output must match this grammar (JSON)
    speculation: SpeculationParams | None = None  # None: the server's default
    skip_special_tokens: bool = True  # special tokens stay out of the text (EOS always does: output_text.py)
    kept_special_token_ids: frozenset[int] = frozenset()  # special tokens kept in the text anyway (tool call markers)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
