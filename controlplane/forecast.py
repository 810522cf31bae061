"""Load forecasting per pool: Holt's linear trend on each windowed rate, forecast over the replica start-up
time, with an error band for the level (from the one-step residuals, never narrower than the window's Poisson
noise) and a jump to a new level when a window lands far above the band. A sudden change shows first in the
window's newest interval: a count there far off the level (in its own Poisson noise) starts a shift, whose
level is measured from its start until the window holds nothing older."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from baton.controlplane.capacity import Load
from baton.controlplane.signals import Interval, SignalWindow

# A shift: the newest interval's request count this many Poisson sigmas off the level, and by this factor at
# least. At 5 sigma noise triggers about once in 3.5 million intervals; the factor keeps a busy pool's small
# but significant drift (Holt's trend follows that) from reading as a step.
SHIFT_Z = 5.0
SHIFT_RATIO = 1.5


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
    wander: float  # the same less a shift's own band: how far the level moves tick to tick, the margin against
    # flapping (a shift's band only shrinks as its arrivals add up, and `upper` holds it already: counted twice,
    # it kept the spike example's burst replicas for minutes)
    rising: bool = False  # in a sudden step up: a queue is the step's, not the ordinary one of a busy pool


@dataclass
class Shift:
    """Arrivals since a sudden change of level began; `direction` +1 for a step up, -1 down, from the request
    rate `before`."""

    start: float
    direction: int
    before: float = 0.0
    ticks: int = 0
    seconds: float = 0.0
    requests: float = 0.0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    inputs: float = 0.0

    def add(self, iv: Interval) -> None:
        self.ticks += 1
        self.seconds += iv.seconds
        self.requests += iv.requests
        self.prompt_tokens += iv.prompt_tokens
        self.output_tokens += iv.output_tokens
        self.inputs += iv.inputs

    def rates(self) -> dict[str, float]:
        s = max(self.seconds, 1e-3)
        return {"request_rate": self.requests / s, "prompt_tokens_per_s": self.prompt_tokens / s,
                "output_tokens_per_s": self.output_tokens / s, "inputs_per_s": self.inputs / s}

    @property
    def confirmed(self) -> bool:
        """Two ticks or more whose arrivals, together, still pass the shift test against the level before it:
        one odd tick is not a step (as for HoltSeries' jumps)."""
        together = Interval(self.seconds, self.requests, self.prompt_tokens, self.output_tokens, self.inputs)
        return self.ticks >= 2 and shifted(self.before, together) == self.direction


def shifted(level_rate: float, iv: Interval) -> int:
    """+1 or -1 when the interval's request count is a step up or down from `level_rate`, else 0."""
    expected, n = level_rate * iv.seconds, iv.requests
    off = SHIFT_Z * math.sqrt(max(expected, 1.0))
    if n - expected > off and n >= SHIFT_RATIO * expected:
        return 1
    if expected - n > off and n * SHIFT_RATIO <= expected:
        return -1
    return 0


@dataclass
class LoadForecaster:
    """Request rate, prompt tokens/s, output tokens/s and (embed pools) inputs/s of one pool, each its own
    HoltSeries."""

    series: dict[str, HoltSeries] = field(default_factory=lambda: {
        "request_rate": HoltSeries(), "prompt_tokens_per_s": HoltSeries(), "output_tokens_per_s": HoltSeries(),
        "inputs_per_s": HoltSeries()})
    shift: Shift | None = None

    def update(self, t: float, window: SignalWindow, window_s: float) -> None:
        """While a shift lasts, its own rates are the level (the window still averages in the old one); it
        ends once the window holds only arrivals since it began."""
        iv = window.recent
        level = self.series["request_rate"].level
        step = shifted(level, iv) if iv is not None and iv.seconds > 0 and level is not None else 0
        if step:
            self.shift = Shift(start=t - iv.seconds, direction=step, before=level)
        if self.shift is not None:
            if iv is not None:
                self.shift.add(iv)
                for name, rate in self.shift.rates().items():
                    s = self.series[name]
                    s.level, s.trend, s.last_t, s.jumping = rate, 0.0, t, 0
            if t - self.shift.start >= window_s:
                self.shift = None
            return
        poisson = _poisson(window.request_rate, window_s)
        for name, s in self.series.items():
            y = getattr(window, name)
            s.update(t, y, poisson * max(y, s.level or 0.0))

    def forecast(self, horizon_s: float, z: float, window_s: float) -> Forecast:
        """Never below the level: a falling trend waits for the load itself to fall before replicas go. During
        a shift the band is the sampling noise of the arrivals since it began."""
        expected, upper, band = {}, {}, {}
        poisson = _poisson(self.series["request_rate"].level or 0.0, window_s)
        since = math.sqrt(2.0 / max(1.0, self.shift.requests)) if self.shift is not None else 0.0
        for name, s in self.series.items():
            level = s.level or 0.0
            smoothing = math.sqrt(s.alpha / (2 - s.alpha))  # how much smoothing narrows errors for the level
            expected[name] = max(level, s.forecast(horizon_s))
            band[name] = z * smoothing * max(s.sigma, poisson * level)
            upper[name] = expected[name] + max(band[name], z * since * level)
        exp_prompt = expected["prompt_tokens_per_s"]
        noise = (upper["prompt_tokens_per_s"] - exp_prompt) / exp_prompt if exp_prompt > 0 else 0.0
        wander = band["prompt_tokens_per_s"] / exp_prompt if exp_prompt > 0 else 0.0
        return Forecast(expected=Load(**expected), upper=Load(**upper), noise=noise, wander=wander,
                        rising=self.shift is not None and self.shift.direction > 0)


def _poisson(request_rate: float, window_s: float) -> float:
    """Relative sampling noise of a rate measured over a window of N requests: about sqrt(2/N) for token sums
    (the count's 1/sqrt(N), and as much again from request sizes)."""
    return math.sqrt(2.0 / max(1.0, request_rate * window_s))
