"""Generated C device part vs Chainer, and one BConv layer vs the XNOR-popcount bound.

Measured side by side in one run on this machine (prints ratios, writes bench/out/bench_c.json):

1. Per-sample latency of the generated C device part (-O3 -march=native, the runner's
   --bench timing of <name>_infer) against Chainer's test-mode forward of the same device part
   and local exit at batch 1, for the MNIST model and a CIFAR-10 deep-64 device part (zoo
   ``cifar10_deep``, random weights: FConv 3->64 3x3 on 32x32 + pool 2/2/0). Goal >= 50x.
2. One BConv 64->64, 32x32, 3x3 pad 1 layer (the runner's per-layer time in a random
   FConv+BConv model) against a bare loop of 64-bit XNOR + popcount over the same 589 824
   words, both -O3 -march=native (layer: mean over samples; loop: mean of its 50 runs, the
   best-of-50 ratio reported too). Goal within 2x. Also built without -march=native, where
   x86-64 has no popcnt instruction and GCC calls a libgcc helper.
3. Each device part against its own bound: FConv multiply-accumulates at the measured int32
   MAC rate plus the binary layers' popcount words at the measured XNOR-popcount rate.

The machine may be shared (other processes busy): every C and Chainer figure is the minimum
over --rounds runs taken in turn, so both sides see the same contention, and only ratios
measured in the same run are compared.

Usage: python bench/bench_c.py [--samples 500] [--repeat 5] [--chainer-samples 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import chainer
import numpy as np

from ddnn_gen.bench.c_timing import build_runner, runner_bench
from ddnn_gen.codegen.c_target import load_program
from ddnn_gen.errors import DatasetError
from ddnn_gen.fold.program import DeviceProgram, stage_work
from ddnn_gen.model import datasets, zoo
from ddnn_gen.model.links import input_to_float
from ddnn_gen.model.modelfile import load_model, save_model
from ddnn_gen.model.network import DDNN
from ddnn_gen.model.spec import parse_spec

log = logging.getLogger("bench_c")
REPO = Path(__file__).resolve().parent.parent
NATIVE = "-O3 -march=native"

# Bare-loop bounds, compiled with the same flags as the generated code.
BOUND_SOURCE = r"""
#define _POSIX_C_SOURCE 200112L
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define PIXELS 1024
#define WORDS 576 /* 64 output channels x 3x3 taps x 1 input word */
#define OC 64
#define MAC_STEPS 1769472 /* multiply-accumulates of the bench: 32*32*64*27 */

static uint64_t in_words[PIXELS + WORDS];
static uint64_t weights[WORDS];
static int8_t mac_w[27 * OC];
static uint8_t mac_x[PIXELS * 27];
static int32_t mac_acc[OC];

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* PIXELS x WORDS = 589 824 XNOR + popcounts over cache-resident data; the sliding input
 * window keeps the compiler from hoisting anything out of the outer loop. */
static int64_t xnor_popcount(void)
{
    int64_t total = 0;
    int p, i;
    for (p = 0; p < PIXELS; ++p) {
        int32_t acc = 0;
        for (i = 0; i < WORDS; ++i)
            acc += __builtin_popcountll(~(in_words[p + i] ^ weights[i]));
        total += acc;
    }
    return total;
}

/* The FConv inner loop shape: for every pixel and tap, acc[oc] += w[oc] * x over 64 channels. */
static int64_t int_macs(void)
{
    int64_t total = 0;
    int p, t, oc;
    for (p = 0; p < PIXELS; ++p) {
        for (oc = 0; oc < OC; ++oc)
            mac_acc[oc] = 0;
        for (t = 0; t < 27; ++t) {
            const int32_t x = mac_x[p * 27 + t];
            for (oc = 0; oc < OC; ++oc)
                mac_acc[oc] += mac_w[t * OC + oc] * x;
        }
        for (oc = 0; oc < OC; ++oc)
            total += mac_acc[oc];
    }
    return total;
}

int main(void)
{
    uint64_t state = 88172645463325252ull;
    double best_pop = 1e30, best_mac = 1e30, sum_pop = 0;
    int64_t sink = 0;
    int i, rep;
    for (i = 0; i < PIXELS + WORDS; ++i) {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17;
        in_words[i] = state;
        if (i < WORDS)
            weights[i] = state * 2654435761u;
    }
    for (i = 0; i < 27 * OC; ++i)
        mac_w[i] = (int8_t)((i * 7919) % 3 == 0 ? -1 : 1);
    for (i = 0; i < PIXELS * 27; ++i)
        mac_x[i] = (uint8_t)(i * 31);
    for (rep = 0; rep < 50; ++rep) {
        double t0 = now(), t1;
        sink += xnor_popcount();
        t1 = now();
        if (t1 - t0 < best_pop)
            best_pop = t1 - t0;
        sum_pop += t1 - t0;
        t0 = now();
        sink += int_macs();
        t1 = now();
        if (t1 - t0 < best_mac)
            best_mac = t1 - t0;
    }
    printf("xnor_popcount_words=%d seconds=%.9g\n", PIXELS * WORDS, best_pop);
    printf("xnor_popcount_mean_words=%d seconds=%.9g\n", PIXELS * WORDS, sum_pop / 50);
    printf("int32_macs=%d seconds=%.9g\n", MAC_STEPS, best_mac);
    printf("sink=%lld\n", (long long)sink);
    return 0;
}
"""


def measure_bounds(tmp: Path, cflags: str) -> dict[str, float]:
    source = tmp / "bound.c"
    source.write_text(BOUND_SOURCE)
    binary = tmp / "bound"
    subprocess.run(["gcc", "-std=c99", *cflags.split(), "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, *rest = line.split()
        if rest:
            count, seconds = (float(part.split("=")[1]) for part in [key] + rest)
            values[key.split("=")[0]] = count / seconds
    return {"popcount_words_per_s": values["xnor_popcount_words"], "int32_macs_per_s": values["int32_macs"],
            "xnor_popcount_589824_us": 589824 / values["xnor_popcount_words"] * 1e6,
            "xnor_popcount_589824_mean_us": 589824 / values["xnor_popcount_mean_words"] * 1e6}


def random_model(raw: dict[str, Any], path: Path, seed: int = 0) -> Path:
    """Random weights and BN statistics (timing does not depend on their values)."""
    rng = np.random.default_rng(seed)
    spec = parse_spec(raw)
    model = DDNN(spec)
    for block in [*model.device_layers, model.local_exit]:
        size = block.bn.gamma.array.shape[0]
        block.bn.avg_mean[...] = rng.normal(0, 1, size).astype(np.float32)
        block.bn.avg_var[...] = rng.uniform(0.5, 2, size).astype(np.float32)
        block.bn.gamma.array[...] = rng.normal(0, 1, size).astype(np.float32)
    save_model(path, model, spec)
    return path


def device_work(program: DeviceProgram) -> dict[str, int]:
    """Multiply-accumulates of FConv and popcount words of the binary layers and the exit."""
    work = stage_work(program)
    return {"fconv_macs": sum(macs for macs, _ in work), "popcount_words": sum(words for _, words in work)}


def chainer_latency_us(model_path: Path, images: np.ndarray) -> float:
    """Chainer test-mode forward of the device layers + local exit logits, one sample at a time."""
    loaded = load_model(model_path)
    model, scale = loaded.model, loaded.spec.input.scale
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        for image in images[:5]:  # warm-up
            model.local_exit(model.device_forward(input_to_float(image[None], scale)))
        start = time.perf_counter()
        for image in images:
            logits = model.local_exit(model.device_forward(input_to_float(image[None], scale)))
            logits.array.argmax()
        elapsed = time.perf_counter() - start
    return elapsed / len(images) * 1e6


def c_runner(model_path: Path, images: np.ndarray, tmp: Path, cflags: str) -> tuple[Path, Path]:
    return build_runner(model_path, model_path.stem, images, tmp, cflags)


def c_bench(binary: Path, samples: Path, repeat: int) -> dict[str, float]:
    return runner_bench(binary, samples, repeat)


def min_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-stage minimum over rounds (the least disturbed run of each stage)."""
    return {key: min(run[key] for run in runs) for key in runs[0]}


def load_images(name: str, count: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    try:
        return datasets.load(name, "test").images[:count], f"{name} test"
    except DatasetError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(count, *shape), dtype=np.uint8), "random uint8 (dataset not found)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chainer-samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="C and Chainer runs taken in turn; minimum kept")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "bench_c.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("ddnn_gen").setLevel(logging.WARNING)
    chainer.config.use_ideep = "never"

    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cflags": NATIVE,
                               "cpu_count": os.cpu_count(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_c_") as tmp_name:
        tmp = Path(tmp_name)
        bounds = measure_bounds(tmp, NATIVE)
        results["bounds"] = bounds
        log.info("measured peaks (%s): XNOR+popcount %.3g words/s, int32 MAC %.3g /s",
                 NATIVE, bounds["popcount_words_per_s"], bounds["int32_macs_per_s"])

        mnist_model = REPO / "models" / "mnist_16.npz"
        cifar_model = random_model(zoo.cifar10_deep(64), tmp / "cifar10_deep_64.npz")
        cases = [("mnist_16", mnist_model, "mnist", (1, 28, 28)), ("cifar10_deep_64", cifar_model, "cifar10",
                                                                      (3, 32, 32))]
        log.info("\n== device part per sample: generated C vs Chainer (batch 1) ==")
        log.info("%-18s %12s %12s %9s %12s %9s  data", "model", "C us", "Chainer us", "speedup", "bound us",
                 "C/bound")
        for name, path, dataset, shape in cases:
            images, source = load_images(dataset, max(args.samples, args.chainer_samples), shape)
            program = load_program(path)
            binary, samples = c_runner(path, images[:args.samples], tmp, NATIVE)
            c_runs, chainer_runs = [], []
            for _ in range(args.rounds):
                c_runs.append(c_bench(binary, samples, args.repeat))
                chainer_runs.append(chainer_latency_us(path, images[:args.chainer_samples]))
            c, chainer_us = min_stages(c_runs), min(chainer_runs)
            work = device_work(program)
            bound_us = (work["fconv_macs"] / bounds["int32_macs_per_s"]
                        + work["popcount_words"] / bounds["popcount_words_per_s"]) * 1e6
            speedup = chainer_us / c["total"]
            results["models"][name] = {"c_us": c["total"], "c_stage_us": c, "chainer_us": chainer_us,
                                       "c_us_rounds": [run["total"] for run in c_runs],
                                       "chainer_us_rounds": chainer_runs,
                                       "speedup": speedup, "bound_us": bound_us, "c_over_bound": c["total"] / bound_us,
                                       "work": work, "data": source, "goal_speedup": 50, "meets_goal": speedup >= 50}
            log.info("%-18s %12.2f %12.1f %8.0fx %12.2f %8.2fx  %s", name, c["total"], chainer_us, speedup,
                     bound_us, c["total"] / bound_us, source)
            log.info("   C per stage (us): %s", ", ".join(f"{k} {v:.2f}" for k, v in c.items()
                                                        if k not in ("total", "stages_total")))

        log.info("\n== one BConv 64->64, 32x32, 3x3 pad 1 (589 824 XNOR-popcount words) ==")
        raw = zoo.cifar10_deep(64)
        raw["name"] = "bconv_layer_bench"
        raw["tiers"][0]["layers"] = [
            {"name": "conv1", "type": "fconv", "out_channels": 64, "ksize": 3, "stride": 1, "pad": 1},
            {"name": "conv2", "type": "bconv", "out_channels": 64, "ksize": 3, "stride": 1, "pad": 1},
        ]
        layer_model = random_model(raw, tmp / "bconv_layer.npz")
        images, _ = load_images("cifar10", args.samples, (3, 32, 32))
        rows, bound_rounds = {}, []
        for label, cflags in (("-O3 -march=native", NATIVE), ("-O3 (generic x86-64, no popcnt)", "-O3")):
            binary, samples = c_runner(layer_model, images[:max(50, args.samples // 5)], tmp, cflags)
            runs = []
            for _ in range(args.rounds if cflags == NATIVE else 1):
                runs.append(c_bench(binary, samples, args.repeat)["conv2"])
                if cflags == NATIVE:  # the bound loop in turn with the layer, same contention
                    bound_rounds.append(measure_bounds(tmp, NATIVE))
            rows[label] = min(runs)
        # The runner reports a mean over samples, so the layer is compared with the bound loop's mean
        # over its 50 runs (each round's pair taken in turn); the best-of-50 ratio is kept too.
        bound = min(b["xnor_popcount_589824_mean_us"] for b in bound_rounds)
        bound_best = min(b["xnor_popcount_589824_us"] for b in bound_rounds)
        bconv_native = rows["-O3 -march=native"]
        results["bconv_layer"] = {"c_us": rows, "bound_us": bound, "bound_best_of_50_us": bound_best,
                                  "ratio_vs_best_of_50": bconv_native / bound_best, "bound_rounds": bound_rounds,
                                  "ratio": bconv_native / bound, "goal_ratio": 2.0,
                                  "meets_goal": bconv_native / bound <= 2.0}
        log.info("bare XNOR+popcount loop: %.1f us mean of 50 runs (best run %.1f us)", bound, bound_best)
        for label, value in rows.items():
            log.info("generated BConv %-32s %8.1f us  = %.2fx the bound", label, value, value / bound)

        log.info("\n== goals (issue 3) ==")
        for name, row in results["models"].items():
            log.info("%-18s C %.0fx faster than Chainer (goal >= 50x: %s); %.2fx its own bound", name, row["speedup"],
                     "met" if row["meets_goal"] else "NOT met", row["c_over_bound"])
        log.info("%-18s %.2fx the XNOR-popcount bound (goal <= 2x: %s)", "BConv 64->64", bconv_native / bound,
                 "met" if bconv_native / bound <= 2.0 else "NOT met")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    log.info("\nwrote %s", args.out)


if __name__ == "__main__":
    main()
