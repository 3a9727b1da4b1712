"""Live telemetry over MQTT: what servers and simulated devices publish through a real Mosquitto equals what
they did; the broker-config rules let a device write only its own telemetry; a reader rejects hostile
messages with a reason."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from net_harness import Expected, RawClient, ServerProcess, secure_broker, serving

from ddnn_gen.device.simulated import SimDevice, run_devices
from ddnn_gen.wire import telemetry, topics
from ddnn_gen.wire.broker import Broker

NOT_AUTHORIZED = "Not authorized"
INTERVAL_S = 0.3


@pytest.fixture()
def plain() -> Iterator[Broker]:
    require_tool("mosquitto")
    with Broker() as broker:
        yield broker


def _collect(reader: RawClient) -> list[telemetry.Telemetry]:
    found = []
    while True:
        try:
            topic, payload = reader.messages.get_nowait()
        except queue.Empty:
            return found
        if topics.parse_telemetry_topic(topic) is not None:
            found.append(telemetry.parse(topic, payload))  # every message must pass the reader's checks


def test_server_and_device_telemetry_equal_what_happened(plain: Broker, fmnist_expected: Expected,
                                                         fmnist_model_path: Path) -> None:
    expected = fmnist_expected
    reader = RawClient(plain.connection(), "reader", subscribe_replies=False)
    for topic in topics.TELEMETRY_SUBSCRIPTIONS:
        assert reader.subscribe(topic).startswith("Granted")
    server = ServerProcess(plain.address, fmnist_model_path, workers=2, server_id="srv-tel",
                           extra=["--telemetry-interval", str(INTERVAL_S)]).start()
    try:
        report = run_devices(plain.connection(), expected.program, expected.loaded.hash_bytes,
                             expected.device.split_words, expected.device.entropy, expected.device.local_class,
                             3, 200, timeout_s=30.0, telemetry_interval_s=INTERVAL_S, window=4)
        time.sleep(3 * INTERVAL_S)  # the server's window holding the last replies goes out
    finally:
        assert server.terminate() == 0, server.output
        time.sleep(0.2)
        messages = _collect(reader)
        reader.close()
    servers = [m for m in messages if m.kind == "server"]
    devices = [m for m in messages if m.kind == "device"]
    assert servers and {m.source for m in servers} == {"srv-tel"}
    name, key = expected.loaded.spec.name, topics.model_key(expected.loaded.hash_bytes)
    assert all(m.body["models"] == {name: key} and m.body["workers"] == 2 for m in servers)
    # Rates times their intervals add up to the replies the server sent (each interval is rounded to 1 ms).
    ok = sum(m.body["rps"].get(name, {}).get("OK", 0) * m.body["interval_s"] for m in servers)
    offloaded = report.count("server")
    assert offloaded > 0 and abs(ok - offloaded) <= 0.01 * offloaded + 1, (ok, offloaded)
    busy = [m for m in servers if m.body["rps"]]
    assert busy and all(m.body["latency_ms"]["p99"] >= m.body["latency_ms"]["p50"] > 0 for m in busy)
    assert all(0 < m.body["batch"]["mean"] <= m.body["batch"]["max"] for m in busy if m.body["batch"]["count"])
    # Each device's last message (sent as it stops) holds its final counts, equal to what it recorded.
    last = {m.source: m.body for m in devices}
    assert set(last) == {"sim0", "sim1", "sim2"}
    for device_id, body in last.items():
        mine = [o for o in report.outcomes if o.device_id == device_id]
        assert body["samples"] == len(mine) == 200
        assert body["local"] == sum(o.source == "local" for o in mine)
        assert body["offloaded"] == sum(o.source != "local" for o in mine)
        assert body["fallback"] == 0 and body["error"] == 0
        assert body["threshold"] == expected.program.threshold and body["model"] == key
    assert len(devices) > 3  # periodic, not only the final one
    # Counters only grow.
    for device_id in last:
        samples = [m.body["samples"] for m in devices if m.source == device_id]
        assert samples == sorted(samples)


def test_a_device_writes_only_its_own_telemetry_and_the_operator_reads_it(fmnist_expected: Expected,
                                                                         fmnist_model_path: Path) -> None:
    users = {"devA": "device", "srv": "server", "ops": "operator"}
    with secure_broker(users) as secure, serving(secure.connection("srv"), fmnist_model_path):
        operator = RawClient(secure.connection("ops"), "ops", subscribe_replies=False)
        for topic in topics.TELEMETRY_SUBSCRIPTIONS:
            assert operator.subscribe(topic).startswith("Granted"), topic
        # The broker names clients by user name: the raw client and the device take turns as devA.
        attacker = RawClient(secure.connection("devA"), "devA")
        model_key = topics.model_key(fmnist_expected.loaded.hash_bytes)
        forged = telemetry.encode({**_device_body(), "device": "devB", "model": model_key})
        try:
            for topic in (*topics.TELEMETRY_SUBSCRIPTIONS, topics.device_telemetry_topic("devB")):
                assert attacker.subscribe(topic) == NOT_AUTHORIZED, topic
            for topic in (topics.device_telemetry_topic("devB"), topics.server_telemetry_topic("srv")):
                assert attacker.publish(topic, forged) == NOT_AUTHORIZED, topic
        finally:
            attacker.close()
        device = SimDevice("devA", secure.connection("devA"), fmnist_expected.loaded.hash_bytes,
                           telemetry_interval_s=0.2).start()
        try:
            time.sleep(2.5)  # the server's default interval is 2 s
        finally:
            device.stop()
        time.sleep(0.3)
        seen = _collect(operator)
        operator.close()
    assert {(m.kind, m.source) for m in seen} == {("device", "devA"), ("server", "srv")}


def _device_body() -> dict[str, object]:
    return {"v": 1, "device": "cam1", "model": "0" * 32, "time": 1.0, "samples": 10, "local": 6, "offloaded": 4,
            "fallback": 1, "error": 0, "threshold": 0.3, "thresholds": {"model": 0.3, "device": None, "default": 0.2}}


def test_hostile_telemetry_is_rejected_with_a_reason() -> None:
    topic = topics.device_telemetry_topic("cam1")
    assert telemetry.parse(topic, telemetry.encode(_device_body())).body["samples"] == 10
    cases = [
        (topic, b"{" * 20000, "bytes, more than"),
        (topic, b"\xff\xfe", "not JSON"),
        (topic, b'{"v": 1, "samples": NaN}', "not JSON"),
        (topic, json.dumps({**_device_body(), "extra": 1}).encode(), "Additional properties"),
        (topic, json.dumps({**_device_body(), "samples": -1}).encode(), "samples"),
        (topic, json.dumps({**_device_body(), "threshold": 2}).encode(), "threshold"),
        (topic, json.dumps({**_device_body(), "device": "cam2"}).encode(), "claims id"),
        (topic, json.dumps({**_device_body(), "device": "a/b"}).encode(), "device"),
        (topic, b"[1, 2]", "message"),
        ("ddnn/device/a+b/telemetry", telemetry.encode(_device_body()), "not a telemetry topic"),
        ("ddnn/device/cam1/telemetry/x", telemetry.encode(_device_body()), "not a telemetry topic"),
        (topics.server_telemetry_topic("cam1"), telemetry.encode(_device_body()), "server cam1"),
        (topic, b"[" * 5000 + b"]" * 5000, "not JSON|message"),
    ]
    for where, payload, reason in cases:
        with pytest.raises(telemetry.TelemetryError, match=reason):
            telemetry.parse(where, payload)


def test_server_refuses_a_telemetry_interval_that_would_flood_the_broker(fmnist_model_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "from ddnn_server.cli import main; main()", "--models",
                             str(fmnist_model_path), "--telemetry-interval", "0.01"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--telemetry-interval" in result.stderr and "0.1 s" in result.stderr


def test_generated_c_device_publishes_its_counters(plain: Broker, net_device_bin: Path, fmnist_samples_file: Path,
                                                    fmnist_model_path: Path, tmp_path: Path) -> None:
    """The generated C device (ddnn_device_net) publishes the same telemetry as the simulated devices, every
    --telemetry-interval-ms and at the end: each message passes the reader's checks, the counts never go back,
    and the last one equals what its CSV says it did."""
    from net_harness import device_rows, finish_device, start_device

    reader = RawClient(plain.connection(), "reader", subscribe_replies=False)
    assert reader.subscribe(topics.device_telemetry_topic("c-tel")).startswith("Granted")
    server = ServerProcess(plain.address, fmnist_model_path, workers=1).start()
    out = tmp_path / "results.csv"
    try:
        device = start_device(net_device_bin, fmnist_samples_file, out, "c-tel", plain.connection(),
                              "--telemetry-interval-ms", "100", "--pace-ms", "1", "--timeout-ms", "10000")
        finish_device(device)
    finally:
        assert server.terminate() == 0, server.output
    time.sleep(0.3)
    messages = _collect(reader)
    reader.close()
    rows = device_rows(out)
    assert len(messages) >= 3, len(messages)  # periodic ones and the final one
    samples = [m.body["samples"] for m in messages]
    assert samples == sorted(samples)
    last = messages[-1].body
    sources = [row["source"] for row in rows]
    assert last["samples"] == len(rows)
    assert last["local"] == sources.count("local") and last["fallback"] == sources.count("fallback")
    assert last["offloaded"] == len(rows) - sources.count("local") and last["error"] == sources.count("error")
    assert last["threshold"] == float(rows[-1]["threshold"]) and last["device"] == "c-tel"
    assert last["thresholds"] == {"model": None, "device": None, "default": float(rows[0]["threshold"])}
