"""The loopback link emulator bench --plan uses in place of netem: bytes arrive intact and in order, no
sooner than the link allows, and every byte is counted."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ddnn_gen.bench.link_emulator import EmulatedLink


@pytest.fixture
def echo_port() -> Iterator[int]:
    """An echo server: returns what it receives."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        client.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = client.recv(65536)
            assert chunk, "the link closed early"
            got += chunk
        return got, time.monotonic() - started


def test_bytes_cross_intact_in_order_and_counted(echo_port: int) -> None:
    payload = bytes(range(256)) * 4000  # ~1 MB: many chunks
    with EmulatedLink("127.0.0.1", echo_port) as link:
        got, _ = _round_trip(link.port, payload)
        assert got == payload
        deadline = time.monotonic() + 5
        while link.bytes_down < len(payload) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.bytes_up == len(payload) and link.bytes_down == len(payload)


def test_no_byte_arrives_before_the_link_allows(echo_port: int) -> None:
    rtt_ms, mbps, size = 30.0, 1.0, 5000
    with EmulatedLink("127.0.0.1", echo_port, rtt_ms=rtt_ms, mbps=mbps) as link:
        got, elapsed = _round_trip(link.port, bytes(size))
    assert got == bytes(size)
    # Half the round trip each way, and 5000 bytes at 1 Mbit/s (40 ms) each way: a lower bound by
    # construction (how much later it may be depends on the machine, so that is for the benchmark).
    assert elapsed >= (rtt_ms + 2 * size * 8 / (mbps * 1e3)) / 1e3


def test_a_link_needs_sane_figures() -> None:
    with pytest.raises(ValueError):
        EmulatedLink("127.0.0.1", 1, rtt_ms=-1)
    with pytest.raises(ValueError):
        EmulatedLink("127.0.0.1", 1, mbps=0)
