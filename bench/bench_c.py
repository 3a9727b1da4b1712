"""Generated C device part vs Chainer and Larq Compute Engine, and BConv vs the SIMD XNOR-popcount limit.

Measured side by side in one run on this machine (prints ratios, writes bench/out/bench_c.json):

1. The limit of each popcount path this host runs (bench/limits.c, compiled with that path's flags):
   the fastest XNOR-popcount loop over L1-resident words the build has (AVX-512 VPOPCNTQ; AVX2 VPSHUFB
   and Harley-Seal; NEON CNT; scalar POPCNT) and the scalar POPCNT loop, over 589 824 words.
2. One BConv 64->64, 32x32, 3x3 pad 1 layer (the runner's per-layer time in an FConv+BConv model with
   random weights) per path: the native build (-march=native: AVX-512 VPOPCNTDQ here), AVX2
   (-mno-avx512f), the scalar path (-DDDNN_FORCE_SCALAR) and generic x86-64 (no popcnt instruction).
   Printed: BConv / SIMD limit (goal <= 1.25) and BConv / scalar popcount loop.
3. Per-sample latency of the shipped models' device parts (models/mnist_16.npz, models/cifar10_deep_64.npz)
   per path, against Chainer's test-mode forward of the same device part and local exit at batch 1
   (goal >= 50x), against Larq Compute Engine on the same shapes (below) and against the part's bound:
   FConv MACs at the fastest MAC loop's rate (bench/limits.c: int32, AVX2 VPMADDUBSW, AVX-VNNI or AVX-512
   VNNI VPDPBUSD) plus popcount words at the SIMD limit's rate; FConv alone against its MAC limit.
4. Larq Compute Engine 0.16, one thread, when its venv exists (bench/lce_peer.py, bench/requirements-lce.txt;
   ``$DDNN_LCE_PYTHON`` or ~/.cache/ddnngen/lce-venv/bin/python): the two device parts and the BConv layer
   (the difference of a 3- and a 2-layer BConv stack: a middle layer reads and writes packed bits as
   ddnngen's does). Its rounds run in turn with the C rounds. Without the venv the bench says so and
   prints the rest.

The machine may be shared (other processes busy): every figure is the minimum over --rounds runs taken
in turn (C, its limit loops, Chainer, LCE), so all sides see the same contention, and only ratios
measured in the same run are compared. The runner reports a mean over its samples, so BConv is divided
by the limit loop's mean over its 50 runs; the ratio to the loop's best run is printed too.

Usage: python bench/bench_c.py [--samples 500] [--repeat 5] [--chainer-samples 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import chainer
import numpy as np

from ddnn_gen.bench.c_timing import build_runner
from ddnn_gen.codegen import toolchain
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
LIMITS_SOURCE = REPO / "bench" / "limits.c"
LCE_PEER = REPO / "bench" / "lce_peer.py"
LCE_VENV_PYTHON = Path.home() / ".cache" / "ddnngen" / "lce-venv" / "bin" / "python"
NATIVE = "-O3 -march=native"
BCONV_WORDS = 589824  # 32 * 32 pixels * 9 taps * 64 output channels * 1 input word
FCONV_MACS = 1769472  # bench/limits.c's MAC loops: 32 * 32 pixels * 27 taps * 64 output channels
# (label, CFLAGS after the Makefile's -march=native, predefined macro the variant needs on the host).
# The generic build's later -march wins over the Makefile's.
VARIANTS = (
    ("native", NATIVE, None),
    ("avx2", NATIVE + " -mno-avx512f", "__AVX512F__"),
    ("scalar", NATIVE + " -DDDNN_FORCE_SCALAR", None),
    ("generic x86-64", "-O3 -march=x86-64 -mtune=generic", "__x86_64__"),
)


def native_macros() -> set[str]:
    out = subprocess.run(["gcc", "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def variants() -> list[tuple[str, str]]:
    """The builds this host runs: AVX2 only where -march=native is AVX-512 (else native is AVX2 already)."""
    macros = native_macros()
    return [(label, cflags) for label, cflags, needs in VARIANTS if needs is None or needs in macros]


def limit_cflags(cflags: str) -> list[str]:
    """The generated Makefile puts -march=native before CFLAGS on a host build; the limit loops get the same."""
    return ["-march=native", *cflags.split()]


def build_limits(tmp: Path, label: str, cflags: str) -> Path:
    binary = tmp / f"limits_{re.sub(r'[^a-z0-9]+', '_', label)}"
    subprocess.run(["gcc", "-std=c99", *limit_cflags(cflags), "-o", str(binary), str(LIMITS_SOURCE)], check=True)
    return binary


def run_limits(binary: Path) -> dict[str, Any]:
    """us of every XNOR-popcount loop (589 824 words) and MAC loop (1 769 472 MACs): best and mean of 50 runs."""
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = {"loops": {}, "macs": {}}
    for line in out.splitlines():
        parts = line.split()
        fields = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
        if parts[0] in ("loop", "macs") and "best_s" in fields:
            result["loops" if parts[0] == "loop" else "macs"][parts[1]] = {
                "best_us": float(fields["best_s"]) * 1e6, "mean_us": float(fields["mean_s"]) * 1e6}
    return result


def min_limits(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per loop, the minimum over rounds of its best and of its mean; a limit is the fastest loop of its kind."""
    def fastest(kind: str) -> tuple[dict[str, dict[str, float]], str]:
        loops = {name: {key: min(run[kind][name][key] for run in runs) for key in ("best_us", "mean_us")}
                 for name in runs[0][kind]}
        return loops, min(loops, key=lambda name: loops[name]["best_us"])

    loops, limit = fastest("loops")
    macs, mac_limit = fastest("macs")
    return {"loops": loops, "limit_loop": limit, "limit_best_us": loops[limit]["best_us"],
            "limit_mean_us": loops[limit]["mean_us"], "scalar_best_us": loops["scalar"]["best_us"],
            "scalar_mean_us": loops["scalar"]["mean_us"], "macs": macs, "mac_loop": mac_limit,
            "macs_per_s": FCONV_MACS / (macs[mac_limit]["best_us"] * 1e-6)}


def runner_simd(binary: Path, samples: Path) -> str:
    """The popcount path a runner was built with (its --bench report says)."""
    stderr = toolchain.run_runner(binary, samples, bench=True).stderr
    match = re.search(r"\bsimd=(\S+)", stderr)
    return match.group(1) if match else "unknown"


def runner_times(binary: Path, samples: Path, repeat: int) -> dict[str, dict[str, float]]:
    """The runner's per-sample times (us) of every stage and ``total``: ``mean`` over the samples and
    ``min``, the least disturbed sample (every sample does the same work)."""
    out = toolchain.run_runner(binary, samples, bench=True, repeat=repeat)
    least = {}
    for line in out.stderr.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "stage_min":
            least[parts[1]] = float(parts[2].split("=", 1)[1])
        elif len(parts) == 2 and parts[0] == "total_min":
            least["total"] = float(parts[1].split("=", 1)[1])
    return {"mean": out.bench, "min": least}


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


def chainer_latency_us(model_path: Path, images: np.ndarray) -> dict[str, float]:
    """Chainer test-mode forward of the device layers + local exit logits, one sample at a time: the least
    and the mean time of a sample (us)."""
    loaded = load_model(model_path)
    model, scale = loaded.model, loaded.spec.input.scale
    took = []
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        for image in images[:5]:  # warm-up
            model.local_exit(model.device_forward(input_to_float(image[None], scale)))
        for image in images:
            start = time.perf_counter()
            logits = model.local_exit(model.device_forward(input_to_float(image[None], scale)))
            logits.array.argmax()
            took.append(time.perf_counter() - start)
    return {"min": min(took) * 1e6, "mean": sum(took) / len(took) * 1e6}


def min_over(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the minimum over rounds (the least disturbed round)."""
    return {key: min(run[key] for run in runs) for key in runs[0]}


def load_images(name: str, count: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    try:
        return datasets.load(name, "test").images[:count], f"{name} test"
    except DatasetError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(count, *shape), dtype=np.uint8), "random uint8 (dataset not found)"




def lce_python() -> Path | None:
    path = Path(os.environ.get("DDNN_LCE_PYTHON", LCE_VENV_PYTHON))
    return path if path.exists() else None


def lce_case(name: str, model_path: Path, images: Path) -> dict[str, Any]:
    """A device part's shapes as bench/lce_peer.py reads them."""
    spec = load_model(model_path).spec
    layers = [{"name": layer.name, "type": layer.type, "out_channels": layer.out_channels, "ksize": layer.ksize,
               "stride": layer.stride, "pad": layer.pad,
               "pool": [layer.pool.ksize, layer.pool.stride, layer.pool.pad] if layer.pool else None}
              for layer in spec.device.layers]
    return {"name": name, "input": [spec.input.height, spec.input.width, spec.input.channels], "layers": layers,
            "n_classes": len(spec.classes), "images": str(images), "scale": spec.input.scale}


def bconv_stack(name: str, depth: int) -> dict[str, Any]:
    layer = {"type": "bconv", "out_channels": 64, "ksize": 3, "stride": 1, "pad": 1, "pool": None}
    return {"name": name, "input": [32, 32, 64], "layers": [dict(layer, name=f"b{i}") for i in range(depth)]}


class LcePeer:
    """bench/lce_peer.py in LCE's venv: converts the cases once, then times one round per call."""

    def __init__(self, python: Path, cases: list[dict[str, Any]], calls: dict[str, int], tmp: Path) -> None:
        spec = tmp / "lce_cases.json"
        spec.write_text(json.dumps({"cases": cases, "calls": calls}))
        self.log = tmp / "lce_peer.log"
        self.proc = subprocess.Popen([str(python), str(LCE_PEER), str(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            tail = self.log.read_text()[-2000:]
            raise RuntimeError(f"bench/lce_peer.py stopped (exit {self.proc.poll()}):\n{tail}")
        return json.loads(line)

    def round(self, index: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"round {index}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ratio_text(value: float, goal: float) -> str:
    return f"{value:.2f} ({'met' if value <= goal else 'NOT met'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chainer-samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="all sides' runs taken in turn; minimum kept")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "bench_c.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("ddnn_gen").setLevel(logging.WARNING)
    chainer.config.use_ideep = "never"

    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                               "rounds": args.rounds, "paths": {}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_c_") as tmp_name:
        tmp = Path(tmp_name)
        raw = zoo.cifar10_deep(64)
        raw["name"] = "bconv_layer_bench"
        raw["tiers"][0]["layers"] = [
            {"name": "conv1", "type": "fconv", "out_channels": 64, "ksize": 3, "stride": 1, "pad": 1},
            {"name": "conv2", "type": "bconv", "out_channels": 64, "ksize": 3, "stride": 1, "pad": 1},
        ]
        layer_model = random_model(raw, tmp / "bconv_layer.npz")
        cases = {"bconv_layer": (layer_model, "cifar10", (3, 32, 32), max(50, args.samples // 5)),
                 "mnist_16": (REPO / "models" / "mnist_16.npz", "mnist", (1, 28, 28), args.samples),
                 "cifar10_deep_64": (REPO / "models" / "cifar10_deep_64.npz", "cifar10", (3, 32, 32), args.samples)}
        images = {name: load_images(dataset, max(count, args.chainer_samples), shape)
                  for name, (_, dataset, shape, count) in cases.items()}

        builds: dict[str, dict[str, Any]] = {}
        for label, cflags in variants():
            build: dict[str, Any] = {"cflags": cflags, "limits": build_limits(tmp, label, cflags)}
            for name, (path, _, _, count) in cases.items():
                build[name] = build_runner(path, name, images[name][0][:count], tmp, cflags)
            build["simd"] = runner_simd(*build["bconv_layer"])
            builds[label] = build
            log.info("built %-15s (CFLAGS %s): popcount path %s", label, cflags, build["simd"])

        peer = None
        python = lce_python()
        if python is None:
            log.info("Larq Compute Engine: no interpreter at %s ($DDNN_LCE_PYTHON, else the default venv): LCE "
                     "columns left out. To add them: python3 -m venv ~/.cache/ddnngen/lce-venv && "
                     "~/.cache/ddnngen/lce-venv/bin/pip install -r bench/requirements-lce.txt",
                     os.environ.get("DDNN_LCE_PYTHON", LCE_VENV_PYTHON))
        else:
            lce_cases = [bconv_stack("bconv2", 2), bconv_stack("bconv3", 3)]
            for name in ("mnist_16", "cifar10_deep_64"):
                npy = tmp / f"{name}_images.npy"
                np.save(npy, images[name][0][:1])
                case = lce_case(name, cases[name][0], npy)
                lce_cases += [case, {"name": f"call_{name}", "input": case["input"], "layers": []}]
            calls = {"bconv2": 50, "bconv3": 50, "mnist_16": 400, "cifar10_deep_64": 400, "call_mnist_16": 400,
                     "call_cifar10_deep_64": 400}
            start = time.perf_counter()
            try:
                peer = LcePeer(python, lce_cases, calls, tmp)
                log.info("Larq Compute Engine %s (TensorFlow %s, %s) ready in %.0f s; operators: %s",
                         peer.info["lce"], peer.info["tensorflow"], peer.info["options"],
                         time.perf_counter() - start,
                         "; ".join(f"{k}: {' '.join(v)}" for k, v in peer.info["ops"].items()))
            except (OSError, RuntimeError) as error:
                log.info("Larq Compute Engine peer failed, LCE columns left out: %s", error)

        limit_runs: dict[str, list[dict[str, Any]]] = {label: [] for label in builds}
        c_runs: dict[str, dict[str, list[dict[str, dict[str, float]]]]] = {
            label: {name: [] for name in cases} for label in builds}
        chainer_runs: dict[str, list[dict[str, float]]] = {"mnist_16": [], "cifar10_deep_64": []}
        lce_runs: list[dict[str, Any]] = []
        for index in range(args.rounds):
            for label, build in builds.items():
                limit_runs[label].append(run_limits(build["limits"]))
                for name in cases:
                    c_runs[label][name].append(runner_times(*build[name], args.repeat))
            for name in chainer_runs:
                chainer_runs[name].append(chainer_latency_us(cases[name][0], images[name][0][:args.chainer_samples]))
            if peer is not None:
                lce_runs.append(peer.round(index))
        if peer is not None:
            peer.close()
    lce = min_over([run["us"] for run in lce_runs]) if lce_runs else None
    if lce is not None and peer is not None:
        lce["bconv_layer"] = lce["bconv3"] - lce["bconv2"]
        results["lce"] = {"version": peer.info["lce"], "tensorflow": peer.info["tensorflow"],
                          "options": peer.info["options"], "ops": peer.info["ops"], "min_us": lce, "rounds": lce_runs}

    log.info("\n== SIMD XNOR-popcount limit per build (bench/limits.c, 589 824 words in L1; us, best of 50 runs / "
             "mean, min over %d rounds) ==", args.rounds)
    log.info("%-15s %-17s %-17s %18s %18s", "build", "runtime path", "fastest loop", "limit us", "scalar loop us")
    for label, build in builds.items():
        limits = min_limits(limit_runs[label])
        results["paths"][label] = {"cflags": build["cflags"], "simd": build["simd"], "limits": limits,
                                   "limit_rounds": limit_runs[label]}
        log.info("%-15s %-17s %-17s %8.1f / %7.1f %8.1f / %7.1f", label, build["simd"], limits["limit_loop"],
                 limits["limit_best_us"], limits["limit_mean_us"], limits["scalar_best_us"], limits["scalar_mean_us"])

    log.info("\n== one BConv 64->64, 32x32, 3x3 pad 1 (%d XNOR-popcount words), per build; us, least sample "
             "(mean) ==", BCONV_WORDS)
    log.info("%-15s %-17s %16s %16s %14s %12s%s", "build", "runtime path", "BConv us", "/ SIMD limit",
             "mean / mean", "/ scalar", "     LCE us  LCE/BConv" if lce else "")
    for label, path in results["paths"].items():
        runs = c_runs[label]["bconv_layer"]
        least, mean = min(run["min"]["conv2"] for run in runs), min(run["mean"]["conv2"] for run in runs)
        limits = path["limits"]
        row = {"c_us": least, "c_mean_us": mean, "c_us_rounds": [run["min"]["conv2"] for run in runs],
               "over_limit": least / limits["limit_best_us"], "mean_over_limit_mean": mean / limits["limit_mean_us"],
               "over_scalar_loop": least / limits["scalar_best_us"], "goal_over_limit": 1.25}
        row["meets_goal"] = row["over_limit"] <= 1.25
        extra = ""
        if lce:
            row["lce_us"], row["lce_over_c"] = lce["bconv_layer"], lce["bconv_layer"] / least
            extra = f" {lce['bconv_layer']:10.1f} {lce['bconv_layer'] / least:9.1f}x"
        path["bconv_layer"] = row
        log.info("%-15s %-17s %7.1f (%6.1f) %16s %14.2f %12.2f%s", label, path["simd"], least, mean,
                 ratio_text(row["over_limit"], 1.25), row["mean_over_limit_mean"], row["over_scalar_loop"], extra)

    log.info("\n== device part per sample (us, least sample; C: the runner's <name>_infer; Chainer and LCE: "
             "batch 1) ==")
    log.info("%-16s %-15s %-17s %8s %10s %8s %9s %8s %9s %8s", "model", "build", "runtime path", "C us",
             "Chainer us", "speedup", "LCE us", "LCE/C", "bound us", "C/bound")
    for name in chainer_runs:
        work = device_work(load_program(cases[name][0]))
        chainer_us = min_over(chainer_runs[name])
        model_row: dict[str, Any] = {"work": work, "data": images[name][1], "chainer_us": chainer_us["min"],
                                     "chainer_mean_us": chainer_us["mean"], "chainer_rounds": chainer_runs[name],
                                     "paths": {}}
        if lce:
            # The interpreter's own per-call cost (a 1-op model on the same input) is taken off, in LCE's favour.
            model_row["lce_us_raw"], model_row["lce_call_us"] = lce[name], lce[f"call_{name}"]
            model_row["lce_us"] = lce[name] - lce[f"call_{name}"]
        for label, path in results["paths"].items():
            runs = c_runs[label][name]
            c, c_mean = min_over([run["min"] for run in runs]), min_over([run["mean"] for run in runs])
            limits = path["limits"]
            fconv_limit_us = work["fconv_macs"] / limits["macs_per_s"] * 1e6
            bound_us = fconv_limit_us + work["popcount_words"] / (BCONV_WORDS / (limits["limit_best_us"] * 1e-6)) * 1e6
            row = {"c_us": c["total"], "c_stage_us": c, "c_mean_us": c_mean["total"], "c_stage_mean_us": c_mean,
                   "speedup_vs_chainer": chainer_us["min"] / c["total"], "bound_us": bound_us,
                   "c_over_bound": c["total"] / bound_us, "fconv_us": c["conv1"], "fconv_limit_us": fconv_limit_us,
                   "fconv_over_limit": c["conv1"] / fconv_limit_us, "mac_loop": limits["mac_loop"]}
            lce_text = f"{'':>9} {'':>8}"
            if lce:
                row["lce_over_c"] = model_row["lce_us"] / c["total"]
                lce_text = f"{model_row['lce_us']:9.1f} {row['lce_over_c']:7.1f}x"
            model_row["paths"][label] = row
            log.info("%-16s %-15s %-17s %8.2f %10.1f %7.0fx %s %9.2f %7.2fx", name, label, path["simd"], c["total"],
                     chainer_us["min"], row["speedup_vs_chainer"], lce_text, bound_us, row["c_over_bound"])
        native = model_row["paths"]["native"]
        log.info("   native C per stage (us, least sample): %s; FConv %.2fx its MAC limit (%s loop, %.2f us)",
                 ", ".join(f"{k} {v:.2f}" for k, v in native["c_stage_us"].items() if k != "total"),
                 native["fconv_over_limit"], native["mac_loop"], native["fconv_limit_us"])
        model_row["goal_speedup"], model_row["meets_goal"] = 50, native["speedup_vs_chainer"] >= 50
        results["models"][name] = model_row

    log.info("\n== goals (issues 3 and 18) ==")
    for name, row in results["models"].items():
        native = row["paths"]["native"]
        log.info("%-16s C %.0fx faster than Chainer (goal >= 50x: %s)%s", name, native["speedup_vs_chainer"],
                 "met" if row["meets_goal"] else "NOT met",
                 f"; LCE takes {native['lce_over_c']:.1f}x C's time" if lce else "")
    for label, path in results["paths"].items():
        row = path["bconv_layer"]
        log.info("BConv 64->64 %-15s (%s) %.2fx the SIMD limit (goal <= 1.25: %s), %.2fx the scalar loop", label,
                 path["simd"], row["over_limit"], "met" if row["meets_goal"] else "NOT met", row["over_scalar_loop"])
    if not lce:
        log.info("Larq Compute Engine: not measured (no venv)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    log.info("\nwrote %s", args.out)


if __name__ == "__main__":
    main()
