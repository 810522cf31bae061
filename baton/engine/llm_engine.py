"""The engine: add requests, step (schedule → run → sample → finish), abort; plus the two disaggregation halves."""
from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field

from baton.engine.attention import allocate_kv_cache
from baton.engine.block_manager import BlockManager, BlockStats, KVEventSink
from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.errors import InvalidRequestError, NoCapacityError
from baton.engine.loader import load_model
from baton.engine.model_runner import ModelRunner
from baton.engine.output_text import TextTracker
from baton.engine.sampler import Sampler
from baton.engine.sampling_params import SamplingParams
from baton.engine.scheduler import Scheduler
from baton.engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta), plus totals for usage."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)  # prefill-only: the blocks holding the prompt's KV


@dataclass(frozen=True)
class RemoteReservation:
    """Destination blocks a decode engine set aside for a prompt whose KV comes from elsewhere."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int  # leading prompt tokens already in local cache: their blocks need no transfer


@dataclass(frozen=True)
class EngineStats:
    blocks: BlockStats
    running: int
    waiting: int
    prefilled: int
    pending_remote: int
    prefill_tokens_computed: int
    prefill_tokens_cached: int
    generated_tokens: int
    preemptions: int
    queued_prefill_tokens: int  # prompt tokens admitted but not yet computed


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None, events: KVEventSink | None = None) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model_dir)
        mc = self.model_config
        if tokenizer is None and (pathlib.Path(config.model_dir) / "tokenizer.json").is_file():
            from baton.engine.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(config.model_dir)
        self.tokenizer = tokenizer
        self.model = load_model(config, mc)
        self.dtype = next(self.model.parameters()).dtype
        bs = config.block_size
        block_nbytes = mc.num_layers * 2 * bs * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        num_blocks = config.num_kv_blocks
        if num_blocks is None and config.device.startswith("cuda"):
            from baton.engine.gpu_memory import kv_blocks_for_gpu

            num_blocks = kv_blocks_for_gpu(self.model, config, mc, block_nbytes)
        elif num_blocks is None:
            num_blocks = max(1, int(config.kv_cache_memory_gb * 2**30) // block_nbytes)
        self.kv_cache = allocate_kv_cache(num_blocks, mc.num_layers, bs, mc.num_kv_heads, mc.head_dim,
                                          self.dtype, config.device)
        self.max_model_len = min(config.max_model_len or mc.max_position, mc.max_position, num_blocks * bs)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching, events)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv_cache, bs, config.device, config.max_num_seqs,
                                  self.max_model_len, cuda_graphs=not config.enforce_eager)
        if self.runner.graphs is not None:
            self.runner.graphs.capture()
        self.sampler = Sampler(config.seed)
        # Published checkpoints often pad the embedding past the tokenizer; such ids can never be decoded.
        self._sample_vocab = min(mc.vocab_size, tokenizer.vocab_size) if tokenizer is not None else mc.vocab_size
        self.eos_token_ids = set(mc.eos_token_ids)
        if tokenizer is not None:
            self.eos_token_ids |= set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self._seqs: dict[str, Sequence] = {}
        self._text: dict[str, TextTracker] = {}
        self._prefilled: dict[str, Sequence] = {}
        self._pending_remote: dict[str, Sequence] = {}
        self._generated_requests = 0  # numbers the ids that generate() makes up
        self._prefill_computed = 0
        self._prefill_cached = 0
        self._generated = 0

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises InvalidRequestError for input the engine cannot serve; touches no state."""
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty: at least one token is required")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {len(prompt_ids)} "
                f"prompt tokens + max_tokens {params.max_tokens} = {len(prompt_ids) + params.max_tokens} were requested"
            )

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False) -> None:
        if request_id in self._seqs or request_id in self._prefilled or request_id in self._pending_remote:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params, prefill_only=prefill_only)
        self._seqs[request_id] = seq
        self._track_text(seq)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stops a request wherever it is and frees its blocks; False if it is unknown (already done)."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
            if seq.block_table:
                self.block_manager.free(seq)
        else:
            seq = self._prefilled.pop(request_id, None) or self._pending_remote.pop(request_id, None)
            if seq is None:
                return False
            self.block_manager.free(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        self._forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits = self.runner.run(scheduled)
        logits = logits[:, : self._sample_vocab]
        sampling = [s for s in scheduled if s.samples]
        tokens, logprobs = self.sampler.sample(logits, [(s.seq.request_id, s.seq.params) for s in sampling])
        for item in scheduled:
            seq = item.seq
            in_prompt = max(0, min(seq.num_prompt_tokens, seq.num_computed_tokens + item.num_tokens)
                            - seq.num_computed_tokens)
            seq.num_prefill_computed += in_prompt
            self._prefill_computed += in_prompt
            seq.num_computed_tokens += item.num_tokens
            self.block_manager.register_computed(seq)
        outputs = []
        for item, token, logprob in zip(sampling, tokens, logprobs):
            seq = item.seq
            if seq.num_preemptions == 0 and seq.num_tokens == seq.num_prompt_tokens:
                self._prefill_cached += seq.num_cached_tokens
            outputs.append(self._append_token(seq, token, logprob))
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: float) -> RequestOutput:
        seq.token_ids.append(token)
        seq.output_logprobs.append(logprob)
        self._generated += 1
        text, stopped = self._text[seq.request_id].push(token) if seq.request_id in self._text else ("", False)
        params = seq.params
        reason = None
        if stopped:
            reason = "stop"
        elif not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            new_logprobs=[logprob],
            text=text,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_ids),
            num_cached_tokens=seq.num_cached_tokens,
        )
        if seq.prefill_only:
            # Prefill-only: pin the prompt's blocks for the KV transfer; release() frees them.
            self.scheduler.remove(seq)
            del self._seqs[seq.request_id]
            seq.status = SeqStatus.PREFILLED
            self._prefilled[seq.request_id] = seq
            self._forget(seq.request_id)
            out.block_ids = list(seq.block_table)
            out.finished, out.finish_reason = True, reason or "prefilled"
            return out
        if reason is not None:
            self._finish(seq, reason)
            out.finished, out.finish_reason = True, reason
            out.text += self._forget(seq.request_id)
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self._seqs.pop(seq.request_id, None)

    def _track_text(self, seq: Sequence) -> None:
        if self.tokenizer is not None and not seq.prefill_only:
            self._text[seq.request_id] = TextTracker(self.tokenizer, seq.prompt_ids, seq.params.stop)

    def _forget(self, request_id: str) -> str:
        """Drops the request's text and sampler state; returns the text its detokenizer still held back."""
        self.sampler.forget(request_id)
        tracker = self._text.pop(request_id, None)
        return tracker.flush() if tracker is not None else ""

    # ---- disaggregation: prefill side ----------------------------------------------------
    def release(self, request_id: str) -> bool:
        """Frees a prefill-only request's pinned blocks once its KV has been shipped (or failed to)."""
        seq = self._prefilled.pop(request_id, None)
        if seq is None:
            return False
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED
        return True

    # ---- disaggregation: decode side -----------------------------------------------------
    def reserve_remote(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RemoteReservation:
        """Allocates blocks for a prompt whose KV will be written from outside; local prefix hits are kept."""
        if request_id in self._seqs or request_id in self._prefilled or request_id in self._pending_remote:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params)
        if not self.block_manager.can_allocate(seq):
            raise NoCapacityError(f"not enough free KV blocks to receive request {request_id}")
        self.block_manager.allocate(seq)
        self._pending_remote[request_id] = seq
        return RemoteReservation(request_id, list(seq.block_table), seq.num_cached_tokens)

    def commit_remote(self, request_id: str, first_token: int, first_logprob: float = 0.0) -> RequestOutput:
        """The reserved blocks now hold the prompt's KV: start decoding after the prefill worker's first token."""
        seq = self._pending_remote.pop(request_id, None)
        if seq is None:
            raise InvalidRequestError(f"no pending remote request {request_id!r}")
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.register_computed(seq)
        self._prefill_cached += seq.num_cached_tokens
        self._seqs[request_id] = seq
        self._track_text(seq)
        self.scheduler.add_running(seq)
        return self._append_token(seq, first_token, first_logprob)

    def detach_remote(self, request_id: str) -> Sequence | None:
        """Forgets a pending remote request but keeps its blocks, for a transport that may still write
        into them; free_detached() returns them once no write can arrive any more."""
        return self._pending_remote.pop(request_id, None)

    def free_detached(self, seq: Sequence) -> None:
        self.block_manager.free(seq)

    # ---- introspection -------------------------------------------------------------------
    def stats(self) -> EngineStats:
        # Copies first: stats() is also read from other threads while the engine thread steps.
        queued = list(self.scheduler.waiting) + list(self.scheduler.running)
        return EngineStats(
            blocks=self.block_manager.stats(),
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            prefilled=len(self._prefilled),
            pending_remote=len(self._pending_remote),
            prefill_tokens_computed=self._prefill_computed,
            prefill_tokens_cached=self._prefill_cached,
            generated_tokens=self._generated,
            preemptions=self.scheduler.num_preemptions,
            queued_prefill_tokens=sum(max(0, q.num_prompt_tokens - q.num_computed_tokens) for q in queued),
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Offline batch helper: runs prompts to completion and returns their finished sequences in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{self._generated_requests + i}" for i in range(len(prompts))]
        self._generated_requests += len(prompts)
        seqs = []
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
            seqs.append(self._seqs[rid])
        while self.has_unfinished():
            self.step()
        return seqs
