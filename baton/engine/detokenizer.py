"""Streaming text from generated token ids: an incremental detokenizer that never emits half a
character, and a stop-string checker that never emits any part of a stop string."""
from __future__ import annotations

import operator
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from baton.engine.tokenizer import Tokenizer

# Prompt tokens kept as left context: enough for tokenizers whose decoding of a token depends on
# its neighbours (SentencePiece drops the leading space of the first token in a sequence).
_PROMPT_CONTEXT = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated ids into text, one id at a time.

    Works as vLLM's offsets do: decode a small window of ids before and after the last emission point
    and emit what the new id added. Text ending in U+FFFD is held back because the bytes of a
    multi-byte character may still be arriving. `"".join(pushes) + flush()` equals
    `tokenizer.decode(generated_ids)` whenever the prompt context itself decodes cleanly.

    With `skip_special_tokens`, the special tokens in `keep_special_ids` still show (a tool parser's markers):
    the others are dropped from the ids before decoding, which is what the tokenizer's own skipping does.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True, keep_special_ids: Collection[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        kept = frozenset(keep_special_ids) & tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self._dropped = tokenizer.all_special_ids - kept if kept else None  # None: the tokenizer's own choice
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self._prefix = 0  # window start: context that shapes decoding but was already emitted
        self._read = len(self._ids)  # ids before this were emitted
        self.output_ids: list[int] = []
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        if self._dropped is None:
            return self._tokenizer.decode(ids, skip_special_tokens=self._skip)
        return self._tokenizer.decode([i for i in ids if i not in self._dropped], skip_special_tokens=False)

    def _emit(self, force: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not force):
            return ""
        delta = new_text[len(prefix_text):]
        # Drop ids that can no longer influence decoding, so each push stays O(window).
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        self.text += delta
        return delta

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text that became printable (often "")."""
        try:
            token_id = operator.index(token_id)
        except TypeError:
            raise ValueError(f"token id must be an integer, got {token_id!r}") from None
        if not 0 <= token_id < self._tokenizer.vocab_size:
            raise ValueError(f"token id {token_id} is not in this tokenizer's range [0, {self._tokenizer.vocab_size})")
        self._ids.append(token_id)
        self.output_ids.append(token_id)
        return self._emit(force=False)

    def flush(self) -> str:
        """At the end of generation: whatever was held back (an unfinished character decodes as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(force=True)


@dataclass(frozen=True)
class StopMatch:
    index: int  # where the output must end: the stop string starts here
    stop: str


class StopChecker:
    """Finds stop strings in generated text, including ones split across tokens.

    `find(text)` answers for a whole text. For streaming, `push(delta)` returns only text that can
    no longer become part of a stop string; after a stop, `stopped` is set and nothing more is
    returned. `flush()` releases the held-back tail when generation ends for another reason.
    With `include_stop` the output ends after the stop string instead of before it.
    """

    def __init__(self, stop_strings: Iterable[str] | None, include_stop: bool = False) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stops = list(stop_strings or ())
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop_strings: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._include = include_stop
        self.text = ""  # accumulated output, cut at the stop string once one is found
        self._emitted = 0
        self._scanned = 0  # text[:_scanned] holds no complete stop string
        self._floor = 0  # text emitted unchecked (before min_tokens) is never searched again
        self.match: StopMatch | None = None

    @property
    def stopped(self) -> bool:
        return self.match is not None

    def find(self, text: str, start: int = 0) -> StopMatch | None:
        """The stop string in `text` (beginning at or after `start`) that is completed first, as a stream would
        meet it, so that the result never depends on how the text was cut into deltas; ties: the earliest start."""
        best: StopMatch | None = None
        for stop in self.stop_strings:
            i = text.find(stop, start)
            if i == -1:
                continue
            key = (i + len(stop), i)
            if best is None or key < (best.index + len(best.stop), best.index):
                best = StopMatch(i, stop)
        return best

    def held_back(self, text: str) -> int:
        """How many trailing characters of `text` could be the start of a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def push(self, delta: str, check: bool = True) -> str:
        """Add newly decoded text; returns the part that is safe to stream now. With `check` false the
        text is not searched for stop strings and is all released."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stop_strings or not check:
            out, self._emitted = self.text[self._emitted:], len(self.text)
            self._floor = self._scanned = len(self.text)
            return out
        # A new match can only begin where the last scan could not yet see a whole stop string.
        self.match = self.find(self.text, max(self._floor, self._scanned - self._longest + 1))
        if self.match is not None:
            self.text = self.text[:self.match.index + (len(self.match.stop) if self._include else 0)]
            safe = len(self.text)
        else:
            self._scanned = len(self.text)
            safe = len(self.text) - self.held_back(self.text)
        out = self.text[self._emitted:safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return out

    def flush(self) -> str:
        out, self._emitted = self.text[self._emitted:], len(self.text)
        return out
