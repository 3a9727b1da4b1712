"""ddnn_gen/wire/mqtt_client.py: the read-ahead socket, checked against a real Mosquitto."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from conftest import require_tool
from paho.mqtt.subscribeoptions import SubscribeOptions

from ddnn_gen.wire import mqtt_client
from ddnn_gen.wire.broker import Broker


def test_read_ahead_socket_serves_small_reads_from_one_recv() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.setblocking(False)
        reader = mqtt_client.ReadAheadSocket(right)
        with pytest.raises(BlockingIOError):  # nothing there yet: paho's "try again" signal passes through
            reader.recv(1)
        left.sendall(b"\x30\x05hello\x40\x02ab")
        time.sleep(0.05)
        assert reader.recv(1) == b"\x30" and reader.pending() == 10
        assert reader.recv(1) == b"\x05"
        assert reader.recv(5) == b"hello"
        assert reader.recv(100) == b"\x40\x02ab"  # a short read never crosses into bytes not received
        assert reader.pending() == 0
        big = bytes(range(256)) * 400  # more than one read-ahead
        left.sendall(big)
        got = b""
        while len(got) < len(big):
            try:
                got += reader.recv(len(big) - len(got))
            except BlockingIOError:
                time.sleep(0.01)
        assert got == big
        left.close()
        time.sleep(0.05)
        assert reader.recv(1) == b""  # end of stream is still paho's "connection lost"


def test_client_reads_ahead_and_never_strands_buffered_packets() -> None:
    """A burst of QoS 1 messages lands in the read-ahead buffer several at a time; every one must be
    delivered promptly (paho would otherwise sleep in select with packets waiting in memory)."""
    require_tool("mosquitto")
    with Broker() as broker:
        received: list[bytes] = []
        done = threading.Event()
        count = 500

        def on_message(client: object, userdata: object, message: object) -> None:
            received.append(message.payload)  # type: ignore[attr-defined]
            if len(received) == count:
                done.set()

        subscribed = threading.Event()
        receiver = mqtt_client.Client("read-ahead-receiver")
        receiver.on_message = on_message
        receiver.on_subscribe = lambda *args: subscribed.set()
        receiver.connect(broker.host, broker.port)
        receiver.loop_start()
        sender = mqtt_client.Client("read-ahead-sender")
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        try:
            assert isinstance(receiver.socket(), mqtt_client.ReadAheadSocket)
            receiver.subscribe("t/burst", options=SubscribeOptions(qos=1))
            assert subscribed.wait(5)
            started = time.monotonic()
            for i in range(count):
                sender.publish("t/burst", i.to_bytes(4, "little") + bytes(60), qos=1)
            assert done.wait(10), f"only {len(received)} of {count} delivered"
            # paho's select timeout is 1 s: a stranded buffer would show as a multi-second delivery.
            assert time.monotonic() - started < 3
            assert [int.from_bytes(p[:4], "little") for p in received] == list(range(count))
        finally:
            for client in (sender, receiver):
                client.disconnect()
                client.loop_stop()
