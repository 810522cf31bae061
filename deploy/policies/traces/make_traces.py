"""Writes the example traces (seeded, so re-running reproduces them byte for byte).

Both carry long-context assistant traffic (RAG and agents): prompts lognormal around 20k tokens (mean 24k,
p90 43k), answers around 350 tokens, the load at which a Llama-3-8B replica on one H200 serves 1-2
requests/s (deploy/policies/profiles/llama-3-8b_h200.json).

- diurnal_day.csv.gz: one day, two regions six hours apart, each with a 10x peak-to-trough day (trough 04:00,
  peak 15:00 local) and slow minute-scale swings of a few percent; us-east peaks at 20 requests/s (about 12
  prefill replicas), eu-west at 6.
- spike_5x.csv.gz: one hour; us-east jumps from 3 to 15 requests/s for 15 minutes (20 to 35 min), eu-west
  steady at 2.
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent


def _arrivals(rng: random.Random, rate_at, end: float, peak: float):
    """A non-homogeneous Poisson process by thinning against its peak rate."""
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return
        if rng.random() * peak <= rate_at(t):
            yield t


def _rows(rng: random.Random, region: str, rate_at, end: float, peak: float):
    for t in _arrivals(rng, rate_at, end, peak):
        prompt = min(120_000, max(256, int(rng.lognormvariate(math.log(20_000), 0.6))))
        output = min(4096, max(16, int(rng.lognormvariate(math.log(350), 0.6))))
        yield (round(t, 2), region, prompt, output)


def _write(name: str, rows) -> None:
    rows = sorted(rows)
    # mtime 0: the same rows give the same bytes, so a re-run leaves git clean
    with (open(HERE / name, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
          io.TextIOWrapper(gz, encoding="ascii", newline="") as f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["timestamp", "region", "prompt_tokens", "output_tokens"])
        w.writerows(rows)
    print(f"{name}: {len(rows)} requests")


def day_curve(t: float, offset_h: float, peak: float, rng_swing) -> float:
    """10x from the 04:00 trough to the 15:00 peak (local time = UTC + offset_h), times a slow swing."""
    hour = (t / 3600 + offset_h) % 24
    # A cosine day, sharpened so the peak is an afternoon and the night is long and flat.
    rise = hour - 4 if hour >= 4 else hour + 20  # hours since the trough
    phase = rise / 11 if rise <= 11 else 1 - (rise - 11) / 13
    shape = (1 - math.cos(math.pi * phase)) / 2
    return peak * (0.1 + 0.9 * shape**1.3) * rng_swing(t)


def _swing(rng: random.Random, span_s: float, step_s: float = 300.0, sigma: float = 0.04):
    """A smooth multiplicative wander around 1 (knots every 5 minutes, linear in between)."""
    knots = [math.exp(rng.gauss(0, sigma)) for _ in range(int(span_s / step_s) + 2)]

    def at(t: float) -> float:
        i, f = divmod(t / step_s, 1.0)
        i = int(i)
        return knots[i] * (1 - f) + knots[i + 1] * f
    return at


def main() -> int:
    rng = random.Random(7)
    day = 24 * 3600
    us_peak, eu_peak = 20.0, 6.0
    us_swing, eu_swing = _swing(rng, day), _swing(rng, day)
    _write("diurnal_day.csv.gz", [
        *_rows(rng, "us-east", lambda t: day_curve(t, -5, us_peak, us_swing), day, us_peak * 1.2),
        *_rows(rng, "eu-west", lambda t: day_curve(t, 1, eu_peak, eu_swing), day, eu_peak * 1.2),
    ])
    hour = 3600
    _write("spike_5x.csv.gz", [
        *_rows(rng, "us-east", lambda t: 15.0 if 1200 <= t < 2100 else 3.0, hour, 15.0),  # 5x for 15 minutes
        *_rows(rng, "eu-west", lambda t: 2.0, hour, 2.0),
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
