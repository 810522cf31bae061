"""Text ↔ token ids and chat templates for a Hugging Face-format model directory, matching what
`transformers.AutoTokenizer` gives for the same directory, without importing transformers."""
from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from baton.engine.errors import ModelFilesError


def read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ModelFilesError(f"{path}: missing (a model directory needs {path.name})")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [v for v in value if isinstance(v, int)]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}`, which some HF templates use to mark assistant text;
    rendering only needs the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's filter: unlike jinja's own `tojson` it keeps non-ASCII text and does not HTML-escape.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        content = message.get("content")
        # An assistant turn that only calls tools may carry no content, as in the OpenAI API.
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
        checked.append(dict(message))
    return checked


class Tokenizer:
    """One model directory's tokenizer: tokenizer.json (+ tokenizer_config.json, chat_template.jinja,
    config.json and generation_config.json for special tokens)."""

    def __init__(self, backend: HFTokenizer, tokenizer_config: dict, model_config: dict, generation_config: dict,
                 chat_template: str | None, source: Path) -> None:
        self._backend = backend
        self._source = source
        self.chat_template = chat_template
        self.bos_token = _token_text(tokenizer_config.get("bos_token"))
        self.eos_token = _token_text(tokenizer_config.get("eos_token"))
        self.pad_token = _token_text(tokenizer_config.get("pad_token"))
        self.unk_token = _token_text(tokenizer_config.get("unk_token"))
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise ModelFilesError(
                    f"{source / 'tokenizer_config.json'}: field '{name}' = {token!r} is not in tokenizer.json's vocabulary"
                )

        if "bos_token" in tokenizer_config:
            # The tokenizer's own word wins, even when it says "no BOS" (Qwen) and config.json names one.
            self.bos_token_id = None if self.bos_token is None else backend.token_to_id(self.bos_token)
        else:
            bos = _ids(generation_config.get("bos_token_id")) or _ids(model_config.get("bos_token_id"))
            self.bos_token_id = bos[0] if bos else None
        eos = set(_ids(generation_config.get("eos_token_id"))) | set(_ids(model_config.get("eos_token_id")))
        if self.eos_token is not None:
            eos.add(backend.token_to_id(self.eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.pad_token_id = None if self.pad_token is None else backend.token_to_id(self.pad_token)

        # transformers rebuilds the post-processor from add_bos_token/add_eos_token when the config
        # names either (or when tokenizer.json has none); otherwise tokenizer.json's own one decides.
        if "add_bos_token" in tokenizer_config or "add_eos_token" in tokenizer_config or backend.post_processor is None:
            add_bos = bool(tokenizer_config.get("add_bos_token")) and self.bos_token is not None
            add_eos = bool(tokenizer_config.get("add_eos_token")) and self.eos_token is not None
            single = " ".join([f"{self.bos_token}:0"] * add_bos + ["$A:0"] + [f"{self.eos_token}:0"] * add_eos)
            pair = single + " " + " ".join([f"{self.bos_token}:1"] * add_bos + ["$B:1"] + [f"{self.eos_token}:1"] * add_eos)
            specials = [(t, backend.token_to_id(t)) for t, on in ((self.bos_token, add_bos), (self.eos_token, add_eos)) if on]
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path, chat_template: str | None = None) -> Tokenizer:
        """`chat_template`, if given, replaces the directory's own template (vLLM's --chat-template)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelFilesError(f"{model_dir}: not a directory (expected a Hugging Face-format model directory)")
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelFilesError(f"{path}: missing (a model directory needs tokenizer.json)")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
            raise ModelFilesError(f"{path}: unreadable tokenizer ({exc})") from None
        tokenizer_config = read_json(model_dir / "tokenizer_config.json", required=False)
        template_path = model_dir / "chat_template.jinja"
        if chat_template is None and template_path.is_file():
            chat_template = template_path.read_text(encoding="utf-8")
        elif chat_template is None:
            chat_template = tokenizer_config.get("chat_template")
            if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
                chat_template = named.get("default")
            if chat_template is not None and not isinstance(chat_template, str):
                raise ModelFilesError(f"{model_dir / 'tokenizer_config.json'}: field 'chat_template' must be a string")
        return cls(
            backend,
            tokenizer_config,
            read_json(model_dir / "config.json", required=False),
            read_json(model_dir / "generation_config.json", required=False),
            chat_template,
            model_dir,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Many texts in one call: the tokenizers library runs it in Rust with the GIL released (and on several
        threads), so a caller on another thread keeps its event loop running meanwhile. The fast variant skips
        character offsets, which ids do not need."""
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # tokenizers >= 0.21
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        try:
            ids = [operator.index(i) for i in ids]  # numpy / torch integers too, but no floats
        except TypeError:
            raise ValueError(f"token ids must be integers, got {ids!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in this tokenizer's range [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def vocab(self) -> list[str]:
        """Every token's string as tokenizer.json spells it, indexed by id (for grammar-constrained decoding)."""
        by_id = [""] * self.vocab_size
        for token, i in self._backend.get_vocab(with_added_tokens=True).items():
            if 0 <= i < self.vocab_size:
                by_id[i] = token
        return by_id

    def to_json(self) -> str:
        return self._backend.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @cached_property
    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError(
                f"{self._source}: no chat template (neither chat_template.jinja nor 'chat_template' in "
                "tokenizer_config.json)"
            )
        # The same environment settings and helpers as transformers, so Hub templates render alike.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            return env.from_string(self.chat_template)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ModelFilesError(f"{self._source}: chat template does not parse (line {exc.lineno}: {exc.message})") from None

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools: list[dict] | None = None,
                            **template_kwargs) -> str:
        """Render `messages` ([{"role", "content"}, ...]) to the prompt text; extra keyword
        arguments (e.g. `enable_thinking`) reach the template as variables, as in transformers."""
        checked = _check_messages(messages)
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
            raise ValueError("tools must be a list of JSON-schema dicts")
        specials = {name: getattr(self, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        variables = {k: v for k, v in specials.items() if v is not None}
        variables.update(template_kwargs)
        try:
            return self._template.render(
                messages=checked, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.exceptions.TemplateError as exc:
            # raise_exception() in a template is how it rejects a conversation (e.g. roles out of order).
            raise ValueError(f"chat template rejected the messages: {exc}") from None

    def encode_chat(self, messages, add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **template_kwargs) -> list[int]:
        # The template writes BOS itself where the model wants one, so none is added here (as HF does).
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(text, add_special_tokens=False)
