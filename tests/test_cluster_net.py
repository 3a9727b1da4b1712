"""Acceptance on a real 3-node RabbitMQ cluster: two ddnn-servers consuming the model's quorum queue over AMQP
from different nodes, 24 simulated devices on MQTT 3.1.1 spread over the three nodes. Every request is answered
by a server exactly once (a second reply after a fail-over is dropped by request id), and every answer is the
Python evaluation's; the same with a server killed mid-run (its unacknowledged requests go to the other) and
with a node killed mid-run (its devices fail over to the next node)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from net_harness import Expected, ServerProcess, device_rows, finish_device, start_device, wait_for

from ddnn_gen.device.simulated import SampleOutcome, SimReport, run_devices
from ddnn_gen.wire import topics
from ddnn_gen.wire.rabbitmq_cluster import RabbitCluster, rabbitmq_sbin

pytestmark = pytest.mark.skipif(rabbitmq_sbin() is None,
                                reason="rabbitmq-server not installed (make setup installs it)")

DEVICES = 24
REQUESTS = 24  # per device
SERVERS = ("srvA", "srvB")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fmnist_expected: Expected) -> Iterator[RabbitCluster]:
    users = {f"d{i}": "device" for i in range(DEVICES)} | {name: "server" for name in SERVERS} | {"c0": "device"}
    found = RabbitCluster(tmp_path_factory.mktemp("rabbit"), 3, users, [(fmnist_expected.loaded.hash_bytes, 1)])
    with found:
        yield found


def _server(cluster: RabbitCluster, name: str, first_node: int, models: Path) -> ServerProcess:
    """``name`` on node ``first_node`` (the other nodes as fail-over), prefetch 64."""
    urls = []
    for k in range(3):
        urls += ["--amqp", cluster.amqp_url(name, (first_node - 1 + k) % 3 + 1)]
    return ServerProcess(None, models, workers=1, extra=[*urls, "--amqp-password-file",
                                                         str(cluster.password_file(name)),
                                                         "--receive-maximum", "64"]).start()


def _run(cluster: RabbitCluster, expected: Expected, on_outcome: object = None) -> SimReport:
    def brokers(device_id: str) -> list:
        # Device i starts on node i mod 3 + 1: a third of the fleet on each node.
        return cluster.mqtt_all(device_id, int(device_id[1:]) % 3 + 1)

    return run_devices(brokers, expected.program, expected.loaded.hash_bytes, expected.device.split_words,
                       expected.device.entropy, expected.device.local_class, DEVICES, REQUESTS, timeout_s=30.0,
                       device_prefix="d", protocol=mqtt.MQTTv311, subscribe_qos=0,
                       on_outcome=on_outcome)  # type: ignore[arg-type]


def _check(report: SimReport, expected: Expected) -> None:
    assert len(report.outcomes) == DEVICES * REQUESTS
    sources = {source: report.count(source) for source in ("local", "server", "fallback", "error")}
    assert sources["fallback"] == 0 and sources["error"] == 0, sources
    assert sources["server"] > DEVICES, sources  # the servers did answer a good share
    assert report.misrouted == 0
    keys = [(o.device_id, o.request_id) for o in report.outcomes if o.source == "server"]
    assert len(keys) == len(set(keys))  # one answer per request
    wrong = [o for o in report.outcomes if o.final_class != int(expected.final_class(o.threshold)[o.index])]
    assert not wrong, wrong[:3]


def _stop(servers: list[ServerProcess]) -> None:
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            assert server.terminate() == 0, server.output


def _when(count: int, action: object) -> object:
    """An on_outcome callback that runs ``action`` (in its own thread) once ``count`` answers are in."""
    seen = [0]
    lock = threading.Lock()

    def outcome(_outcome: SampleOutcome) -> None:
        with lock:
            seen[0] += 1
            fire = seen[0] == count
        if fire:
            threading.Thread(target=action, daemon=True).start()  # type: ignore[arg-type]

    return outcome


def _closes_connection(cluster: RabbitCluster, user: str, action: Callable[[mqtt.Client], object]) -> bool:
    """Whether the cluster closes ``user``'s MQTT 3.1.1 connection after ``action``: 3.1.1 has no negative
    PUBACK, and RabbitMQ 3.10 answers an unauthorised SUBSCRIBE or PUBLISH by closing the connection."""
    connected, gone, acked = threading.Event(), threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311)
    connection = cluster.mqtt(user, 2)
    connection.configure(client)
    client.on_connect = lambda *args: connected.set()
    client.on_disconnect = lambda *args: gone.set()
    client.on_subscribe = lambda *args: acked.set()
    client.on_publish = lambda *args: acked.set()
    client.reconnect_delay_set(30, 30)
    client.connect(connection.host, connection.port)
    client.loop_start()
    try:
        assert connected.wait(10)
        action(client)
        assert wait_for(lambda: gone.is_set() or acked.is_set(), 10.0)
        time.sleep(0.3)  # a refusal closes the connection right after, if at all
        return gone.is_set()
    finally:
        client.disconnect()
        client.loop_stop()


def test_device_may_use_only_its_own_topics(cluster: RabbitCluster, fmnist_expected: Expected) -> None:
    """The cluster's topic permissions, live: d0 may read its replies and publish its requests, not d1's."""
    model = fmnist_expected.loaded.hash_bytes
    assert not _closes_connection(cluster, "d0", lambda c: c.subscribe(topics.reply_topic("d0"), 1))
    assert _closes_connection(cluster, "d0", lambda c: c.subscribe(topics.reply_topic("d1"), 1))
    assert _closes_connection(cluster, "d0", lambda c: c.subscribe(topics.request_topic(model, "d1"), 1))
    assert _closes_connection(cluster, "d0", lambda c: c.publish(topics.request_topic(model, "d1"), b"x", qos=1))
    assert _closes_connection(cluster, "d0", lambda c: c.publish(topics.reply_topic("d1"), b"x", qos=1))
    assert _closes_connection(cluster, "d0", lambda c: c.publish(topics.threshold_topic(model), b"0.1", qos=1))


def test_two_servers_on_two_nodes_answer_every_request(cluster: RabbitCluster, fmnist_expected: Expected,
                                                       fmnist_model_path: Path) -> None:
    servers = [_server(cluster, "srvA", 1, fmnist_model_path), _server(cluster, "srvB", 2, fmnist_model_path)]
    try:
        report = _run(cluster, fmnist_expected)
    finally:
        _stop(servers)
    _check(report, fmnist_expected)
    assert report.duplicates == 0 and report.failovers == 0  # nothing failed, so nothing was sent twice
    replies = [server.replies_sent() for server in servers]
    assert sum(replies) == report.count("server") and min(replies) > 0, replies  # both took a share


def test_killed_server_leaves_its_requests_to_the_other(cluster: RabbitCluster, fmnist_expected: Expected,
                                                        fmnist_model_path: Path) -> None:
    servers = [_server(cluster, "srvA", 1, fmnist_model_path), _server(cluster, "srvB", 2, fmnist_model_path)]
    try:
        report = _run(cluster, fmnist_expected, _when(DEVICES * REQUESTS // 3, servers[0].kill))
        assert servers[0].process is not None and servers[0].process.returncode == -9
    finally:
        _stop(servers)
    _check(report, fmnist_expected)
    # The survivor answered what it got first-hand and what the dead one had not acknowledged.
    found = re.findall(r"AMQP: (\d+) requests received, (\d+) of them redelivered", servers[1].output)
    assert found and int(found[-1][1]) > 0, servers[1].output[-2000:]


def test_device_sim_command_on_the_cluster(cluster: RabbitCluster, fmnist_model_path: Path) -> None:
    """`ddnngen device-sim` with the cluster's options: MQTT 3.1.1, QoS 0 subscriptions, the other nodes."""
    from click.testing import CliRunner

    from ddnn_gen.cli import cli

    nodes = cluster.mqtt_all("d0", 1)
    servers = [_server(cluster, "srvA", 1, fmnist_model_path)]
    try:
        result = CliRunner().invoke(cli, ["device-sim", str(fmnist_model_path), "--broker", nodes[0].address,
                                          "--also-broker", nodes[1].address, "--also-broker", nodes[2].address,
                                          "--credentials", str(cluster.directory / "credentials"),
                                          "--device-prefix", "d", "--devices", "3", "--requests", "20",
                                          "--all-to-server", "--mqtt-version", "3.1.1", "--subscribe-qos", "0",
                                          "--impl", "numpy", "--timeout-ms", "20000"])
    finally:
        _stop(servers)
    assert result.exit_code == 0, result.output
    assert "samples 60 in" in result.output and "server 60, fallback 0, error 0" in result.output, result.output
    assert servers[0].replies_sent() == 60


def test_killed_node_devices_fail_over(cluster: RabbitCluster, fmnist_expected: Expected, fmnist_model_path: Path,
                                       net_device_bin: Path, fmnist_samples_file: Path, tmp_path: Path) -> None:
    """Node 3 is SIGKILLed while 8 of the simulated devices and the generated C device (ASan build, MQTT 3.1.1,
    the other nodes as --also-broker) are on it."""
    servers = [_server(cluster, "srvA", 1, fmnist_model_path), _server(cluster, "srvB", 2, fmnist_model_path)]
    c_out = tmp_path / "c0.csv"
    nodes = cluster.mqtt_all("c0", 3)
    c_device = start_device(net_device_bin, fmnist_samples_file, c_out, "c0", nodes[0], "--mqtt-version", "3.1.1",
                            "--subscribe-qos", "0", "--also-broker", nodes[1].address, "--also-broker",
                            nodes[2].address, "--threshold", "0", "--timeout-ms", "20000", "--pace-ms", "10")
    c_rows_at_kill = []

    def kill_node() -> None:
        c_rows_at_kill.append(len(device_rows(c_out)))
        cluster.kill(3)

    try:
        assert wait_for(lambda: len(device_rows(c_out)) >= 100, 60.0)  # the C device is well under way
        report = _run(cluster, fmnist_expected, _when(DEVICES * REQUESTS // 3, kill_node))
        c_stderr = finish_device(c_device)
    finally:
        if c_device.poll() is None:
            c_device.kill()
        _stop(servers)
    _check(report, fmnist_expected)
    # Each device of node 3 moved on; duplicates only from requests sent again then (by us, or by paho's own
    # resend of an unacknowledged publish), one outstanding request per device.
    assert report.failovers >= DEVICES // 3, report
    assert report.duplicates <= 2 * report.failovers
    # The C device too: every sample answered, none locally for want of a server, classes the evaluation's.
    rows = device_rows(c_out)
    assert c_rows_at_kill and c_rows_at_kill[0] < len(rows) == len(fmnist_expected.server_class), c_stderr
    local = np.array([r["exit_local"] == "1" for r in rows])
    assert [r["source"] for r in rows] == ["local" if lo else "server" for lo in local], c_stderr
    assert [int(r["final_class"]) for r in rows] == fmnist_expected.final_class(0.0).tolist()
    assert "lost the broker" in c_stderr
    assert any(f"connected to {node.address} as c0" in c_stderr for node in nodes[1:]), c_stderr
    assert cluster.pid(3) is None or not Path(f"/proc/{cluster.pid(3)}").exists()
    # The quorum queue lives on: the two nodes left are its majority.
    assert sorted(cluster.running_nodes()) == ["ddnn1@localhost", "ddnn2@localhost"]
    assert topics.request_queue(fmnist_expected.loaded.hash_bytes) in cluster.ctl("list_queues", "name")
