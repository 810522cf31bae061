"""Checks a model directory before a process loads it: every file the engine reads is there and parses, so a bad
directory is one line naming the file (the CLI's exit 2), not a traceback from deep in the loader."""
from __future__ import annotations

import json
import pathlib

from baton.engine.config import ModelConfig
from baton.engine.errors import ModelFilesError
from baton.engine.tokenizer import Tokenizer


def check_model_dir(model_dir: str | pathlib.Path) -> None:
    """Raises ModelFilesError naming the first missing or unreadable file: tokenizer.json, config.json (and its
    architecture), the safetensors headers. Reads no weights."""
    from safetensors import SafetensorError, safe_open

    from baton.engine.loader import weight_files

    model_dir = pathlib.Path(model_dir)
    Tokenizer.from_dir(model_dir)  # a directory, with a readable tokenizer.json
    config = model_dir / "config.json"
    if not config.is_file():
        raise ModelFilesError(f"{config}: missing (a model directory needs config.json)")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{config}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelFilesError(f"{config}: expected a JSON object, got {type(raw).__name__}")
    ModelConfig.from_dict(raw, source=str(config))
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelFilesError(f"{path}: not a readable safetensors file ({exc})") from None
