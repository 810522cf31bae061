"""Tool-call parsers: whole answers read into content and tool_calls, and the same answers streamed in pieces of
every size give deltas that add up to the whole message."""
from __future__ import annotations

import json

import pytest

from baton.router.tool_calls import ToolOutput, ToolRequestError, ToolUse, special_marker_ids, tools_in_system_prompt
from baton.router.tool_parsers import PARSERS, scan_required, scanner_for_function

NAMES = {"get_weather", "add"}


def whole(output: ToolOutput, text: str, finish: str = "stop") -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    output.message(choice, text)
    return choice


def streamed(output: ToolOutput, text: str, size: int, finish: str = "stop") -> tuple[str, list[dict], str]:
    """Feeds `text` in pieces of `size` characters; returns the content, the calls the deltas build, the finish."""
    stream, content, calls, reason = output.stream(), "", [], None
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    for k, piece in enumerate(pieces):
        delta, deltas, reason = stream.feed(piece, finish if k == len(pieces) - 1 else None)
        content += delta
        for d in deltas:
            if "id" in d:  # the first delta of a call: index, id, type and name, then argument fragments
                assert d["index"] == len(calls) and d["type"] == "function" and d["id"].startswith("call_")
                calls.append({"name": d["function"]["name"], "arguments": d["function"]["arguments"]})
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, calls, reason


def calls_of(choice: dict) -> list[dict]:
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in choice["message"].get("tool_calls", [])]


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}\n</tool_call>')
LLAMA3 = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "add", "parameters": {}}'


@pytest.mark.parametrize("parser,text,content", [("hermes", HERMES, "Let me check.\n"), ("llama3_json", LLAMA3, None)])
def test_whole_and_streamed_answers_agree(parser, text, content):
    output = ToolOutput(PARSERS[parser].scan, NAMES, parallel=True)
    choice = whole(output, text)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == content
    calls = calls_of(choice)
    assert [c["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["arguments"])["city"] in ("Paris", "Oslo")
    for size in (1, 2, 3, 7, 1000):
        got_content, got_calls, reason = streamed(output, text, size)
        assert reason == "tool_calls"
        assert got_content == (content or "")
        assert got_calls == calls, size


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_plain_answers_stay_content(parser):
    output = ToolOutput(PARSERS[parser].scan, NAMES, parallel=True)
    for text in ("The weather is fine.", "a < b and <tool", "   ", ""):
        assert whole(output, text) == {"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}
        content, calls, reason = streamed(output, text, 1)
        assert (content, calls, reason) == (text, [], "stop")


def test_streamed_content_never_shows_the_start_of_a_tag():
    stream = ToolOutput(PARSERS["hermes"].scan, NAMES, parallel=True).stream()
    assert stream.feed("Hi <tool_", None) == ("Hi ", [], None)
    assert stream.feed("call>\n{", None) == ("", [], None)


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',  # not one of the tools
    '<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "add", "arguments": {"a": 1',  # cut off (max_tokens)
    '<tool_call>\nadd(1, 2)\n</tool_call>',  # not JSON
])
def test_a_call_that_does_not_parse_leaves_the_answer_as_content(text):
    output = ToolOutput(PARSERS["hermes"].scan, NAMES, parallel=True)
    assert whole(output, text, "length")["message"] == {"role": "assistant", "content": text}


def test_a_closing_tag_may_be_missing_at_the_end():
    output = ToolOutput(PARSERS["hermes"].scan, NAMES, parallel=True)
    assert calls_of(whole(output, '<tool_call>\n{"name": "add", "arguments": {"a": 1}}')) == [
        {"name": "add", "arguments": '{"a": 1}'}]


def test_without_parallel_calls_only_the_first_counts():
    output = ToolOutput(PARSERS["hermes"].scan, NAMES, parallel=False)
    assert [c["name"] for c in calls_of(whole(output, HERMES))] == ["get_weather"]
    assert [c["name"] for c in streamed(output, HERMES, 4)[1]] == ["get_weather"]


def test_required_and_named_outputs():
    text = '[{"name":"add","arguments":{"a":1,"b":2}},{"name":"get_weather","arguments":{"city":"x"}}]'
    required = ToolOutput(scan_required, NAMES, parallel=True)
    calls = calls_of(whole(required, text))
    assert calls == [{"name": "add", "arguments": '{"a":1,"b":2}'}, {"name": "get_weather", "arguments": '{"city":"x"}'}]
    assert streamed(required, text, 3) == ("", calls, "tool_calls")
    named = ToolOutput(scanner_for_function("add"), NAMES, parallel=True)
    assert calls_of(whole(named, '{"a":1}')) == [{"name": "add", "arguments": '{"a":1}'}]
    assert streamed(named, '{"a":1}', 2) == ("", [{"name": "add", "arguments": '{"a":1}'}], "tool_calls")
    # max_tokens mid-JSON: no call, the cut text as content, finish "length"
    assert whole(named, '{"a":', "length") == {"index": 0, "message": {"role": "assistant", "content": '{"a":'},
                                               "finish_reason": "length"}


def tool(name: str, parameters: dict | None = None) -> dict:
    fn = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": fn}


def test_tool_use_checks_the_request():
    with pytest.raises(ToolRequestError, match="only allowed when tools"):
        ToolUse.of([], "auto", None, True)
    with pytest.raises(ToolRequestError, match="'nope', which is not among the tools"):
        ToolUse.of([tool("add")], None, "nope", True)
    with pytest.raises(ToolRequestError, match=r"tools\[1\].function.parameters \(bad\).*schema"):
        ToolUse.of([tool("add"), tool("bad", {"type": "foo"})], "auto", None, True)
    with pytest.raises(ToolRequestError, match="given twice"):
        ToolUse.of([tool("add"), tool("add")], "auto", None, True)
    with pytest.raises(ToolRequestError, match="letters"):
        ToolUse.of([tool("add me")], "auto", None, True)
    assert ToolUse.of([tool("add")], "none", None, True) is None
    auto = ToolUse.of([tool("add")], None, None, True)
    assert auto.choice == "auto" and auto.grammar is None
    named = ToolUse.of([tool("add", {"type": "object", "properties": {"a": {"type": "integer"}}})], None, "add", True)
    assert json.loads(named.grammar.json_schema)["properties"] == {"a": {"type": "integer"}}
    required = json.loads(ToolUse.of([tool("add"), tool("sub")], "required", None, False).grammar.json_schema)
    assert required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from baton.devtools.make_model import make_model
    from baton.engine.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tool-templates")
    return {arch: Tokenizer.from_dir(make_model(root / arch, arch=arch, layers=1, hidden=32, heads=2, kv_heads=1,
                                                vocab=512)) for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_tools_go_through_the_template_or_else_a_system_prompt(tokenizers, parser):
    tools = [tool("add", {"type": "object", "properties": {"a": {"type": "integer"}}})]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    use = ToolUse.of(tools, "auto", None, True)
    messages, template_tools = use.prompt(history, tokenizers["qwen2"], PARSERS[parser])
    assert (messages, template_tools) == (history, tools)  # Qwen's template renders tools itself
    messages, template_tools = use.prompt(history, tokenizers["llama"], PARSERS[parser])
    assert template_tools is None
    text = tokenizers["llama"].apply_chat_template(messages)
    # The system prompt keeps its text, then explains the format and lists the tools; the past call is written in
    # the parser's format, and the answer parses back to the same call.
    assert "Be brief.\n\n" in text and json.dumps(tools[0]) in text
    written = PARSERS[parser].render_calls([("add", {"a": 1})])
    assert written in text and messages[2]["content"] == written
    assert calls_of(whole(use.output(PARSERS[parser]), written)) == [{"name": "add", "arguments": '{"a": 1}'}]


def test_markers_that_are_special_tokens_are_kept(tmp_path):
    """A parser's markers are kept only where the tokenizer holds them as special tokens: spelled in plain tokens they
    show anyway, and <|im_end|> (special, no marker) never is."""
    from baton.devtools.make_model import make_model
    from baton.engine.tokenizer import Tokenizer
    from tests.engine.checkpoints import add_special_tokens

    model = make_model(tmp_path / "m", arch="qwen2", layers=1, hidden=32, heads=2, kv_heads=1, vocab=512)
    plain = Tokenizer.from_dir(model)
    assert special_marker_ids(plain, PARSERS["hermes"]) == special_marker_ids(plain, PARSERS["llama3_json"]) == ()
    add_special_tokens(model, ("<tool_call>", "</tool_call>", "<|python_tag|>"))
    tok = Tokenizer.from_dir(model)
    hermes = special_marker_ids(tok, PARSERS["hermes"])
    assert [tok.id_to_token(i) for i in hermes] == ["<tool_call>", "</tool_call>"]
    assert set(hermes) < tok.all_special_ids and tok.token_to_id("<|im_end|>") not in hermes
    assert [tok.id_to_token(i) for i in special_marker_ids(tok, PARSERS["llama3_json"])] == ["<|python_tag|>"]


def test_a_malformed_past_call_still_renders():
    history = [{"role": "user", "content": "?"},
               {"role": "assistant", "content": "ok", "tool_calls": [{"function": "add"}, {"function": {
                   "name": "add", "arguments": "not json"}}]}]
    messages = tools_in_system_prompt(history, [tool("add")], PARSERS["hermes"])
    assert messages[2]["content"].startswith("ok\n<tool_call>\n") and '"arguments": "not json"' in messages[2]["content"]


def test_the_parser_flag_is_checked(tmp_path):
    from baton.router.config import RouterConfig

    with pytest.raises(ValueError, match="unknown tool call parser 'mistral'"):
        RouterConfig(model=str(tmp_path), tool_call_parser="mistral")
    assert RouterConfig(model=str(tmp_path), tool_call_parser="llama3_json").tool_call_parser == "llama3_json"
