"""Per-request output text: incremental detokenization feeding stop-string detection."""
from __future__ import annotations

from collections.abc import Collection

from baton.engine.detokenizer import IncrementalDetokenizer, StopChecker
from baton.engine.sampling_params import SamplingParams


class TextTracker:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], include_stop: bool = False,
                 keep_special_ids: Collection[int] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, keep_special_ids=keep_special_ids)
        self._stops = StopChecker(stop, include_stop=include_stop)

    @classmethod
    def of(cls, tokenizer, prompt_ids: list[int], params: SamplingParams,
           eos_token_ids: Collection[int]) -> TextTracker:
        """A request's tracker. Which special tokens reach its text:

        - by default none (vLLM's skip_special_tokens);
        - `params.kept_special_token_ids`, chosen by the router for a chat request with tools: its tool parser's
          call markers where the tokenizer makes them special tokens (Hermes models' <tool_call> / </tool_call>,
          Llama 3's <|python_tag|>). A parser that never sees them cannot find the calls. Keeping just these,
          rather than turning skipping off as vLLM's Hermes parser does, keeps <|im_end|>, <|im_start|> and the
          like out of the content the client sees;
        - with `params.skip_special_tokens` false, every special token but those that end the answer (EOS,
          stop_token_ids): they are not part of it (vLLM leaves the stop token out of the text too).
        """
        if params.skip_special_tokens:
            kept = params.kept_special_token_ids
        else:
            kept = tokenizer.all_special_ids - set(eos_token_ids) - set(params.stop_token_ids)
        return cls(tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output, kept)

    def push(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """Text now safe to emit, and whether a stop string has just been completed (never when not
        `check_stop`: before min_tokens)."""
        text = self._stops.push(self._detok.push(token_id), check=check_stop)
        return text, self._stops.stopped

    def flush(self) -> str:
        """Held-back text at the end of generation (nothing once a stop string matched)."""
        if self._stops.stopped:
            return ""
        return self._stops.push(self._detok.flush()) + self._stops.flush()
