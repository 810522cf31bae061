"""How every benchmark reports: its JSON document with the headline under "result", and the same headline
as the last line printed, `RESULT <bench> key=value ...`."""
from __future__ import annotations

import json
import pathlib
from typing import Any

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def emit(bench: str, headline: dict[str, Any], doc: dict[str, Any], out: pathlib.Path | None = None) -> pathlib.Path:
    """Writes doc (+ the headline as doc["result"]) to bench/results/<bench>.json unless out is given,
    then prints the RESULT line; call it last."""
    path = pathlib.Path(out) if out is not None else RESULTS_DIR / f"{bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": bench, "result": headline, **doc}, indent=2, default=str) + "\n")
    print(f"RESULT {bench} " + " ".join(f"{k}={_fmt(v)}" for k, v in headline.items()), flush=True)
    return path
