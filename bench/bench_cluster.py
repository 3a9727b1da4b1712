"""One Mosquitto vs a 3-node RabbitMQ cluster, side by side in one run on one machine:

1. requests/s answered with 1 and with 2 ddnn-server processes: on Mosquitto through the MQTT 5 shared
   subscription (paho transport), on the cluster as competing AMQP consumers of the model's quorum queue
   (pika transport, servers on different nodes), the simulated devices on MQTT 3.1.1 spread over the nodes;
2. the servers' CPU time per request (from /proc), AMQP transport vs paho transport: the same model and
   batching above both, so the difference is the transport.

Every request goes to the servers (no local exits). The load generator and the brokers share the machine
with the servers, so the absolute rates are this machine's; the ratios are what carries over.

Usage: python bench/bench_cluster.py [--model models/fmnist_32.npz] [--devices 12] [--requests 200]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as ddnn-server does; must precede numpy

import argparse
import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from bench_server import wait_ready

from ddnn_gen.bench import procstat
from ddnn_gen.device.simulated import run_devices
from ddnn_gen.fold.program import fold
from ddnn_gen.fold.reference import run_device
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.rabbitmq_cluster import RabbitCluster

log = logging.getLogger("bench_cluster")
REPO = Path(__file__).resolve().parent.parent
SERVER_MAIN = "from ddnn_server.cli import main; main()"


@dataclass
class Run:
    broker: str
    servers: int
    rate: float  # requests/s answered by the servers
    cpu_us: float  # servers' CPU per request, all processes
    answered: int
    sent: int
    lost: int
    duplicates: int


def start_server(model: Path, workers: int, max_batch: int, where: Sequence[str]) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", SERVER_MAIN, "--models", str(model), "--workers", str(workers),
                                "--max-batch", str(max_batch), *where], stderr=subprocess.PIPE, text=True)
    return wait_ready(process, "ddnn-server: ready")


def measure(name: str, servers: list[subprocess.Popen[str]], devices: Callable[..., object],
            args: argparse.Namespace) -> Run:
    try:
        devices(args.devices, 10)  # warm-up: connections, first batches
        before = sum(procstat.cpu_seconds(server.pid) for server in servers)
        report = devices(args.devices, args.requests)
        cpu = sum(procstat.cpu_seconds(server.pid) for server in servers) - before
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
    answered = report.count("server")  # type: ignore[attr-defined]
    return Run(name, len(servers), answered / report.wall_s, cpu / max(1, answered) * 1e6,  # type: ignore[attr-defined]
               answered, len(report.outcomes), report.lost, report.duplicates)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "fmnist_32.npz")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--devices", type=int, default=12, help="simulated devices (multiple of 3: 1/3 per node)")
    parser.add_argument("--requests", type=int, default=200, help="requests per device per run")
    parser.add_argument("--window", type=int, default=4, help="requests outstanding per device")
    parser.add_argument("--workers", type=int, default=1, help="worker threads per server")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    loaded = load_model(args.model)
    program = fold(loaded)
    images = datasets.load(loaded.spec.dataset, "test", args.data_dir).images[:1000]
    device = run_device(program, images)
    sim = (program, loaded.hash_bytes, device.split_words, device.entropy, device.local_class)
    options = {"all_to_server": True, "window": args.window, "timeout_s": 60.0, "device_prefix": "b"}
    runs: list[Run] = []

    with Broker() as broker:
        def on_mosquitto(n: int, per: int) -> object:
            return run_devices(broker.connection(), *sim, n, per, **options)  # type: ignore[arg-type]

        for count in (1, 2):
            servers = [start_server(args.model, args.workers, args.max_batch, ["--broker", broker.address])
                       for _ in range(count)]
            runs.append(measure("mosquitto", servers, on_mosquitto, args))

    users = {f"b{i}": "device" for i in range(args.devices)} | {"s1": "server", "s2": "server"}
    with tempfile.TemporaryDirectory(prefix="ddnn-bench-cluster-") as directory, \
            RabbitCluster(directory, 3, users, [(loaded.hash_bytes, 1)]) as cluster:
        def on_cluster(n: int, per: int) -> object:
            return run_devices(lambda d: cluster.mqtt_all(d, int(d[1:]) % 3 + 1), *sim, n, per,  # type: ignore[arg-type]
                               protocol=mqtt.MQTTv311, subscribe_qos=0, **options)

        for count in (1, 2):
            servers = []
            for k, user in enumerate(("s1", "s2")[:count]):
                urls = [item for node in range(3) for item in ("--amqp", cluster.amqp_url(user, (k + node) % 3 + 1))]
                servers.append(start_server(args.model, args.workers, args.max_batch,
                                            [*urls, "--amqp-password-file", str(cluster.password_file(user))]))
            runs.append(measure("rabbitmq-3", servers, on_cluster, args))

    print(f"{loaded.spec.name}: {args.devices} devices x {args.requests} requests, window {args.window}, "
          f"{args.workers} worker(s)/server, max batch {args.max_batch}, {os.cpu_count()} CPUs")
    print(f"{'broker':<12}{'servers':>8}{'req/s':>9}{'CPU us/req':>12}{'answered':>10}{'lost':>6}{'dups':>6}")
    for run in runs:
        print(f"{run.broker:<12}{run.servers:>8}{run.rate:>9.0f}{run.cpu_us:>12.0f}{run.answered:>10}{run.lost:>6}"
              f"{run.duplicates:>6}")
    by = {(run.broker, run.servers): run for run in runs}
    for count in (1, 2):
        mosquitto, rabbit = by[("mosquitto", count)], by[("rabbitmq-3", count)]
        print(f"{count} server(s): cluster/mosquitto req/s {rabbit.rate / mosquitto.rate:.2f}, "
              f"CPU per request AMQP/paho {rabbit.cpu_us / mosquitto.cpu_us:.2f}")
    for name in ("mosquitto", "rabbitmq-3"):
        print(f"{name}: 2 servers / 1 server req/s {by[(name, 2)].rate / by[(name, 1)].rate:.2f}")


if __name__ == "__main__":
    main()
