"""The whole path on real test images: the shipped model compiled to C, the networked device program,
a private Mosquitto, ddnn-server (and, for a model with an edge tier, an edge ddnn-server between them);
per-exit accuracy and timings per tier and per hop as measured by the device program."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddnn_gen.bench.device_csv import HopTimes, read_rows
from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.device.samples import write_samples
from ddnn_gen.errors import DdnnError
from ddnn_gen.fold import exits
from ddnn_gen.fold.program import fold
from ddnn_gen.model import datasets, evaluate
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire import codec
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.connection import BrokerConnection

log = logging.getLogger(__name__)

# The repository's shipped model: ddnn_gen/bench/demo.py -> the repository root.
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "fmnist_32.npz"


@dataclass
class DemoReport:
    samples: int
    threshold: float
    local_accuracy: float  # correct local exits / N (as evaluate.py defines it)
    server_accuracy: float  # accuracy on the samples the server answered
    overall_accuracy: float
    ideal_accuracy: float
    expected_overall: float  # what the Python evaluation predicts at this threshold
    rates: dict[str, float]  # local / server / fallback / error
    t_device_us: float
    t_server_us: float
    t_comm_us: float
    t_total_us: float
    thresholds: tuple[float, ...] = ()
    answered_by: dict[str, float] | None = None  # tier name -> share of samples its exit answered
    t_edge_us: float = math.nan  # the edge's compute per sample it received
    t_cloud_us: float = math.nan  # the cloud's compute per sample it received through the edge
    t_comm_hops_us: tuple[float, ...] = ()  # device <-> first server, then edge <-> cloud
    hop_bytes: tuple[float, ...] = ()  # request payload + header bytes per sample on each hop

    def table(self) -> str:
        rates = ", ".join(f"{name} {100 * rate:.1f}%" for name, rate in self.rates.items())
        if self.answered_by is not None and len(self.answered_by) > 2:
            shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in self.answered_by.items())
            hops = ["device-edge", "edge-cloud"]
            return "\n".join([
                f"samples {self.samples}, thresholds {'/'.join(f'{t:.4g}' for t in self.thresholds)}",
                f"accuracy: Overall {100 * self.overall_accuracy:.2f}%  Ideal {100 * self.ideal_accuracy:.2f}%  "
                f"(Python evaluation predicts Overall {100 * self.expected_overall:.2f}%)",
                f"answered by: {shares}; device outcomes: {rates}",
                f"mean per sample (us): T_Device {self.t_device_us:.1f}  T_Total {self.t_total_us:.1f}",
                f"mean per sample reaching it (us): T_Edge {self.t_edge_us:.1f}  T_Cloud {self.t_cloud_us:.1f}",
                "mean communication per sample crossing the hop (us): " + "  ".join(
                    f"T_Comm({hop}) {value:.1f}" for hop, value in zip(hops, self.t_comm_hops_us)),
                "bytes per sample on each hop (requests, all samples): " + "  ".join(
                    f"{hop} {value:.1f}" for hop, value in zip(hops, self.hop_bytes)),
            ])
        return "\n".join([
            f"samples {self.samples}, threshold {self.threshold:.4g}",
            f"accuracy: Local {100 * self.local_accuracy:.2f}%  Server {100 * self.server_accuracy:.2f}%  "
            f"Overall {100 * self.overall_accuracy:.2f}%  Ideal {100 * self.ideal_accuracy:.2f}%  "
            f"(Python evaluation predicts Overall {100 * self.expected_overall:.2f}%)",
            f"exits: {rates}",
            f"mean per sample (us): T_Device {self.t_device_us:.1f}  T_Total {self.t_total_us:.1f}",
            f"mean per offloaded sample (us): T_Server {self.t_server_us:.1f}  T_Comm {self.t_comm_us:.1f} "
            "(T_Comm = round trip - server compute)",
        ])


DEMO_DEVICE, DEMO_SERVER = "demo-device", "demo-server"


def start_server(broker: BrokerConnection, model: Path, workers: int, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", "from ddnn_server.cli import main; main()",
                                *broker.runner_args(), "--models", str(model), "--workers", str(workers), *extra],
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "ddnn-server: ready" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process
    process.wait()
    raise DdnnError("ddnn-server did not start:\n" + "".join(lines))


def run_demo(model_path: str | Path | None = None, count: int = 1000, threshold: float | None = None,
             workers: int = 2, timeout_ms: int = 2000, broker: BrokerConnection | None = None, secure: bool = False,
             work_dir: str | Path | None = None) -> DemoReport:
    """The demo on ``broker`` (device and server share its credentials), else on a private Mosquitto: plain,
    or with ``secure`` TLS and one identity per role (device ``demo-device``, server ``demo-server``)."""
    model = Path(model_path) if model_path else DEFAULT_MODEL
    loaded = load_model(model)
    program = fold(loaded, threshold)
    threshold = program.threshold
    spec = loaded.spec
    hierarchy = len(spec.tiers) >= 3 and spec.tiers[1].binary
    if hierarchy and secure:
        raise DdnnError("the demo runs an edge only on a plain broker for now (an edge's two connections need "
                        "identities of their own on a secured one; docs/security.md)")
    data = datasets.load(loaded.spec.dataset or "fashion-mnist", "test")
    images, labels = data.images[:count], data.labels[:count]
    with tempfile.TemporaryDirectory(prefix="ddnn-demo-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        project = work / "device"
        compile_c(model, project)
        binary = toolchain.build_project(project, target="net")
        samples = work / "samples.ddns"
        write_samples(samples, images, labels)
        results = work / "results.csv"
        private = None
        if broker is None:
            private = (Broker.secure({DEMO_DEVICE: "device", DEMO_SERVER: "server"}) if secure else Broker()).start()
        server = edge = None
        try:
            server_broker = private.connection(DEMO_SERVER if secure else None) if private else broker
            device_broker = private.connection(DEMO_DEVICE if secure else None) if private else broker
            assert server_broker is not None and device_broker is not None
            server = start_server(server_broker, model, workers)
            if hierarchy:
                edge = start_server(server_broker, model, max(1, workers // 2), "--role", "edge")
            run = subprocess.run([str(binary), str(samples), "--device-id", DEMO_DEVICE, *device_broker.runner_args(),
                                  "--timeout-ms", str(timeout_ms), "--threshold", repr(threshold), "-o",
                                  str(results)], capture_output=True, text=True)
            if run.returncode != 0:
                raise DdnnError(f"the device program failed ({run.returncode}):\n{run.stderr}")
            log.info("%s", run.stderr.strip())
        finally:
            for process in (edge, server):
                if process is not None:
                    process.terminate()
                    process.wait(30)
            if private is not None:
                private.cleanup()
        rows = read_rows(results)
    if len(rows) != len(labels):
        raise DdnnError(f"the device program answered {len(rows)} of {len(labels)} samples")
    final = np.array([int(r["final_class"]) for r in rows])
    sources = np.array([r["source"] for r in rows])
    local = sources == "local"
    remote = ~local
    correct = final == labels
    thresholds = (threshold, *spec.thresholds[1:])
    outputs = exits.compute_outputs(loaded, datasets.Dataset(data.name, data.split, images, labels))
    expected = evaluate.metrics_at(outputs, thresholds)
    served = [r for r in rows if r["source"] == "server"]
    answered = np.array([int(r["answered_by"]) for r in rows])
    hop_bytes = tuple(float(np.mean(answered > hop)) * (size + codec.REQUEST_HEADER_BYTES)
                      for hop, size in enumerate(outputs.hop_bytes))
    times = HopTimes.from_rows(rows)
    return DemoReport(
        samples=len(rows), threshold=threshold,
        local_accuracy=float((local & correct).sum() / len(rows)),
        server_accuracy=float(correct[sources == "server"].mean()) if served else math.nan,
        overall_accuracy=float(correct.mean()),
        ideal_accuracy=expected.ideal_accuracy,
        expected_overall=expected.overall_accuracy,
        rates={name: float((sources == name).mean()) for name in ("local", "server", "fallback", "error")},
        t_device_us=times.t_device_us,
        t_server_us=times.t_first_server_us,
        t_comm_us=times.t_comm_first_us,
        t_total_us=times.t_total_us if remote.any() or local.any() else math.nan,
        thresholds=thresholds,
        answered_by={tier.name: float(np.mean(answered == index)) for index, tier in enumerate(spec.tiers)},
        t_edge_us=times.t_first_server_us if hierarchy else math.nan,
        t_cloud_us=times.t_upstream_server_us,
        t_comm_hops_us=(times.t_comm_first_us, times.t_comm_upstream_us),
        hop_bytes=hop_bytes,
    )
