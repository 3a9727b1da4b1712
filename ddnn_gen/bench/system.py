"""The whole system measured the way the adaptive-DDNN paper reports it (its Tables II-IV).

Everything runs for real on this machine: a private Mosquitto (ddnn_gen.wire.broker), the generated C
networked device program (codegen.c_target + codegen.toolchain, ``ddnn_device_net``), and a ``ddnn-server`` process.

* Time decomposition (Table II) per configuration: Device&Server at several thresholds and Server-only
  (``ddnn_device_net --server-only``: raw input, the server runs the whole model). Per sample, from the
  device program's CSV: T_Device (device compute), T_Server (server compute of the batch, from the reply),
  T_Comm (round trip minus server time: T_Total - T_Device - T_Server), T_Total (as the device sees it).
* Accuracy and exit rates (Table III) of the same runs, next to ddnn_gen.model.evaluate on the same samples;
  bytes on the wire counted by a sniffing MQTT client subscribed to the request and reply topics.
* Server load (Table IV): fresh ddnn-server processes serving W1/W2/W3 (2, 6, 10 models; the extra ones
  are differently seeded random-weight copies of the shipped architectures, written to a temp dir);
  process CPU time / wall and peak RSS (/proc), and the highest offered request rate (open loop, Python
  simulated devices) whose p99 round trip stays under a bound.

Tables, plots and the JSON are written by ddnn_gen.bench.report.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chainer
import numpy as np
import paho.mqtt.client as mqtt

from ddnn_gen.bench import procstat
from ddnn_gen.bench.wire_sizes import request_sizes
from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.device.samples import write_samples
from ddnn_gen.device.simulated import SimDevice, split_header
from ddnn_gen.errors import DatasetError, DdnnError
from ddnn_gen.fold import exits, reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model import datasets, evaluate
from ddnn_gen.model.modelfile import LoadedModel, load_model, save_model
from ddnn_gen.model.network import DDNN, predict
from ddnn_gen.wire import codec, mqtt_client, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.connection import BrokerConnection

log = logging.getLogger(__name__)

SERVER_MAIN = "from ddnn_server.cli import main; main()"
DEFAULT_THRESHOLDS = (0.4, 0.8)
DEFAULT_WORKLOADS = (2, 6, 10)
DEFAULT_RATES = (50, 100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1600, 2400)
# OpenBLAS worker threads spin after each call: at low request rates they, not the forward passes, dominate
# the server's CPU time. The load runs are repeated for W1 with one BLAS thread to show the difference.
# ddnn-server defaults to one BLAS thread (server/__init__.py); W1 is measured once more with one BLAS
# thread per core to show what that default buys.
MULTI_BLAS_ENV = {"OPENBLAS_NUM_THREADS": str(os.cpu_count() or 1), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
REPLY_TOP_K = 3  # ddnn-server's default --top-k
# The device program's C flags: popcnt and vector units of the host (see docs/c_target.md).
DEVICE_CFLAGS = ("-march=native",)


class BenchError(DdnnError):
    """A benchmark step failed (build, process start, run)."""


@dataclass
class BenchConfig:
    models: list[Path]
    out_dir: Path
    samples: int = 1000
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # the model's calibrated threshold is always added
    workloads: tuple[int, ...] = DEFAULT_WORKLOADS
    rates: tuple[float, ...] = DEFAULT_RATES
    step_s: float = 3.0
    multi_blas_w1: bool = True  # also measure W1 with one BLAS thread per core
    p99_bound_ms: float = 50.0
    per_device_hz: float = 1.0
    workers: int = 2
    timeout_ms: int = 5000
    seed: int = 0
    data_dir: str | None = None
    secure: bool = False  # TLS and one identity per device and server (a broker-config deployment)


BENCH_SERVER, BENCH_MONITOR = "bench-server", "bench-monitor"
LOAD_DEVICES = 4  # simulated devices offering the load in the server-load runs


def bench_users(config: BenchConfig, data: list[ModelData]) -> dict[str, str]:
    """Every identity a secure bench run uses: the C device of each configuration run, the load devices, the
    server, and the byte counter (monitor role: it reads requests and replies)."""
    users = {BENCH_SERVER: "server", BENCH_MONITOR: "monitor"}
    for item in data:
        for index in range(len(config.thresholds) + 2):  # the thresholds, the calibrated one, Server-only
            users[f"bench-{item.path.stem}-{index}"] = "device"
    for count in config.workloads:
        users.update({f"load{count}-{d}": "device" for d in range(LOAD_DEVICES)})
    return users


def identity(broker: Broker, user: str) -> BrokerConnection:
    """``user``'s connection on a secure broker; the anonymous one on a plain broker."""
    return broker.connection(user if broker.deployment is not None else None)


# ---- small measurement helpers -----------------------------------------------------------------------

def stats(values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """mean / p50 / p99 (None when there is nothing to summarise)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "p50": None, "p99": None, "n": 0}
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p99": float(np.percentile(array, 99)), "n": int(array.size)}


class ServerHandle:
    """A real ``ddnn-server`` process; CPU time and memory read from /proc."""

    def __init__(self, broker: BrokerConnection, models: Path, workers: int, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.args = [sys.executable, "-c", SERVER_MAIN, *broker.runner_args(), "--models", str(models),
                     "--workers", str(workers)]
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self, timeout_s: float = 120.0) -> ServerHandle:
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        env=self.env)
        ready = threading.Event()

        def read() -> None:
            assert self.process is not None and self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                if "ddnn-server: ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout_s):
            self.stop()
            raise BenchError("ddnn-server did not become ready:\n" + "".join(self.lines[-20:]))
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_s(self) -> float:
        return procstat.cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return procstat.rss_bytes(self.pid)

    def peak_rss_bytes(self) -> int:
        return procstat.peak_rss_bytes(self.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class CpuMeter:
    """Server CPU time / wall time over a ``with`` block."""

    def __init__(self, server: ServerHandle) -> None:
        self.server = server
        self.cpu_s = self.wall_s = 0.0

    def __enter__(self) -> CpuMeter:
        self._cpu0, self._t0 = self.server.cpu_s(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_s = self.server.cpu_s() - self._cpu0
        self.wall_s = time.monotonic() - self._t0

    @property
    def utilisation(self) -> float:
        """1.0 = one core busy the whole time."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else math.nan


def _varint_len(value: int) -> int:
    length = 1
    while value >= 128:
        value >>= 7
        length += 1
    return length


def publish_packet_bytes(topic: str, payload_len: int) -> int:
    """Size of the MQTT 5 QoS 1 PUBLISH packet carrying it (fixed + variable header, an empty property
    section: requests and replies carry no MQTT 5 properties)."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + payload_len
    return 1 + _varint_len(remaining) + remaining


class WireSniffer:
    """Counts the request and reply publishes (payload bytes and MQTT packet bytes) the broker routes."""

    def __init__(self, broker: BrokerConnection) -> None:
        self._client = mqtt_client.Client(broker.username or f"ddnn-bench-sniffer-{os.getpid()}", broker)
        self._client.on_message = self._message
        self._lock = threading.Lock()
        self.reset()
        self._client.connect(broker.host, broker.port)
        self._client.subscribe([(f"{topics.TOPIC_ROOT}/req/+/+", 0), (f"{topics.TOPIC_ROOT}/reply/+", 0)])
        self._client.loop_start()
        time.sleep(0.2)

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.counts = {"req": [0, 0, 0], "reply": [0, 0, 0]}  # messages, payload bytes, packet bytes

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        kind = message.topic.split("/")[1]
        packet = publish_packet_bytes(message.topic, len(message.payload))
        with self._lock:
            entry = self.counts.setdefault(kind, [0, 0, 0])
            entry[0] += 1
            entry[1] += len(message.payload)
            entry[2] += packet

    def snapshot(self, settle_s: float = 0.3) -> dict[str, list[int]]:
        time.sleep(settle_s)  # the last publishes are still on their way to the sniffer
        with self._lock:
            return {key: list(value) for key, value in self.counts.items()}

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# ---- per-model configuration runs ----------------------------------------------------------------------

@dataclass
class ModelData:
    path: Path
    loaded: LoadedModel
    program: DeviceProgram
    images: np.ndarray
    labels: np.ndarray
    outputs: evaluate.ExitOutputs
    split_words: np.ndarray
    full_model_class: np.ndarray  # Chainer's whole-model prediction (the server-only answer)
    dataset: str


def load_model_data(path: Path, samples: int, data_dir: str | None) -> ModelData:
    loaded = load_model(path)
    program = fold(loaded)
    name = loaded.spec.dataset or "fashion-mnist"
    data = datasets.load(name, "test", data_dir)
    images, labels = data.images[:samples], data.labels[:samples]
    device = reference.run_device(program, images)
    if loaded.spec.big_little:  # the big net answers from the raw input, and the little net only for its classes
        outputs = exits.big_little_outputs(loaded, program, device, datasets.Dataset(name, "test", images, labels))
    else:
        server_class = exits.server_classes(loaded, program, device.split_words)
        outputs = evaluate.ExitOutputs(labels, device.local_class, device.entropy, server_class,
                                       program.split_bytes, program.weight_bytes)
    _, final_logits = predict(loaded.model, images)
    return ModelData(path, loaded, program, images, labels, outputs, device.split_words,
                     final_logits.argmax(axis=1).astype(np.int32), name)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def summarise_run(rows: list[dict[str, str]], labels: np.ndarray, server_only: bool) -> dict[str, Any]:
    """Times, accuracies and exit rates of one device-program run, from its CSV rows."""
    n = len(rows)
    if n != len(labels):
        raise BenchError(f"the device program answered {n} of {len(labels)} samples")
    source = np.array([row["source"] for row in rows])
    final = np.array([int(row["final_class"]) for row in rows])
    local_class = np.array([int(row["local_class"]) for row in rows])
    t_device = np.array([float(row["t_device_us"]) for row in rows])
    t_server = np.array([float(row["t_server_us"]) for row in rows])
    t_total = np.array([float(row["t_total_us"]) for row in rows])
    served = source == "server"
    local = source == "local"
    t_comm = t_total - t_device - t_server
    correct = final == labels
    return {
        "samples": n,
        "times_us": {
            "device": stats(t_device),
            "server": stats(t_server[served]),
            "comm": stats(t_comm[served]),
            "total": stats(t_total),
            "total_offloaded": stats(t_total[served]),
        },
        # Averages over every sample (a local exit has no server time, and its "comm" is only the few
        # tenths of a microsecond between the exit decision and the timestamp): these add up to T_Total.
        "mean_per_sample_us": {
            "device": float(t_device.mean()),
            "server": float(t_server.mean()),
            "comm": float(t_comm.mean()),
            "total": float(t_total.mean()),
        },
        "exit_rates": {name: float((source == name).mean()) for name in ("local", "server", "fallback", "error")},
        "accuracy": {
            "local": float((local & correct).sum() / n),
            "server": float(correct[served].mean()) if served.any() else None,
            "overall": float(correct.mean()),
        },
        "final_class": final.tolist(),
        "local_class": local_class.tolist(),
        "server_only": server_only,
    }


def _text_bytes(values: np.ndarray) -> float:
    """Mean bytes of each sample's values written as text the way the paper's prototype sent them
    (a printed list of floats, e.g. ``[1.0, -1.0, ...]``)."""
    return float(np.mean([len(str(sample.ravel().tolist())) for sample in values]))


def encoding_comparison(data: ModelData) -> dict[str, Any]:
    """Bytes of one offloaded sample's payload: our bit packing vs float32 vs text (paper: 8 KB -> 36 KB)."""
    program = data.program
    count = min(50, len(data.split_words))
    split_pm1 = reference.split_to_server_input(program, data.split_words[:count])  # +-1 float32
    raw = data.images[:count].astype(np.float32)
    # Measured from the encoder devices use (dense bits), not computed from the shape.
    request = codec.encode_request(split_header(program, data.loaded.hash_bytes, 1), data.split_words[0])
    return {
        "split_values": int(np.prod(split_pm1.shape[1:])),
        "split_bits_payload_bytes": len(request) - codec.REQUEST_HEADER_BYTES,  # packing 4, what devices send
        "split_words_payload_bytes": int(program.split_words * 8),  # packing 1: the device's 64-bit words
        "split_request_bytes": len(request),
        "split_float32_bytes": int(np.prod(split_pm1.shape[1:]) * 4),
        "split_text_bytes": _text_bytes(split_pm1),
        "raw_input_bytes": int(np.prod(data.images.shape[1:])),
        "raw_input_float32_bytes": int(np.prod(data.images.shape[1:]) * 4),
        "raw_input_text_bytes": _text_bytes(raw / 255.0),
        "request_header_bytes": codec.REQUEST_HEADER_BYTES,
        "reply_payload_bytes": codec.REPLY_HEADER_BYTES + 8 * min(REPLY_TOP_K, program.n_classes),
    }


def run_configuration(binary: Path, samples: Path, broker: Broker, server: ServerHandle, sniffer: WireSniffer,
                      data: ModelData, threshold: float | None, timeout_ms: int, device_id: str) -> dict[str, Any]:
    server_only = threshold is None
    out = samples.with_name(f"{device_id}.csv")
    cmd = [str(binary), str(samples), "--device-id", device_id, *identity(broker, device_id).runner_args(),
           "--timeout-ms", str(timeout_ms), "-o", str(out)]
    cmd += ["--server-only"] if server_only else ["--threshold", repr(float(threshold))]
    sniffer.reset()
    with CpuMeter(server) as meter:
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
    wire = sniffer.snapshot()
    summary = summarise_run(_read_rows(out), data.labels, server_only)
    n = summary["samples"]
    summary.update({
        "configuration": "Server-only" if server_only else "Device&Server",
        "threshold": None if server_only else float(threshold),  # type: ignore[arg-type]
        "wall_s": meter.wall_s,
        "server_cpu_s": meter.cpu_s,
        "server_cpu_utilisation": meter.utilisation,
        "wire": {
            "requests": wire["req"][0], "replies": wire["reply"][0],
            "request_payload_bytes_per_sample": wire["req"][1] / n,
            "reply_payload_bytes_per_sample": wire["reply"][1] / n,
            "payload_bytes_per_sample": (wire["req"][1] + wire["reply"][1]) / n,
            "mqtt_publish_bytes_per_sample": (wire["req"][2] + wire["reply"][2]) / n,
            "payload_bytes_per_offloaded_sample": (wire["req"][1] + wire["reply"][1]) / wire["req"][0]
            if wire["req"][0] else None,
        },
    })
    if server_only:
        expected = data.full_model_class
        summary["expected"] = {"overall_accuracy": float((expected == data.labels).mean())}
        summary["mismatches_vs_python"] = int((np.array(summary["final_class"]) != expected).sum())
        summary["accuracy"]["ideal"] = None
    else:
        metrics = evaluate.metrics_at(data.outputs, float(threshold))  # type: ignore[arg-type]
        summary["expected"] = metrics.as_dict()
        local = evaluate.answering_exit(data.outputs, (float(threshold),)) == 0  # type: ignore[arg-type]
        expected_final = np.where(local, data.outputs.local_class, data.outputs.final_class)
        summary["mismatches_vs_python"] = int((np.array(summary["final_class"]) != expected_final).sum())
        summary["accuracy"]["ideal"] = metrics.ideal_accuracy
    del summary["final_class"], summary["local_class"]
    log.info("%s %s: %s", data.loaded.spec.name, summary["configuration"], summary["mean_per_sample_us"])
    return summary


def bench_model(data: ModelData, work: Path, broker: Broker, server: ServerHandle, sniffer: WireSniffer,
                config: BenchConfig) -> dict[str, Any]:
    name = data.loaded.spec.name
    project = work / f"device-{data.path.stem}"
    compile_c(data.path, project)
    binary = toolchain.build_project(project, target="net", opt="-O2", extra_cflags=DEVICE_CFLAGS)
    samples = work / f"{data.path.stem}.ddns"
    write_samples(samples, data.images, data.labels)
    calibrated = float(data.program.threshold)
    thresholds = sorted({*map(float, config.thresholds), calibrated})
    runs = []
    for index, threshold in enumerate([*thresholds, None]):
        run = run_configuration(binary, samples, broker, server, sniffer, data, threshold, config.timeout_ms,
                                f"bench-{data.path.stem}-{index}")
        run["calibrated"] = threshold == calibrated
        runs.append(run)
    return {
        "name": name,
        "path": str(data.path),
        "content_hash": data.loaded.content_hash,
        "dataset": data.dataset,
        "samples": len(data.labels),
        "calibrated_threshold": calibrated,
        "split_chw": list(data.loaded.spec.split_shape),
        "device_cflags": ["-O2", *DEVICE_CFLAGS],
        "encoding": encoding_comparison(data),
        "sweep": [row.as_dict() for row in evaluate.sweep(data.outputs, 41)],
        "runs": runs,
    }


# ---- server load (Table IV) ---------------------------------------------------------------------------

def random_copy(spec_source: LoadedModel, seed: int, path: Path) -> str:
    """A random-weight model with the same architecture (different weights, so a different content hash)."""
    rng = np.random.default_rng(seed)
    model = DDNN(spec_source.spec)
    for param in model.params():
        if param.array is not None:
            param.array[...] = rng.standard_normal(param.array.shape).astype(param.array.dtype) * 0.1
    return save_model(path, model, spec_source.spec)


def _served_models(base: list[ModelData], folder: Path) -> list[tuple[bytes, ModelData]]:
    """(wire hash, shipped model with the same architecture) of every model file in a workload folder."""
    by_stem = {item.path.stem: item for item in base}
    served = []
    for path in sorted(folder.glob("*.npz")):
        stem = path.stem.split("_", 2)[2] if path.stem.startswith("random_") else path.stem
        served.append((load_model(path).hash_bytes, by_stem[stem]))
    return served


def workload_dir(base: list[ModelData], count: int, folder: Path, seed: int) -> list[tuple[bytes, ModelData]]:
    """``count`` model files in ``folder``: the shipped ones first, then seeded random copies of their
    architectures. Returns (wire hash, the shipped model whose split data the requests reuse)."""
    folder.mkdir(parents=True, exist_ok=True)
    served: list[tuple[bytes, ModelData]] = []
    for index in range(count):
        source = base[index % len(base)]
        if index < len(base):
            target = folder / source.path.name
            shutil.copyfile(source.path, target)
            served.append((source.loaded.hash_bytes, source))
            continue
        digest = random_copy(source.loaded, seed + index, folder / f"random_{index}_{source.path.stem}.npz")
        served.append((bytes.fromhex(digest)[:codec.HASH_BYTES], source))
    if len({key for key, _ in served}) != count:
        raise BenchError("random model copies collided in content hash")
    return served


def offered_load_step(devices: list[SimDevice], served: list[tuple[bytes, ModelData]], rate: float,
                      duration_s: float, timeout_s: float) -> dict[str, Any]:
    """Open loop: requests at ``rate``/s spread round-robin over the models and devices, for ``duration_s``."""
    total = max(1, int(rate * duration_s))
    pending = []
    started = time.monotonic()
    for i in range(total):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        model_hash, data = served[i % len(served)]
        device = devices[i % len(devices)]
        request_id = device.next_request_id()
        header = split_header(data.program, model_hash, request_id)
        split = data.split_words[i % len(data.split_words)]
        waiter = device.send(codec.encode_request(header, split), request_id,
                             topics.request_topic(model_hash, device.device_id))
        pending.append((device, request_id, waiter))
    send_end = time.monotonic()
    rtts, lost, errors = [], 0, 0
    last_reply = send_end
    for device, request_id, waiter in pending:
        reply = device.wait(request_id, waiter, max(0.0, timeout_s - (time.monotonic() - send_end)))
        if reply is None:
            lost += 1
        elif reply.status != codec.Status.OK:
            errors += 1
        else:
            rtts.append((waiter.received - waiter.sent) * 1e3)
            last_reply = max(last_reply, waiter.received)
    span = max(last_reply, send_end) - started
    return {"offered_rate": rate, "sent": total, "answered": len(rtts), "lost": lost, "errors": errors,
            "achieved_rate": len(rtts) / span if span > 0 else math.nan,
            "send_rate": total / max(send_end - started, 1e-9), "rtt_ms": stats(rtts)}


def bench_workload(base: list[ModelData], count: int, work: Path, broker: Broker, config: BenchConfig,
                   server_env: dict[str, str] | None = None) -> dict:
    folder = work / f"workload-{count}"
    if not folder.exists():
        workload_dir(base, count, folder, config.seed + 1000 * count)
    served = _served_models(base, folder)
    server = ServerHandle(identity(broker, BENCH_SERVER), folder, config.workers, server_env).start()
    devices: list[SimDevice] = []
    try:
        idle_rss = server.rss_bytes()
        devices = [SimDevice(f"load{count}-{d}", identity(broker, f"load{count}-{d}"), served[0][0],
                             timeout_s=config.timeout_ms / 1000).start() for d in range(LOAD_DEVICES)]
        offered_load_step(devices, served, 100.0, 0.5, 5.0)  # warm-up: first forward of every model
        steps = []
        sustained: dict[str, Any] | None = None
        for rate in config.rates:
            # A failing step is tried once more: on a shared machine one stall of another process can
            # break a p99 that the server itself would hold.
            for _attempt in range(2):
                with CpuMeter(server) as meter:
                    step = offered_load_step(devices, served, float(rate), config.step_s, config.timeout_ms / 1000)
                step["server_cpu_utilisation"] = meter.utilisation
                p99 = step["rtt_ms"]["p99"]
                step["ok"] = bool(step["lost"] == 0 and step["errors"] == 0 and p99 is not None
                                  and p99 <= config.p99_bound_ms and step["achieved_rate"] >= 0.9 * rate
                                  and step["send_rate"] >= 0.9 * rate)
                steps.append(step)
                if step["ok"]:
                    break
            log.info("W(%d models) %.0f req/s: p99 %.1f ms, cpu %.2f, ok %s", count, rate, p99 or math.nan,
                     meter.utilisation, step["ok"])
            if not step["ok"]:
                break
            sustained = step
        return {
            "models": count,
            "server_env": server_env or {},
            "model_files": sorted(p.name for p in folder.glob("*.npz")),
            "random_copies": max(0, count - len(base)),
            "idle_rss_bytes": idle_rss,
            "peak_rss_bytes": server.peak_rss_bytes(),
            "steps": steps,
            "sustained_rate": sustained["offered_rate"] if sustained else 0.0,
            "sustained_p99_ms": sustained["rtt_ms"]["p99"] if sustained else None,
            "cpu_utilisation_at_sustained": sustained["server_cpu_utilisation"] if sustained else None,
            "limited_by": "top of the offered-rate list" if sustained is steps[-1] else "p99 bound / loss",
        }
    finally:
        for device in devices:
            device.stop()
        server.stop()


# ---- the whole benchmark ------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "chainer": chainer.__version__,
        "load_average_start": list(os.getloadavg()),
        "gpu": None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def devices_supported(sustained_rate: float, per_device_hz: float, server_exit_rate: float) -> float | None:
    """Devices one server can take: sustained rate / (per-device sample rate x server exit rate)."""
    load = per_device_hz * server_exit_rate
    return sustained_rate / load if load > 0 else None


def run_bench(config: BenchConfig) -> dict[str, Any]:
    started = time.monotonic()
    env = environment()
    data, skipped, sizes = [], [], []
    for path in config.models:
        loaded = load_model(Path(path))
        sizes.extend(request_sizes(loaded))  # every model, multi-view ones included
        if loaded.spec.views is not None:
            reason = "multi-view model: the system runs drive one camera per model (request sizes only)"
            log.warning("skipping %s: %s", path, reason)
            skipped.append({"path": str(path), "reason": reason})
            continue
        try:
            data.append(load_model_data(Path(path), config.samples, config.data_dir))
        except DatasetError as error:
            log.warning("skipping %s: %s", path, error)
            skipped.append({"path": str(path), "reason": str(error)})
    if not data:
        raise BenchError("no model could be benchmarked: " + "; ".join(s["reason"] for s in skipped))
    result: dict[str, Any] = {"version": 1, "environment": env, "config": _config_json(config), "models": [],
                              "skipped_models": skipped, "workloads": [], "request_sizes": sizes}
    broker = Broker.secure(bench_users(config, data)) if config.secure else Broker()
    with tempfile.TemporaryDirectory(prefix="ddnn-bench-") as tmp, broker:
        work = Path(tmp)
        shipped = work / "served"
        shipped.mkdir()
        for item in data:
            shutil.copyfile(item.path, shipped / item.path.name)
        server = ServerHandle(identity(broker, BENCH_SERVER), shipped, config.workers).start()
        sniffer = WireSniffer(identity(broker, BENCH_MONITOR))
        try:
            for item in data:
                result["models"].append(bench_model(item, work, broker, server, sniffer, config))
            result["server_peak_rss_bytes"] = server.peak_rss_bytes()
        finally:
            sniffer.close()
            server.stop()
        for count in config.workloads:
            result["workloads"].append(bench_workload(data, count, work, broker, config))
        if config.multi_blas_w1 and config.workloads:
            result["workloads_multi_blas"] = [bench_workload(data, config.workloads[0], work, broker, config,
                                                             MULTI_BLAS_ENV)]
    sustained = result["workloads"][0]["sustained_rate"] if result["workloads"] else None
    for model in result["models"]:
        for run in model["runs"]:
            run["devices_supported"] = None if sustained is None else devices_supported(
                sustained, config.per_device_hz, run["exit_rates"]["server"] + run["exit_rates"]["fallback"]
                + run["exit_rates"]["error"])
    env["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = time.monotonic() - started
    return result


def _config_json(config: BenchConfig) -> dict[str, Any]:
    return {"models": [str(p) for p in config.models], "samples": config.samples,
            "thresholds": list(config.thresholds), "workloads": list(config.workloads), "rates": list(config.rates),
            "step_s": config.step_s, "p99_bound_ms": config.p99_bound_ms, "per_device_hz": config.per_device_hz,
            "server_workers": config.workers, "timeout_ms": config.timeout_ms, "seed": config.seed,
            "secure": config.secure}


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean_json(result), indent=1, allow_nan=False) + "\n")


def clean_json(value: Any) -> Any:
    """NumPy scalars to Python numbers, NaN/inf to None (strict JSON)."""
    if isinstance(value, dict):
        return {str(key): clean_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(item) for item in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
