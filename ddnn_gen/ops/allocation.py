"""Per-device thresholds (``ddnngen control --per-device``): when one model's devices see different data, the
same threshold makes them offload different shares, and one threshold for all spends accuracy where it buys
little offload. This controller gives each device its own threshold so that the predicted server load meets
the target at the least expected loss of accuracy.

Each device's curve is the model's calibration curve corrected by what the device is seen to do: its onward
share at threshold t is ``min(1, c * onward(t))``, with c its offloaded count over the curve's expectation at
the threshold it reported using, over the recent intervals in which that threshold did not change. Its loss
of accuracy at t is ``c**2 * (acc(0) - acc(t))`` (the curve's accuracy made non-increasing first: noise in a
measured curve is never taken for a free step): c once because it has c times the curve's samples near the
threshold, once because a device whose exit is less often sure is taken to be less often right when it
exits. That second factor is an assumption (devices send no labels); tests/test_allocation.py checks it on
Fashion-MNIST class groups. Accuracy is weighted by each device's share of the samples (the fleet's accuracy
is per sample), load by its rate.

The allocation is greedy: from every device at t_min, raise, one grid step at a time, the device whose next
step removes the most predicted requests/s per point of fleet accuracy lost, until the prediction fits the
budget. Rates cancel out of that ratio (load and accuracy weight both scale with a device's rate), so devices
that differ only in offered rate get the same threshold, which is the optimum for a concave curve; devices
whose data differ get different ones.

Damping is the model-wide controller's, per device: thresholds rise at once only while the predicted load at
the current thresholds is over the allowed load, each to at least the allocation that fits it; they fall only
when the lowered allocation stays ``margin`` under the allowed load, by at most ``max_step_down`` per device
per interval. A rise lands under the allowed load and a fall under (1 - margin) of it. When no device can come
down without another going up (the estimates changed after a rise: the devices that should carry it are
known only then), the devices move towards the roomy allocation together, by at most ``max_step_down`` each,
only if that raises the expected accuracy at no more load. So with steady estimates no decision undoes the
previous one: rises fit, falls keep the margin, reallocations strictly improve the expected accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ddnn_gen.ops.controller import TargetKeeper, threshold_grid

# A device's correction is its offloaded count over the curve's expectation, both summed over its recent
# steady intervals, once the expectation reaches MIN_EXPECTED requests: a ratio of a handful of requests is
# noise, and per-device thresholds that followed it would differ for nothing. The sums are scaled down to
# MEMORY_EXPECTED requests when they grow past it, so the memory is a number of requests (about +-16 %
# binomial noise at 40), whatever the device's rate, and older intervals fade.
MIN_EXPECTED = 10.0
MEMORY_EXPECTED = 40.0
CORRECTION_BOUNDS = (0.2, 5.0)  # wider than the model-wide controller's: devices' data may differ a lot


@dataclass
class DeviceObservation:
    """One device's interval: samples it classified, how many it offloaded, the threshold it reported using
    (NaN: unknown; the controller's last value for it is assumed)."""

    samples: int
    offloaded: int
    threshold: float = math.nan


@dataclass
class ControlledDevice:
    threshold: float
    rate: float | None = None  # samples/s, smoothed
    correction: float = 1.0
    _offloaded: float = 0.0  # sums over recent steady intervals (MEMORY_EXPECTED)
    _expected: float = 0.0
    _reported: float = math.nan  # the threshold its previous message said it used


@dataclass
class DevicesDecision:
    thresholds: dict[str, float]
    predicted_load: float  # requests/s
    allowed_load: float
    expected_accuracy: float  # sample-weighted over the devices
    reason: str

    @property
    def threshold(self) -> float:
        """The model-wide value to publish for devices not seen yet: the highest (the least load)."""
        return max(self.thresholds.values())


@dataclass
class _Curves:
    """Every device's predicted load (requests/s) and accuracy at each grid threshold, and its sample weight."""

    grid: np.ndarray
    ids: list[str]
    load: np.ndarray  # devices x grid
    accuracy: np.ndarray  # devices x grid
    weight: np.ndarray  # devices


@dataclass
class DeviceThresholdController(TargetKeeper):
    """``threshold``: where a device not seen before starts."""

    devices: dict[str, ControlledDevice] = field(default_factory=dict)

    def update(self, seen: dict[str, DeviceObservation], span_s: float, p99_ms: float = math.nan) -> DevicesDecision:
        for device_id, observation in seen.items():
            self._observe(self.devices.setdefault(device_id, ControlledDevice(self.threshold)), observation, span_s)
        load_seen = sum(observation.offloaded for observation in seen.values()) / span_s
        self.adapt_allowed(load_seen, p99_ms)
        curves = self._curves()
        now = self._indices(curves, [self.devices[i].threshold for i in curves.ids])
        wanted = _allocate(curves, self.allowed)
        roomy = _allocate(curves, (1 - self.margin) * self.allowed)
        if _load(curves, now) > self.allowed:
            chosen, reason = np.maximum(now, wanted), "over target: more local exits"
        elif np.any(roomy < now):
            chosen, reason = self._lower(curves, now, roomy)
        else:
            chosen, reason = now, "holding"
        # A device that classifies nothing keeps its threshold: moving it would gain nothing now.
        chosen = np.where(curves.weight > 0, chosen, now)
        for d, device_id in enumerate(curves.ids):
            if chosen[d] != now[d]:
                self.devices[device_id].threshold = float(curves.grid[chosen[d]])
        thresholds = {device_id: self.devices[device_id].threshold for device_id in curves.ids}
        return DevicesDecision(thresholds, _load(curves, chosen), self.allowed, _accuracy(curves, chosen), reason)

    # ---- internals -------------------------------------------------------------------------------------

    def _observe(self, device: ControlledDevice, seen: DeviceObservation, span_s: float) -> None:
        weight = self.smoothing
        rate = seen.samples / span_s
        device.rate = rate if device.rate is None else (1 - weight) * device.rate + weight * rate
        used = seen.threshold if math.isfinite(seen.threshold) else device.threshold
        # Only an interval that began and ended at one threshold says what that threshold offloads: right after
        # a change, the samples counted were mostly classified at the old one.
        steady = used == device._reported
        device._reported = used
        if not steady or not seen.samples:
            return
        device._offloaded += seen.offloaded
        device._expected += seen.samples * self.curve.onward_at(used)
        if device._expected > MEMORY_EXPECTED:
            scale = MEMORY_EXPECTED / device._expected
            device._offloaded, device._expected = scale * device._offloaded, MEMORY_EXPECTED
        if device._expected >= MIN_EXPECTED:
            low, high = CORRECTION_BOUNDS
            device.correction = min(high, max(low, device._offloaded / device._expected))

    def _curves(self) -> _Curves:
        ids = sorted(self.devices)
        now = [self.devices[i].threshold for i in ids]
        # Each device's threshold and the one a bounded step below it are grid points: a fall is never held
        # back by a coarse curve.
        below = [max(self.t_min, round(t - self.max_step_down, 6)) for t in now]  # as the curve's grid is rounded
        above = [min(self.t_max, round(t + self.max_step_down, 6)) for t in now]
        grid = threshold_grid(self.curve, self.t_min, self.t_max, now + below + above)
        onward = np.array([self.curve.onward_at(float(t)) for t in grid])
        rates = np.array([self.devices[i].rate or 0.0 for i in ids])
        corrections = np.array([self.devices[i].correction for i in ids])
        share = np.minimum(1.0, np.outer(corrections, onward))
        # The set's accuracy, never rising with the threshold (a measured curve has noise; a step that seemed to
        # gain accuracy would be taken first for nothing), as a loss from where everything is offloaded.
        monotone = np.minimum.accumulate(self.curve.accuracy)
        loss = monotone[0] - np.interp(grid, self.curve.thresholds, monotone)
        accuracy = monotone[0] - np.outer(corrections ** 2, loss)
        total = rates.sum()
        weight = rates / total if total > 0 else np.zeros_like(rates)
        return _Curves(grid, ids, rates[:, None] * share, accuracy, weight)

    @staticmethod
    def _indices(curves: _Curves, thresholds: list[float]) -> np.ndarray:
        return np.array([int(np.searchsorted(curves.grid, t)) for t in thresholds], dtype=int)

    def _lower(self, curves: _Curves, now: np.ndarray, roomy: np.ndarray) -> tuple[np.ndarray, str]:
        """Move the devices above the roomy allocation down towards it, by at most max_step_down each, while
        the prediction stays under (1 - margin) of the allowed load: all of them if that fits, else one at
        a time, the most accuracy per request/s added first."""
        budget = (1 - self.margin) * self.allowed
        floor = np.maximum(self.t_min, np.round(curves.grid[now] - self.max_step_down, 6))  # grid points (_curves)
        steps = np.maximum(roomy, np.searchsorted(curves.grid, floor))
        lowered = np.where(roomy < now, steps, now)
        if _load(curves, lowered) <= budget:
            return lowered, "room: more accuracy"
        chosen = now.copy()

        def value(d: int) -> float:
            added = curves.load[d, lowered[d]] - curves.load[d, now[d]]
            gained = curves.weight[d] * (curves.accuracy[d, lowered[d]] - curves.accuracy[d, now[d]])
            return gained / added if added > 1e-12 else math.inf

        for d in sorted((int(d) for d in np.nonzero(lowered < now)[0]), key=value, reverse=True):
            trial = chosen.copy()
            trial[d] = lowered[d]
            if _load(curves, trial) <= budget:
                chosen = trial
        if np.any(chosen < now):
            return chosen, "room: more accuracy"
        return self._reallocate(curves, now, roomy)

    def _reallocate(self, curves: _Curves, now: np.ndarray, roomy: np.ndarray) -> tuple[np.ndarray, str]:
        """No device can come down alone: the others must make room. The devices the roomy allocation puts
        higher go up towards it (at most max_step_down each); the ones it puts lower come down into the room
        that frees (most accuracy per request/s first, each as far as fits, at most max_step_down), never
        adding load beyond what there is now or the margin allows. Taken only if the expected accuracy rises:
        with steady estimates such moves never undo each other."""
        top = np.round(curves.grid[now] + self.max_step_down, 6)
        trial = np.where(roomy > now, np.maximum(now, np.minimum(roomy, np.searchsorted(curves.grid, top,
                                                                                         side="right") - 1)), now)
        floor = np.maximum(self.t_min, np.round(curves.grid[now] - self.max_step_down, 6))
        down = np.maximum(roomy, np.searchsorted(curves.grid, floor))
        limit = min(self.allowed, max(_load(curves, now), (1 - self.margin) * self.allowed))

        def value(d: int) -> float:
            added = curves.load[d, down[d]] - curves.load[d, now[d]]
            gained = curves.weight[d] * (curves.accuracy[d, down[d]] - curves.accuracy[d, now[d]])
            return gained / added if added > 1e-12 else math.inf

        for d in sorted((int(d) for d in np.nonzero(roomy < now)[0]), key=value, reverse=True):
            for index in range(int(down[d]), int(now[d])):  # as far down as fits
                candidate = trial.copy()
                candidate[d] = index
                if _load(curves, candidate) <= limit:
                    trial = candidate
                    break
        if np.any(trial != now) and _accuracy(curves, trial) > _accuracy(curves, now) + 1e-9:
            return trial, "reallocating: more accuracy"
        return now, "holding (within the margin)"


def _load(curves: _Curves, index: np.ndarray) -> float:
    return float(curves.load[np.arange(len(index)), index].sum())


def _accuracy(curves: _Curves, index: np.ndarray) -> float:
    return float((curves.weight * curves.accuracy[np.arange(len(index)), index]).sum())


def _allocate(curves: _Curves, budget: float) -> np.ndarray:
    """Grid indices, one per device, that fit ``budget`` (or come as close as t_max allows) at the least loss
    of sample-weighted accuracy: greedy from t_min, the step with the most load removed per accuracy lost."""
    index = np.zeros(len(curves.ids), dtype=int)
    last = len(curves.grid) - 1
    total = _load(curves, index)
    while total > budget:
        best, best_ratio, best_next = -1, -math.inf, 0
        for d in range(len(index)):
            here = curves.load[d, index[d]]
            lower = np.nonzero(curves.load[d, index[d] + 1:] < here - 1e-12)[0]
            if index[d] >= last or not len(lower):
                continue  # at t_max, or nothing to gain above: raising it costs accuracy for no load
            step = index[d] + 1 + int(lower[0])
            lost = curves.weight[d] * (curves.accuracy[d, index[d]] - curves.accuracy[d, step])
            ratio = (here - curves.load[d, step]) / max(lost, 1e-12)
            if ratio > best_ratio:
                best, best_ratio, best_next = d, ratio, step
        if best < 0:
            break  # every device at t_max (or offloading nothing more it could stop): as close as it gets
        total -= curves.load[best, index[best]] - curves.load[best, best_next]
        index[best] = best_next
    return index
