"""Structured output: JSON (a schema, or any object), a regex or a choice, guaranteed by masking the logits with
an xgrammar matcher each step. Grammars compile once per spec (xgrammar's compiler caches them); one matcher
per request."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial

import torch
import xgrammar as xgr

from baton.engine.errors import InvalidRequestError

KINDS = ("json_object", "json_schema", "regex", "choice")


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must be: `json_object` (any JSON object), `json_schema` (valid under `schema`), `regex`
    (a full match of `regex`) or `choice` (exactly one of `choices`)."""

    kind: str
    schema: str = ""  # the JSON Schema as text, for json_schema
    regex: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "json_schema":
            check_schema(self.schema)
        elif self.kind == "regex":
            _checked(xgr.Grammar.from_regex, self.regex, what="regex")
        elif self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise InvalidRequestError("choice must be a non-empty list of non-empty strings")
            _checked(xgr.Grammar.from_ebnf, self.ebnf(), what="choice")

    def ebnf(self) -> str:
        """For choice: one alternative per string (JSON string escapes are EBNF's too)."""
        return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choices)


def _checked(build, text: str, *, what: str):
    try:
        return build(text)
    except (RuntimeError, ValueError) as exc:  # what xgrammar raises for input it cannot convert
        raise InvalidRequestError(f"unsupported {what}: {_message(exc)}") from None


def check_schema(schema: str) -> None:
    """Raises InvalidRequestError unless xgrammar can turn `schema` into a grammar (no tokenizer needed)."""
    try:
        parsed = json.loads(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"JSON schema is not valid JSON: {exc}") from None
    if not isinstance(parsed, (dict, bool)):
        raise InvalidRequestError(f"JSON schema must be an object, got {type(parsed).__name__}")
    _checked(xgr.Grammar.from_json_schema, schema, what="JSON schema")


class GrammarBackend:
    """One tokenizer's grammar compiler; hands each constrained request its own matcher."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]) -> None:
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_json())
        vocab = tokenizer.vocab()[:vocab_size]
        self._stop = sorted(t for t in stop_token_ids if t < vocab_size)
        info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=self._stop,
                                 add_prefix_space=meta["add_prefix_space"])
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def matcher(self, spec: StructuredOutput) -> xgr.GrammarMatcher:
        if spec.kind == "regex":
            compiled = _checked(self._compiler.compile_regex, spec.regex, what="regex")
        elif spec.kind == "choice":
            compiled = _checked(self._compiler.compile_grammar, spec.ebnf(), what="choice")
        else:
            # Compact JSON: with any whitespace allowed, a weak model can pad with blanks until max_tokens.
            schema = '{"type": "object"}' if spec.kind == "json_object" else spec.schema
            compiled = _checked(partial(self._compiler.compile_json_schema, any_whitespace=False), schema,
                                what="JSON schema")
        return xgr.GrammarMatcher(compiled, override_stop_tokens=self._stop)


def mask_logits_(logits: torch.Tensor, rows: list[int], matchers: list[xgr.GrammarMatcher]) -> None:
    """Sets to -inf, in place and on the logits' device, every token row rows[i]'s matcher does not allow next."""
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for row, matcher in zip(rows, matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def _message(exc: Exception) -> str:
    """xgrammar's C++ errors start with a timestamp and a source location; the rest is for the client."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc)).strip()
