"""Our Tokenizer against transformers' AutoTokenizer on generated checkpoints; the incremental
detokenizer and the stop-string checker on real token streams; clear errors for bad input."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from baton.devtools.make_model import make_model
from baton.devtools.tokenizer_training import SPECIAL_TOKENS
from baton.engine.detokenizer import IncrementalDetokenizer, StopChecker
from baton.engine.errors import ModelFilesError
from baton.engine.output_text import TextTracker
from baton.engine.sampling_params import SamplingParams
from baton.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TEXTS = [
    "",
    "Hello, world!",
    "def main():\n    return 42\n",
    "  leading and trailing   ",
    "tabs\tand\n\n\nnewlines \r\n  runs     of spaces",
    "numbers 1234567 3.14159 -0.5e10",
    "héllo wörld – naïve café",
    "e\u0301 combining accent and Ω≈ç√",
    "日本語のテキストと中文",
    "مرحبا بالعالم",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇩🇪",
    "literal specials <|im_start|>user\nhi<|im_end|> <|begin_of_text|>",
    "\x00\x01 control \u200b zero-width",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the 🐔 cross the road?"},
        {"role": "user", "content": "Why? 日本"},
    ],
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {arch: make_model(tmp_path_factory.mktemp(arch), arch=arch) for arch in ARCHS}
    dirs["llama-jinja"] = make_model(tmp_path_factory.mktemp("llama-jinja"), arch="llama", chat_template_file=True)
    return dirs


@pytest.fixture(scope="module")
def llama(model_dirs):
    return Tokenizer.from_dir(model_dirs["llama"])


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_transformers(model_dirs, arch):
    ours = Tokenizer.from_dir(model_dirs[arch])
    ref = transformers.AutoTokenizer.from_pretrained(model_dirs[arch])
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    adds_bos = arch in ("llama", "mistral")
    assert (ours.encode("x")[0] == ours.bos_token_id) is adds_bos
    assert ours.bos_token_id == ref.bos_token_id
    assert ref.eos_token_id in ours.eos_token_ids
    assert ours.vocab_size == len(ref) == 512


@pytest.mark.parametrize("arch", [*ARCHS, "llama-jinja"])
def test_chat_template_matches_transformers(model_dirs, arch):
    ours = Tokenizer.from_dir(model_dirs[arch])
    ref = transformers.AutoTokenizer.from_pretrained(model_dirs[arch])
    for messages in CONVERSATIONS:
        if arch == "mistral" and messages[0]["role"] == "system":
            continue  # that template only takes alternating user/assistant turns
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        ids = ours.encode_chat(messages)
        assert ids == ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=False) == ours.apply_chat_template(messages)
    if arch in ("llama", "llama-jinja"):
        assert ours.encode_chat(CONVERSATIONS[0]).count(ours.bos_token_id) == 1


def test_template_variables_and_tools(model_dirs):
    qwen2 = Tokenizer.from_dir(model_dirs["qwen2"])
    ref2 = transformers.AutoTokenizer.from_pretrained(model_dirs["qwen2"])
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": {"type": "string"}}}}]
    ours = qwen2.apply_chat_template(CONVERSATIONS[0], tools=tools)
    assert '"name": "météo"' in ours  # HF's tojson: non-ASCII kept, no HTML escaping
    assert ours == ref2.apply_chat_template(CONVERSATIONS[0], tools=tools, tokenize=False, add_generation_prompt=True)

    qwen3 = Tokenizer.from_dir(model_dirs["qwen3"])
    assert (model_dirs["qwen3"] / "chat_template.jinja").is_file()
    ref3 = transformers.AutoTokenizer.from_pretrained(model_dirs["qwen3"])
    ours = qwen3.apply_chat_template(CONVERSATIONS[0], enable_thinking=False)
    assert ours.endswith("<think>\n\n</think>\n\n")
    assert ours == ref3.apply_chat_template(CONVERSATIONS[0], enable_thinking=False, tokenize=False,
                                            add_generation_prompt=True)


def test_special_token_ids(model_dirs, llama):
    ids = {t: llama.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|im_end|>", "<|pad|>")}
    assert llama.bos_token_id == ids["<|begin_of_text|>"]
    assert llama.eos_token_ids == {ids["<|end_of_text|>"], ids["<|im_end|>"]}  # from generation_config
    assert llama.pad_token_id == ids["<|pad|>"]
    qwen = Tokenizer.from_dir(model_dirs["qwen3"])
    assert qwen.bos_token_id is None and qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)
    assert ids["<|im_end|>"] in qwen.eos_token_ids


def test_mistral_template_rejects_bad_role_order(model_dirs):
    tok = Tokenizer.from_dir(model_dirs["mistral"])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template(bad)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "must be a list"),
        ([], "must not be empty"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\]\['role'\] must be a non-empty string"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], r"messages\[1\]\['content'\]"),
    ],
)
def test_bad_messages(llama, messages, message):
    with pytest.raises(ValueError, match=message):
        llama.apply_chat_template(messages)


def test_bad_encode_decode_input(llama):
    with pytest.raises(ValueError, match="must be a string"):
        llama.encode(b"bytes")
    with pytest.raises(ValueError, match=r"token id 512 is not in this tokenizer's range \[0, 512\)"):
        llama.decode([1, 512])
    with pytest.raises(ValueError, match="must be integers"):
        llama.decode([1.5])


def test_missing_and_broken_files(tmp_path, model_dirs):
    with pytest.raises(ModelFilesError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(ModelFilesError, match="tokenizer.json: missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFilesError, match="tokenizer.json: unreadable"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((model_dirs["llama"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ModelFilesError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ModelFilesError, match="field 'eos_token'"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    bare = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(CONVERSATIONS[0])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ModelFilesError, match="chat template does not parse"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS[0])


# --- incremental detokenizer -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_detokenizer_round_trips_random_ids(model_dirs, arch):
    tok = Tokenizer.from_dir(model_dirs[arch])
    rng = random.Random(1234)
    prompt = tok.encode("The prompt: ")
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            det = IncrementalDetokenizer(tok, prompt_ids=rng.choice([None, prompt]), skip_special_tokens=skip)
            pieces = [det.push(i) for i in ids]
            tail = det.flush()
            assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)
            assert det.text == "".join(pieces) + tail and det.output_ids == ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_detokenizer_keeps_only_the_special_tokens_asked_for(model_dirs, arch):
    """Random ids dense in special tokens: the stream equals decoding the ids without the special tokens that are
    not kept, and shows each kept one's text."""
    tok = Tokenizer.from_dir(model_dirs[arch])
    specials = sorted(tok.all_special_ids)
    rng = random.Random(99)
    prompt = tok.encode("The prompt: ")
    for _ in range(200):
        keep = set(rng.sample(specials, rng.randrange(1, len(specials))))
        ids = [rng.choice(specials) if rng.random() < 0.3 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(1, 40))]
        det = IncrementalDetokenizer(tok, prompt_ids=rng.choice([None, prompt]), keep_special_ids=keep)
        text = "".join(det.push(i) for i in ids) + det.flush()
        shown = [i for i in ids if i in keep or i not in tok.all_special_ids]
        assert text == tok.decode(shown, skip_special_tokens=False)
        assert text.count(tok.id_to_token(min(keep))) >= ids.count(min(keep))


def test_text_tracker_shows_kept_special_tokens_and_never_eos(model_dirs):
    """Defaults skip every special token; kept ids show; skip_special_tokens false shows all but EOS and the stop
    token ids (qwen2 style: <|im_end|> and <|end_of_text|> are EOS)."""
    tok = Tokenizer.from_dir(model_dirs["qwen2"])
    start, end, pad, bos = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|pad|>", "<|begin_of_text|>"))
    body = tok.encode("hi there", add_special_tokens=False)
    ids = [start, *body, pad, bos, end]

    def text(**params) -> str:
        tracker = TextTracker.of(tok, [], SamplingParams(**params), tok.eos_token_ids)
        return "".join(tracker.push(i)[0] for i in ids) + tracker.flush()

    assert text() == "hi there"
    assert text(kept_special_token_ids=frozenset({start, end})) == "<|im_start|>hi there<|im_end|>"
    assert text(skip_special_tokens=False) == "<|im_start|>hi there<|pad|><|begin_of_text|>"
    assert text(skip_special_tokens=False, stop_token_ids=[pad]) == "<|im_start|>hi there<|begin_of_text|>"


def test_detokenizer_holds_back_partial_characters(llama):
    text = "日本語 😀👍🏽 family 👨‍👩‍👧‍👦 ok"
    ids = llama.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the multibyte characters really are split over several tokens
    det = IncrementalDetokenizer(llama)
    pieces = [det.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text and det.flush() == ""


def test_detokenizer_flush_emits_unfinished_bytes(llama):
    euro = llama.encode("€", add_special_tokens=False)  # three byte tokens
    assert len(euro) == 3
    det = IncrementalDetokenizer(llama)
    assert det.push(euro[0]) == "" and det.push(euro[1]) == ""
    assert det.flush() == "\ufffd" == llama.decode(euro[:2])


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_detokenizer_streams_any_text(model_dirs, text):
    # Text spelling a special token encodes to that token, which decoding skips, as transformers does.
    assume(not any(special in text for special in SPECIAL_TOKENS))
    tok = Tokenizer.from_dir(model_dirs["llama"])
    det = IncrementalDetokenizer(tok)
    out = "".join(det.push(t) for t in tok.encode(text, add_special_tokens=False)) + det.flush()
    assert out == text


def test_detokenizer_rejects_bad_ids(llama):
    det = IncrementalDetokenizer(llama)
    with pytest.raises(ValueError, match="not in this tokenizer's range"):
        det.push(-1)
    with pytest.raises(ValueError, match="must be an integer"):
        det.push("7")
    assert det.output_ids == []


# --- stop strings ------------------------------------------------------------------------------

def test_stop_string_split_across_pieces():
    checker = StopChecker(["STOP"])
    assert checker.push("Hel") == "Hel"
    assert checker.push("lo ST") == "lo "  # "ST" might begin "STOP": held back
    assert not checker.stopped
    assert checker.push("OP and more") == ""
    assert checker.stopped and checker.match.stop == "STOP"
    assert checker.text == "Hello "
    assert checker.push("ignored") == "" and checker.flush() == ""


def test_held_back_text_released_when_not_a_stop():
    checker = StopChecker(["</s>", "\n\n"])
    assert checker.push("a </") == "a "
    assert checker.push("b>") == "</b>"
    assert checker.push("x\n") == "x"
    assert checker.flush() == "\n" and not checker.stopped


def test_stop_on_real_token_stream(llama):
    text = "first line\n\nsecond line STOP never"
    det, checker = IncrementalDetokenizer(llama), StopChecker(["STOP", "never"])
    streamed = ""
    for token_id in llama.encode(text, add_special_tokens=False):
        streamed += checker.push(det.push(token_id))
        if checker.stopped:
            break
    assert streamed == checker.text == "first line\n\nsecond line "
    assert checker.match.index == text.index("STOP")


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="abc \n", max_size=30),
    stops=st.lists(st.text(alphabet="abc \n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_streaming_equals_whole_text_truncation(text, stops, cuts):
    checker = StopChecker(stops)
    whole = checker.find(text)
    expected = text if whole is None else text[:whole.index]
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    streamed = ""
    for a, b in zip(bounds, bounds[1:]):
        streamed += checker.push(text[a:b])
        assert not any(s in streamed for s in stops)  # never emit a stop string
    if not checker.stopped:
        streamed += checker.flush()
    assert streamed == expected == checker.text
    assert checker.stopped is (whole is not None)


@pytest.mark.parametrize("bad", [[""], [None], [3]])
def test_bad_stop_strings(bad):
    with pytest.raises(ValueError, match="non-empty strings"):
        StopChecker(bad)


def test_no_stop_strings_streams_everything():
    checker = StopChecker(None)
    assert checker.push("abc") == "abc" and checker.flush() == "" and not checker.stopped
