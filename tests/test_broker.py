"""The private Mosquitto launcher (ddnn_gen/wire/broker.py) against the real mosquitto binary."""

from __future__ import annotations

import socket

import pytest
from conftest import require_tool

from ddnn_gen.wire.broker import Broker, BrokerError, parse_broker


def test_parse_broker() -> None:
    assert parse_broker("localhost:1884") == ("localhost", 1884)
    assert parse_broker("10.0.0.1") == ("10.0.0.1", 1883)
    for bad in ("host:port", ":1883", "host:0", "host:70000"):
        with pytest.raises(BrokerError):
            parse_broker(bad)


def test_missing_mosquitto_is_a_clear_error() -> None:
    with pytest.raises(BrokerError, match="not installed|exited"):
        Broker(executable="/nonexistent/mosquitto").start()


def test_broker_starts_restarts_and_cleans_up() -> None:
    require_tool("mosquitto")
    broker = Broker().start()
    try:
        with socket.create_connection((broker.host, broker.port), timeout=2):
            pass
        assert "max_packet_size" in broker.config_path.read_text()
        broker.kill()
        assert not broker.running
        with pytest.raises(OSError):
            socket.create_connection((broker.host, broker.port), timeout=1)
        broker.start()  # same port again, as the broker-loss tests need
        with socket.create_connection((broker.host, broker.port), timeout=2):
            pass
    finally:
        broker.cleanup()
    assert not broker.config_path.exists()
