"""Big-Little vs the alternatives, measured end to end in one run on one machine: the generated C device program
(ddnn_device_net, -O2, no sanitizers), a private Mosquitto and a real ddnn-server, on the first N MNIST test images.

For each Big-Little model: its own routing at its threshold (the little net answers priority classes, the rest
goes to the big net as raw input), the same model Server-only (every raw image to the big net), and a DDNN
early-exit model (default models/mnist_16.npz) at the threshold whose routed F1 on the same priority classes
matches the Big-Little model's. Per configuration: mean latency per sample (all samples, and the priority-class
samples alone), request bytes per sample on the wire, share answered on the device, overall accuracy; then the
ratios side by side.

Usage: python bench/bench_biglittle.py [--model models/mnist_bl8_8.npz ...] [--ddnn models/mnist_16.npz]
       [--samples 1000]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as ddnn-server does; must precede numpy

import argparse
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ddnn_gen.bench.system import ServerHandle, _read_rows
from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.device.samples import write_samples
from ddnn_gen.fold import exits
from ddnn_gen.fold.program import fold
from ddnn_gen.model import datasets, evaluate
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire import codec
from ddnn_gen.wire.broker import Broker

log = logging.getLogger("bench_biglittle")
REPO = Path(__file__).resolve().parent.parent


def _run(binary: Path, samples: Path, broker: Broker, device_id: str, extra: list[str]) -> list[dict[str, str]]:
    out = samples.with_name(f"{device_id}.csv")
    cmd = [str(binary), str(samples), "--device-id", device_id, "--broker", broker.address, "--timeout-ms", "20000",
           "-o", str(out), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
    return _read_rows(out)


def _summary(name: str, rows: list[dict[str, str]], labels: np.ndarray, priority: tuple[int, ...],
             raw_bytes: int, split_bytes: int) -> dict[str, Any]:
    source = np.array([row["source"] for row in rows])
    total = np.array([float(row["t_total_us"]) for row in rows])
    final = np.array([int(row["final_class"]) for row in rows])
    offloaded = source != "local"
    in_priority = np.isin(labels, priority)
    # What went up per sample: the header and payload of each offloaded sample's request.
    payload = raw_bytes if split_bytes == 0 else split_bytes
    return {"name": name, "latency_us": float(total.mean()), "priority_latency_us": float(total[in_priority].mean()),
            "bytes": float(offloaded.mean()) * (codec.REQUEST_HEADER_BYTES + payload),
            "local": float((~offloaded).mean()), "priority_local": float((~offloaded[in_priority]).mean()),
            "accuracy": float((final == labels).mean()),
            "f1": float(np.mean([evaluate.f1_score(final, labels, c) for c in priority])),
            "fallbacks": int((source == "fallback").sum() + (source == "error").sum())}


def _build(model: Path, work: Path) -> Path:
    project = work / model.stem
    compile_c(model, project)
    return toolchain.build_project(project, target="net", opt="-O2")


def bench(models: list[Path], ddnn: Path, count: int, data_dir: str | None) -> None:
    data = datasets.load("mnist", "test", data_dir).subset(count)
    with tempfile.TemporaryDirectory(prefix="bench_bl_") as tmp, Broker() as broker:
        work = Path(tmp)
        samples = work / "mnist.ddns"
        write_samples(samples, data.images, data.labels)
        for model in models:
            loaded = load_model(model)
            priority = loaded.spec.priority_classes
            raw_bytes = int(np.prod(loaded.spec.input.shape))
            bl_outputs = exits.compute_outputs(loaded, data)
            target = float(np.mean([row.f1_routed for row in
                                    evaluate.priority_report(bl_outputs, loaded.spec.thresholds, priority).rows]))
            ddnn_loaded = load_model(ddnn)
            matched = evaluate.match_routed_f1(exits.compute_outputs(ddnn_loaded, data), priority, target)
            server = ServerHandle(broker.connection(), model, workers=1).start()
            try:
                binary = _build(model, work)
                runs = [_summary(f"Big-Little t={loaded.spec.threshold:.4f}", _run(binary, samples, broker,
                                 f"{model.stem}-bl", []), data.labels, priority, raw_bytes, 0),
                        _summary("Server-only (big net)", _run(binary, samples, broker, f"{model.stem}-so",
                                 ["--server-only"]), data.labels, priority, raw_bytes, 0)]
            finally:
                server.stop()
            server = ServerHandle(broker.connection(), ddnn, workers=1).start()
            try:
                binary = _build(ddnn, work)
                rows = _run(binary, samples, broker, f"{model.stem}-ddnn", ["--threshold", repr(matched.threshold)])
                split = 8 * fold(ddnn_loaded).split_words
                runs.append(_summary(f"DDNN {ddnn.stem} t={matched.threshold:.4f}", rows, data.labels, priority,
                                     raw_bytes, split))
            finally:
                server.stop()
            _print(model.stem, priority, target, runs)


def _print(name: str, priority: tuple[int, ...], target: float, runs: list[dict[str, Any]]) -> None:
    base = runs[0]
    print(f"\n{name}: priority classes {list(priority)}, routed F1 to match {100 * target:.2f}%")
    header = (f"{'configuration':>28} {'F1':>7} {'overall':>7} {'local':>7} {'prio local':>10} {'us/sample':>9} "
              f"{'prio us':>8} {'B/sample':>8} {'us ratio':>8} {'B ratio':>7}")
    print(header)
    print("-" * len(header))
    for run in runs:
        print(f"{run['name']:>28} {100 * run['f1']:6.2f}% {100 * run['accuracy']:6.2f}% {100 * run['local']:6.2f}% "
              f"{100 * run['priority_local']:9.2f}% {run['latency_us']:9.1f} {run['priority_latency_us']:8.1f} "
              f"{run['bytes']:8.1f} {run['latency_us'] / base['latency_us']:8.2f} "
              f"{run['bytes'] / base['bytes'] if base['bytes'] else float('nan'):7.2f}"
              + (f"  ({run['fallbacks']} fallbacks/errors)" if run["fallbacks"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", type=Path, help="Big-Little model (repeatable)")
    parser.add_argument("--ddnn", type=Path, default=REPO / "models" / "mnist_16.npz")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    models = args.model or [REPO / "models" / "mnist_bl8_8.npz", REPO / "models" / "mnist_bl3_8_8.npz"]
    bench(models, args.ddnn, args.samples, args.data_dir)


if __name__ == "__main__":
    main()
