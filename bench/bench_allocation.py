"""Per-device thresholds vs one model-wide threshold, on real data, without a network (the plant of
tests/test_allocation.py): six devices of the shipped Fashion-MNIST model, three seeing only the test images
of the five classes its local exit finds easy (trouser, sandal, sneaker, bag, ankle boot), three the other
five. Each device's offload and accuracy at a threshold are its group's images' own. The devices offer 3x the
capacity at the starting threshold for 30 intervals; both controllers (ddnn_gen/ops/allocation.py,
ddnn_gen/ops/controller.py) keep the load under 0.8 of it. Prints, per controller, the thresholds, the true
load and the true accuracy, and the one threshold that gives the per-device controller's load.

Usage: python bench/bench_allocation.py [--model models/fmnist_32.npz] [--samples 4000]
"""

from __future__ import annotations

import argparse

import numpy as np

from ddnn_gen.bench.class_groups import class_groups
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import calibration_curves
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.ops.allocation import DeviceObservation, DeviceThresholdController
from ddnn_gen.ops.controller import Curve, Observation, ThresholdController

CAPACITY = 1000.0
START = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/fmnist_32.npz")
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args()
    loaded = load_model(args.model)
    outputs = compute_outputs(loaded, datasets.load("fashion-mnist", "test").subset(args.samples))
    curve = Curve.from_calibration(calibration_curves(outputs, loaded.spec.thresholds, "test"))
    groups = class_groups(outputs)
    members = {f"easy{i}": "easy" for i in range(3)} | {f"hard{i}": "hard" for i in range(3)}
    rate = 3.0 * CAPACITY / (len(members) * curve.onward_at(START))
    per = DeviceThresholdController(curve, CAPACITY, START, t_min=0.05, t_max=0.95, max_load=0.8)
    wide = ThresholdController(curve, CAPACITY, START, t_min=0.05, t_max=0.95, max_load=0.8)
    thresholds: dict[str, float] = {}
    for _ in range(30):
        seen = {}
        for device_id, name in members.items():
            used = per.devices[device_id].threshold if device_id in per.devices else START
            seen[device_id] = DeviceObservation(int(rate), int(round(rate * groups[name].onward_at(used))), used)
        thresholds = per.update(seen, 1.0).thresholds
        onward = float(np.mean([groups[name].onward_at(wide.threshold) for name in members.values()]))
        wide.update(Observation(len(members) * rate, onward))

    def report(what: str, chosen: dict[str, float]) -> float:
        load = sum(rate * groups[name].onward_at(chosen[d]) for d, name in members.items())
        accuracy = float(np.mean([groups[name].accuracy_at(chosen[d]) for d, name in members.items()]))
        print(f"{what:>36}: {', '.join(f'{d} {t:.3f}' for d, t in chosen.items())}; true load {load:.0f} req/s "
              f"of {0.8 * CAPACITY:.0f} allowed; true accuracy {100 * accuracy:.2f} %")
        return load

    at_start = {name: g[0](loaded.spec.thresholds[0]) for name, g in groups.items()}
    print(f"offloaded at the stored threshold {loaded.spec.thresholds[0]:.4f}: easy {100 * at_start['easy']:.1f} %, "
          f"hard {100 * at_start['hard']:.1f} %")
    load = report("per-device", thresholds)
    report("model-wide", {d: wide.threshold for d in members})
    one = next(t for t in np.linspace(0.0, 1.0, 1001)
               if sum(rate * groups[name].onward_at(t) for name in members.values()) <= load + 1e-9)
    report("one threshold at the per-device load", {d: float(one) for d in members})


if __name__ == "__main__":
    main()
