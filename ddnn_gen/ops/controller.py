"""The load-driven threshold controller: keep the server load (or its p99) at the operator's target by
moving a model's device-exit threshold along the model's calibration curve.

The curve (stored by `ddnngen calibrate`, model/evaluate.py calibration_curves) says which share of samples
leaves the device at each threshold, and the accuracy that buys. The controller corrects it with the share
it observes (devices' counters), estimates the sample rate the devices offer, and picks the *lowest*
threshold (most accurate) whose predicted server load stays under the target. Raising the threshold (more
local exits, less load) happens at once when the load is over target; lowering it only when the lower one
leaves a margin, and by a bounded step per interval: so a step in offered load settles in a bounded number
of intervals without oscillating. In p99 mode the allowed load itself adapts (multiplicative decrease when
the p99 is over target; additive increase, never far ahead of the load seen, when it is well under, slower
near the load at which the p99 last went over), and the same rule follows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ddnn_gen.errors import DdnnError


class ControlError(DdnnError):
    """A model without a calibration curve, or a target that cannot be met."""


def _exit_entry(calibration: dict[str, object] | None, exit_index: int) -> dict[str, object]:
    """The stored calibration's entry of exit ``exit_index``, or a ControlError that says what is missing."""
    if not calibration or "exits" not in calibration:
        raise ControlError("the model has no calibration curve; run `ddnngen calibrate` on it first")
    exits = calibration["exits"]
    assert isinstance(exits, list)
    if not 0 <= exit_index < len(exits):
        raise ControlError(f"the model's calibration curve has exits 0..{len(exits) - 1}, not {exit_index} "
                           "(the last tier's exit is final: nothing to move)")
    return exits[exit_index]


@dataclass(frozen=True)
class Curve:
    """One exit's cost curve: thresholds ascending, the share of samples sent on, the overall accuracy."""

    thresholds: np.ndarray
    onward: np.ndarray
    accuracy: np.ndarray

    @classmethod
    def from_calibration(cls, calibration: dict[str, object] | None, exit_index: int = 0) -> Curve:
        entry = _exit_entry(calibration, exit_index)
        return cls(np.asarray(entry["thresholds"], float), np.asarray(entry["onward_rate"], float),
                   np.asarray(entry["overall_accuracy"], float))

    @classmethod
    def for_hop(cls, calibration: dict[str, object] | None, exit_index: int) -> Curve:
        """Exit ``exit_index``'s curve per request that reaches it: the share it sends on to the next tier
        (the load that hop's controller keeps) out of those arriving, not out of all samples. The stored
        curve counts every sample with the other exits at their stored thresholds, so the share reaching
        the exit is its exit rate plus its onward rate (the same at every threshold); for the device's exit
        (0) that is 1 and this is :meth:`from_calibration`'s curve. One controller per hop: the same
        controller moves any exit's threshold against the tier above's load."""
        entry = _exit_entry(calibration, exit_index)
        onward = np.asarray(entry["onward_rate"], float)
        reaching = np.asarray(entry["exit_rate"], float) + onward
        if exit_index and float(reaching.max()) <= 0.0:
            raise ControlError(f"no calibration sample reaches exit {exit_index}: its curve says nothing")
        per_arrival = np.where(reaching > 0, onward / np.maximum(reaching, 1e-12), 0.0) if exit_index else onward
        return cls(np.asarray(entry["thresholds"], float), np.clip(per_arrival, 0.0, 1.0),
                   np.asarray(entry["overall_accuracy"], float))

    def onward_at(self, threshold: float) -> float:
        return float(np.interp(threshold, self.thresholds, self.onward))

    def accuracy_at(self, threshold: float) -> float:
        return float(np.interp(threshold, self.thresholds, self.accuracy))


def threshold_grid(curve: Curve, t_min: float, t_max: float, extra: list[float]) -> np.ndarray:
    """The thresholds a controller chooses among: the curve's within [t_min, t_max], the bounds, ``extra``."""
    inside = curve.thresholds[(curve.thresholds >= t_min) & (curve.thresholds <= t_max)]
    return np.unique(np.concatenate([inside, [t_min, t_max], extra]))


@dataclass
class Observation:
    """What one interval showed: samples the devices classified per second, the share they sent on, and the
    server's p99 round trip (ms; NaN when unknown)."""

    sample_rate: float
    onward_share: float
    p99_ms: float = math.nan


@dataclass
class Decision:
    threshold: float
    predicted_load: float  # requests/s the server gets at that threshold
    allowed_load: float
    expected_accuracy: float
    reason: str


@dataclass
class TargetKeeper:
    """What every controller shares: the curve, the capacity, the bounds, the operator's target and the load
    it allows now (``threshold``: where it starts)."""

    curve: Curve
    capacity: float  # requests/s the server sustains (measured)
    threshold: float
    t_min: float = 0.0
    t_max: float = 1.0
    max_load: float | None = 0.8  # share of capacity (load mode)
    target_p99_ms: float | None = None  # p99 mode
    margin: float = 0.1  # lower the threshold only if the load stays this far under the allowed load
    max_step_down: float = 0.05  # per interval
    smoothing: float = 0.5  # EWMA weight of a new observation
    allowed: float = field(default=0.0)
    overloaded_at: float = field(default=math.inf)  # p99 mode: the allowed load at which the p99 last went over

    def __post_init__(self) -> None:
        if (self.max_load is None) == (self.target_p99_ms is None):
            raise ControlError("give exactly one target: a share of capacity, or a p99 in ms")
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            raise ControlError(f"threshold bounds [{self.t_min}, {self.t_max}] are not within [0, 1]")
        if self.capacity <= 0:
            raise ControlError("the server capacity must be > 0 requests/s")
        self.threshold = min(max(self.threshold, self.t_min), self.t_max)
        self.allowed = (self.max_load if self.max_load is not None else 0.8) * self.capacity

    def target(self) -> dict[str, float]:
        """The target in force, as on the wire: {"max_load": F} or {"target_p99_ms": X}."""
        return {"max_load": self.max_load} if self.max_load is not None else {"target_p99_ms": float(
            self.target_p99_ms or 0.0)}

    def set_target(self, max_load: float | None = None, target_p99_ms: float | None = None) -> None:
        """The operator's new target, from the next decision on. A new share of capacity applies at once; a
        new p99 keeps the allowed load learnt so far (the p99 rule moves it from there)."""
        if (max_load is None) == (target_p99_ms is None):
            raise ControlError("give exactly one target: a share of capacity, or a p99 in ms")
        self.max_load, self.target_p99_ms = max_load, target_p99_ms
        if max_load is not None:
            self.allowed = max_load * self.capacity
        self.overloaded_at = math.inf

    def adapt_allowed(self, load: float, p99_ms: float) -> None:
        """The allowed load after one interval in p99 mode (``load``: requests/s seen): multiplicative decrease
        when the p99 is over target, additive increase (never far ahead of the load seen) when it is well under;
        unchanged in load mode or when the p99 is unknown.

        The p99 of a queue jumps once the load nears what the server sustains, so an increase that crosses
        that point shows up only as an interval over target. The allowed load at which that last happened is
        remembered, and within 10 % of it the increase is a fifth of the usual step: the controller probes
        for room it may have gained there slowly, instead of overshooting by a full step each time."""
        if self.target_p99_ms is None or not math.isfinite(p99_ms):
            return
        if p99_ms > self.target_p99_ms:
            self.overloaded_at = min(self.allowed, load)
            self.allowed = max(0.1 * self.capacity, 0.8 * self.overloaded_at)
            return
        if p99_ms < 0.75 * self.target_p99_ms:
            # Grow the allowed load only a little ahead of the load actually seen, so the threshold comes down
            # gradually and the p99 is watched on the way instead of overshot and cut back.
            ceiling = min(self.capacity, 1.2 * load + 0.05 * self.capacity)
            near_overload = 0.9 * self.overloaded_at <= self.allowed <= 1.1 * self.overloaded_at
            step = (0.01 if near_overload else 0.05) * self.capacity
            if self.allowed < ceiling:
                self.allowed = min(ceiling, self.allowed + step)



@dataclass
class ThresholdController(TargetKeeper):
    """One threshold for all the model's devices."""

    rate: float | None = None
    correction: float = 1.0

    def _predicted(self, threshold: float) -> float:
        assert self.rate is not None
        return self.rate * min(1.0, self.correction * self.curve.onward_at(threshold))

    def update(self, seen: Observation) -> Decision:
        weight = self.smoothing
        self.rate = seen.sample_rate if self.rate is None else (1 - weight) * self.rate + weight * seen.sample_rate
        expected = self.curve.onward_at(self.threshold)
        if expected > 1e-3 and seen.sample_rate > 0:
            ratio = min(2.0, max(0.5, seen.onward_share / expected))
            self.correction = (1 - weight) * self.correction + weight * ratio
        self.adapt_allowed(seen.sample_rate * seen.onward_share, seen.p99_ms)
        grid = threshold_grid(self.curve, self.t_min, self.t_max, [self.threshold])
        fits = [t for t in grid if self._predicted(float(t)) <= self.allowed]
        wanted = float(min(fits)) if fits else self.t_max
        now = self._predicted(self.threshold)
        if now > self.allowed:
            # Lowest threshold that fits is above the current one (the load only falls as it rises): go there.
            self.threshold, reason = wanted, "over target: more local exits"
        elif wanted < self.threshold:
            roomy = [t for t in grid if t < self.threshold and self._predicted(float(t)) <= (1 - self.margin)
                     * self.allowed]
            if roomy:
                self.threshold = max(float(min(roomy)), self.threshold - self.max_step_down)
                reason = "room: more accuracy"
            else:
                reason = "holding (within the margin)"
        else:
            reason = "holding"
        return Decision(self.threshold, self._predicted(self.threshold), self.allowed,
                        self.curve.accuracy_at(self.threshold), reason)
