"""A corpus of hostile HTTP requests to the router's OpenAI API, as data: malformed JSON, wrong types, huge and
negative numbers, invalid UTF-8, giant prompts, deep nesting, 10k stop strings, absurd max_tokens, logit_bias
abuse, invalid roles and message shapes, wrong methods and content types.

Each case says what a correct server does with it: REFUSE (a 4xx OpenAI-style error), SERVE (a correct
completion) or EITHER (both are correct: the API leaves it open)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

REFUSE, SERVE, EITHER = "refuse", "serve", "either"
CMPL, CHAT, TOKENIZE, DETOKENIZE = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
MAX_TOKENS = 3  # of every case that may be served: the batch stays fast


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes
    expect: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


def _json(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def _nested(depth: int, leaf: Any = "x", kind: str = "list") -> str:
    if kind == "list":
        return "[" * depth + json.dumps(leaf) + "]" * depth
    return '{"a":' * depth + json.dumps(leaf) + "}" * depth


def corpus(model: str) -> list[Case]:
    cases: list[Case] = []

    def add(name: str, path: str, body: Any, expect: str, **kw) -> None:
        raw = body if isinstance(body, bytes) else _json(body)
        cases.append(Case(name, path, raw, expect, **kw))

    def cmpl(**fields) -> dict:
        return {"model": model, "prompt": "hello", "max_tokens": MAX_TOKENS, **fields}

    def chat(**fields) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": MAX_TOKENS,
                **fields}

    # --- malformed JSON and bodies that are not a request object
    for i, raw in enumerate([b"", b"{", b"}", b"{not json", b'{"model": }', b'{"model": "m",}', b"{'model': 'm'}",
                             b"null", b"true", b"1", b'"a string"', b"[]", b"[1, 2]", b'{"model"}',
                             b'{"model": "m" "prompt": "x"}', b"\x00\x01\x02", b'{"a": 1}{"b": 2}',
                             b'{"model": "m", "prompt": "x"', b"\xef\xbb\xbf{}", b"  \n\t  ",
                             b'{"model": undefined}', b"/* c */ {}", b'{"prompt": "x", "prompt": 5}']):
        for path in (CMPL, CHAT):
            add(f"malformed-{i}{path}", path, raw, REFUSE)

    # --- invalid UTF-8 and odd strings
    add("utf8-bad-byte", CMPL, b'{"model": "%s", "prompt": "\xff\xfe"}' % model.encode(), REFUSE)
    add("utf8-overlong", CMPL, b'{"model": "%s", "prompt": "\xc0\xaf"}' % model.encode(), REFUSE)
    add("utf8-truncated", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "\xe2\x82"}]}'
        % model.encode(), REFUSE)
    add("utf8-latin1-body", CMPL, '{"model": "%s", "prompt": "caf\xe9"}'.replace("%s", model).encode("latin-1"),
        REFUSE)
    add("utf16-body", CMPL, _json(cmpl()).decode().encode("utf-16"), EITHER)  # JSON may be UTF-16 (RFC 8259 8.1)
    add("lone-surrogate-prompt", CMPL, b'{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 3}'
        % model.encode(), EITHER)
    add("lone-surrogate-chat", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}], '
        b'"max_tokens": 3}' % model.encode(), EITHER)
    add("lone-surrogate-stop", CMPL, b'{"model": "%s", "prompt": "x", "stop": ["\\ud83d"], "max_tokens": 3}'
        % model.encode(), EITHER)
    add("nul-in-prompt", CMPL, cmpl(prompt="a\u0000b"), SERVE)
    add("control-chars", CMPL, cmpl(prompt="".join(map(chr, range(1, 32)))), SERVE)
    add("emoji-and-rtl", CMPL, cmpl(prompt="\U0001F600\u202e\u200b\ufeff"), SERVE)
    add("jinja-in-content", CHAT, chat(messages=[{"role": "user", "content": "{{ 7*7 }}{% for x in y %}"}]), SERVE)
    add("model-name-unicode", CMPL, cmpl(model="\U0001F600" * 10), REFUSE)
    add("model-name-huge", CMPL, cmpl(model="m" * 100_000), REFUSE)

    # --- wrong types, field by field
    wrong = [[], {}, "str", True, 1.5, -1, [1], {"a": 1}]
    typed = {"max_tokens": int, "temperature": float, "top_p": float, "n": int, "stream": bool, "seed": int,
             "logprobs": int, "echo": bool, "presence_penalty": float, "frequency_penalty": float, "top_k": int,
             "min_tokens": int, "ignore_eos": bool, "logit_bias": dict, "stop": list, "stop_token_ids": list,
             "model": str, "prompt": str}
    for name, kind in typed.items():
        for value in wrong:
            ok = (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)) or \
                 (kind is int and type(value) is int) or (kind is bool and isinstance(value, bool)) or \
                 (kind is dict and isinstance(value, dict)) or (kind is list and isinstance(value, list)) or \
                 (kind is str and isinstance(value, str)) or (name == "stop" and isinstance(value, str)) or \
                 (name == "prompt" and value == [1])
            if ok:
                continue
            # pydantic's lax mode, as in vLLM: true is a number 1 and may be served.
            lax = isinstance(value, bool) and kind in (int, float)
            add(f"type-{name}-{type(value).__name__}-{json.dumps(value)}", CMPL, cmpl(**{name: value}),
                EITHER if lax else REFUSE)
    for name, value in [("messages", "hello"), ("messages", {"role": "user"}), ("messages", [1, 2]),
                        ("messages", [None]), ("messages", [[]]), ("top_logprobs", "five"),
                        ("response_format", "json"), ("stream_options", True), ("n", "two"), ("max_tokens", "3.5"),
                        ("temperature", "hot"), ("stop", {"a": 1}), ("chat_template_kwargs", "x"),
                        ("add_generation_prompt", "maybe")]:
        add(f"chat-type-{name}-{json.dumps(value)}", CHAT, chat(**{name: value}), REFUSE)
    # pydantic's lax mode, as in vLLM: numeric strings are numbers and "yes" is true; served or refused, never 5xx.
    for name, value in [("logprobs", "yes"), ("top_logprobs", "0"), ("n", "2"), ("max_tokens", "3"),
                        ("temperature", "0.5"), ("add_generation_prompt", "yes")]:
        add(f"chat-lax-{name}-{json.dumps(value)}", CHAT, chat(**{name: value}), EITHER)

    # --- huge, negative and non-finite numbers
    for name, value in [("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 2**31), ("max_tokens", 2**63),
                        ("max_tokens", 10**100), ("temperature", -0.1), ("temperature", 1e308),
                        ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", -1), ("top_p", 2),
                        ("top_p", float("nan")), ("n", -1), ("n", 10**6), ("n", 0), ("seed", -1), ("seed", 2**64),
                        ("seed", 10**40), ("top_k", -2), ("min_p", float("nan")), ("min_p", 1.5),
                        ("presence_penalty", float("-inf")), ("frequency_penalty", 1e10),
                        ("repetition_penalty", 0), ("repetition_penalty", float("nan")), ("repetition_penalty", -1),
                        ("logprobs", -1), ("logprobs", 10**9), ("min_tokens", -5), ("min_tokens", 10**9),
                        ("best_of", 10**6), ("best_of", -1)]:
        add(f"number-{name}-{value!r}", CMPL, cmpl(**{name: value}), REFUSE)
    for name, value in [("top_k", 2**40), ("top_k", -1), ("temperature", 0), ("top_p", 1e-300), ("seed", 2**64 - 1),
                        ("frequency_penalty", -2), ("repetition_penalty", 1e-9), ("max_tokens", 1)]:
        add(f"edge-{name}-{value!r}", CMPL, cmpl(**{name: value}), EITHER)
    add("max-tokens-as-float", CMPL, cmpl(max_tokens=2.0), EITHER)
    add("max-tokens-as-float-frac", CMPL, cmpl(max_tokens=2.5), REFUSE)
    add("number-exponent-huge", CMPL, b'{"model": "%s", "prompt": "x", "temperature": 1e999999}' % model.encode(),
        REFUSE)
    add("number-digits-many", CMPL, b'{"model": "%s", "prompt": "x", "max_tokens": %s}'
        % (model.encode(), b"9" * 5000), REFUSE)
    add("number-nan-literal", CMPL, b'{"model": "%s", "prompt": "x", "top_p": NaN}' % model.encode(), REFUSE)
    add("number-infinity-literal", CMPL, b'{"model": "%s", "prompt": "x", "temperature": -Infinity}'
        % model.encode(), REFUSE)

    # --- absurd max_tokens (beyond the context; the router refuses instead of truncating silently)
    for value in (1024, 1025, 100_000, 2**40):
        add(f"max-tokens-beyond-context-{value}", CMPL, cmpl(max_tokens=value), REFUSE)
        add(f"chat-max-tokens-beyond-context-{value}", CHAT, chat(max_tokens=value), REFUSE)
    add("max-completion-tokens-huge", CHAT, chat(max_completion_tokens=10**12), REFUSE)

    # --- giant prompts and lists
    add("prompt-1M-chars", CMPL, cmpl(prompt="a " * 500_000), REFUSE)
    add("prompt-ids-100k", CMPL, cmpl(prompt=[5] * 100_000), REFUSE)
    add("prompt-ids-negative", CMPL, cmpl(prompt=[1, -1, 2]), REFUSE)
    add("prompt-ids-huge", CMPL, cmpl(prompt=[2**63]), REFUSE)
    add("prompt-ids-floats", CMPL, cmpl(prompt=[1.5, 2.5]), REFUSE)
    add("prompt-ids-mixed", CMPL, cmpl(prompt=[1, "a"]), REFUSE)
    add("prompt-list-of-10k", CMPL, cmpl(prompt=["hi"] * 10_000), REFUSE)
    add("prompt-nested-ids-empty", CMPL, cmpl(prompt=[[]]), REFUSE)
    add("prompt-list-empty", CMPL, cmpl(prompt=[]), REFUSE)
    add("body-over-16MiB", CMPL, cmpl(prompt="a" * (17 << 20)), REFUSE)
    add("chat-10k-messages", CHAT, chat(messages=[{"role": "user", "content": "hi"}] * 10_000), REFUSE)
    add("chat-content-1M", CHAT, chat(messages=[{"role": "user", "content": "word " * 200_000}]), REFUSE)
    add("tokenize-1M", TOKENIZE, {"model": model, "prompt": "a " * 500_000}, EITHER)
    add("detokenize-100k", DETOKENIZE, {"model": model, "tokens": [5] * 100_000}, EITHER)

    # --- deep nesting
    for depth in (100, 1_000, 100_000):
        add(f"nested-list-{depth}", CMPL,
            b'{"model": "%s", "prompt": %s}' % (model.encode(), _nested(depth).encode()), REFUSE)
        add(f"nested-object-{depth}", CMPL,
            b'{"model": "%s", "prompt": "x", "logit_bias": %s}' % (model.encode(), _nested(depth, 1, "obj").encode()),
            REFUSE)
        add(f"nested-content-{depth}", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}'
            % (model.encode(), _nested(depth).encode()), REFUSE)
        add(f"nested-template-kwargs-{depth}", CHAT,
            b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, '
            b'"chat_template_kwargs": {"k": %s}}' % (model.encode(), _nested(depth, 1, "obj").encode()),
            EITHER if depth <= 100 else REFUSE)
    add("nested-schema-deep", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": json.loads(_nested(200, {"type": "string"}, "obj").replace('"a"', '"items"'))}}),
        EITHER)

    # --- stop strings
    add("stop-10k", CMPL, cmpl(stop=[f"s{i}" for i in range(10_000)]), EITHER)
    add("stop-10k-chat", CHAT, chat(stop=[f"s{i}" for i in range(10_000)]), EITHER)
    add("stop-1MB", CMPL, cmpl(stop=["x" * (1 << 20)]), EITHER)
    add("stop-empty-string", CMPL, cmpl(stop=[""]), EITHER)
    add("stop-ints", CMPL, cmpl(stop=[1, 2]), REFUSE)
    add("stop-nested", CMPL, cmpl(stop=[["a"]]), REFUSE)
    add("stop-null-entries", CMPL, cmpl(stop=[None]), REFUSE)
    add("stop-token-ids-10k", CMPL, cmpl(stop_token_ids=list(range(10_000))), REFUSE)
    add("stop-token-ids-negative", CMPL, cmpl(stop_token_ids=[-3]), REFUSE)
    add("stop-token-ids-huge", CMPL, cmpl(stop_token_ids=[2**70]), REFUSE)

    # --- logit_bias abuse
    for name, bias in [("non-numeric-key", {"abc": 1}), ("negative-key", {"-1": 1}), ("float-key", {"1.5": 1}),
                       ("exp-key", {"1e3": 1}), ("huge-key", {str(2**70): 1}), ("beyond-vocab", {"100000": 1}),
                       ("nan-value", {"5": float("nan")}), ("inf-value", {"5": float("inf")}),
                       ("too-big", {"5": 101}), ("too-small", {"5": -100.5}), ("string-value", {"5": "high"}),
                       ("list-value", {"5": [1]}), ("as-list", [[5, 1]]), ("100k-entries", {str(i): 1 for i in
                                                                                           range(100_000)})]:
        add(f"logit-bias-{name}", CMPL, cmpl(logit_bias=bias), REFUSE)
    add("logit-bias-all-vocab", CMPL, cmpl(logit_bias={str(i): -100 for i in range(512)}), EITHER)
    add("logit-bias-ban-all-but-one", CHAT, chat(logit_bias={str(i): -100 for i in range(1, 512)}), EITHER)

    # --- roles and message shapes
    for role in ("wizard", "", "USER", "system ", None, 5, ["user"], "function", "developer\u0000"):
        add(f"role-{json.dumps(role)}", CHAT, chat(messages=[{"role": role, "content": "x"}]), REFUSE)
    for name, message in [("no-role", {"content": "x"}), ("no-content-user", {"role": "user"}),
                          ("content-int", {"role": "user", "content": 5}),
                          ("content-dict", {"role": "user", "content": {"text": "x"}}),
                          ("content-part-bad-type", {"role": "user", "content": [{"type": "video", "url": "x"}]}),
                          ("content-part-no-text", {"role": "user", "content": [{"type": "text"}]}),
                          ("content-part-image", {"role": "user", "content": [
                              {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}),
                          ("tool-without-id", {"role": "tool", "content": "x"}),
                          ("extra-field", {"role": "user", "content": "x", "evil": True}),
                          ("name-huge", {"role": "user", "content": "x", "name": "n" * 100_000})]:
        expect = EITHER if name in ("tool-without-id", "name-huge", "no-content-user", "content-part-no-text",
                                    "extra-field") else REFUSE
        add(f"message-{name}", CHAT, chat(messages=[message]), expect)
    add("messages-empty", CHAT, chat(messages=[]), REFUSE)
    add("messages-only-assistant", CHAT, chat(messages=[{"role": "assistant", "content": "x"}]), EITHER)
    add("messages-system-only", CHAT, chat(messages=[{"role": "system", "content": "x"}]), EITHER)
    add("chat-with-prompt", CHAT, chat(prompt="x"), REFUSE)
    add("completion-with-messages", CMPL, cmpl(messages=[{"role": "user", "content": "x"}]), REFUSE)

    # --- unknown and unsupported fields, wrong model, structured output junk
    for name, value in [("suffix", "x"), ("functions", []), ("evil", 1), ("__proto__", {}), ("", 1),
                        ("model\u0000", "x")]:
        add(f"unknown-field-{json.dumps(name)}", CMPL, cmpl(**{name: value}), REFUSE)
    add("wrong-model", CMPL, cmpl(model="gpt-4"), REFUSE)
    add("empty-model", CMPL, cmpl(model=""), REFUSE)
    add("regex-catastrophic", CMPL, cmpl(structured_outputs={"regex": "(a+)+$" * 50}), EITHER)
    add("regex-invalid", CMPL, cmpl(structured_outputs={"regex": "(unclosed"}), REFUSE)
    add("choice-empty", CMPL, cmpl(structured_outputs={"choice": []}), REFUSE)
    add("schema-not-object", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": 5}}), REFUSE)
    add("schema-name-huge", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s" * 10_000, "schema": {}}}), REFUSE)
    add("stream-options-junk", CMPL, cmpl(stream=True, stream_options={"include_usage": "maybe"}), REFUSE)
    add("echo-with-logprobs-huge", CMPL, cmpl(echo=True, logprobs=100), REFUSE)

    # --- streaming variants of served requests
    add("stream-10k-stop", CMPL, cmpl(stream=True, stop=[f"s{i}" for i in range(10_000)]), EITHER)
    add("stream-nul", CHAT, chat(stream=True, messages=[{"role": "user", "content": "\u0000"}]), SERVE)
    add("stream-n-3", CMPL, cmpl(stream=True, n=3), SERVE)

    # --- tokenize / detokenize
    for name, body, expect in [
            ("tokens-negative", {"model": model, "tokens": [-1]}, REFUSE),
            ("tokens-huge", {"model": model, "tokens": [2**64]}, REFUSE),
            ("tokens-beyond-vocab", {"model": model, "tokens": [100_000]}, REFUSE),
            ("tokens-string", {"model": model, "tokens": "abc"}, REFUSE),
            ("tokens-nested", {"model": model, "tokens": [[1]]}, REFUSE),
            ("tokens-missing", {"model": model}, REFUSE)]:
        add(f"detokenize-{name}", DETOKENIZE, body, expect)
    for name, body, expect in [
            ("prompt-int", {"model": model, "prompt": 5}, REFUSE),
            ("both", {"model": model, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, REFUSE),
            ("neither", {"model": model}, REFUSE),
            ("bad-role", {"model": model, "messages": [{"role": "wizard", "content": "x"}]}, REFUSE),
            ("wrong-model", {"model": "nope", "prompt": "x"}, REFUSE)]:
        add(f"tokenize-{name}", TOKENIZE, body, expect)

    # --- methods, content types, paths
    add("get-completions", CMPL, b"", REFUSE, method="GET")
    add("put-chat", CHAT, _json(chat()), REFUSE, method="PUT")
    add("delete-models", "/v1/models", b"", REFUSE, method="DELETE")
    add("unknown-path", "/v1/does-not-exist", _json(cmpl()), REFUSE)
    add("path-traversal", "/v1/../../etc/passwd", b"", REFUSE, method="GET")
    add("form-encoded", CMPL, b"model=x&prompt=y", REFUSE, headers={"content-type": "application/x-www-form-urlencoded"})
    add("text-plain-json", CMPL, _json(cmpl()), EITHER, headers={"content-type": "text/plain"})
    add("no-content-type", CMPL, _json(cmpl()), EITHER, headers={})
    add("multipart", CMPL, b"--b\r\nContent-Disposition: form-data; name=prompt\r\n\r\nx\r\n--b--\r\n", REFUSE,
        headers={"content-type": "multipart/form-data; boundary=b"})
    add("gzip-claimed", CMPL, _json(cmpl()), EITHER, headers={"content-type": "application/json",
                                                               "content-encoding": "gzip"})
    add("bogus-auth-header", CMPL, _json(cmpl()), SERVE, headers={"content-type": "application/json",
                                                                    "authorization": "Bearer " + "x" * 8000})
    return cases
