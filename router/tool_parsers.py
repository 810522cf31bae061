"""Tool-call output parsers, chosen by the router's `--tool-call-parser` (as vLLM's): each reads a chat answer's text
so far into the content to show and the tool calls it holds (name and raw arguments text). One scan serves whole
answers and streams alike, so streamed deltas always add up to the non-streamed message."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

_WS = " \t\r\n"


@dataclass(frozen=True)
class PartialCall:
    name: str | None  # None until the name's string is complete
    arguments: str  # the arguments' JSON text so far, as the model wrote it
    complete: bool  # the call's JSON is closed


@dataclass(frozen=True)
class Scan:
    content: str  # text that is not part of a tool call; while streaming, without a possible start of a tag
    calls: list[PartialCall] = field(default_factory=list)


# (text so far, final) -> Scan. `final`: the text is the whole answer (nothing more will come).
Scanner = Callable[[str, bool], Scan]


# -- partial JSON ------------------------------------------------------------------------------
def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value that starts at text[i], or None if the text ends inside it. Brackets and
    strings are matched, not validated: json.loads judges the finished value."""
    n = len(text)
    if text[i] in "{[":
        depth, in_string, j = 0, False, i
        while j < n:
            ch = text[j]
            if in_string:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    if text[i] == '"':
        j = i + 1
        while j < n:
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return None
    j = i  # number, true, false, null: the text may still extend it until a delimiter comes
    while j < n and text[j] not in _WS + ",}]":
        j += 1
    return j if j < n else None


def _members(text: str, i: int) -> dict[str, tuple[int, int | None]]:
    """Top-level members of the (possibly unfinished) object at text[i] == '{': key -> (value start, value end)."""
    out: dict[str, tuple[int, int | None]] = {}
    j = _skip_ws(text, i + 1)
    while j < len(text) and text[j] == '"':
        key_end = value_end(text, j)
        if key_end is None:
            break
        try:
            key = json.loads(text[j:key_end])
        except ValueError:
            break
        j = _skip_ws(text, key_end)
        if j >= len(text) or text[j] != ":":
            break
        j = _skip_ws(text, j + 1)
        if j >= len(text):
            break
        end = value_end(text, j)
        out[key] = (j, end)
        if end is None:
            break
        j = _skip_ws(text, end)
        if j >= len(text) or text[j] != ",":
            break
        j = _skip_ws(text, j + 1)
    return out


def _call_at(text: str, i: int, end: int | None) -> PartialCall:
    """The call written as {"name": ..., "arguments" | "parameters": {...}} at text[i]."""
    members = _members(text, i)
    name = None
    if "name" in members and members["name"][1] is not None:
        start, stop = members["name"]
        try:
            value = json.loads(text[start:stop])
        except ValueError:
            value = None
        name = value if isinstance(value, str) else None
    args = members.get("arguments") or members.get("parameters")
    arguments = "" if args is None else text[args[0]:args[1] if args[1] is not None else len(text)]
    return PartialCall(name, arguments, end is not None)


def _objects(text: str, i: int, separators: str) -> tuple[list[PartialCall], int]:
    """Calls written as objects from text[i] on, separated by any of `separators` (and blanks); and where they end."""
    calls = []
    while i < len(text) and text[i] == "{":
        end = value_end(text, i)
        calls.append(_call_at(text, i, end))
        if end is None:
            return calls, len(text)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] in separators:
            i = _skip_ws(text, i + 1)
    return calls, i


def _held_back(text: str, tag: str) -> str:
    """`text` minus a tail that could be the start of `tag` (only while more text may come)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return text[:-k]
    return text


# -- the formats -------------------------------------------------------------------------------
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def scan_hermes(text: str, final: bool) -> Scan:
    """Hermes / Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number of them, with
    content around them (blank-only pieces between calls are dropped)."""
    pieces, calls, pos = [], [], 0
    while True:
        start = text.find(HERMES_OPEN, pos)
        if start < 0:
            pieces.append(text[pos:] if final else _held_back(text[pos:], HERMES_OPEN))
            break
        pieces.append(text[pos:start])
        body = _skip_ws(text, start + len(HERMES_OPEN))
        if body >= len(text) or text[body] != "{":
            if body < len(text):
                calls.append(PartialCall(None, "", False))  # not JSON: never a valid call
            break
        end = value_end(text, body)
        calls.append(_call_at(text, body, end))
        close = text.find(HERMES_CLOSE, end) if end is not None else -1
        if close < 0:
            break  # an unfinished call, or one whose closing tag has not come (or never will: lenient at the end)
        pos = close + len(HERMES_CLOSE)
    if final and not calls:
        return Scan(text)
    return Scan("".join(p for p in pieces if p.strip()), calls)


LLAMA3_PYTHON_TAG = "<|python_tag|>"


def scan_llama3_json(text: str, final: bool) -> Scan:
    """Llama 3.x JSON tool calling: the answer is `{"name": ..., "parameters": {...}}` (optionally after
    <|python_tag|>, several separated by ';'), or plain content when it does not start with one."""
    i = _skip_ws(text, 0)
    if text.startswith(LLAMA3_PYTHON_TAG, i):
        i = _skip_ws(text, i + len(LLAMA3_PYTHON_TAG))
    elif not final and LLAMA3_PYTHON_TAG.startswith(text[i:]):
        return Scan("")  # blank so far, or the tag's start
    if i >= len(text):
        return Scan(text if final else "")
    if text[i] != "{":
        return Scan(text)
    calls, _ = _objects(text, i, ";")
    return Scan("", calls)


def scan_required(text: str, final: bool) -> Scan:
    """tool_choice "required": the grammar makes the answer `[{"name": ..., "arguments": {...}}, ...]`."""
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        return Scan(text if final else "")
    calls, _ = _objects(text, _skip_ws(text, i + 1), ",")
    return Scan("", calls)


def scanner_for_function(name: str) -> Scanner:
    """A named tool_choice: the grammar makes the whole answer that function's arguments."""
    def scan(text: str, final: bool) -> Scan:
        return Scan("", [PartialCall(name, text, final)])
    return scan


def render_hermes(calls: list[tuple[str, object]]) -> str:
    return "\n".join(f'{HERMES_OPEN}\n{json.dumps({"name": n, "arguments": a})}\n{HERMES_CLOSE}' for n, a in calls)


def render_llama3_json(calls: list[tuple[str, object]]) -> str:
    return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)


HERMES_INSTRUCTIONS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML \
tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

LLAMA3_INSTRUCTIONS = """Given the following functions, please respond with a JSON for a function call with its \
proper arguments that best answers the given prompt.

Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. Do not \
use variables.

{tools}"""


@dataclass(frozen=True)
class ToolParser:
    """One output format: how to read it, how to write past calls back into a prompt, and how to explain it in a
    system prompt when the model's chat template does not render `tools` itself."""

    scan: Scanner
    render_calls: Callable[[list[tuple[str, object]]], str]
    instructions: str  # formatted with tools= the tool definitions, one JSON per line
    markers: tuple[str, ...]  # the tags `scan` looks for, which some tokenizers hold as special tokens


PARSERS = {
    "hermes": ToolParser(scan_hermes, render_hermes, HERMES_INSTRUCTIONS, (HERMES_OPEN, HERMES_CLOSE)),
    "llama3_json": ToolParser(scan_llama3_json, render_llama3_json, LLAMA3_INSTRUCTIONS, (LLAMA3_PYTHON_TAG,)),
}
