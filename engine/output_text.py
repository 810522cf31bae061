"""Per-request output text: incremental detokenization plus stop-string detection."""
from __future__ import annotations


class TextTracker:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        raise NotImplementedError
