"""paho-mqtt's Client with two per-message costs taken out, for the server and the simulated devices.

1. paho reads each packet with one ``recv`` for the command byte, one per remaining-length byte and
   one for the rest: 3-4 system calls a packet. ``ReadAheadSocket`` reads up to 64 KB at a time and
   serves those small reads from memory; its ``pending()`` is what paho already asks an SSL socket,
   so the loop does not sleep in ``select`` while whole packets wait in the read-ahead buffer.
2. ``paho.mqtt.properties.Properties`` costs tens of microseconds to build and pack per message.
   ``PackedPublishProperties`` packs a PUBLISH's Response Topic and Correlation Data once, by hand
   (MQTT 5 section 2.2.2), and hands paho the bytes.

Both only use what paho's own code path calls (``_create_socket``, ``pending``, ``pack``); with a
paho that no longer calls ``_create_socket`` the client still works, without the read-ahead.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

READ_AHEAD_BYTES = 64 * 1024

_RESPONSE_TOPIC = 0x08  # MQTT 5 property identifiers
_CORRELATION_DATA = 0x09


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
    """MQTT 5, callback API v2, read-ahead socket."""

    def __init__(self, client_id: str = "", **kwargs: Any) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kwargs)

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        # TLS and WebSocket sockets buffer on their own terms; only plain TCP/Unix sockets get read-ahead.
        return ReadAheadSocket(sock) if type(sock) is socket.socket else sock


class PackedPublishProperties:
    """A PUBLISH's properties packed once; paho only calls ``pack()`` (again on a resend)."""

    def __init__(self, response_topic: str | None = None, correlation: bytes | None = None) -> None:
        body = b""
        if response_topic is not None:
            topic = response_topic.encode()
            body += struct.pack("!BH", _RESPONSE_TOPIC, len(topic)) + topic
        if correlation is not None:
            body += struct.pack("!BH", _CORRELATION_DATA, len(correlation)) + correlation
        self.response_topic = response_topic
        self.correlation = correlation
        self._packed = _varint(len(body)) + body

    def pack(self) -> bytes:
        return self._packed

    def __repr__(self) -> str:
        return f"PackedPublishProperties(response_topic={self.response_topic!r}, correlation={self.correlation!r})"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
