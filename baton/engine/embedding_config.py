"""How a model directory turns hidden states into embeddings, read from its sentence-transformers files
(modules.json, 1_Pooling/config.json, config_sentence_transformers.json) and config.json. No torch: the router
reads it too (instruction prefix, Matryoshka dimensions)."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any

from baton.engine.errors import ModelFilesError

POOLING = ("last", "mean", "cls")
# 1_Pooling/config.json flag -> our pooling name.
_POOLING_FLAGS = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_UNSUPPORTED_FLAGS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens")
_ST = "sentence_transformers.models."
_KNOWN_MODULES = {_ST + "Transformer", _ST + "Pooling", _ST + "Normalize"}


def read_json(path: pathlib.Path) -> Any:
    """The file's JSON; ModelFilesError naming the file when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{path}: unreadable ({exc})") from None


@dataclass(frozen=True)
class EmbeddingSpec:
    hidden_size: int
    pooling: str = "last"  # last (the default of decoder embedding models) | mean | cls
    normalize: bool = True
    prefix: str = ""  # instruction prefix put before every text input (config_sentence_transformers' default prompt)
    # Sizes `dimensions` may truncate to (Matryoshka): None = no truncation; () = any size up to hidden_size.
    matryoshka_dimensions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")

    @classmethod
    def from_dir(cls, model_dir: str | pathlib.Path) -> EmbeddingSpec:
        model_dir = pathlib.Path(model_dir)
        config = read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
        hidden = int(config.get("hidden_size") or 0)
        dims: tuple[int, ...] | None = None
        if isinstance(config.get("matryoshka_dimensions"), list):
            dims = tuple(sorted(int(d) for d in config["matryoshka_dimensions"]))
        elif config.get("is_matryoshka"):
            dims = ()
        pooling, normalize = "last", True
        modules_path = model_dir / "modules.json"
        if modules_path.is_file():
            modules = read_json(modules_path)
            if not isinstance(modules, list):
                raise ModelFilesError(f"{modules_path}: expected a list of modules")
            types = [m.get("type") for m in modules if isinstance(m, dict)]
            unknown = [t for t in types if t not in _KNOWN_MODULES]
            if unknown:
                raise ModelFilesError(f"{modules_path}: module(s) {unknown} are not supported "
                                      f"(supported: Transformer, Pooling, Normalize)")
            normalize = _ST + "Normalize" in types
            pool_dir = next((m.get("path") for m in modules if m.get("type") == _ST + "Pooling"), None)
            if pool_dir is not None:
                pooling = _pooling(model_dir / pool_dir / "config.json")
        prefix = ""
        st_path = model_dir / "config_sentence_transformers.json"
        if st_path.is_file():
            st = read_json(st_path)
            name = st.get("default_prompt_name")
            if name is not None:
                prompts = st.get("prompts") or {}
                if name not in prompts:
                    raise ModelFilesError(f"{st_path}: default_prompt_name {name!r} is not in prompts")
                prefix = str(prompts[name])
        return cls(hidden_size=hidden, pooling=pooling, normalize=normalize, prefix=prefix,
                   matryoshka_dimensions=dims)

    def check_dimensions(self, dimensions: int) -> str | None:
        """Why `dimensions` cannot be served (None when it can)."""
        if self.matryoshka_dimensions is None:
            return "this model does not support 'dimensions' (it is not a Matryoshka model)"
        if not 1 <= dimensions <= self.hidden_size:
            return f"'dimensions' must be between 1 and the model's {self.hidden_size}"
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            return f"'dimensions' must be one of {list(self.matryoshka_dimensions)}"
        return None


def _pooling(path: pathlib.Path) -> str:
    raw = read_json(path)
    on = [name for flag, name in _POOLING_FLAGS.items() if raw.get(flag)]
    bad = [flag for flag in _UNSUPPORTED_FLAGS if raw.get(flag)]
    if bad or len(on) != 1:
        raise ModelFilesError(f"{path}: exactly one of {sorted(_POOLING_FLAGS)} must be true "
                              f"(got {on + bad or 'none'})")
    if raw.get("include_prompt") is False and on[0] != "last":
        # sentence-transformers would leave the instruction's tokens out of the pool; we pool every token.
        raise ModelFilesError(f"{path}: include_prompt false is not supported with {on[0]} pooling")
    return on[0]
