"""The cffi binding's per-sample cost against the C runner's own per-sample time, side by side in one run.

For each shipped 28x28 model (mnist_16, fmnist_32) on the same Fashion-MNIST test images:

* runner: ``ddnn_device --bench`` (-O3 -march=native), the C-timed ``<name>_infer`` per sample;
* binding, batch: ``CModel.infer_into`` (one ``ddnn_infer_batch`` call over all samples into preallocated
  NumPy arrays; what ``run-device --impl c`` uses), wall time per sample seen from Python;
* binding, one sample: ``CModel.infer`` per sample (lock, argument checks, result copied out: what a simulated
  device pays per sample);
* bare call: ``lib.<name>_infer`` on a preallocated result from a Python loop (cffi's own call cost).

The overhead of a path is its time per sample minus the runner's in the same round. Rounds alternate the
paths so they see the same contention; each path keeps its minimum over --rounds (the machine is shared).
The goal (issue 12) is a binding within 2 us per sample of the runner.

Usage: python bench/bench_binding.py [--samples 2000] [--rounds 7] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ddnn_gen.bench.c_timing import build_runner, runner_bench
from ddnn_gen.device import c_binding
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model

log = logging.getLogger("bench_binding")
REPO = Path(__file__).resolve().parent.parent
NATIVE = "-O3 -march=native"
GOAL_US = 2.0


def batch_us(model: c_binding.CModel, hwc: np.ndarray, threshold: float, repeat: int) -> float:
    n = len(hwc)
    out = model.empty_result(n)
    start = time.perf_counter()
    for _ in range(repeat):
        model.infer_into(hwc, threshold, out)
    return (time.perf_counter() - start) / (n * repeat) * 1e6


def one_sample_us(model: c_binding.CModel, hwc: np.ndarray, threshold: float) -> float:
    start = time.perf_counter()
    for image in hwc:
        model.infer(image, threshold)
    return (time.perf_counter() - start) / len(hwc) * 1e6


def bare_call_us(model: c_binding.CModel, hwc: np.ndarray, threshold: float) -> float:
    ffi, infer = model.ffi, getattr(model.lib, f"{model.name}_infer")
    result = ffi.new("ddnn_result *")
    pointers = [ffi.from_buffer("uint8_t[]", image) for image in hwc]
    start = time.perf_counter()
    for pointer in pointers:
        infer(pointer, threshold, result)
    return (time.perf_counter() - start) / len(hwc) * 1e6


def bench_model(program: DeviceProgram, images: np.ndarray, tmp: Path, rounds: int, repeat: int) -> dict[str, Any]:
    model = c_binding.load(program)
    hwc = reference.images_to_hwc(images)
    binary, samples = build_runner(program, program.spec.name, images, tmp, NATIVE)
    threshold = program.threshold
    runs: dict[str, list[float]] = {"runner": [], "batch": [], "one_sample": [], "bare_call": []}
    model.run(images[:50])  # warm caches and the extension
    for _ in range(rounds):
        runs["runner"].append(runner_bench(binary, samples, repeat)["total"])
        runs["batch"].append(batch_us(model, hwc, threshold, repeat))
        runs["one_sample"].append(one_sample_us(model, hwc, threshold))
        runs["bare_call"].append(bare_call_us(model, hwc, threshold))
    best = {path: min(values) for path, values in runs.items()}
    overhead = {path: best[path] - best["runner"] for path in best if path != "runner"}
    return {"us_per_sample": best, "overhead_us": overhead, "rounds": runs,
            "meets_goal": {path: value <= GOAL_US for path, value in overhead.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5, help="passes over the samples per round (runner, batch)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "bench_binding.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("ddnn_gen").setLevel(logging.WARNING)
    images = datasets.load("fashion-mnist", "test").images[:args.samples]
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cflags": NATIVE,
                               "binding_cflags": list(c_binding.CFLAGS), "samples": len(images), "goal_us": GOAL_US,
                               "models": {}}
    log.info("%-10s %10s %10s %12s %10s   overhead vs runner (us): batch / one sample / bare call", "model",
             "runner us", "batch us", "1-sample us", "bare us")
    with tempfile.TemporaryDirectory(prefix="bench_binding_") as tmp:
        for name in ("mnist_16", "fmnist_32"):
            program = fold(load_model(REPO / "models" / f"{name}.npz"))
            row = bench_model(program, images, Path(tmp), args.rounds, args.repeat)
            results["models"][name] = row
            us, over = row["us_per_sample"], row["overhead_us"]
            log.info("%-10s %10.2f %10.2f %12.2f %10.2f   %+.2f / %+.2f / %+.2f", name, us["runner"], us["batch"],
                     us["one_sample"], us["bare_call"], over["batch"], over["one_sample"], over["bare_call"])
    for name, row in results["models"].items():
        met = ", ".join(f"{path} {'met' if ok else 'NOT met'}" for path, ok in row["meets_goal"].items())
        log.info("%s: goal (within %.0f us of the runner): %s", name, GOAL_US, met)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
