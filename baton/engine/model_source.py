"""What a --model value names: a local model directory or a Hugging Face Hub repository id, resolved to a
directory. Hub ids go through huggingface_hub, so HF_TOKEN, HF_HOME and HF_HUB_OFFLINE work as everywhere else;
offline, an id already in the cache resolves without network."""
from __future__ import annotations

import pathlib

from baton.engine.errors import ModelFilesError

# What serving reads: weights, configs, tokenizer and chat template (not .bin/.pt/.gguf copies of the weights).
HUB_FILES = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model"]


def is_hub_id(model: str) -> bool:
    """True if `model` is not a local path but spells a Hub repository id (`name` or `org/name`)."""
    if pathlib.Path(model).expanduser().exists():
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def served_name(model: str) -> str:
    """The name a model is served under unless one is given: a Hub id as written, else the directory's name."""
    return model if is_hub_id(model) else pathlib.Path(model).expanduser().resolve().name


def resolve_model(model: str, revision: str | None = None, *, weights: bool = True) -> pathlib.Path:
    """The directory holding `model`'s files: the path itself, or the Hub snapshot of `revision` (default: the
    main branch), downloaded into the Hub cache unless it is there already; without `weights`, only the configs
    and tokenizer (what the router reads)."""
    path = pathlib.Path(model).expanduser()
    if path.exists():
        return path
    if not is_hub_id(model):
        raise ModelFilesError(f"{model!r}: no such directory, and not a Hugging Face Hub id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        patterns = HUB_FILES if weights else [p for p in HUB_FILES if p != "*.safetensors"]
        return pathlib.Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelFilesError(f"{model!r} (revision {revision or 'main'}) is not in the Hugging Face cache and the "
                              "Hub cannot be reached (HF_HUB_OFFLINE set, or no network)") from None
    except HfHubHTTPError as exc:  # unknown repo or revision, gated without HF_TOKEN, server errors
        raise ModelFilesError(f"{model!r}: {exc}") from None
