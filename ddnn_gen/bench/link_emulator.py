"""A slow link on loopback: a TCP relay in front of the broker that holds every byte for half the round trip
and paces it at the link's bandwidth, in each direction, and counts what crosses.

It stands in for ``tc qdisc ... netem delay D rate R`` (not available on every machine: the netem module is
often missing from containers) for one client's connection: the device's to the broker (its first hop),
an edge's upstream connection (the edge-cloud hop). Delivery order is kept; bytes queue behind each other
at the link's rate as on a real serial link.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHUNK_BYTES = 65536


@dataclass
class _Direction:
    """One way of one connection: bytes read, held, then written in order."""

    one_way_s: float
    bytes_per_s: float | None
    counted: list[int]  # the link's byte counter for this direction (shared by its connections)
    lock: threading.Lock
    held: queue.Queue[tuple[float, bytes | None]] = field(default_factory=queue.Queue)
    free_at: float = 0.0

    def read_loop(self, source: socket.socket) -> None:
        try:
            while True:
                data = source.recv(CHUNK_BYTES)
                if not data:
                    break
                now = time.monotonic()
                start = max(now, self.free_at)
                self.free_at = start + (len(data) / self.bytes_per_s if self.bytes_per_s else 0.0)
                with self.lock:
                    self.counted[0] += len(data)
                self.held.put((self.free_at + self.one_way_s, data))
        except OSError:
            pass
        self.held.put((0.0, None))

    def write_loop(self, sink: socket.socket) -> None:
        try:
            while True:
                due, data = self.held.get()
                if data is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class EmulatedLink:
    """Listens on a free loopback port; every connection is relayed to ``target`` through the link.
    ``mbps`` None: no bandwidth limit (only the delay, or a plain counting relay with ``rtt_ms`` 0)."""

    def __init__(self, target_host: str, target_port: int, rtt_ms: float = 0.0, mbps: float | None = None) -> None:
        if rtt_ms < 0 or (mbps is not None and mbps <= 0):
            raise ValueError("a link needs rtt_ms >= 0 and mbps > 0")
        self.target = (target_host, target_port)
        self.rtt_ms, self.mbps = rtt_ms, mbps
        self._up, self._down = [0], [0]
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closed = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def bytes_up(self) -> int:
        """Bytes from the client towards the broker so far."""
        with self._lock:
            return self._up[0]

    @property
    def bytes_down(self) -> int:
        with self._lock:
            return self._down[0]

    def start(self) -> EmulatedLink:
        thread = threading.Thread(target=self._accept_loop, name=f"link-{self.port}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> EmulatedLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError as error:
                log.warning("link %s: cannot reach %s:%d (%s)", self.address, *self.target, error)
                client.close()
                continue
            for sock in (client, server):
                # Each relayed chunk goes out at once: Nagle would add its own delay on top of the link's.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            one_way = self.rtt_ms / 2000.0
            rate = self.mbps * 1e6 / 8.0 if self.mbps else None
            for source, sink, counted in ((client, server, self._up), (server, client, self._down)):
                direction = _Direction(one_way, rate, counted, self._lock)
                for target, sock in ((direction.read_loop, source), (direction.write_loop, sink)):
                    thread = threading.Thread(target=target, args=(sock,), daemon=True)
                    thread.start()
                    self._threads.append(thread)
