"""Checks a model directory before a process loads it: every file the engine reads is there and parses, so a bad
directory is one line naming the file (the CLI's exit 2), not a traceback from deep in the loader."""
from __future__ import annotations

import pathlib

from baton.engine.config import ModelConfig
from baton.engine.errors import ModelFilesError
from baton.engine.tokenizer import Tokenizer, read_json


def check_model_dir(model_dir: str | pathlib.Path) -> None:
    """Raises ModelFilesError naming the first missing or unreadable file: tokenizer.json, config.json (and its
    architecture), the safetensors headers. Reads no weights."""
    from safetensors import SafetensorError, safe_open

    from baton.engine.loader import weight_files

    model_dir = pathlib.Path(model_dir)
    Tokenizer.from_dir(model_dir)  # a directory, with a readable tokenizer.json
    config = model_dir / "config.json"
    ModelConfig.from_dict(read_json(config, required=True), source=str(config))
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelFilesError(f"{path}: not a readable safetensors file ({exc})") from None
