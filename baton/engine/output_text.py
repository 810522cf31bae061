"""Per-request output text: incremental detokenization feeding stop-string detection."""
from __future__ import annotations

from baton.engine.detokenizer import IncrementalDetokenizer, StopChecker


class TextTracker:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], include_stop: bool = False) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopChecker(stop, include_stop=include_stop)

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
