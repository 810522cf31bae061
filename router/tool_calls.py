"""Tools on chat completions: checks `tools` / `tool_choice`, renders the tools into the prompt (through the chat
template, or a system prompt when the template ignores them), constrains the answer to a JSON schema when a call is
required or named, and reads the answer into OpenAI `tool_calls`, whole or as streamed deltas."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache

from baton.engine.errors import InvalidRequestError
from baton.engine.grammar import check_schema
from baton.proto.v1 import inference_pb2
from baton.router.tool_parsers import Scan, Scanner, ToolParser, scan_required, scanner_for_function

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolRequestError(ValueError):
    """A bad `tools` / `tool_choice`; the 400 names `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _schema_problem(schema: dict) -> str | None:
    try:
        check_schema(json.dumps(schema))
    except InvalidRequestError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class ToolUse:
    """A request's checked tools and what it asks of them: `choice` is "auto", "required" or "function" (the one
    named `function`); `grammar` is the engine's constraint for "required" and a named function."""

    tools: list[dict]  # as chat templates take them: {"type": "function", "function": {"name", ...}}
    choice: str
    function: str | None
    parallel: bool
    grammar: inference_pb2.StructuredOutput | None

    @classmethod
    def of(cls, tools: list[dict] | None, tool_choice: str | None, function: str | None,
           parallel: bool) -> ToolUse | None:
        """None when tools play no part (none given, or tool_choice "none"); raises ToolRequestError."""
        if not tools:
            if tool_choice is not None or function is not None:
                raise ToolRequestError("tool_choice", "tool_choice is only allowed when tools are given")
            return None
        choice = "function" if function is not None else tool_choice or "auto"
        if choice == "none":
            return None
        parameters: dict[str, dict] = {}
        for i, tool in enumerate(tools):
            fn = tool["function"]
            if not FUNCTION_NAME.match(fn["name"]):
                raise ToolRequestError("tools", f"tools[{i}].function.name {fn['name']!r} must be 1-64 letters, "
                                                "digits, '_' or '-'")
            if fn["name"] in parameters:
                raise ToolRequestError("tools", f"tools[{i}].function.name {fn['name']!r} is given twice")
            schema = fn.get("parameters", EMPTY_PARAMETERS)
            problem = _schema_problem(schema)
            if problem is not None:
                raise ToolRequestError("tools", f"tools[{i}].function.parameters ({fn['name']}): {problem}")
            parameters[fn["name"]] = schema
        if choice == "function" and function not in parameters:
            raise ToolRequestError("tool_choice", f"tool_choice names function {function!r}, which is not among "
                                                  f"the tools ({', '.join(parameters)})")
        grammar = None
        if choice != "auto":
            schema = parameters[function] if choice == "function" else required_schema(parameters, parallel)
            problem = _schema_problem(schema)
            if problem is not None:
                raise ToolRequestError("tools", f"the tools cannot be enforced together: {problem}")
            grammar = inference_pb2.StructuredOutput(kind="json_schema", json_schema=json.dumps(schema))
        return cls(tools, choice, function, parallel, grammar)

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def prompt(self, messages: list[dict], tokenizer, parser: ToolParser) -> tuple[list[dict], list[dict] | None]:
        """The messages and `tools` argument for the chat template: the template renders the tools if it can,
        else a system prompt in the parser's format describes them (and past calls are written in that format)."""
        if template_renders_tools(tokenizer):
            return messages, self.tools
        return tools_in_system_prompt(messages, self.tools, parser), None

    def output(self, parser: ToolParser) -> ToolOutput:
        if self.choice == "function":
            return ToolOutput(scanner_for_function(self.function), self.names, True)
        return ToolOutput(scan_required if self.choice == "required" else parser.scan, self.names, self.parallel)


def required_schema(parameters: dict[str, dict], parallel: bool) -> dict:
    """tool_choice "required": one or more calls, each {"name": one of the tools, "arguments": its parameters}."""
    calls = [{"type": "object", "properties": {"name": {"enum": [name]}, "arguments": schema},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, schema in parameters.items()]
    out = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        out["maxItems"] = 1
    return out


_PROBE_TOOL = {"type": "function", "function": {"name": "baton_probe_tool", "parameters": EMPTY_PARAMETERS}}


@lru_cache(maxsize=8)
def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes the `tools` it is given into the prompt."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], True, [_PROBE_TOOL])
    except ValueError:
        return False
    return "baton_probe_tool" in text


@lru_cache(maxsize=8)
def special_marker_ids(tokenizer, parser: ToolParser) -> tuple[int, ...]:
    """The ids of the parser's call markers that the tokenizer holds as special tokens (Hermes models'
    <tool_call> / </tool_call>, Llama 3's <|python_tag|>), for the request's `kept_special_token_ids`.

    Workers leave special tokens out of the text (skip_special_tokens, as vLLM), so without this the parser would
    see bare JSON. vLLM's Hermes parser turns skipping off for requests with tools; keeping only these ids instead
    keeps <|im_end|>, <|im_start|> and the like out of the content the client sees (engine/output_text.py)."""
    ids = (tokenizer.token_to_id(marker) for marker in parser.markers)
    return tuple(i for i in ids if i is not None and i in tokenizer.all_special_ids)


def tools_in_system_prompt(messages: list[dict], tools: list[dict], parser: ToolParser) -> list[dict]:
    """The fallback for templates without tools: the parser's instructions and the tools (one JSON per line) open
    the system message; assistant turns that called tools show those calls in the parser's format."""
    text = parser.instructions.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    out = [_calls_as_text(m, parser) for m in messages]
    if out[0]["role"] in ("system", "developer") and out[0].get("content"):
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def _calls_as_text(message: dict, parser: ToolParser) -> dict:
    if message["role"] != "assistant" or not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = fn.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # shown as the string it is
        calls.append((fn.get("name", ""), arguments))
    written = parser.render_calls(calls)
    content = message.get("content") or ""
    return {**message, "content": f"{content}\n{written}" if content else written}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolOutput:
    """Reads a choice's answer into `content` and `tool_calls`. A finished answer whose calls do not all parse
    (unknown function, arguments that are not a JSON object, cut by max_tokens) is plain content."""

    def __init__(self, scanner: Scanner, names: set[str], parallel: bool) -> None:
        self._scanner, self.names, self._parallel = scanner, names, parallel

    def scan(self, text: str, final: bool) -> Scan:
        scan = self._scanner(text, final)
        calls = scan.calls if self._parallel else scan.calls[:1]
        if final and (not calls or not all(self._valid(c) for c in calls)):
            return Scan(text)
        return Scan(scan.content, calls)

    def _valid(self, call) -> bool:
        if not call.complete or call.name not in self.names:
            return False
        try:
            return isinstance(json.loads(call.arguments), dict)
        except ValueError:
            return False

    def message(self, choice: dict, text: str) -> None:
        """Rewrites a whole chat choice (message, finish_reason) in place."""
        scan = self.scan(text, True)
        if not scan.calls:
            return
        choice["message"]["content"] = scan.content or None
        choice["message"]["tool_calls"] = [
            {"id": _call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in scan.calls]
        if choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed choice: each text delta becomes a content delta and OpenAI tool-call deltas (the first of a call
    carries index, id, type and name; the next ones argument fragments)."""

    def __init__(self, output: ToolOutput) -> None:
        self._output = output
        self._text = self._content = ""
        self._sent: list[int] = []  # argument characters sent, per call started

    def feed(self, text: str, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """(content delta, tool_calls deltas, finish_reason) for the next piece of the answer."""
        self._text += text
        scan = self._output.scan(self._text, finish_reason is not None)
        content = ""
        if scan.content.startswith(self._content):  # false only when a broken call falls back to content
            content, self._content = scan.content[len(self._content):], scan.content
        deltas: list[dict] = []
        for i, call in enumerate(scan.calls):
            if call.name not in self._output.names:
                break
            if i == len(self._sent):
                deltas.append({"index": i, "id": _call_id(), "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
                self._sent.append(0)
            fragment = call.arguments[self._sent[i]:]
            if fragment:
                if deltas and deltas[-1]["index"] == i:
                    deltas[-1]["function"]["arguments"] += fragment
                else:
                    deltas.append({"index": i, "function": {"arguments": fragment}})
                self._sent[i] = len(call.arguments)
        if finish_reason == "stop" and scan.calls and self._sent:
            finish_reason = "tool_calls"
        return content, deltas, finish_reason
