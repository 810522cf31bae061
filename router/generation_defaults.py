"""Sampling defaults of the OpenAI API: the model's generation_config.json where it sets them (as vLLM's
`--generation-config auto`), OpenAI's own otherwise."""
from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None  # generation_config's max_new_tokens: a cap on the default max_tokens

    @classmethod
    def from_dir(cls, model_dir: str | pathlib.Path) -> GenerationDefaults:
        path = pathlib.Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); using OpenAI's sampling defaults", path, exc)
            return cls()
        found = {name: raw[name] for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if isinstance(raw.get(name), (int, float)) and not isinstance(raw.get(name), bool)}
        if isinstance(raw.get("max_new_tokens"), int):
            found["max_tokens"] = raw["max_new_tokens"]
        if found:
            log.info("sampling defaults from %s: %s", path, found)
        return cls(**found)
