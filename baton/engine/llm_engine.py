"""The engine: add requests, step (schedule → run → sample → finish), abort; plus the two disaggregation halves."""
from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from baton.engine.attention import allocate_kv_cache
from baton.engine.block_manager import BlockManager, BlockStats, KVEventSink
from baton.engine.config import FP8_KV_DTYPE, EngineConfig, ModelConfig
from baton.engine.errors import InvalidRequestError, NoCapacityError
from baton.engine.grammar import GrammarBackend
from baton.engine.loader import load_model
from baton.engine.model_runner import ModelRunner
from baton.engine.output_text import TextTracker
from baton.engine.sampler import PendingSample, PromptScoring, Sampler, TopLogprobs
from baton.engine.sampling_params import SamplingParams
from baton.engine.scheduler import ScheduledSeq, Scheduler
from baton.engine.sequence import PLACEHOLDER, SeqStatus, Sequence
from baton.engine.speculation import NgramProposer, Proposer, SpecStats, Speculator, Verified

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta), plus totals for usage."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # when params.top_logprobs
    # On a request's first output when it asked for prompt logprobs: entry p scores prompt token p + 1.
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None
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
class FinishedRequest:
    """What metrics need of a request that left the engine; a time is None where its phase ran elsewhere
    (a remotely prefilled request has no queue or prefill time on the decode engine)."""

    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    queue_s: float | None  # arrival -> first scheduled
    prefill_s: float | None  # first scheduled -> first token
    decode_s: float | None  # first token -> last token


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
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    spec: SpecStats = SpecStats(0, 0, 0)  # speculative decoding: drafts verified, tokens proposed and accepted


@dataclass
class _InFlight:
    """A decode step queued on the device whose sampled ids have not reached the host yet. A step that verifies
    proposed tokens keeps its logits instead (`verifying`): what it accepts decides what runs next, so it is
    resolved before the next step is queued."""

    seqs: list[Sequence]
    positions: list[int]  # where each request's sampled token goes in its token_ids (a PLACEHOLDER until then)
    sample: PendingSample | None
    rows: dict[str, int]  # request id -> row in sample.tokens
    scheduled: list[ScheduledSeq] | None = None  # verifying: the step as scheduled, its logits and rows per request
    logits: torch.Tensor | None = None
    num_rows: list[int] | None = None

    @property
    def verifying(self) -> bool:
        return self.scheduled is not None

    def wait(self) -> None:
        if self.sample is not None:
            self.sample.wait()
        elif self.logits is not None and self.logits.is_cuda:
            torch.cuda.synchronize(self.logits.device)


def _stamp_scheduled(scheduled: list[ScheduledSeq]) -> None:
    """Records when each request was first admitted to a batch (queue-time metric)."""
    now = time.monotonic()
    for item in scheduled:
        if item.seq.scheduled_time is None:
            item.seq.scheduled_time = now


def _layer_sinks(scheduled: list[ScheduledSeq]):
    """The model's per-layer callback for this step: feeds the layer-wise KV hand-off of every request whose
    prompt this step completes (None when there is none)."""
    sinks = [(item.seq.kv_sink, item.seq.block_table) for item in scheduled
             if item.seq.kv_sink is not None
             and item.seq.num_computed_tokens + item.num_tokens >= item.seq.num_prompt_tokens]
    if not sinks:
        return None

    def layer_done(layer: int) -> None:
        for sink, block_table in sinks:
            sink.layer_ready(layer, block_table)

    return layer_done


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None, events: KVEventSink | None = None) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model_dir)
        mc = self.model_config
        if tokenizer is None and (pathlib.Path(config.model_dir) / "tokenizer.json").is_file():
            from baton.engine.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(config.model_dir)
        self.tokenizer = tokenizer
        # What this process held on the device before this engine (another engine's pool and weights): not ours.
        held_before = torch.cuda.memory_allocated(config.device) if config.device.startswith("cuda") else 0
        self.model = load_model(config, mc)
        if config.calculate_kv_scales:  # before the pool, any request or graph capture: see kv_calibration.py
            from baton.engine.kv_calibration import calculate_kv_scales

            calculate_kv_scales(self.model, config, tokenizer)
        self.dtype = next(self.model.parameters()).dtype
        self.kv_cache_dtype = config.resolve_kv_cache_dtype(self.dtype)
        bs = config.block_size
        # Bytes, not elements: an FP8 pool holds twice the blocks of a bf16 one in the same memory.
        block_nbytes = mc.num_layers * 2 * bs * mc.num_kv_heads * mc.head_dim * self.kv_cache_dtype.itemsize
        draft = None
        if config.speculative_model:
            from baton.engine.draft_model import kv_block_nbytes, load_draft

            draft = load_draft(config, mc)
            # The draft's pool has as many blocks as this one.
            block_nbytes += kv_block_nbytes(draft[1], bs, next(draft[0].parameters()).dtype)
        num_blocks = config.num_kv_blocks
        if num_blocks is None and config.device.startswith("cuda"):
            from baton.engine.gpu_memory import kv_blocks_for_gpu

            num_blocks = kv_blocks_for_gpu(self.model, config, mc, block_nbytes, held_before)
        elif num_blocks is None:
            num_blocks = max(1, int(config.kv_cache_memory_gb * 2**30) // block_nbytes)
        self.kv_cache = allocate_kv_cache(num_blocks, mc.num_layers, bs, mc.num_kv_heads, mc.head_dim,
                                          self.kv_cache_dtype, config.device)
        self.max_model_len = min(config.max_model_len or mc.max_position, mc.max_position, num_blocks * bs)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching, events)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        # With speculation on by default, verification steps (1 + k decode rows a request) replay graphs too.
        graph_rows = config.max_num_seqs
        if config.speculative_method != "off":
            verifying = min(config.max_num_seqs, config.speculative_disable_by_batch_size or config.max_num_seqs)
            graph_rows = max(graph_rows, verifying * (1 + config.num_speculative_tokens))
        self.runner = ModelRunner(self.model, self.kv_cache, bs, config.device, graph_rows,
                                  self.max_model_len, cuda_graphs=not config.enforce_eager,
                                  row_invariant=config.row_invariant_verification)
        if self.runner.graphs is not None:
            self.runner.graphs.capture()
        # Published checkpoints often pad the embedding past the tokenizer; such ids can never be decoded.
        self._sample_vocab = min(mc.vocab_size, tokenizer.vocab_size) if tokenizer is not None else mc.vocab_size
        self.eos_token_ids = set(mc.eos_token_ids)
        if tokenizer is not None:
            self.eos_token_ids |= set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.sampler = Sampler(config.seed, self.eos_token_ids)
        proposers: dict[str, Proposer] = {"ngram": NgramProposer(config.ngram_min, config.ngram_max)}
        if draft is not None:
            from baton.engine.draft_model import DraftModelProposer

            proposers["draft"] = DraftModelProposer(*draft, num_blocks, config, self._sample_vocab, self.max_model_len)
        self.speculator = Speculator(config.speculative_method, config.num_speculative_tokens, proposers,
                                     config.speculative_disable_by_batch_size)
        self._grammar: GrammarBackend | None = None  # built on the first structured-output request
        # Called on the engine thread for every request that finishes, is aborted or is handed off (metrics).
        self.finish_listeners: list[Callable[[FinishedRequest], None]] = []
        self._seqs: dict[str, Sequence] = {}
        self._text: dict[str, TextTracker] = {}
        self._prefilled: dict[str, Sequence] = {}
        self._pending_remote: dict[str, Sequence] = {}
        self._generated_requests = 0  # numbers the ids that generate() makes up
        self._prefill_computed = 0
        self._prefill_cached = 0
        self._generated = 0
        # Async scheduling: while a decode step runs on the device, the host schedules and queues the next one.
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None \
            else self.runner.graphs is not None
        self._inflight: _InFlight | None = None
        self._proposing = False

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises InvalidRequestError for input the engine cannot serve; touches no state."""
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty: at least one token is required")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self._sample_vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"{name}: token id {bad!r} is outside the vocabulary [0, {self._sample_vocab})")
        if params.structured_output is not None and self.tokenizer is None:
            raise InvalidRequestError("structured output needs the model's tokenizer, and this engine has none")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {len(prompt_ids)} "
                f"prompt tokens + max_tokens {params.max_tokens} = {len(prompt_ids) + params.max_tokens} were requested"
            )

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False, generated_ids: list[int] = (), kv_sink=None) -> None:
        """`generated_ids` resumes a request another engine began: they are recomputed like a preempted
        request's tokens and count as its output (limits, penalties, usage, text). `kv_sink` (prefill-only):
        a layer-wise KV hand-off, told after each layer of the step that completes the prompt."""
        if request_id in self._seqs or request_id in self._prefilled or request_id in self._pending_remote:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        if not prefill_only:  # a prefill-only request decodes elsewhere, and speculates there
            self.speculator.validate(params)
        if generated_ids:
            self._validate_resume(generated_ids, params, prefill_only)
        if kv_sink is not None and not prefill_only:
            raise InvalidRequestError("a layer-wise KV hand-off needs a prefill-only request")
        seq = Sequence(request_id, list(prompt_ids), params, prefill_only=prefill_only,
                       token_ids=[*prompt_ids, *generated_ids], kv_sink=kv_sink)
        seq.grammar = self._matcher(params, seq.output_ids)
        self._seqs[request_id] = seq
        self._track_text(seq)
        self.scheduler.add(seq)

    def _validate_resume(self, generated_ids: list[int], params: SamplingParams, prefill_only: bool) -> None:
        if prefill_only:
            raise InvalidRequestError("a resumed request cannot be prefill-only")
        bad = next((t for t in generated_ids if not isinstance(t, int) or not 0 <= t < self._sample_vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"generated token id {bad!r} is outside the vocabulary [0, {self._sample_vocab})")
        if len(generated_ids) >= params.max_tokens:
            raise InvalidRequestError(f"{len(generated_ids)} tokens already generated leave none of max_tokens "
                                      f"{params.max_tokens}")

    def _matcher(self, params: SamplingParams, generated_ids: list[int] = ()):
        """The request's grammar matcher (None without structured output), advanced past `generated_ids`."""
        if params.structured_output is None:
            return None
        if self._grammar is None:
            self._grammar = GrammarBackend(self.tokenizer, self._sample_vocab, self.eos_token_ids)
        matcher = self._grammar.matcher(params.structured_output)
        if not all(matcher.accept_token(t) for t in generated_ids):
            raise InvalidRequestError("the tokens already generated do not match response_format's grammar")
        return matcher

    def abort(self, request_id: str) -> bool:
        """Stops a request wherever it is and frees its blocks; False if it is unknown (already done)."""
        seq = self._seqs.pop(request_id, None)
        handed_off = False  # a prefilled request was reported when its prompt was done
        if seq is not None:
            self.scheduler.remove(seq)
            if seq.block_table:
                self.block_manager.free(seq)
        else:
            handed_off = request_id in self._prefilled
            seq = self._prefilled.pop(request_id, None) or self._pending_remote.pop(request_id, None)
            if seq is None:
                return False
            self.block_manager.free(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        self._forget(request_id)
        if not handed_off:
            self._report(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step's outputs. With async scheduling, a decode step's outputs come back from the next call:
        that call first queues the following step on the device, then waits for this one's ids."""
        # A verification in flight is resolved first: the tokens it accepts decide the next step's inputs.
        outputs = self._drain() if self._inflight is not None and self._inflight.verifying else []
        if self._pipelinable():
            previous = self._inflight
            self._inflight = self._launch_decode()
            return outputs + (self._resolve(previous) if previous is not None else [])
        outputs += self._drain()
        return outputs + self._step_sync()

    def _drain(self) -> list[RequestOutput]:
        previous, self._inflight = self._inflight, None
        return self._resolve(previous) if previous is not None else []

    def _pipelinable(self) -> bool:
        """Whether the next step may be queued before the host knows the last sampled ids: decode only, no
        admissions, no preemption possible, and nothing that needs the ids on the host to sample (grammar
        masks, penalties) or to decide whether there is a next token at all (the limits). A request whose next
        step verifies proposed tokens may be queued too where its proposer guesses past the id still being sampled
        (n-gram lookup); that step is then resolved before the next one is queued."""
        sched = self.scheduler
        if not self.async_scheduling or sched.waiting or not sched.running:
            return False
        if len(sched.running) > self.block_manager.num_available or len(sched.running) > sched.max_num_seqs \
                or len(sched.running) > sched.max_num_batched_tokens:
            return False
        if self.runner.graphs is not None and not self.runner.graphs.fits(len(sched.running)):
            return False
        self._proposing = False  # whether the step to queue has a proposal to verify (_launch_decode asks for it)
        for seq in sched.running:
            p = seq.params
            if seq.num_uncomputed != 1 or seq.grammar is not None or p.penalized or seq.prefill_only \
                    or len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                return False
            if self.speculator.speculates_next(seq, len(sched.running)):
                if not self.speculator.proposes_in_flight(seq):
                    return False
                self._proposing = True
        return True

    def _launch_decode(self) -> _InFlight:
        if self._proposing:
            self.speculator.propose(self.scheduler.running, self.max_model_len)
        scheduled = self.scheduler.schedule()
        _stamp_scheduled(scheduled)
        previous = self._inflight
        logits = self.runner.run(scheduled, (previous.sample.tokens, previous.rows) if previous else None)
        seqs = [item.seq for item in scheduled]
        if any(seq.num_draft for seq in seqs):  # every request decodes here: 1 + its proposed tokens rows each
            return _InFlight(seqs, [], None, {}, scheduled, logits, [1 + seq.num_draft for seq in seqs])
        sample = self.sampler.launch(logits[:, : self._sample_vocab], seqs)
        positions = []
        for seq in seqs:
            seq.num_computed_tokens += 1
            positions.append(len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)
        return _InFlight(seqs, positions, sample, {seq.request_id: row for row, seq in enumerate(seqs)})

    def _resolve(self, inflight: _InFlight) -> list[RequestOutput]:
        if inflight.verifying:
            return self._resolve_verification(inflight)
        result = inflight.sample.result()
        outputs = []
        for i, (seq, position) in enumerate(zip(inflight.seqs, inflight.positions)):
            if self._seqs.get(seq.request_id) is not seq:
                continue  # finished by an earlier token, or aborted, while this step was in flight
            top = result.top_logprobs[i]
            outputs.append(self._append_token(seq, result.tokens[i], result.logprobs[i], top, position))
            if seq.status is not SeqStatus.FINISHED:
                self.block_manager.register_computed(seq)
        return outputs

    def _resolve_verification(self, inflight: _InFlight) -> list[RequestOutput]:
        """A queued verification step, resolved as a synchronous step would be, less the requests that finished (or
        were aborted) while it was in flight: their rows are dropped, their blocks are already free."""
        scheduled, logits = inflight.scheduled, inflight.logits
        live = [self._seqs.get(item.seq.request_id) is item.seq for item in scheduled]
        if not all(live):
            keep, row = [], 0
            for item, n, ok in zip(scheduled, inflight.num_rows, live):
                if ok:
                    keep += range(row, row + n)
                else:
                    item.seq.num_draft = 0  # its token_ids were cut back when it finished
                row += n
            scheduled = [item for item, ok in zip(scheduled, live) if ok]
            if not scheduled:
                return []
            logits = logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]
        return self._finish_step(scheduled, logits)

    def _step_sync(self) -> list[RequestOutput]:
        self.speculator.propose(self.scheduler.running, self.max_model_len)
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        _stamp_scheduled(scheduled)
        return self._finish_step(scheduled, self.runner.run(scheduled, layer_done=_layer_sinks(scheduled)))

    def _finish_step(self, scheduled: list[ScheduledSeq], logits: torch.Tensor) -> list[RequestOutput]:
        """Samples (or verifies) the step's logits and advances its requests."""
        logits = logits[:, : self._sample_vocab]
        sampling = [s for s in scheduled if s.samples]
        verified: list[tuple[Sequence, Verified]] = []
        if any(s.seq.num_draft for s in sampling):
            sampling, logits, verified = self._verify(sampling, logits)
        scoring = [(s.seq, s.prompt_positions) for s in scheduled if s.prompt_positions]
        prompt = None
        if scoring:
            prompt = PromptScoring(logits[len(sampling):], [seq.prompt_ids[p + 1] for seq, ps in scoring for p in ps],
                                   max(seq.params.prompt_logprobs for seq, _ in scoring))
        result = self.sampler.sample(logits[: len(sampling)], [s.seq for s in sampling], prompt) \
            if sampling or prompt is not None else None  # a step of verifications only samples nothing more
        row = 0
        for seq, positions in scoring:
            k = seq.params.prompt_logprobs
            seq.prompt_logprobs += result.prompt_logprobs[row:row + len(positions)]
            seq.prompt_top_logprobs += [top[:k] for top in result.prompt_top_logprobs[row:row + len(positions)]]
            row += len(positions)
        for item in scheduled:
            seq = item.seq
            in_prompt = max(0, min(seq.num_prompt_tokens, seq.num_computed_tokens + item.num_tokens)
                            - seq.num_computed_tokens)
            self._prefill_computed += in_prompt
            seq.num_computed_tokens += item.num_tokens
            if not seq.num_draft:  # a verified request's blocks are registered once its accepted tokens are known
                self.block_manager.register_computed(seq)
        outputs = [self._accept(seq, v) for seq, v in verified]
        for i, item in enumerate(sampling):
            seq = item.seq
            if seq.num_preemptions == 0 and seq.num_tokens == seq.num_prompt_tokens:
                self._prefill_cached += seq.num_cached_tokens
            outputs.append(self._append_token(seq, result.tokens[i], result.logprobs[i], result.top_logprobs[i]))
        return outputs

    def _verify(self, sampling: list[ScheduledSeq], logits: torch.Tensor):
        """Splits off the rows of requests verifying proposed tokens (1 + num_draft each, in order) and verifies
        them; returns the other sampling requests, their rows followed by the prompt-scoring rows, and verdicts."""
        plain, plain_rows, spec_rows, spec = [], [], [], []
        row = 0
        for item in sampling:
            n = 1 + item.seq.num_draft
            if item.seq.num_draft:
                spec_rows += range(row, row + n)
                spec.append(item.seq)
            else:
                plain_rows.append(row)
                plain.append(item)
            row += n
        device = logits.device
        gens = [None if seq.params.greedy else self.sampler.generator(seq, device) for seq in spec]
        if not plain and row == len(logits):  # every row verifies (the common case): no gathers
            return plain, logits[:0], list(zip(spec, self.speculator.verify(spec, logits, gens)))
        verdicts = self.speculator.verify(spec, logits[torch.tensor(spec_rows, device=device)], gens)
        rest = torch.tensor(plain_rows + list(range(row, len(logits))), dtype=torch.long, device=device)
        return plain, logits[rest], list(zip(spec, verdicts))

    def _accept(self, seq: Sequence, verdict: Verified) -> RequestOutput:
        """Rolls seq back to its accepted tokens (rejected ones' KV slots are dropped, trailing blocks freed) and
        appends the verified tokens, stopping where one-at-a-time decoding would have stopped."""
        base = seq.num_tokens - seq.num_draft
        seq.drop_draft()
        seq.num_computed_tokens = base + verdict.num_accepted
        self.block_manager.trim(seq)
        outs = []
        tops = verdict.top_logprobs or [None] * len(verdict.tokens)
        for token, logprob, top in zip(verdict.tokens, verdict.logprobs, tops):
            outs.append(self._append_token(seq, token, logprob, top))
            if outs[-1].finished:
                break
        if not outs[-1].finished:
            self.block_manager.register_computed(seq)
        out = outs[-1]
        for field_name in ("new_token_ids", "new_logprobs", "new_top_logprobs"):
            setattr(out, field_name, [x for o in outs for x in getattr(o, field_name)])
        out.text = "".join(o.text for o in outs)
        return out

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: TopLogprobs | None = None,
                      position: int | None = None) -> RequestOutput:
        """`position`: the PLACEHOLDER this token replaces (async scheduling); later ones may follow it."""
        if position is None:
            position = len(seq.token_ids)
            seq.token_ids.append(token)
        else:
            seq.token_ids[position] = token
        num_output = position + 1 - seq.num_prompt_tokens
        seq.output_logprobs.append(logprob)
        self._generated += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        params = seq.params
        tracker = self._text.get(seq.request_id)
        # Before min_tokens, a stop string does not end the request either (as vLLM).
        text, stopped = tracker.push(token, check_stop=num_output > params.min_tokens) \
            if tracker is not None else ("", False)
        reason = None
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            # Only a token sampled elsewhere can break the grammar (a prefill worker that did not mask it).
            log.error("request %s: token %d breaks its structured-output grammar", seq.request_id, token)
            reason = "error"
        elif stopped or (seq.grammar is not None and seq.grammar.is_terminated()):
            reason = "stop"
        elif not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason = "stop"
        elif num_output >= params.max_tokens or position + 1 >= self.max_model_len:
            reason = "length"
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            new_logprobs=[logprob],
            new_top_logprobs=[top] if top is not None and params.top_logprobs else [],
            text=text,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=num_output,
            # A recompute (preempted or resumed request) may also hit blocks of its output.
            num_cached_tokens=min(seq.num_cached_tokens, seq.num_prompt_tokens),
        )
        if params.prompt_logprobs is not None and num_output == 1:
            out.prompt_logprobs, out.prompt_top_logprobs = seq.prompt_logprobs, seq.prompt_top_logprobs
        if seq.prefill_only:
            # Prefill-only: pin the prompt's blocks for the KV transfer; release() frees them.
            self.scheduler.remove(seq)
            del self._seqs[seq.request_id]
            seq.status = SeqStatus.PREFILLED
            self._prefilled[seq.request_id] = seq
            self._forget(seq.request_id)
            out.block_ids = list(seq.block_table)
            out.finished, out.finish_reason = True, reason or "prefilled"
            self._report(seq, out.finish_reason)
            return out
        if reason is not None:
            del seq.token_ids[position + 1:]  # the placeholder of a step queued after this token, if any
            self._finish(seq, reason)
            out.finished, out.finish_reason = True, reason
            out.text += self._forget(seq.request_id)
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self._seqs.pop(seq.request_id, None)
        self._report(seq, reason)

    def _report(self, seq: Sequence, reason: str) -> None:
        if not self.finish_listeners:
            return
        now = time.monotonic()
        first, scheduled = seq.first_token_time, seq.scheduled_time
        done = FinishedRequest(
            finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=len(seq.output_ids),
            queue_s=None if scheduled is None else scheduled - seq.arrival_time,
            prefill_s=None if scheduled is None or first is None or seq.remote_prefill else first - scheduled,
            decode_s=None if first is None or seq.prefill_only else now - first)
        for listener in self.finish_listeners:
            listener(done)

    def _track_text(self, seq: Sequence) -> None:
        if self.tokenizer is not None and not seq.prefill_only:
            tracker = TextTracker.of(self.tokenizer, seq.prompt_ids, seq.params, self.eos_token_ids)
            # A resumed request: the earlier engine emitted these tokens' text; replaying them leaves the
            # detokenizer and stop checker holding back exactly what that engine held back.
            for n, token in enumerate(seq.output_ids, start=1):
                tracker.push(token, check_stop=n > seq.params.min_tokens)
            self._text[seq.request_id] = tracker

    def _forget(self, request_id: str) -> str:
        """Drops the request's text, sampler and proposer state; returns the text its detokenizer still held back."""
        self.sampler.forget(request_id)
        self.speculator.forget(request_id)
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
        self.speculator.validate(params)
        if self._inflight is not None:
            # Blocks freed while a step is in flight may still take that step's KV writes (stream-ordered for
            # local work, but a remote writer is not on this stream): let the step finish first.
            self._inflight.wait()
        # The prefill worker's first token obeyed the grammar too; commit_remote() advances this matcher with it.
        seq = Sequence(request_id, list(prompt_ids), params, grammar=self._matcher(params))
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
        # Queue time here is reservation -> commit (the remote prefill and hand-off); the prefill is the prefill
        # worker's to report, not a span of this engine (its first token predates this engine's first step).
        seq.remote_prefill, seq.scheduled_time = True, time.monotonic()
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
    def kv_scales_for_transfer(self) -> torch.Tensor | None:
        """The per-layer K/V scales a peer's pool must share for blocks to move between them: an FP8 pool's,
        else None (a model-dtype pool stores values as they are)."""
        if self.kv_cache.dtype != FP8_KV_DTYPE:
            return None
        return getattr(self.model, "kv_scales", None)

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
            prefix_cache_queries=self.block_manager.prefix_queries,
            prefix_cache_hits=self.block_manager.prefix_hits,
            spec=self.speculator.stats(),
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
