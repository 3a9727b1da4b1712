"""OpenCL target vs C target: per-sample device latency with the per-layer breakdown, side by side
in one run on this machine (prints tables and ratios, writes bench/out/bench_opencl.json).

For every model, one generated project per placement (``--opencl-layers`` auto -- the default
rule --, all, none and each single layer) is built with the same flags as the C runner
(-O3 -march=native) and both runners time the same sample file with their ``--bench`` option:

* C: ``ddnn_device`` (<name>_infer, one sample at a time);
* OpenCL: ``ddnn_device_ocl --batch 1`` for every placement, and ``--batch 64`` for ``all``.

Stage times include what a stage causes on the host: the input upload is in the first OpenCL
layer's time, the split/sum read-back in the exit's, and the queue is drained after every stage
(only when timing stages; the ``total`` column is an untimed run). The first batch is run once
before timing (PoCL compiles work-group functions on first launch).

Models: the shipped fmnist_32 (real Fashion-MNIST), and random-weight CIFAR-10 device parts from
the zoo (cifar10_shallow 64: FConv 3->64 32x32 pool 3/1/1 + BConv 64->64 pool 2/2/0; cifar10_deep
64: FConv 3->64 pool 2/2/0), where the layers are large enough for offloading to matter.

Usage: python bench/bench_opencl.py [--samples 200] [--repeat 2] [--models fmnist_32,cifar10_shallow_64]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.codegen.opencl_target import compile_opencl, estimated_c_us, parse_opencl_layers
from ddnn_gen.codegen.toolchain import build_opencl_runner, run_opencl_runner
from ddnn_gen.device.samples import write_samples
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model import datasets, zoo
from ddnn_gen.model.modelfile import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_c import random_model  # noqa: E402  (the C bench's random-weight model builder)

log = logging.getLogger("bench_opencl")
REPO = Path(__file__).resolve().parent.parent
NATIVE = "-O3 -march=native"
BATCH = 64


def model_cases(tmp: Path, names: list[str]) -> list[tuple[str, Path, np.ndarray, str]]:
    cases = []
    for name in names:
        if name == "fmnist_32":
            path = REPO / "models" / "fmnist_32.npz"
            cases.append((name, path, datasets.load("fashion-mnist", "test").images, "fashion-mnist test"))
        elif name in ("cifar10_shallow_64", "cifar10_deep_64"):
            raw = zoo.cifar10_shallow(64) if name.startswith("cifar10_shallow") else zoo.cifar10_deep(64)
            path = random_model(raw, tmp / f"{name}.npz")
            images = np.random.default_rng(0).integers(0, 256, (1000, 3, 32, 32), dtype=np.uint8)
            cases.append((name, path, images, "random uint8"))
        else:
            raise SystemExit(f"unknown model {name!r}")
    return cases


def placements(program: DeviceProgram) -> list[str]:
    names = [layer.name for layer in program.layers]
    return ["auto", "all", "none"] + (names if len(names) > 1 else [])


def bench_model(name: str, path: Path, images: np.ndarray, tmp: Path, repeat: int) -> dict[str, Any]:
    program = fold(load_model(path))
    samples = tmp / f"{name}.bin"
    write_samples(samples, images, np.zeros(len(images), dtype=np.int32))
    c_dir = tmp / f"{name}_c"
    compile_c(program, c_dir)
    c_binary = toolchain.build_project(c_dir, opt=NATIVE)
    runs: dict[str, dict[str, float]] = {"C": toolchain.run_runner(c_binary, samples, bench=True, repeat=repeat).bench}
    for placement in placements(program):
        folder = tmp / f"{name}_ocl_{placement}"
        compile_opencl(program, folder, opencl_layers=placement, opencl_max_batch=BATCH)
        binary = build_opencl_runner(folder, opt=NATIVE)
        runs[f"OCL {placement} b1"] = run_opencl_runner(binary, samples, bench=True, repeat=repeat, batch=1).bench
        if placement == "all":
            runs[f"OCL all b{BATCH}"] = run_opencl_runner(binary, samples, bench=True, repeat=repeat,
                                                          batch=BATCH).bench
    stages = [layer.name for layer in program.layers] + [program.spec.device.exit_name]
    auto = parse_opencl_layers("auto", program)
    return {"stages": stages, "runs": runs, "estimated_c_us": dict(zip(stages, estimated_c_us(program))),
            "auto": {stage: "opencl" if flag else "c" for stage, flag in zip(stages, auto)}}


def print_table(name: str, source: str, count: int, result: dict[str, Any]) -> None:
    runs, stages = result["runs"], result["stages"]
    columns = list(runs)
    width = max(12, *(len(column) + 2 for column in columns))
    print(f"\n== {name} ({count} samples of {source}; us per sample; ratio = time / C time)")
    print("stage".ljust(16) + "".join(column.rjust(width) for column in columns))
    for row in [*stages, "stages_total", "total"]:
        cells = "".join(f"{runs[column].get(row, float('nan')):{width}.1f}" for column in columns)
        note = (f"   auto: {result['auto'][row]} (C estimate {result['estimated_c_us'][row]:.1f} us)"
                if row in stages else "")
        print(row.ljust(16) + cells + note)
    c_total = runs["C"]["total"]
    print("ratio".ljust(16) + "".join(f"{runs[column]['total'] / c_total:{width}.2f}" for column in columns))
    batch1 = {column: runs[column]["total"] for column in columns if column.endswith(" b1")}
    best = min(batch1, key=batch1.__getitem__)
    print(f"fastest OpenCL placement at batch 1: {best.split()[1]} ({batch1[best]:.1f} us vs C {c_total:.1f} us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--models", default="fmnist_32,cifar10_shallow_64,cifar10_deep_64")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "bench_opencl.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                               "cflags": NATIVE, "samples": args.samples, "repeat": args.repeat, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_ocl_") as tmp_name:
        tmp = Path(tmp_name)
        for name, path, images, source in model_cases(tmp, args.models.split(",")):
            result = bench_model(name, path, images[:args.samples], tmp, args.repeat)
            print_table(name, source, min(args.samples, len(images)), result)
            results["models"][name] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
