"""Per-device thresholds against a plant made of real data: two groups of devices, one seeing the Fashion-MNIST
test images of five classes the local exit finds easy, one the other five. The controller gives the groups
different thresholds, meets the load target after a step to 3x, settles without oscillating, and the
fleet's true accuracy (measured on the groups' own images) is at least that of the one threshold that gives
the same load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ddnn_gen.bench.class_groups import DeviceGroup, class_groups
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import calibration_curves
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.ops.allocation import DeviceObservation, DeviceThresholdController
from ddnn_gen.ops.controller import ControlError, Curve

CAPACITY = 1000.0


@pytest.fixture(scope="module")
def plant(fmnist_model_path: Path, fmnist_test: datasets.Dataset) -> tuple[Curve, dict[str, DeviceGroup]]:
    loaded = load_model(fmnist_model_path)
    outputs = compute_outputs(loaded, fmnist_test.subset(4000))
    curve = Curve.from_calibration(calibration_curves(outputs, loaded.spec.thresholds, "fashion-mnist test[:4000]"))
    return curve, class_groups(outputs)


def _run(controller: DeviceThresholdController, groups: dict[str, DeviceGroup], members: dict[str, str],
         rates: list[float]) -> list[dict[str, float]]:
    trace = []
    for rate in rates:
        seen = {}
        for device_id, name in members.items():
            state = controller.devices.get(device_id)
            threshold = state.threshold if state else controller.threshold
            offloaded = int(round(rate * groups[name].onward_at(threshold)))
            seen[device_id] = DeviceObservation(int(rate), offloaded, threshold)
        decision = controller.update(seen, 1.0)
        load = sum(rate * groups[name].onward_at(decision.thresholds[d]) for d, name in members.items())
        trace.append({**decision.thresholds, "_load": load, "_allowed": decision.allowed_load})
    return trace


def _direction_changes(values: list[float]) -> int:
    steps = [np.sign(b - a) for a, b in zip(values, values[1:]) if abs(b - a) > 1e-12]
    return sum(1 for a, b in zip(steps, steps[1:]) if a != b)


def test_devices_whose_data_differ_get_thresholds_that_meet_the_target_at_less_cost(plant: tuple) -> None:
    curve, groups = plant
    members = {f"easy{i}": "easy" for i in range(3)} | {f"hard{i}": "hard" for i in range(3)}
    start = 0.2
    base = CAPACITY / (len(members) * curve.onward_at(start))  # per device: 1x the capacity in all at `start`
    rates = [0.5 * base] * 10 + [3.0 * base] * 30 + [0.5 * base] * 40
    controller = DeviceThresholdController(curve, CAPACITY, start, t_min=0.05, t_max=0.95, max_load=0.8)
    trace = _run(controller, groups, members, rates)
    for row in trace:
        assert all(0.05 <= row[d] <= 0.95 for d in members)
    settle = 10 + 5
    for row in trace[settle:40]:
        assert row["_load"] <= row["_allowed"] * 1.05, row
    at_load = trace[39]
    easy = np.mean([at_load[d] for d, g in members.items() if g == "easy"])
    hard = np.mean([at_load[d] for d, g in members.items() if g == "hard"])
    assert easy > hard + 0.01, (easy, hard)  # not one threshold: the easy data's devices exit more locally
    # What it buys: the fleet's true accuracy at least that of the single threshold giving the same true load.
    accuracy = np.mean([groups[g].accuracy_at(at_load[d]) for d, g in members.items()])
    grid = np.linspace(0.0, 1.0, 1001)
    uniform = next(t for t in grid if sum(3.0 * base * groups[g].onward_at(t) for g in members.values())
                   <= at_load["_load"] + 1e-9)
    assert accuracy >= np.mean([groups[g].accuracy_at(uniform) for g in members.values()]) - 1e-3
    for device_id in members:
        series = [row[device_id] for row in trace]
        assert _direction_changes(series[settle:40]) <= 1, series
        tail = series[40:]
        assert all(b <= a + 1e-12 for a, b in zip(tail, tail[1:])), tail  # back down, never bouncing up
        assert tail[-1] <= start + 0.05
    assert all(row["_load"] <= row["_allowed"] * 1.05 for row in trace[40:])


def test_devices_learnt_only_after_the_first_rise_are_reallocated(plant: tuple) -> None:
    """Overloaded from the first interval: the first rise is taken before any device's correction is known
    (every device the same), so the easy devices can only take over the load by reallocation later."""
    curve, groups = plant
    members = {f"easy{i}": "easy" for i in range(3)} | {f"hard{i}": "hard" for i in range(3)}
    start = 0.2
    rate = 3.0 * CAPACITY / (len(members) * curve.onward_at(start))
    controller = DeviceThresholdController(curve, CAPACITY, start, t_min=0.05, t_max=0.95, max_load=0.8)
    trace = _run(controller, groups, members, [rate] * 40)
    first = trace[0]
    values = [first[d] for d in members]
    assert max(values) - min(values) <= 0.05 and first["_load"] <= first["_allowed"] * 1.05  # one rise, blind
    last = trace[-1]
    easy = np.mean([last[d] for d, g in members.items() if g == "easy"])
    hard = np.mean([last[d] for d, g in members.items() if g == "hard"])
    assert easy > hard + 0.01, last
    assert all(row["_load"] <= row["_allowed"] * 1.05 for row in trace[5:])
    # Reallocation converges: the last 10 intervals move nothing.
    assert all(row == last for row in trace[-10:])


def test_a_device_seen_late_starts_at_the_model_wide_threshold_and_bounds_hold(plant: tuple) -> None:
    curve, groups = plant
    controller = DeviceThresholdController(curve, CAPACITY, 0.3, t_min=0.1, t_max=0.6, max_load=0.5)
    _run(controller, groups, {"a": "easy"}, [5000.0] * 5)
    decision = controller.update({"a": DeviceObservation(5000, 100, controller.devices["a"].threshold),
                                  "b": DeviceObservation(0, 0)}, 1.0)
    assert set(decision.thresholds) == {"a", "b"}
    assert decision.thresholds["b"] == 0.3  # no samples from it yet: nothing to move it for
    assert decision.threshold == max(decision.thresholds.values())
    with pytest.raises(ControlError, match="within"):
        DeviceThresholdController(curve, CAPACITY, 0.3, t_min=0.7, t_max=0.2)
