"""ddnn-server speed, side by side in one run on one machine, for every shipped model (models/*.npz) or those given:

1. throughput: requests/s answered through MQTT (simulated devices -> Mosquitto -> ddnn-server) vs the
   raw batched forward of the same server part (what a worker computes on a batch of decoded payloads:
   ServedModel.logits, or an edge's edge_forward; same batch size, same threads, same CPUs, no MQTT, measured
   right before each server run); goal ratio >= 0.8.
2. latency: median round trip of a lone request through ddnn-server vs a bare paho echo of the same payload
   size over the same broker (QoS 1 both ways, the echo responder on the server's CPUs); goal ratio <= 1.5.

Each server a deployment runs is a row of its own, fed what reaches it there:
- a two-tier model's cloud: the device tier's splits (dense bits, as the C device sends them);
- a Big-Little model's cloud: raw uint8 images (its big net reads the input: ServedModel.forward_raw);
- a three-tier model's edge (``NAME/edge``): device splits, with the edge exit's threshold retained at 1 so the
  edge answers every request itself (a request sent on would put the cloud's work in the edge's row), and its
  cloud (``NAME/cloud``): the edge tier's splits, built as an edge builds them (dense bits of tier 1's output,
  tier 2's split layer, the tier-2 topic).
Multi-view models (models/views/) are skipped: their aggregator takes one split per camera and event
(bench/bench_views.py). Every reply is checked: an error status, a class other than the reference's (the
Chainer forward; an edge: the bitwise reference) or an answer from another tier is printed as WRONG and the
bench exits 1; requests without a reply are counted lost.

The load generator and Mosquitto are not part of the server under test, so with two or more CPUs the
server (and the raw forward it is compared with) gets the upper half of the CPUs and the simulated devices
and the broker the rest (--no-pin shares them all). The server's CPU time per request (from /proc) is
printed next to the raw forward's, which is where the ratio comes from, and next to the CPU a bare paho echo
responder spends per request/reply pair: the ceiling forward / (forward + echo) that no paho-based server
can pass on this machine.

Each model's server runs once per --forward (default both): the NumPy forward of the server tiers
(ddnn_gen/model/fast_forward.py, ddnn-server's default) and Chainer's, the reference; the raw forward every
row is compared with is the fastest one (NumPy), and a last table puts the two forwards side by side. Each
of those runs once per --transport (default all three): paho-mqtt (Python), paho-c (Paho C through cffi,
server/pahoc_transport.py) and c-mqtt (the server's own MQTT client in C, c_runtime/ddnn_mqtt_batch.c, behind
the same Python side); a table puts their ratios and server CPU per request side by side.

Usage: python bench/bench_server.py [--model models/fmnist_32.npz ...] [--max-batch 32] [--no-pin]
                                    [--forward numpy --forward chainer] [--transport paho-mqtt --transport c-mqtt ...]
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
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ddnn_gen.bench import procstat
from ddnn_gen.device.simulated import Pending, SimDevice
from ddnn_gen.errors import DatasetError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import fold
from ddnn_gen.fold.reference import run_device
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.spec import exit_decision
from ddnn_gen.wire import codec, mqtt_client, topics
from ddnn_gen.wire.broker import Broker, free_port
from ddnn_gen.wire.codec import Packing
from ddnn_gen.wire.connection import BrokerConnection, BrokerError
from ddnn_gen.wire.retained import publish_retained
from ddnn_server.allocator import keep_freed_memory
from ddnn_server.store import FORWARDS, ModelStore, ServedModel

log = logging.getLogger("bench_server")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = tuple(sorted(str(p.relative_to(REPO)) for p in (REPO / "models").glob("*.npz")))
TRANSPORTS = ("paho-mqtt", "paho-c", "c-mqtt")
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


def _pinned(cpus: set[int]) -> dict[str, object]:
    return {"preexec_fn": lambda: os.sched_setaffinity(0, cpus)}


def start_server(address: str, model: str, workers: int, max_batch: int, cpus: set[int],
                 forward: str = "numpy", transport: str = "paho-mqtt",
                 extra: Sequence[str] = ()) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", "from ddnn_server.cli import main; main()", "--broker", address,
                                "--models", model, "--workers", str(workers), "--max-batch", str(max_batch),
                                "--forward", forward, "--transport", transport, *extra],
                               stderr=subprocess.PIPE, text=True, **_pinned(cpus))  # type: ignore[call-overload]
    return wait_ready(process, "ddnn-server: ready")


def start_echo_responder(host: str, port: int, cpus: set[int], transport: str = "paho-mqtt") -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--echo-responder", f"{host}:{port}",
                                "--echo-transport", transport],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **_pinned(cpus))  # type: ignore[call-overload]
    return wait_ready(process, "echo: ready")


def wait_ready(process: subprocess.Popen[str], marker: str) -> subprocess.Popen[str]:
    assert process.stderr is not None
    for line in process.stderr:
        if marker in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process
    raise RuntimeError(f"{process.args[:3]} did not start")


def batches_so_far(metrics_port: int) -> tuple[float, float]:
    """(forward passes, requests in them) from the server's /metrics (its ddnn_batch_size histogram)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {sample.name: sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name.startswith("ddnn_batch_size")}
    return values.get("ddnn_batch_size_count", 0.0), values.get("ddnn_batch_size_sum", 0.0)


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


def echo_responder(address: str, transport: str) -> None:
    """A bare echo: every request's payload straight back, QoS 1. paho-mqtt: from the network thread;
    paho-c and c-mqtt: through the server's own C transport (its take thread, one publish call per reply), so
    its cost is the floor of ``ddnn-server --transport paho-c`` (or c-mqtt) before the server does any work of
    its own."""
    host, port = address.rsplit(":", 1)
    if transport in ("paho-c", "c-mqtt"):
        from ddnn_server.pahoc_transport import PahocTransport

        pahoc: PahocTransport | None = None

        def echo(topic: str, payload: bytes) -> None:
            assert pahoc is not None
            pahoc.publish_raw(ECHO_REPLY, payload, qos=1)

        pahoc = PahocTransport(BrokerConnection(host, int(port)), f"bench-echo-c-{os.getpid()}", "bench", [],
                               lambda incoming: None, False, extra_subscriptions=[ECHO_REQUEST], on_other=echo,
                               client=transport)
        pahoc.start()
        if not pahoc.wait_ready(10):
            raise RuntimeError(f"{transport} echo: not subscribed")
        print("echo: ready", file=sys.stderr, flush=True)
        sys.stdin.read()
        pahoc.close()
        return
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
class Workload:
    """One server under test: what it is started as, the requests its devices (or the edge below it) send, the
    computation its workers run on a batch of decoded payloads, and what each request must be answered."""

    label: str  # the row's name: the model, plus the role for a model served by several tiers
    path: Path
    served: ServedModel  # as the server under test serves it (NumPy forward: the raw rate's)
    header: codec.RequestHeader  # the requests' (request id and time set per request)
    topic_tier: int
    payloads: np.ndarray  # (N, ...) as decoded on the server: uint64 split words, or uint8 HWC images
    expected: np.ndarray  # (N,) the reference's class for each payload
    answered_by: int  # the tier whose exit must answer (the reply's answered_by)
    raw_batch: Callable[[list[np.ndarray]], np.ndarray]  # decoded payloads -> classes: what the workers compute
    server_args: tuple[str, ...] = ()
    retained: tuple[tuple[str, bytes], ...] = ()  # retained messages the server must find (an edge's threshold)

    @property
    def request_bytes(self) -> int:
        return len(codec.encode_request(self.header, self.payloads[0]))


def _header(served: ServedModel, packing: Packing) -> codec.RequestHeader:
    """The header of what a request to ``served`` carries: the raw image (split layer 0) or its entry tier's
    split, with the shape ServedModel.check insists on."""
    channels, height, width = served.input_chw if packing == Packing.RAW_U8 else served.split_chw
    split_layer = 0 if packing == Packing.RAW_U8 else served.split_layer
    return codec.RequestHeader(served.hash_bytes, split_layer, channels, height, width, 0, 0, packing)


def _classes_of(served: ServedModel, packing: Packing) -> Callable[[list[np.ndarray]], np.ndarray]:
    """A cloud worker's batch: Server._run_batch's ServedModel.logits on the decoded payloads, then the class."""
    return lambda payloads: served.logits(payloads, packing).argmax(axis=1)


def workloads(model: str, args: argparse.Namespace) -> list[Workload]:
    """The servers a deployment of ``model`` runs, each with its requests: a two-tier model's cloud fed device
    splits; a Big-Little model's cloud fed raw images (its big net reads them: ServedModel.forward_raw); a
    three-tier model's edge fed device splits and its cloud fed the edge's splits, built as the edge builds them
    (Upstream.forward: dense bits of tier 1's output, tier 2's split layer and topic)."""
    path = REPO / model if not Path(model).exists() else Path(model)
    loaded = load_model(path)
    spec = loaded.spec
    try:
        images = datasets.load(spec.dataset, "test", args.data_dir).images[:args.samples]
    except DatasetError as error:
        print(f"skipping {spec.name}: {error}")
        return []
    if spec.views is not None:
        print(f"skipping {spec.name}: a multi-view model (its aggregator takes one split per camera and event; "
              "bench/bench_views.py measures it)")
        return []
    if spec.big_little:
        served = ModelStore(forward="numpy").add_file(path)
        reference_served = ModelStore(forward="chainer").add_file(path)
        payloads = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # the wire's HWC
        expected = _classes_of(reference_served, Packing.RAW_U8)(list(payloads))
        return [Workload(spec.name, path, served, _header(served, Packing.RAW_U8), 1, payloads, expected,
                         len(spec.tiers) - 1, _classes_of(served, Packing.RAW_U8))]
    device = run_device(fold(loaded, tier=0), images)
    if len(spec.tiers) == 2:
        served = ModelStore(forward="numpy").add_file(path)
        reference_served = ModelStore(forward="chainer").add_file(path)
        expected = _classes_of(reference_served, Packing.BITS_U64)(list(device.split_words))
        return [Workload(spec.name, path, served, _header(served, Packing.BITS_DENSE), 1, device.split_words,
                         expected, 1, _classes_of(served, Packing.BITS_U64))]
    if len(spec.tiers) != 3 or not spec.tiers[1].binary:
        print(f"skipping {spec.name}: tiers {', '.join(t.kind for t in spec.tiers)} (the bench drives a binary edge "
              "tier between device and cloud)")
        return []
    edge = ModelStore(forward="numpy", role="edge").add_file(path)
    assert edge.edge_program is not None
    # The edge answers every request itself at threshold 1 (retained, as `ddnngen threshold set --tier edge`
    # sets it): a request it sent on would be the cloud's work in the edge's row, and the cloud is benched in
    # a row of its own, fed exactly what an edge sends on.
    edge_result = reference.run_device(edge.edge_program, device.split_words, threshold=1.0)
    if not exit_decision(edge_result.entropy, 1.0).all():
        raise RuntimeError(f"{spec.name}: an edge exit entropy is not <= 1 (NaN?): the edge would send it on")
    cloud = ModelStore(forward="numpy", role="cloud").add_file(path)
    reference_cloud = ModelStore(forward="chainer", role="cloud").add_file(path)
    expected = _classes_of(reference_cloud, Packing.BITS_U64)(list(edge_result.split_words))
    edge_threshold = ((topics.tier_threshold_topic(edge.hash_bytes, edge.entry_tier), codec.encode_threshold(1.0)),)
    return [Workload(f"{spec.name}/edge", path, edge, _header(edge, Packing.BITS_DENSE), 1, device.split_words,
                     edge_result.local_class, edge.entry_tier,
                     lambda payloads: edge.edge_forward(payloads).local_class, ("--role", "edge"), edge_threshold),
            Workload(f"{spec.name}/cloud", path, cloud, _header(cloud, Packing.BITS_DENSE), cloud.entry_tier,
                     edge_result.split_words, expected, len(spec.tiers) - 1, _classes_of(cloud, Packing.BITS_U64))]


def raw_forward_rate(work: Callable[[list[np.ndarray]], np.ndarray], payloads: np.ndarray, batch: int, threads: int,
                     cpus: set[int], repeats: int = 3) -> float:
    """Requests/s of a server worker's computation on batches of ``batch`` decoded payloads, ``threads`` threads
    at once on ``cpus``."""
    batches = [list(payloads[s:s + batch]) for s in range(0, len(payloads), batch)]
    shares = [batches[t::threads] for t in range(threads)]

    def run(share: list[list[np.ndarray]]) -> None:
        for one in share:
            work(one)

    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        run(batches[:2])  # warm-up: first-call allocations and BLAS buffers
        best = float("inf")
        for _ in range(repeats):
            workers = [threading.Thread(target=run, args=(share,)) for share in shares]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            best = min(best, time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, own)
    return len(payloads) / best


@dataclass
class Load:
    """What the simulated devices saw of one load run."""

    answered: int = 0  # OK replies from the tier under test with the reference's class
    sent: int = 0
    lost: int = 0  # no reply within the timeout
    errors: int = 0  # replies with a status other than OK
    duplicates: int = 0
    misrouted: int = 0
    wall_s: float = 0.0
    wrong: list[str] = field(default_factory=list)  # replies with another class or from another tier: bugs
    rtts_us: list[float] = field(default_factory=list)
    queue_us: list[int] = field(default_factory=list)  # the replies' own figures: queued (checked) to batch start
    server_us: list[int] = field(default_factory=list)  # and the batch's forward


def drive(connection: BrokerConnection, work: Workload, n_devices: int, per_device: int, window: int,
          timeout_s: float) -> Load:
    """``n_devices`` devices, each with up to ``window`` requests in flight, sending ``per_device`` requests of
    ``work`` (device d sends payloads d * per_device + i, mod N) and checking every reply against the
    reference's class and the tier that must answer."""
    devices = []
    try:
        for d in range(n_devices):
            devices.append(SimDevice(f"sim{d}", connection, work.served.hash_bytes, timeout_s,
                                     telemetry_interval_s=0).start())
    except BrokerError:
        for device in devices:
            device.stop()
        raise
    load = Load()
    lock = threading.Lock()
    topic_of = [topics.request_topic(work.served.hash_bytes, device.device_id, work.topic_tier) for device in devices]

    def finish(device: SimDevice, index: int, request_id: int, pending: Pending) -> None:
        reply = device.wait(request_id, pending)
        with lock:
            load.sent += 1
            if reply is None:
                load.lost += 1
            elif reply.status != codec.Status.OK:
                load.errors += 1
                load.wrong.append(f"{device.device_id} sample {index}: status {reply.status.name}: {reply.message}")
            elif (reply.class_id, reply.answered_by, reply.flags) != (int(work.expected[index]), work.answered_by, 0):
                load.wrong.append(f"{device.device_id} sample {index}: class {reply.class_id} by tier "
                                  f"{reply.answered_by} flags {reply.flags:#x}; the reference: class "
                                  f"{int(work.expected[index])} by tier {work.answered_by}")
            else:
                load.answered += 1
                load.rtts_us.append((pending.received - pending.sent) * 1e6)
                load.queue_us.append(reply.queue_us)
                load.server_us.append(reply.server_us)

    def run(d: int) -> None:
        device, in_flight = devices[d], []
        for i in range(per_device):
            index = (d * per_device + i) % len(work.payloads)
            request_id = device.next_request_id()
            header = replace(work.header, request_id=request_id, device_time_us=time.monotonic_ns() // 1000)
            pending = device.send(codec.encode_request(header, work.payloads[index]), request_id, topic_of[d])
            in_flight.append((device, index, request_id, pending))
            if len(in_flight) >= window:
                finish(*in_flight.pop(0))
        for item in in_flight:
            finish(*item)

    threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in range(n_devices)]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        load.wall_s = time.monotonic() - started
        time.sleep(0.2)  # late duplicates would arrive within a moment of the last reply
    finally:
        for device in devices:
            device.stop()
    load.duplicates = sum(device.duplicates for device in devices)
    load.misrouted = sum(device.misrouted for device in devices)
    return load



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
    echo_rtt_us: float = 0.0  # the echo responder's on the same transport, measured once per model
    echo_cpu_us: float = 0.0
    wrong: int = 0  # replies with a non-OK status, another class than the reference's, or from another tier
    mean_batch: float = 0.0  # requests per forward pass under load (the server's ddnn_batch_size histogram)
    lone_queue_us: float = 0.0  # a lone request, from its reply: queued (after its checks) to its batch's start
    lone_server_us: float = 0.0  # and its batch's forward


def bench_model(work: Workload, args: argparse.Namespace, cpus: CpuSplit, workers: int) -> list[ModelResult]:
    # Raw rates: the NumPy forward (the fastest there is), on as many payloads as the load sends.
    raw = raw_forward_rate(work.raw_batch, np.concatenate([work.payloads] * 4)[:max(args.max_batch * 8, 256)],
                           args.max_batch, workers, cpus.server)
    # Enough requests for --seconds of work at the raw rate, so a slow server part does not take minutes.
    n_requests = int(min(args.requests, max(args.devices * 50, raw * args.seconds)))
    payloads = np.concatenate([work.payloads] * (n_requests // len(work.payloads) + 1))[:n_requests]
    results = []
    with Broker() as broker:
        for topic, value in work.retained:
            publish_retained(broker.connection(), topic, value)
        for forward in args.forward or FORWARDS:
            # A lone request's forward as that server computes it.
            lone = work if forward == "numpy" else replace(work, raw_batch=_lone_reference(work, forward))
            single_us = 1e6 / raw_forward_rate(lone.raw_batch, payloads[:100], 1, 1, cpus.server)
            for transport in args.transport or TRANSPORTS:
                # Measured right before each server run: on a shared machine the load moves between runs, and a
                # ratio against a raw rate taken minutes earlier would measure the load, not the server.
                raw = raw_forward_rate(work.raw_batch, payloads, args.max_batch, workers, cpus.server)
                measured, wrong = _through_server(broker, work, forward, transport, n_requests, single_us, args,
                                                  cpus, workers)
                *measured_rates, batch, lone_queue_us, lone_server_us = measured
                results.append(ModelResult(work.label, forward, work.request_bytes, workers, raw, *measured_rates,
                                           single_us, transport, wrong=wrong, mean_batch=batch,
                                           lone_queue_us=lone_queue_us, lone_server_us=lone_server_us))
        echoes = {}
        for transport in args.transport or TRANSPORTS:
            echo = start_echo_responder(broker.host, broker.port, cpus.server, transport)
            try:
                echoes[transport] = (echo_round_trip_us(broker.host, broker.port, work.request_bytes,
                                                        args.latency_count),
                                     echo_cpu_us(broker.host, broker.port, echo.pid, work.request_bytes,
                                                 args.echo_load))
            finally:
                echo.kill()
                echo.wait()
    for result in results:
        result.echo_rtt_us, result.echo_cpu_us = echoes[result.transport]
    return results


def _lone_reference(work: Workload, forward: str) -> Callable[[list[np.ndarray]], np.ndarray]:
    """The worker's computation with ``forward``'s float tiers (an edge's binary tier has one forward only)."""
    if work.served.edge_program is not None:
        return work.raw_batch
    store = ModelStore(forward=forward, role=work.served.role, from_tier=work.served.entry_tier or None)
    other = store.add_file(work.path)
    return _classes_of(other, Packing.RAW_U8 if work.header.packing == Packing.RAW_U8 else Packing.BITS_U64)


def _through_server(broker: Broker, work: Workload, forward: str, transport: str, n_requests: int,
                    single_us: float, args: argparse.Namespace, cpus: CpuSplit,
                    workers: int) -> tuple[tuple[float, int, int, int, int, int, float, float, float, float, float],
                                           int]:
    """One ddnn-server (--forward ``forward``, --transport ``transport``) under load, then a lone request at a
    time: ((req/s, answered, sent, lost, duplicates, misrouted, server CPU us per request, median round trip
    us, mean batch under load, a lone request's median queue and forward us as its replies state them), replies
    that were wrong). A wrong reply is printed."""
    latency_count = int(min(args.latency_count, max(50, 0.5e6 / single_us)))
    metrics_port = free_port()
    server = start_server(broker.address, str(work.path), workers, args.max_batch, cpus.server, forward,
                          transport, (*work.server_args, "--metrics-port", str(metrics_port)))
    try:
        per_device = n_requests // args.devices
        connection = broker.connection()
        drive(connection, work, args.devices, 10, 4, 5.0)  # warm-up
        cpu_before, batches_before = procstat.cpu_seconds(server.pid), batches_so_far(metrics_port)
        load = drive(connection, work, args.devices, per_device, args.window, 60.0)
        server_cpu_us = (procstat.cpu_seconds(server.pid) - cpu_before) / max(1, per_device * args.devices) * 1e6
        batches_after = batches_so_far(metrics_port)
        batch = (batches_after[1] - batches_before[1]) / max(1.0, batches_after[0] - batches_before[0])
        lone = drive(connection, work, 1, latency_count, 1, 30.0)
    finally:
        server.terminate()
        server.wait(30)
    for wrong in (load.wrong + lone.wrong)[:20]:
        print(f"WRONG ({work.label}, {forward} forward, {transport}): {wrong}")
    skip = len(lone.rtts_us) // 10
    rtts = lone.rtts_us[skip:] or [float("nan")]
    inside = (statistics.median(lone.queue_us[skip:] or [0]), statistics.median(lone.server_us[skip:] or [0]))
    return ((load.answered / load.wall_s, load.answered, load.sent, load.lost, load.duplicates, load.misrouted,
             server_cpu_us, statistics.median(rtts), batch, *inside), len(load.wrong) + len(lone.wrong))


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
        print(f"    a lone request's round trip {r.server_rtt_us:.0f} us = {r.lone_queue_us:.0f} us queued for a "
              f"worker + {r.lone_server_us:.0f} us forward + "
              f"{r.server_rtt_us - r.lone_queue_us - r.lone_server_us:.0f} us for the rest (MQTT both ways, the take "
              "and the request's checks, top-k and the reply)")
        print(f"    a bare {r.transport} echo responder spends {r.echo_cpu_us:.0f} us of CPU per request/reply pair, "
              f"so no {r.transport} server can pass {forward_us / (forward_us + r.echo_cpu_us):.2f} of the raw "
              "forward here")
        busy = r.server_cpu_us * r.mqtt_rate / 1e6 / len(cpus.server)
        # Well under 100 %: the server waited (for the load, or for CPU other processes took), so the ratio
        # measures that, not the server.
        print(f"    the server process used {100 * busy:.0f} % of its CPUs under load, {r.mean_batch:.1f} requests "
              f"per forward pass (the raw forward's: {args.max_batch})")
        print(f"    {r.answered}/{r.sent} answered by the server; lost {r.lost}, duplicates {r.duplicates}, "
              f"misrouted {r.misrouted}, wrong {r.wrong}")


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
    """The transports side by side, per model and forward, where more than one ran."""
    by_run: dict[tuple[str, str], dict[str, ModelResult]] = {}
    for r in results:
        by_run.setdefault((r.name, r.forward), {})[r.transport] = r
    ran = [t for t in TRANSPORTS if any(t in runs for runs in by_run.values())]
    rows = [(name, forward, runs) for (name, forward), runs in by_run.items() if all(t in runs for t in ran)]
    if len(ran) < 2 or not rows:
        return
    width = 7 * len(ran)
    print(f"transports side by side ({', '.join(ran)}): MQTT req/s over the raw forward (goal >= 0.8), server "
          "CPU us per request, lone round trip over the echo (goal <= 1.5):")
    print(f"{'model':<18}{'forward':>8} | {'ratio':>{width}} | {'server CPU us':>{width}} | {'RTT/echo':>{width}}")
    for name, forward, runs in rows:
        ratios = "".join(f"{runs[t].mqtt_rate / runs[t].raw_rate:>7.2f}" for t in ran)
        cpu = "".join(f"{runs[t].server_cpu_us:>7.0f}" for t in ran)
        rtt = "".join(f"{runs[t].server_rtt_us / runs[t].echo_rtt_us:>7.2f}" for t in ran)
        print(f"{name:<18}{forward:>8} | {ratios} | {cpu} | {rtt}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, help="model file (repeat); default: "
                        + ", ".join(DEFAULT_MODELS))
    parser.add_argument("--samples", type=int, default=1000, help="test images per model (requests cycle them)")
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
                        help="the server's MQTT transport (repeat); default: all")
    parser.add_argument("--echo-responder", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--echo-transport", choices=TRANSPORTS, default="paho-mqtt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_responder:
        echo_responder(args.echo_responder, args.echo_transport)
        return
    logging.basicConfig(level=logging.WARNING)
    keep_freed_memory()  # the raw forward gets the server's allocator settings
    cpus = split_cpus(not args.no_pin)
    workers = args.workers or len(cpus.server)
    os.sched_setaffinity(0, cpus.clients)  # the simulated devices, and the broker we start, run here
    results = [r for model in (args.model or DEFAULT_MODELS) for work in workloads(model, args)
               for r in bench_model(work, args, cpus, workers)]
    print_results(results, args, cpus)
    print_forwards(results)
    print_transports(results)
    wrong = sum(r.wrong for r in results)
    if wrong:
        # A reply with another class than the reference's is a server bug, not a speed figure.
        print(f"FAILED: {wrong} replies were errors, had another class than the reference's, or came from "
              "another tier (WRONG lines above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
