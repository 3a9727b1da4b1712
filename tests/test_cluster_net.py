"""Acceptance on a real 3-node RabbitMQ cluster: two ddnn-servers consuming the model's quorum queue over AMQP
from different nodes, 24 simulated devices on MQTT 3.1.1 spread over the three nodes. Every request is answered
by a server exactly once (a second reply after a fail-over is dropped by request id), and every answer is the
Python evaluation's; the same with a server killed mid-run (its unacknowledged requests go to the other) and
with a node killed mid-run (its devices fail over to the next node)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from net_harness import Expected, ServerProcess, wait_for

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
    users = {f"d{i}": "device" for i in range(DEVICES)} | {name: "server" for name in SERVERS}
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
    assert servers[1].replies_sent() > 0


def test_killed_node_devices_fail_over(cluster: RabbitCluster, fmnist_expected: Expected,
                                       fmnist_model_path: Path) -> None:
    servers = [_server(cluster, "srvA", 1, fmnist_model_path), _server(cluster, "srvB", 2, fmnist_model_path)]
    try:
        report = _run(cluster, fmnist_expected, _when(DEVICES * REQUESTS // 3, lambda: cluster.kill(3)))
    finally:
        _stop(servers)
    _check(report, fmnist_expected)
    # Each device of node 3 moved on; duplicates only from requests sent again then (by us, or by paho's own
    # resend of an unacknowledged publish), one outstanding request per device.
    assert report.failovers >= DEVICES // 3, report
    assert report.duplicates <= 2 * report.failovers
    assert cluster.pid(3) is None or not Path(f"/proc/{cluster.pid(3)}").exists()
    # The quorum queue lives on: the two nodes left are its majority.
    assert sorted(cluster.running_nodes()) == ["ddnn1@localhost", "ddnn2@localhost"]
    assert topics.request_queue(fmnist_expected.loaded.hash_bytes) in cluster.ctl("list_queues", "name")
