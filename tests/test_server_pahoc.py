"""The C transports (server/pahoc_transport.py with either C side: c_runtime/ddnn_pahoc.c on Paho C, or the
server's own MQTT client c_runtime/ddnn_mqtt_batch.c) against a real Mosquitto: the bounds the C side keeps
(topic length, payload length, queue), replies only to the topic's device, whole batches handed over, TLS with
a password, keepalive, reconnection, and what a crash costs (in-flight requests fall back on the devices, none
hangs). The end-to-end scenarios shared with paho-mqtt are in test_server.py."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest
from net_harness import Expected, RawClient, ServerProcess, run_one_device, secure_broker, wait_for

from ddnn_gen.device.simulated import run_devices, split_header
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.codec import Status
from ddnn_server.transport import Incoming

MODEL_HASH = bytes(range(16))
# Each test below runs on both C sides (--transport paho-c and c-mqtt) unless it names one.
C_CLIENTS = pytest.mark.parametrize("client", ["paho-c", "c-mqtt"], indirect=True)
NEEDS = {"paho-c": ("/usr/include/MQTTAsync.h", "libpaho-mqtt-dev"), "c-mqtt": ("/usr/include/openssl/ssl.h",
                                                                                 "libssl-dev")}


@pytest.fixture()
def client(request: pytest.FixtureRequest) -> str:
    header, package = NEEDS[request.param]
    if not os.path.exists(header):
        pytest.skip(f"--transport {request.param} needs {package}")
    return str(request.param)


def _transport(broker: Broker, on_request: object, client: str, **kwargs: object):  # noqa: ANN202
    from ddnn_server.pahoc_transport import PahocTransport

    transport = PahocTransport(broker.connection(), f"pahoc-{os.getpid()}", "g", [(MODEL_HASH, 1)],
                               on_request, persistent=False, client=client, **kwargs)  # type: ignore[arg-type]
    transport.start()
    assert transport.wait_ready(10.0), transport.connection_problem
    return transport


@C_CLIENTS
def test_bounds_of_the_c_side_topic_payload_and_queue(broker: Broker, client: str) -> None:
    """A topic longer than the C bound never reaches Python; an oversized payload arrives as its header,
    flagged with its wire size (also one larger than c-mqtt's read buffer, which it discards as it arrives);
    the queue never grows past its capacity: Paho C drops (counted) what finds it full, c-mqtt asks the broker
    for no more unacknowledged requests than it holds, so the rest wait in the broker and all arrive; what was
    queued arrives intact and in order."""
    release = threading.Event()
    got: list[Incoming] = []

    def on_request(incoming: Incoming) -> None:
        got.append(incoming)
        release.wait(30.0)  # the take thread stops here: the C queue fills behind it

    transport = _transport(broker, on_request, client, queue_capacity=8, max_request_bytes=1000)
    sender = RawClient(broker.connection(), "sender")
    key = topics.model_key(MODEL_HASH)
    try:
        assert sender.publish(f"ddnn/req/{key}/{'x' * 600}", b"long topic") == "Success"
        big = codec.REQUEST_MAGIC + bytes(range(60)) + bytes(5000)
        huge = codec.REQUEST_MAGIC + bytes(range(60)) + bytes(3 << 20)  # over any read buffer of c-mqtt's
        assert sender.publish(f"ddnn/req/{key}/sender", big) == "Success"
        assert wait_for(lambda: len(got) == 1, 10.0)
        assert sender.publish(f"ddnn/req/{key}/huge", huge) == "Success"
        for index in range(40):
            assert sender.publish(f"ddnn/req/{key}/dev{index}", index.to_bytes(4, "little")) == "Success"
        if client == "paho-c":
            assert wait_for(lambda: transport.stats()["received"] + transport.stats()["dropped_full"] == 42, 10.0)
        else:
            assert wait_for(lambda: transport.stats()["received"] == 1 + 8, 10.0)
            time.sleep(0.5)  # nothing more arrives while the queue is full
        stats = transport.stats()
        assert stats["dropped_topic"] == 1 and stats["queued"] == 8, stats
        if client == "paho-c":
            assert stats["oversized"] == 2 and stats["dropped_full"] == 41 - 8, stats
        else:
            assert stats["oversized"] == 2 and stats["dropped_full"] == 0, stats
        release.set()
        kept = 1 + 8 if client == "paho-c" else 1 + 41
        assert wait_for(lambda: len(got) == kept, 10.0)
        stats = transport.stats()
    finally:
        release.set()
        sender.close()
        transport.close()
    oversized = got[0]
    assert oversized.truncated_from == len(big) and oversized.payload == big[:codec.REQUEST_HEADER_BYTES]
    assert oversized.topic == f"ddnn/req/{key}/sender" and oversized.qos == 1
    assert got[1].truncated_from == len(huge) and got[1].payload == huge[:codec.REQUEST_HEADER_BYTES]
    assert got[1].topic == f"ddnn/req/{key}/huge"
    # What found room (all of them on c-mqtt), in order and intact, on time.monotonic()'s clock.
    arrived = range(7) if client == "paho-c" else range(40)
    assert [incoming.payload for incoming in got[2:]] == [index.to_bytes(4, "little") for index in arrived]
    assert [incoming.topic.rsplit("/", 1)[1] for incoming in got[2:]] == [f"dev{index}" for index in arrived]
    assert all(incoming.truncated_from == 0 for incoming in got[2:])
    assert all(0 < time.monotonic() - incoming.received < 60 for incoming in got)
    if client == "c-mqtt":
        assert stats["received"] == 42 and stats["oversized"] == 2 and stats["dropped_full"] == 0, stats


def _broker_sockets_no_delay(port: int) -> list[bool]:
    """TCP_NODELAY of every stream socket of this process connected to ``port``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            probe = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with probe:
            try:
                if probe.type != socket.SOCK_STREAM or probe.getpeername()[1] != port:
                    continue
                found.append(bool(probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
            except (OSError, IndexError, TypeError):
                continue
    return found


@C_CLIENTS
def test_nagle_is_off_on_the_broker_connection(broker: Broker, client: str) -> None:
    """Paho C leaves Nagle's algorithm on: a lone round trip then waits ~40 ms for a delayed ACK (measured
    43.7 ms against 1.05 ms with TCP_NODELAY in bench_server). The shim turns it off on every connection;
    c-mqtt opens its socket so."""
    transport = _transport(broker, lambda incoming: None, client)
    try:
        assert _broker_sockets_no_delay(broker.port) == [True]
    finally:
        transport.close()


def _replies_and_stats(transport: object, clients: list[tuple[RawClient, int]]) -> tuple[list[list[bytes]],
                                                                                          dict[str, int]]:
    """The replies each client waits for (how many given), and the transport's stats once they were acked."""
    replies = [[client.replies.get(timeout=10.0) for _ in range(count)] for client, count in clients]
    assert transport.wait_replies_acked(5.0)  # type: ignore[attr-defined]
    return replies, transport.stats()  # type: ignore[attr-defined]


def _close(transport: object, *clients: RawClient) -> None:
    for client in clients:
        client.close()
    transport.close()  # type: ignore[attr-defined]


@C_CLIENTS
def test_replies_reach_only_the_topics_device_and_batches_are_taken_whole(broker: Broker, client: str) -> None:
    seen: list[Incoming] = []
    transport_box: list[object] = []
    burst = 200

    def on_request(incoming: Incoming) -> None:
        seen.append(incoming)
        routed = topics.parse_request_topic(incoming.topic)
        assert routed is not None
        transport_box[0].reply(incoming, routed[1], b"for " + routed[1].encode())  # type: ignore[attr-defined]

    transport = _transport(broker, on_request, client)
    transport_box.append(transport)
    alice, bob = RawClient(broker.connection(), "alice"), RawClient(broker.connection(), "bob")
    key = topics.model_key(MODEL_HASH)
    try:
        # Published without waiting for each PUBACK, so requests arrive faster than one per take.
        for index in range(burst):
            alice._client.publish(f"ddnn/req/{key}/alice", index.to_bytes(4, "little"), qos=1)
        assert wait_for(lambda: len(seen) == burst, 20.0)
        assert bob.publish(f"ddnn/req/{key}/bob", b"b") == "Success"
        (alice_replies, (bob_reply,)), stats = _replies_and_stats(transport, [(alice, burst), (bob, 1)])
    finally:
        _close(transport, alice, bob)
    assert alice_replies == [b"for alice"] * burst and bob_reply == b"for bob"
    assert alice.replies.empty() and bob.replies.empty()
    assert stats["published"] == stats["completed"] >= burst + 1 and stats["failed"] == 0
    assert transport.takes < burst, f"{transport.takes} takes for {burst} requests: not batched"


@C_CLIENTS
def test_a_takes_requests_come_as_one_batch_and_reply_many_answers_each_its_own_device(broker: Broker,
                                                                                       client: str) -> None:
    batches: list[list[Incoming]] = []
    transport_box: list[object] = []
    burst = 300

    def on_requests(batch: list[Incoming]) -> None:
        batches.append(batch)
        replies = []
        for incoming in batch:
            routed = topics.parse_request_topic(incoming.topic)
            assert routed is not None
            replies.append((incoming, routed[1], routed[1].encode() + b":" + incoming.payload))
        transport_box[0].reply_many(replies)  # type: ignore[attr-defined]

    def on_request(incoming: Incoming) -> None:
        raise AssertionError("a take's requests must come through on_requests")

    transport = _transport(broker, on_request, client, on_requests=on_requests)
    transport_box.append(transport)
    alice, bob = RawClient(broker.connection(), "alice"), RawClient(broker.connection(), "bob")
    key = topics.model_key(MODEL_HASH)
    try:
        for index in range(burst):  # interleaved, without waiting for PUBACKs: several per take
            (alice if index % 2 else bob)._client.publish(f"ddnn/req/{key}/{'alice' if index % 2 else 'bob'}",
                                                          index.to_bytes(4, "little"), qos=1)
        (alice_replies, bob_replies), stats = _replies_and_stats(transport, [(alice, burst // 2), (bob, burst // 2)])
    finally:
        _close(transport, alice, bob)
    # Each device heard exactly its own requests' replies, in the order it sent them.
    assert alice_replies == [b"alice:" + i.to_bytes(4, "little") for i in range(1, burst, 2)]
    assert bob_replies == [b"bob:" + i.to_bytes(4, "little") for i in range(0, burst, 2)]
    assert sum(len(batch) for batch in batches) == burst and len(batches) < burst and max(map(len, batches)) > 1
    assert stats["published"] == stats["completed"] >= burst and stats["failed"] == 0
    assert transport.unsent_replies == 0


@C_CLIENTS
def test_the_cffi_declarations_are_the_header_s(client: str) -> None:
    from ddnn_gen.codegen.resources import c_runtime_dir
    from ddnn_server.pahoc_transport import header_cdef, load_library

    header = (c_runtime_dir() / "ddnn_pahoc.h").read_text()
    lib = load_library(client).lib
    declared = set(re.findall(r"\b(ddnn_pahoc_\w+)\s*\(", header))
    assert {"ddnn_pahoc_take", "ddnn_pahoc_publish_many"} <= declared
    assert all(callable(getattr(lib, name)) for name in declared)
    assert "/*" not in header_cdef(header) and "#" not in header_cdef(header)


@C_CLIENTS
def test_tls_with_a_password_and_the_reason_when_refused(fmnist_expected: Expected, fmnist_model_path: object,
                                                         client: str) -> None:
    """The deployment broker (TLS, password file, ACL): served like paho-mqtt; a device's credentials get the
    broker's refusal as the reason it is not ready."""
    with secure_broker({"devA": "device", "srv": "server"}) as secure:
        server = ServerProcess(secure.connection("srv"), fmnist_model_path, workers=1,
                               extra=["--transport", client]).start()
        try:
            report = run_one_device(secure.connection("devA"), "devA", fmnist_expected, 100)
        finally:
            assert server.terminate() == 0, server.output
        assert report.count("server") == 100 and report.misrouted == 0
        wrong = ServerProcess(secure.connection("devA"), fmnist_model_path, workers=1,
                              extra=["--transport", client])
        with pytest.raises(RuntimeError, match="did not become ready"):
            wrong.start(timeout_s=8.0)
        assert "refused the subscriptions" in wrong.output and "Not authorized" in wrong.output, wrong.output


@C_CLIENTS
def test_a_killed_server_costs_its_in_flight_requests_to_the_fallback_and_none_hangs(
        broker: Broker, fmnist_expected: Expected, fmnist_model_path: object, client: str) -> None:
    """Paho C acks on arrival, c-mqtt when the server takes a request: SIGKILL loses what the server held.
    Every request still ends, answered by the server or by the device's own exit after its timeout, and the
    restarted server answers the rest."""
    args = ["--transport", client]
    server = ServerProcess(broker.address, fmnist_model_path, workers=2, server_id="pahoc-crash", extra=args).start()
    restarted: list[ServerProcess] = []
    answered = threading.Semaphore(0)

    def crash_and_restart() -> None:
        for _ in range(300):
            answered.acquire()
        server.kill()
        time.sleep(0.5)
        restarted.append(ServerProcess(broker.address, fmnist_model_path, workers=2, server_id="pahoc-crash",
                                       extra=args).start())

    chaos = threading.Thread(target=crash_and_restart)
    chaos.start()
    started = time.monotonic()
    try:
        report = run_devices(broker.connection(), fmnist_expected.program, fmnist_expected.loaded.hash_bytes,
                             fmnist_expected.device.split_words, fmnist_expected.device.entropy,
                             fmnist_expected.device.local_class,
                             6, 250, all_to_server=True, timeout_s=2.0, window=4,
                             on_outcome=lambda _: answered.release())
    finally:
        chaos.join()
        for process in restarted:
            process.terminate()
        server.kill()
    assert len(restarted) == 1 and restarted[0].replies_sent() > 0, "the run ended before the crash"
    assert len(report.outcomes) == 1500 and report.misrouted == 0
    counts = {source: report.count(source) for source in ("server", "fallback", "error")}
    assert counts["server"] + counts["fallback"] == 1500, counts
    assert counts["server"] >= 300
    assert time.monotonic() - started < 120
    for outcome in report.outcomes:
        reference = fmnist_expected.server_class if outcome.source == "server" else fmnist_expected.device.local_class
        assert outcome.final_class == int(reference[outcome.index]), outcome


@C_CLIENTS
def test_oversized_request_is_answered_too_large_with_its_id(broker: Broker, fmnist_expected: Expected,
                                                              fmnist_model_path: object, client: str) -> None:
    server = ServerProcess(broker.address, fmnist_model_path, workers=1,
                           extra=["--transport", client, "--max-request-bytes", "10000"]).start()
    client = RawClient(broker.connection(), "big")
    good = codec.encode_request(split_header(fmnist_expected.program, fmnist_expected.loaded.hash_bytes, 42),
                                fmnist_expected.device.split_words[0])
    try:
        client.publish(topics.request_topic(fmnist_expected.loaded.hash_bytes, "big"), good + bytes(20000))
        reply = client.next_reply(20.0)
        client.publish(topics.request_topic(fmnist_expected.loaded.hash_bytes, "big"), good)
        after = client.next_reply(20.0)
    finally:
        client.close()
        assert server.terminate() == 0, server.output
    assert reply is not None and reply.status == Status.TOO_LARGE and reply.request_id == 42, reply
    assert "10000-byte limit" in reply.message
    assert after is not None and after.status == Status.OK and after.class_id == int(fmnist_expected.server_class[0])


@C_CLIENTS
def test_several_subscriptions_and_the_other_topics_go_to_on_other(broker: Broker, client: str) -> None:
    """Edge and aggregator servers subscribe to several models and to retained thresholds and statuses: all
    granted (Paho reports several reason codes another way than one), requests and the rest kept apart."""
    from ddnn_server.pahoc_transport import PahocTransport

    other_hash = bytes(range(16, 32))
    threshold = topics.threshold_topic(MODEL_HASH)
    setter = RawClient(broker.connection(), "setter", subscribe_replies=False)
    assert setter.publish(threshold, b"0.25", retain=True) in ("Success", "No matching subscribers")
    requests: list[Incoming] = []
    others: list[tuple[str, bytes]] = []
    transport = PahocTransport(broker.connection(), "pahoc-many", "g", [(MODEL_HASH, 1), (other_hash, 2)],
                               requests.append, persistent=False, extra_subscriptions=[threshold],
                               on_other=lambda topic, payload: others.append((topic, payload)), client=client)
    transport.start()
    try:
        assert transport.wait_ready(10.0), transport.connection_problem
        assert wait_for(lambda: others == [(threshold, b"0.25")], 10.0), others
        assert setter.publish(topics.request_topic(other_hash, "setter", 2), b"to tier 2") == "Success"
        assert wait_for(lambda: len(requests) == 1, 10.0)
    finally:
        setter.close()
        transport.close()
    assert requests[0].topic == topics.request_topic(other_hash, "setter", 2) and requests[0].payload == b"to tier 2"


@C_CLIENTS
def test_broker_restart_reconnects_resubscribes_and_serves_again(broker: Broker, client: str) -> None:
    """Both C sides reconnect on their own; each connection subscribes again, and the loss shows in the log."""
    got: list[Incoming] = []
    transport = _transport(broker, got.append, client)
    key = topics.model_key(MODEL_HASH)
    try:
        broker.kill()
        assert wait_for(lambda: transport.stats()["lost"] == 1, 10.0)
        assert not transport.wait_ready(0.1)
        broker.start()
        assert transport.wait_ready(15.0), transport.connection_problem
        sender = RawClient(broker.connection(), "after")
        try:
            assert sender.publish(f"ddnn/req/{key}/after", b"again") == "Success"
            assert wait_for(lambda: len(got) == 1, 10.0)
        finally:
            sender.close()
        stats = transport.stats()
    finally:
        transport.close()
    assert got[0].payload == b"again" and stats["connects"] == 2 and stats["connected"] == 1


def test_c_mqtt_keeps_an_idle_connection_alive_with_pings(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mosquitto drops a client silent for 1.5 keepalives: c-mqtt's own PINGREQs keep an idle link up."""
    if not os.path.exists(NEEDS["c-mqtt"][0]):
        pytest.skip("--transport c-mqtt needs libssl-dev")
    from ddnn_server import pahoc_transport

    monkeypatch.setattr(pahoc_transport, "KEEPALIVE_S", 1)
    got: list[Incoming] = []
    transport = _transport(broker, got.append, "c-mqtt")
    key = topics.model_key(MODEL_HASH)
    try:
        time.sleep(3.5)  # more than twice the keepalive with nothing to send
        sender = RawClient(broker.connection(), "late")
        try:
            assert sender.publish(f"ddnn/req/{key}/late", b"still there") == "Success"
            assert wait_for(lambda: len(got) == 1, 10.0)
        finally:
            sender.close()
        stats = transport.stats()
    finally:
        transport.close()
    assert stats["lost"] == 0 and stats["connects"] == 1, stats
