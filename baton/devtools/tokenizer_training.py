"""Offline tokenizer for generated checkpoints: a byte-level BPE trained on the Python stdlib's own
source (no download), cached on disk, and written out as Hugging Face tokenizer files per model style."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
# Appended after the learned vocabulary, as Llama-3 and Qwen do, so they take the last ids.
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END, PAD)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte must stay encodable

# Llama-3's split pattern (digits in groups of up to three) and Qwen2's (single digits, after NFC).
# transformers rebuilds Qwen tokenizers from vocab + merges with Qwen's own pattern, so the qwen
# styles must carry exactly that pattern for our ids to match theirs.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# Bump when training or the saved layout changes, so stale cache entries are never reused.
_FORMAT = 1

LLAMA_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>system\\nToday Date: ' + date_string + '\\n\\n' + system_message + '<|im_end|>\\n' }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

MISTRAL_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {{- '[INST] ' + message['content'] + ' [/INST]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# Qwen-style ChatML with tool schemas rendered through `tojson`, as Qwen2.5's template does.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = 'You are a helpful assistant.' %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>system\\n' + system_message }}\n"
    "{%- if tools %}\n"
    "    {{- '\\n\\n# Tools\\n<tools>' }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- '\\n' }}{{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- '\\n</tools>' }}\n"
    "{%- endif %}\n"
    "{{- '<|im_end|>\\n' }}\n"
    "{%- for message in loop_messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

QWEN3_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'assistant' and '</think>' in message['content'] %}\n"
    "        {%- set content = message['content'].split('</think>')[-1].lstrip('\\n') %}\n"
    "    {%- else %}\n"
    "        {%- set content = message['content'] %}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

_STYLES = {
    # arch: (chat template, bos token the tokenizer adds or None, tokenizer eos, generation eos tokens)
    "llama": (LLAMA_TEMPLATE, BOS, EOS, (EOS, IM_END)),
    "mistral": (MISTRAL_TEMPLATE, BOS, EOS, (EOS,)),
    "qwen2": (QWEN2_TEMPLATE, None, IM_END, (IM_END, EOS)),
    "qwen3": (QWEN3_TEMPLATE, None, IM_END, (IM_END, EOS)),
}


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _corpus(chars_wanted: int):
    """Whole stdlib files in a fixed order until `chars_wanted`, so training is reproducible."""
    total = 0
    for path in _stdlib_sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        total += len(text)
        if total >= chars_wanted:
            return


def _validate_vocab(vocab: int) -> None:
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        raise ValueError(f"vocab must be an integer, got {vocab!r}")
    if vocab < MIN_VOCAB:
        raise ValueError(
            f"vocab={vocab} is too small: a byte-level BPE needs 256 byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens, so vocab must be at least {MIN_VOCAB}"
        )


def byte_level_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_bpe(vocab: int) -> Tokenizer:
    """Train a byte-level BPE with exactly `vocab` ids, the special tokens taking the last five."""
    _validate_vocab(vocab)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level_split(LLAMA3_SPLIT)
    tok.decoder = decoders.ByteLevel()
    learned = vocab - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # ~300 characters of source per learned token is enough headroom for the merges to exist.
    tok.train_from_iterator(_corpus(max(1_000_000, 300 * learned)), trainer)
    if tok.get_vocab_size() != learned:
        raise ValueError(
            f"vocab={vocab} is too large for the offline training corpus (the Python stdlib source gave "
            f"only {tok.get_vocab_size() + len(SPECIAL_TOKENS)} ids)"
        )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "baton" / "tokenizers"


def trained_bpe(vocab: int) -> Tokenizer:
    """`train_bpe(vocab)`, reusing an earlier result from the on-disk cache when there is one.

    The key holds everything training depends on: the corpus (the stdlib of this Python), the
    `tokenizers` version and our format; the weights' seed plays no part in the tokenizer.
    """
    _validate_vocab(vocab)
    key = f"v{_FORMAT}-py{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}-tok{tokenizers.__version__}"
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / f"bpe-{vocab}-{key}.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a truncated or foreign file: retrain and overwrite it
            pass
    tok = train_bpe(vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so concurrent test processes never read a half-written file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def write_tokenizer_files(out_dir: Path, arch: str, vocab: int, chat_template_file: bool) -> dict:
    """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja) for `arch`'s style.

    Returns the special ids the model config needs: bos_token_id, eos_token_id, gen_eos_token_ids,
    pad_token_id.
    """
    template, bos, eos, gen_eos = _STYLES[arch]
    tok = trained_bpe(vocab)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    byte_level = processors.ByteLevel(trim_offsets=False)
    if arch.startswith("qwen"):
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = byte_level_split(_QWEN2_SPLIT)
    if bos is None:
        tok.post_processor = byte_level
    else:
        tok.post_processor = processors.Sequence([
            byte_level,
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ids[bos])]
            ),
        ])
    tok.save(str(out_dir / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
    }
    if bos is not None:
        config["add_bos_token"] = True
        config["add_eos_token"] = False
    else:
        # Qwen2Tokenizer otherwise invents an "<|endoftext|>" unk token outside the model's vocab.
        config["unk_token"] = None
    if chat_template_file:
        (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[eos],
        "gen_eos_token_ids": [ids[t] for t in gen_eos],
        "pad_token_id": ids[PAD],
    }
