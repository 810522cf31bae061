"""Request traces for `baton policy simulate`: CSV (or .csv.gz) rows read into arrays and checked against the
policy, so a row that does not fit stops the run with one line naming the file, the line and the field."""
from __future__ import annotations

import csv
import gzip
import io
import math
import pathlib
from dataclasses import dataclass

import numpy as np

from baton.controlplane.policy import Policy

COLUMNS = ("timestamp", "region", "prompt_tokens", "output_tokens")


class TraceError(Exception):
    """A trace that cannot be replayed; the message is one line naming the file (and line)."""


@dataclass(frozen=True)
class Trace:
    """Requests sorted by time; `region` and `model` index into `regions` and `models`."""

    t: np.ndarray  # seconds, float64
    region: np.ndarray  # int
    model: np.ndarray  # int
    prompt: np.ndarray  # tokens, float64
    output: np.ndarray  # tokens, float64
    regions: tuple[str, ...]
    models: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.t)


def _open(path: pathlib.Path):
    try:
        if path.suffix == ".gz":
            handle = io.TextIOWrapper(gzip.open(path), newline="")  # noqa: SIM115 - the caller's `with` closes it
            handle.buffer.peek(1)  # not gzip: fail here, with the file's name, not mid-parse
            return handle
        return path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None


def load_trace(path: str | pathlib.Path, policy: Policy) -> Trace:
    """Header timestamp,region,prompt_tokens,output_tokens[,model]; times in seconds. Every region and model
    must be one the policy plans for (a request nobody serves would vanish from the results)."""
    path = pathlib.Path(path)
    known = {m.name: set(m.regions) for m in policy.models}
    default_model = policy.models[0].name
    regions: dict[str, int] = {}
    models: dict[str, int] = {}
    cols: list[list] = [[], [], [], [], []]
    handle = _open(path)
    line = 1
    try:
        with handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise TraceError(f"{path}: empty file (expected a header: {','.join(COLUMNS)}[,model])")
            header = [h.strip() for h in header]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise TraceError(f"{path}:1: header lacks {', '.join(missing)} (has {','.join(header)})")
            at = [header.index(c) for c in COLUMNS]
            at_model = header.index("model") if "model" in header else None
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) < len(header):
                    raise TraceError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
                ts, region, prompt, output = (row[i].strip() for i in at)
                model = (row[at_model].strip() if at_model is not None else "") or default_model
                t = _number(path, line, "timestamp", ts, float)
                p = _number(path, line, "prompt_tokens", prompt, int)
                o = _number(path, line, "output_tokens", output, int)
                if not math.isfinite(t) or t < 0:
                    raise TraceError(f"{path}:{line}: timestamp {ts!r} is not a finite time >= 0")
                if p < 1 or o < 1:
                    raise TraceError(f"{path}:{line}: token counts must be >= 1 (prompt {p}, output {o})")
                if model not in known:
                    raise TraceError(f"{path}:{line}: model {model!r} is not in the policy "
                                     f"(models: {', '.join(sorted(known))})")
                if region not in known[model]:
                    raise TraceError(f"{path}:{line}: region {region!r} is not a region of model {model!r} in "
                                     f"the policy (regions: {', '.join(sorted(known[model]))})")
                cols[0].append(t)
                cols[1].append(regions.setdefault(region, len(regions)))
                cols[2].append(models.setdefault(model, len(models)))
                cols[3].append(p)
                cols[4].append(o)
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}:{line}: cannot read: {exc}") from None
    if not cols[0]:
        raise TraceError(f"{path}: no requests")
    t = np.asarray(cols[0], dtype=np.float64)
    order = np.argsort(t, kind="stable")
    return Trace(t=t[order], region=np.asarray(cols[1])[order], model=np.asarray(cols[2])[order],
                 prompt=np.asarray(cols[3], dtype=np.float64)[order],
                 output=np.asarray(cols[4], dtype=np.float64)[order],
                 regions=tuple(regions), models=tuple(models))


def _number(path: pathlib.Path, line: int, field: str, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise TraceError(f"{path}:{line}: {field} {text!r} is not {what}") from None
