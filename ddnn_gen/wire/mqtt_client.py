"""paho-mqtt's Client with its per-packet system calls taken out, for the server, the simulated devices and
the command-line tools; TLS and credentials come from one ``BrokerConnection`` (ddnn_gen/wire/connection.py).

paho reads each packet with one ``recv`` for the command byte, one per remaining-length byte and one for
the rest: 3-4 system calls a packet. ``ReadAheadSocket`` reads up to 64 KB at a time and serves those
small reads from memory; its ``pending()`` is what paho already asks an SSL socket, so the loop does not
sleep in ``select`` while whole packets wait in the read-ahead buffer.

It only uses what paho's own code path calls (``_create_socket``, ``pending``); with a paho that no
longer calls ``_create_socket`` the client still works, without the read-ahead.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ddnn_gen.wire.connection import BrokerConnection

READ_AHEAD_BYTES = 64 * 1024


class ReadAheadSocket:
    """A connected socket whose ``recv`` reads ahead; everything else goes to the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._offset = 0

    def recv(self, size: int) -> bytes:
        if self._offset >= len(self._buffer):
            data = self._sock.recv(max(size, READ_AHEAD_BYTES))  # BlockingIOError passes through to paho
            if len(data) <= size:
                return data
            self._buffer, self._offset = data, 0
        start = self._offset
        self._offset = min(start + size, len(self._buffer))
        return self._buffer[start:self._offset]

    def pending(self) -> int:
        """Bytes already read from the kernel and not yet returned (paho skips ``select`` while > 0)."""
        return len(self._buffer) - self._offset

    def send(self, data: bytes | bytearray) -> int:  # per packet written: spare it the __getattr__ detour
        return self._sock.send(data)

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Client(mqtt.Client):
    """MQTT 5 (or ``protocol=mqtt.MQTTv311`` for brokers such as RabbitMQ's MQTT plugin), callback API v2,
    read-ahead socket, TLS and credentials from a ``BrokerConnection``.

    paho's background loop retries a failed connection attempt without saying why; ``last_connect_error``
    keeps the reason (refused, TLS handshake or certificate check failed) so callers can report it.
    """

    def __init__(self, client_id: str = "", connection: BrokerConnection | None = None,
                 protocol: int = mqtt.MQTTv5, **kwargs: Any) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
        self.last_connect_error: str | None = None
        if connection is not None:
            connection.configure(self)

    def _create_socket(self) -> Any:
        try:
            sock = super()._create_socket()
        except OSError as error:  # ssl.SSLError and CertificateError are OSErrors too
            self.last_connect_error = connect_error_text(error)
            raise
        # TLS and WebSocket sockets buffer on their own terms; only plain TCP/Unix sockets get read-ahead.
        return ReadAheadSocket(sock) if type(sock) is socket.socket else sock


def connect_error_text(error: BaseException) -> str:
    """One line for a failed connection attempt (TLS errors carry their reason, not their class)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate was not accepted ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed ({error.reason or error})"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    return str(error) or type(error).__name__


def tcp_no_delay(client: Any) -> None:
    """Small request/reply packets must not wait for Nagle + delayed ACK (~40 ms per hop).

    ``client`` is a connected paho ``mqtt.Client``; every MQTT hop of the protocol sets this.
    """
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
