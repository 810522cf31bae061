"""One request's state inside an engine: its tokens, KV blocks, progress and finish reason."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from baton.engine.sampling_params import SamplingParams

# Stands in token_ids for a token sampled by a step still running on the device (async scheduling).
PLACEHOLDER = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREFILLED = "prefilled"  # prefill-only request done; blocks pinned until released after transfer
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefill_only: bool = False
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks registered so far
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    output_logprobs: list[float] = field(default_factory=list)
    # Prompt logprobs: entry p scores prompt token p + 1 (logprob, then the top alternatives).
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_preemptions: int = 0
    # Monotonic times for the queue / prefill / decode histograms.
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # first admitted to a batch
    first_token_time: float | None = None
    remote_prefill: bool = False  # the prompt's KV and first token came from a prefill worker
    # Structured output: the request's xgrammar matcher, advanced with every token appended.
    grammar: object | None = None
    # Speculative decoding: proposed tokens at the end of token_ids, to be verified by this step (then removed).
    num_draft: int = 0
    # A prefill-only request's layer-wise KV hand-off (kv_transfer.LayerwiseSend): fed after each layer of the
    # step that completes the prompt.
    kv_sink: object | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def reads_prefix_cache(self) -> bool:
        # Cached prompt blocks have no logits left to score, so prompt logprobs compute the whole prompt (as vLLM).
        return self.params.prompt_logprobs is None

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def drop_draft(self) -> None:
        """Takes back proposed tokens this step will not verify."""
        if self.num_draft:
            del self.token_ids[-self.num_draft:]
            self.num_draft = 0
