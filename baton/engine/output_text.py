"""Per-request output text: incremental detokenization feeding stop-string detection."""
from __future__ import annotations

from baton.engine.detokenizer import IncrementalDetokenizer, StopChecker


class TextTracker:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopChecker(stop)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text now safe to emit, and whether a stop string has just been completed."""
        text = self._stops.push(self._detok.push(token_id))
        return text, self._stops.stopped

    def flush(self) -> str:
        """Held-back text at the end of generation (nothing once a stop string matched)."""
        if self._stops.stopped:
            return ""
        return self._stops.push(self._detok.flush()) + self._stops.flush()
