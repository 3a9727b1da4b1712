"""ddnn-server speed, side by side in one run on one machine, for each shipped model given:

1. throughput: requests/s answered through MQTT (simulated devices -> Mosquitto -> ddnn-server) vs the
   raw batched forward of the same server part (ServedModel.forward, same batch size, same threads, same
   CPUs, no MQTT, measured right before each server run); goal ratio >= 0.8.
2. latency: median round trip of a lone request through ddnn-server vs a bare paho echo of the same payload
   size over the same broker (QoS 1 both ways, the echo responder on the server's CPUs); goal ratio <= 1.5.

The load generator and Mosquitto are not part of the server under test, so with two or more CPUs the
server (and the raw forward it is compared with) gets the upper half of the CPUs and the simulated devices
and the broker the rest (--no-pin shares them all). The server's CPU time per request (from /proc) is
printed next to the raw forward's, which is where the ratio comes from, and next to the CPU a bare paho echo
responder spends per request/reply pair: the ceiling forward / (forward + echo) that no paho-based server
can pass on this machine.

Each model's server runs once per --forward (default both): the NumPy forward of the server tiers
(ddnn_gen/model/fast_forward.py, ddnn-server's default) and Chainer's, the reference; the raw forward every
row is compared with is the fastest one (NumPy), and a last table puts the two forwards side by side. Each
of those runs once per --transport (default both): paho-mqtt (Python) and paho-c (Paho C through cffi,
server/pahoc_transport.py); a table puts their ratios and server CPU per request side by side.

Usage: python bench/bench_server.py [--model models/fmnist_32.npz ...] [--max-batch 32] [--no-pin]
                                    [--forward numpy --forward chainer] [--transport paho-mqtt --transport paho-c]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as ddnn-server does; must precede numpy

import argparse
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddnn_gen.bench import procstat
from ddnn_gen.device.simulated import run_devices
from ddnn_gen.errors import DatasetError
from ddnn_gen.fold.reference import run_device
from ddnn_gen.model import datasets
from ddnn_gen.wire import codec, mqtt_client
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.codec import Packing
from ddnn_server.allocator import keep_freed_memory
from ddnn_server.store import FORWARDS, ModelStore, ServedModel

log = logging.getLogger("bench_server")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("models/fmnist_32.npz", "models/cifar10_deep_64.npz")
TRANSPORTS = ("paho-mqtt", "paho-c")
ECHO_REQUEST, ECHO_REPLY = "bench/echo/request", "bench/echo/reply"


@dataclass
class CpuSplit:
    server: set[int]
    clients: set[int]

    def describe(self) -> str:
        if self.server == self.clients:
            return f"server, broker and devices share CPUs {sorted(self.server)}"
        return f"server on CPUs {sorted(self.server)}; broker and simulated devices on {sorted(self.clients)}"


def split_cpus(pin: bool) -> CpuSplit:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return CpuSplit(set(cpus), set(cpus))
    half = len(cpus) // 2
    return CpuSplit(set(cpus[half:]), set(cpus[:half]))


def raw_forward_rate(served: ServedModel, split_words: np.ndarray, batch: int, threads: int, cpus: set[int],
                     repeats: int = 3) -> float:
    """Requests/s of ServedModel.forward on batches of ``batch``, ``threads`` threads at once on ``cpus``."""
    inputs = [served.server_input(list(split_words[s:s + batch]), Packing.BITS_U64)
              for s in range(0, len(split_words), batch)]
    shares = [inputs[t::threads] for t in range(threads)]

    def work(share: list[np.ndarray]) -> None:
        for server_input in share:
            served.forward(server_input).argmax(axis=1)

    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        work(inputs[:2])  # warm-up: first-call allocations and BLAS buffers
        best = float("inf")
        for _ in range(repeats):
            workers = [threading.Thread(target=work, args=(share,)) for share in shares]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            best = min(best, time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, own)
    return len(split_words) / best


def _pinned(cpus: set[int]) -> dict[str, object]:
    return {"preexec_fn": lambda: os.sched_setaffinity(0, cpus)}


def start_server(address: str, model: str, workers: int, max_batch: int, cpus: set[int],
                 forward: str = "numpy", transport: str = "paho-mqtt") -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", "from ddnn_server.cli import main; main()", "--broker", address,
                                "--models", model, "--workers", str(workers), "--max-batch", str(max_batch),
                                "--forward", forward, "--transport", transport],
                               stderr=subprocess.PIPE, text=True, **_pinned(cpus))  # type: ignore[call-overload]
    return wait_ready(process, "ddnn-server: ready")


def start_echo_responder(host: str, port: int, cpus: set[int]) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--echo-responder", f"{host}:{port}"],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **_pinned(cpus))  # type: ignore[call-overload]
    return wait_ready(process, "echo: ready")


def wait_ready(process: subprocess.Popen[str], marker: str) -> subprocess.Popen[str]:
    assert process.stderr is not None
    for line in process.stderr:
        if marker in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process
    raise RuntimeError(f"{process.args[:3]} did not start")


def _subscribed_client(host: str, port: int, name: str, topic: str, on_message: object) -> mqtt_client.Client:
    """A started client (TCP_NODELAY, as the server and devices) whose QoS 1 subscription to ``topic`` is
    acknowledged."""
    subscribed = threading.Event()
    client = mqtt_client.Client(f"{name}-{os.getpid()}")
    client.on_message = on_message  # type: ignore[assignment]
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect(host, port)
    mqtt_client.tcp_no_delay(client)
    client.subscribe(topic, qos=1)
    client.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError(f"{name}: no SUBACK for {topic}")
    return client


def _stop(client: mqtt_client.Client) -> None:
    client.disconnect()
    client.loop_stop()


def echo_responder(address: str) -> None:
    """A bare paho echo: every request's payload straight back, QoS 1, from the network thread."""
    host, port = address.rsplit(":", 1)
    responder = _subscribed_client(host, int(port), "bench-echo", ECHO_REQUEST,
                       lambda c, u, m: c.publish(ECHO_REPLY, m.payload, qos=1))
    print("echo: ready", file=sys.stderr, flush=True)
    sys.stdin.read()  # until the bench closes our stdin or kills us
    _stop(responder)


def echo_round_trip_us(host: str, port: int, payload_bytes: int, count: int) -> float:
    got = threading.Event()
    requester = _subscribed_client(host, port, "bench-echo-requester", ECHO_REPLY, lambda c, u, m: got.set())
    payload = bytes(payload_bytes)
    samples = []
    try:
        for _ in range(count):
            got.clear()
            started = time.perf_counter()
            requester.publish(ECHO_REQUEST, payload, qos=1)
            if not got.wait(5):
                raise RuntimeError("echo timed out")
            samples.append((time.perf_counter() - started) * 1e6)
    finally:
        _stop(requester)
    return statistics.median(samples[count // 10:])


def echo_cpu_us(host: str, port: int, echo_pid: int, payload_bytes: int, count: int, window: int = 64) -> float:
    """CPU time of the echo responder per request/reply pair under a windowed load: the floor any
    paho-based server pays per request before it does any work of its own."""
    window_free = threading.Semaphore(window)
    all_back = threading.Event()
    received = [0]

    def on_message(client: object, userdata: object, message: object) -> None:
        received[0] += 1
        window_free.release()
        if received[0] == count:
            all_back.set()

    loader = _subscribed_client(host, port, "bench-echo-load", ECHO_REPLY, on_message)
    payload = bytes(payload_bytes)
    try:
        cpu_before = procstat.cpu_seconds(echo_pid)
        for _ in range(count):
            window_free.acquire()
            loader.publish(ECHO_REQUEST, payload, qos=1)
        if not all_back.wait(60):
            raise RuntimeError(f"echo load: {received[0]} of {count} came back")
        return (procstat.cpu_seconds(echo_pid) - cpu_before) / count * 1e6
    finally:
        _stop(loader)


@dataclass
class ModelResult:
    name: str
    forward: str  # the server's --forward
    request_bytes: int
    workers: int
    raw_rate: float
    mqtt_rate: float
    answered: int
    sent: int
    lost: int
    duplicates: int
    misrouted: int
    server_cpu_us: float
    server_rtt_us: float
    single_us: float
    transport: str = "paho-mqtt"  # the server's --transport
    echo_rtt_us: float = 0.0  # the echo responder's, measured once per model
    echo_cpu_us: float = 0.0


def bench_model(model: str, args: argparse.Namespace, cpus: CpuSplit, workers: int) -> list[ModelResult]:
    path = REPO / model if not Path(model).exists() else Path(model)
    served = ModelStore(forward="numpy").add_file(path)  # the raw forward: the fastest one there is
    try:
        images = datasets.load(served.loaded.spec.dataset, "test", args.data_dir).images[:1000]
    except DatasetError as error:
        print(f"skipping {served.name}: {error}")
        return []
    device = run_device(served.program, images)
    raw = raw_forward_rate(served, np.concatenate([device.split_words] * 4)[:max(args.max_batch * 8, 256)],
                           args.max_batch, workers, cpus.server)
    # Enough requests for --seconds of work at the raw rate, so a slow server part does not take minutes.
    n_requests = int(min(args.requests, max(args.devices * 50, raw * args.seconds)))
    split_words = np.concatenate([device.split_words] * (n_requests // len(images) + 1))[:n_requests]
    request_bytes = codec.REQUEST_HEADER_BYTES + served.program.split_bytes  # dense, as the devices send it
    results = []
    with Broker() as broker:
        for forward in args.forward or FORWARDS:
            # A lone request's forward as that server computes it.
            lone = served if forward == "numpy" else ModelStore(forward=forward).add_file(path)
            single_us = 1e6 / raw_forward_rate(lone, split_words[:100], 1, 1, cpus.server)
            for transport in args.transport or TRANSPORTS:
                # Measured right before each server run: on a shared machine the load moves between runs, and a
                # ratio against a raw rate taken minutes earlier would measure the load, not the server.
                raw = raw_forward_rate(served, split_words, args.max_batch, workers, cpus.server)
                measured = _through_server(broker, served, forward, transport, split_words, device, n_requests,
                                           single_us, args, cpus, workers)
                results.append(ModelResult(served.name, forward, request_bytes, workers, raw, *measured, single_us,
                                           transport))
        echo = start_echo_responder(broker.host, broker.port, cpus.server)
        try:
            echo_rtt = echo_round_trip_us(broker.host, broker.port, request_bytes, args.latency_count)
            echo_cpu = echo_cpu_us(broker.host, broker.port, echo.pid, request_bytes, args.echo_load)
        finally:
            echo.kill()
            echo.wait()
    for result in results:
        result.echo_rtt_us, result.echo_cpu_us = echo_rtt, echo_cpu
    return results


def _through_server(broker: Broker, served: ServedModel, forward: str, transport: str, split_words: np.ndarray,
                    device: object, n_requests: int, single_us: float, args: argparse.Namespace, cpus: CpuSplit,
                    workers: int) -> tuple[float, int, int, int, int, int, float, float]:
    """One ddnn-server (--forward ``forward``, --transport ``transport``) under load, then a lone request at a
    time: (req/s, answered, sent, lost, duplicates, misrouted, server CPU us per request, median round trip us)."""
    latency_count = int(min(args.latency_count, max(50, 0.5e6 / single_us)))
    server = start_server(broker.address, str(served.loaded.path), workers, args.max_batch, cpus.server, forward,
                          transport)
    try:
        per_device = n_requests // args.devices
        sim = (broker.connection(), served.program, served.hash_bytes, device.split_words, device.entropy,
               device.local_class)
        run_devices(*sim, args.devices, 10, all_to_server=True, window=4)  # warm-up
        cpu_before = procstat.cpu_seconds(server.pid)
        report = run_devices(*sim, args.devices, per_device, all_to_server=True, window=args.window, timeout_s=60)
        server_cpu_us = (procstat.cpu_seconds(server.pid) - cpu_before) / max(1, per_device * args.devices) * 1e6
        answered = report.count("server")
        latency = run_devices(*sim, 1, latency_count, all_to_server=True, window=1, timeout_s=30)
        rtts = [o.t_round_trip_us for o in latency.outcomes if o.source == "server"]
    finally:
        server.terminate()
        server.wait(30)
    return (answered / report.wall_s, answered, len(report.outcomes), report.lost, report.duplicates,
            report.misrouted, server_cpu_us, statistics.median(rtts[len(rtts) // 10:]))


def print_results(results: Sequence[ModelResult], args: argparse.Namespace, cpus: CpuSplit) -> None:
    print(f"{cpus.describe()}; max batch {args.max_batch}; {args.devices} simulated devices x window {args.window}")
    print(f"{'model':<18}{'request B':>10}{'workers':>8} | {'MQTT req/s':>11}{'raw req/s':>11}{'ratio':>7}"
          f"{'goal':>8} | {'RTT us':>8}{'echo us':>9}{'ratio':>7}{'goal':>8} | server forward, transport")
    for r in results:
        print(f"{r.name:<18}{r.request_bytes:>10}{r.workers:>8} | {r.mqtt_rate:>11.0f}{r.raw_rate:>11.0f}"
              f"{r.mqtt_rate / r.raw_rate:>7.2f}{'>= 0.8':>8} | {r.server_rtt_us:>8.0f}{r.echo_rtt_us:>9.0f}"
              f"{r.server_rtt_us / r.echo_rtt_us:>7.2f}{'<= 1.5':>8} | {r.forward}, {r.transport}")
    print("where the time goes (per request):")
    for r in results:
        forward_us = 1e6 * r.workers / r.raw_rate  # CPU time of the batched forward, all threads
        floor = r.echo_rtt_us + r.single_us
        print(f"  {r.name} ({r.forward} forward, {r.transport}): server CPU {r.server_cpu_us:.0f} us = raw batched "
              f"forward {forward_us:.0f} us + "
              f"{r.server_cpu_us - forward_us:.0f} us of MQTT, decoding, batching and replies; a lone request's "
              f"forward alone {r.single_us:.0f} us, so echo + forward = {floor:.0f} us and the round trip is "
              f"{r.server_rtt_us / floor:.2f}x that")
        print(f"    a bare paho echo responder spends {r.echo_cpu_us:.0f} us of CPU per request/reply pair, so no "
              f"paho-mqtt server can pass {forward_us / (forward_us + r.echo_cpu_us):.2f} of the raw forward here")
        busy = r.server_cpu_us * r.mqtt_rate / 1e6 / len(cpus.server)
        # Well under 100 %: the server waited (for the load, or for CPU other processes took), so the ratio
        # measures that, not the server.
        print(f"    the server process used {100 * busy:.0f} % of its CPUs under load")
        print(f"    {r.answered}/{r.sent} answered by the server; lost {r.lost}, duplicates {r.duplicates}, "
              f"misrouted {r.misrouted}")


def print_forwards(results: Sequence[ModelResult]) -> None:
    """The NumPy forward against Chainer's, per model, where both ran."""
    by_model: dict[str, dict[str, ModelResult]] = {}
    for r in results:
        by_model.setdefault(r.name, {})[r.forward] = r
    pairs = [(name, runs["numpy"], runs["chainer"]) for name, runs in by_model.items()
             if "numpy" in runs and "chainer" in runs]
    if not pairs:
        return
    print("NumPy forward vs Chainer forward, each pair numpy then chainer; every ratio > 1 means NumPy is better "
          "(times: chainer / numpy, rates: numpy / chainer):")
    print(f"{'model':<18}{'lone fwd us':>22}{'ratio':>7} | {'RTT us':>16}{'ratio':>7} | {'MQTT req/s':>16}"
          f"{'ratio':>7} | {'of raw':>12}")
    for name, fast, ref in pairs:
        print(f"{name:<18}{fast.single_us:>11.0f}{ref.single_us:>11.0f}{ref.single_us / fast.single_us:>7.2f} | "
              f"{fast.server_rtt_us:>8.0f}{ref.server_rtt_us:>8.0f}{ref.server_rtt_us / fast.server_rtt_us:>7.2f} | "
              f"{fast.mqtt_rate:>8.0f}{ref.mqtt_rate:>8.0f}{fast.mqtt_rate / ref.mqtt_rate:>7.2f} | "
              f"{fast.mqtt_rate / fast.raw_rate:>6.2f}{ref.mqtt_rate / ref.raw_rate:>6.2f}")


def print_transports(results: Sequence[ModelResult]) -> None:
    """paho-mqtt against paho-c, per model and forward, where both ran."""
    by_run: dict[tuple[str, str], dict[str, ModelResult]] = {}
    for r in results:
        by_run.setdefault((r.name, r.forward), {})[r.transport] = r
    pairs = [(name, forward, runs["paho-mqtt"], runs["paho-c"]) for (name, forward), runs in by_run.items()
             if "paho-mqtt" in runs and "paho-c" in runs]
    if not pairs:
        return
    print("transports side by side (paho-mqtt then paho-c): MQTT req/s over the raw forward (goal >= 0.8), server "
          "CPU us per request, lone round trip over the echo (goal <= 1.5):")
    print(f"{'model':<18}{'forward':>8} | {'ratio':>12} | {'server CPU us':>16} | {'RTT/echo':>12}")
    for name, forward, mqtt, pahoc in pairs:
        print(f"{name:<18}{forward:>8} | {mqtt.mqtt_rate / mqtt.raw_rate:>6.2f}{pahoc.mqtt_rate / pahoc.raw_rate:>6.2f}"
              f" | {mqtt.server_cpu_us:>8.0f}{pahoc.server_cpu_us:>8.0f} | "
              f"{mqtt.server_rtt_us / mqtt.echo_rtt_us:>6.2f}{pahoc.server_rtt_us / pahoc.echo_rtt_us:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, help="model file (repeat); default: "
                        + ", ".join(DEFAULT_MODELS))
    parser.add_argument("--data-dir", default=None, help="data sets (default: DDNN_DATA_DIR, system paths)")
    parser.add_argument("--requests", type=int, default=12000, help="most requests per model for throughput")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput run length at the raw rate")
    parser.add_argument("--workers", type=int, default=None, help="server worker threads (default: its CPUs)")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--window", type=int, default=16, help="requests in flight per simulated device")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--latency-count", type=int, default=400)
    parser.add_argument("--echo-load", type=int, default=5000, help="requests for the echo responder's CPU cost")
    parser.add_argument("--no-pin", action="store_true", help="do not split the CPUs between server and clients")
    parser.add_argument("--forward", action="append", choices=FORWARDS, default=None,
                        help="the server's forward (repeat); default: both")
    parser.add_argument("--transport", action="append", choices=TRANSPORTS, default=None,
                        help="the server's MQTT transport (repeat); default: both")
    parser.add_argument("--echo-responder", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_responder:
        echo_responder(args.echo_responder)
        return
    logging.basicConfig(level=logging.WARNING)
    keep_freed_memory()  # the raw forward gets the server's allocator settings
    cpus = split_cpus(not args.no_pin)
    workers = args.workers or len(cpus.server)
    os.sched_setaffinity(0, cpus.clients)  # the simulated devices, and the broker we start, run here
    results = [r for model in (args.model or DEFAULT_MODELS) for r in bench_model(model, args, cpus, workers)]
    print_results(results, args, cpus)
    print_forwards(results)
    print_transports(results)


if __name__ == "__main__":
    main()
