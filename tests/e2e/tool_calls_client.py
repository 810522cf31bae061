"""Asks for tool calls through the official openai client and reads them back alike from whole and streamed
responses (streamed: the deltas' index, id, type and name, then argument fragments, assembled as clients do)."""
from __future__ import annotations


def tool_choice_arg(choice: str) -> str | dict:
    """"required" / "auto" / "none" as they are; anything else names a function."""
    return choice if choice in ("required", "auto", "none") else {"type": "function", "function": {"name": choice}}


def ask(client, model: str, messages: list[dict], tools: list[dict], choice: str, stream: bool,
        **kw) -> tuple[list[dict], str, str | None]:
    """(calls as [{"name", "arguments", "id"}], finish_reason, content)."""
    args = {"model": model, "messages": messages, "tools": tools, "tool_choice": tool_choice_arg(choice),
            "temperature": 1.0, "max_tokens": 300, **kw}
    if not stream:
        resp = client.chat.completions.create(**args)
        msg = resp.choices[0].message
        calls = [{"name": c.function.name, "arguments": c.function.arguments, "id": c.id} for c in msg.tool_calls or []]
        return calls, resp.choices[0].finish_reason, msg.content
    calls, finish, content = [], None, ""
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    assert d.index == len(calls) and d.type == "function" and d.function.name
                    calls.append({"name": d.function.name, "arguments": d.function.arguments or "", "id": d.id})
                else:
                    assert d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    return calls, finish, content or None
