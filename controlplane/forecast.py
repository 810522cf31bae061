"""Load forecasting per pool: Holt's linear trend on each windowed rate, forecast over the replica start-up
time, with an error band for the level (from the one-step residuals, never narrower than the window's Poisson
noise) and a jump to a new level when a window lands far above the band."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from baton.controlplane.capacity import Load
from baton.controlplane.signals import SignalWindow


@dataclass
class HoltSeries:
    """Level + trend (per second) of one rate, and the variance of its one-step forecast errors.

    Two windows in a row more than `jump_z` sigma off the forecast, the same way, are a new level, taken at once
    (a burst must not wait for smoothing, nor its end hold replicas longer than the stabilisation window; one
    heavy window is not a burst); other errors are clipped at 3 sigma before they enter the variance, so one outlier does not
    widen the band for minutes after it.
    """

    alpha: float = 0.2
    beta: float = 0.05
    gamma: float = 0.1
    jump_z: float = 4.0
    level: float | None = None
    trend: float = 0.0
    var: float = 0.0
    last_t: float | None = None
    jumping: int = 0  # sign of the last window's error when it was beyond jump_z sigma, else 0

    def update(self, t: float, y: float, noise_floor: float = 0.0) -> None:
        """`noise_floor`: the least error sigma to assume (the window's own sampling noise)."""
        if self.level is None or self.last_t is None:
            self.level, self.last_t = y, t
            return
        dt = t - self.last_t
        if dt <= 0:
            return
        predicted = self.level + self.trend * dt
        error = y - predicted
        sd = max(math.sqrt(self.var), noise_floor)
        far = int(math.copysign(1, error)) if sd > 0 and abs(error) > self.jump_z * sd else 0
        if far and far == self.jumping:
            self.level, self.last_t, self.jumping = y, t, 0
            return
        self.jumping = far
        if sd > 0:
            error = max(-3 * sd, min(3 * sd, error))
            self.var += self.gamma * (error * error - self.var)
        else:
            self.var = error * error
        level = self.alpha * y + (1 - self.alpha) * predicted
        self.trend = self.beta * (level - self.level) / dt + (1 - self.beta) * self.trend
        self.level, self.last_t = max(0.0, level), t

    def forecast(self, horizon_s: float) -> float:
        if self.level is None:
            return 0.0
        return max(0.0, self.level + self.trend * horizon_s)

    @property
    def sigma(self) -> float:
        return math.sqrt(self.var)


@dataclass(frozen=True)
class Forecast:
    expected: Load  # the level now, or the trend's value at the horizon when that is higher
    upper: Load  # expected + z sigma of the level: what the planner provisions for (the capacity model's
    # queueing already covers the arrivals' own randomness around it)
    noise: float  # the band's width relative to the expected prompt tokens/s, for the decision record


@dataclass
class LoadForecaster:
    """Request rate, prompt tokens/s and output tokens/s of one pool, each its own HoltSeries."""

    series: dict[str, HoltSeries] = field(default_factory=lambda: {
        "request_rate": HoltSeries(), "prompt_tokens_per_s": HoltSeries(), "output_tokens_per_s": HoltSeries()})

    def update(self, t: float, window: SignalWindow, window_s: float) -> None:
        poisson = _poisson(window.request_rate, window_s)
        for name, s in self.series.items():
            y = getattr(window, name)
            s.update(t, y, poisson * max(y, s.level or 0.0))

    def forecast(self, horizon_s: float, z: float, window_s: float) -> Forecast:
        """Never below the level: a falling trend waits for the load itself to fall before replicas go."""
        expected, upper = {}, {}
        poisson = _poisson(self.series["request_rate"].level or 0.0, window_s)
        for name, s in self.series.items():
            level = s.level or 0.0
            smoothing = math.sqrt(s.alpha / (2 - s.alpha))  # how much smoothing narrows errors for the level
            expected[name] = max(level, s.forecast(horizon_s))
            upper[name] = expected[name] + z * smoothing * max(s.sigma, poisson * level)
        exp_prompt = expected["prompt_tokens_per_s"]
        noise = (upper["prompt_tokens_per_s"] - exp_prompt) / exp_prompt if exp_prompt > 0 else 0.0
        return Forecast(expected=Load(**expected), upper=Load(**upper), noise=noise)


def _poisson(request_rate: float, window_s: float) -> float:
    """Relative sampling noise of a rate measured over a window of N requests: about sqrt(2/N) for token sums
    (the count's 1/sqrt(N), and as much again from request sizes)."""
    return math.sqrt(2.0 / max(1.0, request_rate * window_s))
