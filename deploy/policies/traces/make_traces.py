"""Writes the example traces (seeded, so re-running reproduces them): a diurnal day and a sudden 5x spike."""
from __future__ import annotations

import csv
import gzip
import math
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent


def _poisson(rng: random.Random, rate_at, start: float, end: float, peak: float):
    """Arrivals of a non-homogeneous Poisson process by thinning against the peak rate."""
    t = start
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return
        if rng.random() * peak <= rate_at(t):
            yield t


def _rows(rng: random.Random, region: str, rate_at, end: float, peak: float):
    for t in _poisson(rng, rate_at, 0.0, end, peak):
        prompt = max(16, int(rng.lognormvariate(math.log(1200), 0.6)))
        output = max(8, int(rng.lognormvariate(math.log(200), 0.5)))
        yield (round(t, 3), region, prompt, output)


def _write(name: str, rows) -> None:
    rows = sorted(rows)
    with gzip.open(HERE / name, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "region", "prompt_tokens", "output_tokens"])
        w.writerows(rows)
    print(f"{name}: {len(rows)} requests")


def diurnal(t: float, phase_h: float, peak: float) -> float:
    """Day curve peaking mid-afternoon, silent 02:00-05:00 local time (so pools can scale to zero)."""
    hour = (t / 3600 + phase_h) % 24
    if 2 <= hour < 5:
        return 0.0
    return peak * (0.08 + 0.92 * max(0.0, math.sin(math.pi * (hour - 5) / 19)) ** 2)


def main() -> None:
    rng = random.Random(7)
    day = 24 * 3600
    _write("diurnal_day.csv.gz", [
        *_rows(rng, "us-east", lambda t: diurnal(t, 0, 2.0), day, 2.0),
        *_rows(rng, "eu-west", lambda t: diurnal(t, 6, 1.5), day, 1.5),
    ])
    hour = 3600
    spike = lambda t: 15.0 if 1200 <= t < 2100 else 3.0  # noqa: E731 - 5x for 15 minutes
    _write("spike_5x.csv.gz", [
        *_rows(rng, "us-east", spike, hour, 15.0),
        *_rows(rng, "eu-west", lambda t: 2.0, hour, 2.0),
    ])


if __name__ == "__main__":
    main()
