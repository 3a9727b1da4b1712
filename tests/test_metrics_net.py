"""ddnn-server's Prometheus endpoint and JSON request log against what simulated devices counted: real
Mosquitto, real server process, the shipped Fashion-MNIST model on real test images."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import require_tool
from net_harness import Expected, RawClient, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from ddnn_gen.device.simulated import run_devices, split_header
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.broker import Broker, free_port
from ddnn_gen.wire.codec import RequestHeader, Status


@pytest.fixture()
def running_broker() -> Iterator[Broker]:
    require_tool("mosquitto")
    with Broker() as broker:
        yield broker


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value)]} of the server's /metrics, parsed by prometheus_client's parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    found = [value for got, value in samples.get(name, []) if all(got.get(k) == v for k, v in labels.items())]
    return sum(found)


def test_metrics_and_request_log_equal_what_the_devices_counted(running_broker: Broker, fmnist_expected: Expected,
                                                               fmnist_model_path: object) -> None:
    broker, expected = running_broker, fmnist_expected
    port = free_port()
    server = ServerProcess(broker.address, fmnist_model_path, workers=2,
                           extra=["--metrics-port", str(port), "--log-format", "json"]).start()
    name = expected.loaded.spec.name
    program, model_hash = expected.program, expected.loaded.hash_bytes
    bad = RawClient(broker.connection(), "bad-sender")
    try:
        before = _scrape(port)
        assert _value(before, "ddnn_requests_total") == 0
        # Devices exit locally at the model's threshold and offload the rest: only those reach the server.
        report = run_devices(broker.connection(), program, model_hash, expected.device.split_words,
                             expected.device.entropy, expected.device.local_class, 4, 150, timeout_s=30.0)
        # Two kinds of bad request: one rejected before its model is known, one after.
        good = codec.encode_request(split_header(program, model_hash, 1),
                                    expected.device.split_words[0])
        height, width, channels = program.split_hwc
        wrong_shape = codec.encode_request(RequestHeader(model_hash, len(program.layers), channels + 64, height,
                                                         width, 2),
                                           np.zeros((height, width, 2), np.uint64))
        topic = topics.request_topic(model_hash, bad.device_id)
        statuses = []
        for payload in [good[:-40]] * 3 + [wrong_shape] * 2:
            bad.publish(topic, payload)
            reply = bad.next_reply(20.0)
            assert reply is not None
            statuses.append(reply.status)
        assert statuses == [Status.MALFORMED] * 3 + [Status.SHAPE_MISMATCH] * 2
        after = _scrape(port)
    finally:
        bad.close()
        assert server.terminate() == 0, server.output
    offloaded = report.count("server")
    assert report.count("fallback") == 0 and report.count("error") == 0
    assert 0 < offloaded < len(report.outcomes)  # both paths exercised
    assert offloaded == sum(1 for o in report.outcomes if o.source != "local")
    assert _value(after, "ddnn_requests_total", model=name, status="OK") == offloaded
    assert _value(after, "ddnn_requests_total", model="-", status="MALFORMED") == 3
    assert _value(after, "ddnn_requests_total", model=name, status="SHAPE_MISMATCH") == 2
    assert _value(after, "ddnn_requests_total") == offloaded + 5
    # Every OK reply came from the last tier of this two-tier model, and each was timed once.
    assert _value(after, "ddnn_answered_by_total", model=name, tier="1") == offloaded
    for histogram in ("ddnn_service_seconds", "ddnn_queue_wait_seconds", "ddnn_server_latency_seconds"):
        assert _value(after, f"{histogram}_count", model=name) == offloaded, histogram
        assert _value(after, f"{histogram}_bucket", model=name, le="+Inf") == offloaded, histogram
    assert _value(after, "ddnn_batch_size_sum") == offloaded
    assert 1 <= _value(after, "ddnn_batch_size_count") <= offloaded
    assert _value(after, "ddnn_queue_depth") == 0

    # --log-format json: every line is JSON; one per reply, with the device it went to and its status.
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert all(line.startswith("{") for line in server.lines if "ddnn-server:" not in line)
    requests = [r for r in records if r["logger"] == "ddnn_server.requests"]
    assert len(requests) == offloaded + 5
    per_device = Counter(r["device"] for r in requests if r["status"] == "OK")
    assert per_device == Counter(o.device_id for o in report.outcomes if o.source == "server")
    assert Counter(r["status"] for r in requests if r["device"] == "bad-sender") == {"MALFORMED": 3,
                                                                                     "SHAPE_MISMATCH": 2}
    ok = [r for r in requests if r["status"] == "OK"]
    assert all(r["model"] == name and r["latency_ms"] >= r["service_ms"] >= 0 for r in ok)


def test_metrics_port_in_use_is_a_clear_error(fmnist_model_path: object) -> None:
    import socket
    import subprocess
    import sys

    require_tool("mosquitto")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-c", "from ddnn_server.cli import main; main()", "--models",
                                 str(fmnist_model_path), "--metrics-port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"cannot expose metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
