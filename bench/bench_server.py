"""ddnn-server speed, side by side in one run on one machine:

1. throughput: requests/s answered through MQTT (simulated devices -> Mosquitto -> ddnn-server) vs the
   raw batched forward of the same server part (ServedModel.forward, no MQTT); goal ratio >= 0.8.
2. latency: median request round trip through ddnn-server vs a bare paho-mqtt echo of the same
   payload size over the same broker (QoS 1 both ways); goal ratio <= 1.5.

Usage: python bench/bench_server.py [--model models/fmnist_32.npz] [--requests 4000] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ddnn_gen import datasets, protocol
from ddnn_gen.broker import Broker
from ddnn_gen.device_sim import run_devices
from ddnn_gen.protocol import Packing
from ddnn_gen.reference import run_device
from ddnn_server.store import ModelStore

log = logging.getLogger("bench_server")


def raw_forward_rate(store: ModelStore, split_words: np.ndarray, batch: int, repeats: int = 3) -> float:
    served = store.models()[0]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(split_words), batch):
            chunk = split_words[start:start + batch]
            logits = served.forward(served.server_input(list(chunk), Packing.BITS_U64))
            _ = logits.argmax(axis=1)
        best = min(best, time.perf_counter() - started)
    return len(split_words) / best


def start_server(address: str, model: str, workers: int, max_batch: int) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", "from ddnn_server.cli import main; main()", "--broker", address,
                                "--models", model, "--workers", str(workers), "--max-batch", str(max_batch)],
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if "ddnn-server: ready" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process
    raise RuntimeError("ddnn-server did not start")


def _client(host: str, port: int, on_message: object) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message  # type: ignore[assignment]
    client.connect(host, port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the server and devices do
    client.loop_start()
    return client


def echo_round_trip_us(host: str, port: int, payload_bytes: int, count: int) -> float:
    """Median round trip of a bare paho request/echo pair, QoS 1 both ways, same payload size."""
    echo = _client(host, port, lambda c, u, m: c.publish("bench/echo/reply", m.payload, qos=1))
    echo.subscribe("bench/echo/request", qos=1)
    got = threading.Event()
    requester = _client(host, port, lambda c, u, m: got.set())
    requester.subscribe("bench/echo/reply", qos=1)
    time.sleep(0.3)
    payload = bytes(payload_bytes)
    samples = []
    for _ in range(count):
        got.clear()
        started = time.perf_counter()
        requester.publish("bench/echo/request", payload, qos=1)
        if not got.wait(5):
            raise RuntimeError("echo timed out")
        samples.append((time.perf_counter() - started) * 1e6)
    for client in (echo, requester):
        client.disconnect()
        client.loop_stop()
    return statistics.median(samples[count // 10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/fmnist_32.npz")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--latency-count", type=int, default=400)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    store = ModelStore()
    store.add_file(args.model)
    served = store.models()[0]
    images = datasets.load("fashion-mnist", "test").images[:1000]
    result = run_device(served.program, images)
    split_words = np.concatenate([result.split_words] * max(1, args.requests // len(images)))[:args.requests]
    raw = raw_forward_rate(store, split_words, args.max_batch)
    single_us = 1e6 / raw_forward_rate(store, split_words[:200], 1)  # compute floor of one lone request

    with Broker() as broker:
        server = start_server(broker.address, args.model, args.workers, args.max_batch)
        try:
            per_device = args.requests // args.devices
            run_devices(broker.host, broker.port, served.program, served.hash_bytes, result.split_words,
                        result.entropy, result.local_class, args.devices, 50, all_to_server=True, window=4)  # warm-up
            report = run_devices(broker.host, broker.port, served.program, served.hash_bytes, result.split_words,
                                 result.entropy, result.local_class, args.devices, per_device, all_to_server=True,
                                 window=args.window, timeout_s=30)
            answered = report.count("server")
            mqtt_rate = answered / report.wall_s
            latency = run_devices(broker.host, broker.port, served.program, served.hash_bytes, result.split_words,
                                  result.entropy, result.local_class, 1, args.latency_count, all_to_server=True,
                                  window=1, timeout_s=30)
            rtts = [o.t_round_trip_us for o in latency.outcomes if o.source == "server"]
            server_rtt = statistics.median(rtts[len(rtts) // 10:])
        finally:
            server.terminate()
            server.wait(30)
        request_bytes = protocol.REQUEST_HEADER_BYTES + served.program.split_words * 8
        echo_rtt = echo_round_trip_us(broker.host, broker.port, request_bytes, args.latency_count)

    print(f"model {served.name}: split {served.split_chw} = {request_bytes}-byte requests; {args.workers} workers, "
          f"max batch {args.max_batch}; {args.devices} devices x window {args.window}")
    print(f"{'throughput (req/s)':<24}{'MQTT':>12}{'raw forward':>14}{'ratio':>9}{'goal':>9}")
    print(f"{'':<24}{mqtt_rate:>12.0f}{raw:>14.0f}{mqtt_rate / raw:>9.2f}{'>= 0.8':>9}")
    print(f"  ({answered}/{len(report.outcomes)} answered by the server, lost {report.lost}, duplicates "
          f"{report.duplicates}, misrouted {report.misrouted})")
    print(f"{'round trip (us, median)':<24}{'ddnn-server':>12}{'bare echo':>14}{'ratio':>9}{'goal':>9}")
    print(f"{'':<24}{server_rtt:>12.0f}{echo_rtt:>14.0f}{server_rtt / echo_rtt:>9.2f}{'<= 1.5':>9}")
    floor = echo_rtt + single_us
    print(f"  (one request's raw forward alone takes {single_us:.0f} us: echo + forward = {floor:.0f} us, "
          f"ddnn-server / that = {server_rtt / floor:.2f})")


if __name__ == "__main__":
    main()
