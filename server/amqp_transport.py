"""The server on a RabbitMQ cluster: AMQP 0-9-1 with pika, the only AMQP-aware module of the server.

Devices publish over MQTT 3.1.1 to ``ddnn/req/<model>/<device>``; RabbitMQ's MQTT plugin routes that through
``amq.topic`` (routing key ``ddnn.req.<model>.<device>``) into the model's durable quorum queue, replicated
on every node (``ddnngen cluster up``). Servers consume that queue as competing consumers. The device id is
the routing key's (which the cluster's topic permissions tie to the sender's user name), never the payload's.

A request is acknowledged only once the broker has confirmed its reply (publisher confirms), so a server
that dies, or loses its node, leaves its unacknowledged requests to be delivered to the others. The prefetch
count is the batching window: at most that many requests are with this server unacknowledged. Replies go to
``amq.topic`` with routing key ``ddnn.reply.<device>``, which the MQTT plugin delivers to the device's
subscription. A lost connection moves on to the next node's URL (``--amqp`` repeated).

pika's connection is not thread-safe: everything touching it runs on its I/O loop thread; workers hand their
replies over through a list the loop drains (one wake-up per burst, not per reply).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection

from ddnn_gen.errors import DdnnError
from ddnn_gen.wire import topics
from ddnn_gen.wire.connection import ConnectionConfigError
from ddnn_server.log_limits import RateLimitedLog
from ddnn_server.transport import Incoming

log = logging.getLogger(__name__)
logging.getLogger("pika").setLevel(logging.WARNING)  # pika narrates every connection step at INFO

DEFAULT_AMQP_PORT = 5672
RECONNECT_DELAY_S = 0.2


@dataclass(frozen=True)
class AmqpEndpoint:
    """One cluster node: ``amqp://USER@HOST[:PORT][/VHOST]``, the password read from ``password_file``."""

    host: str
    port: int
    vhost: str
    username: str
    password_file: Path | None

    @property
    def url(self) -> str:
        return f"amqp://{self.username}@{self.host}:{self.port}/{self.vhost.replace('/', '%2F')}"

    def parameters(self) -> pika.ConnectionParameters:
        password = ""
        if self.password_file is not None:
            try:
                password = Path(self.password_file).read_text().split("\n", 1)[0].rstrip("\r")
            except OSError as error:
                raise ConnectionConfigError(f"--amqp-password-file {self.password_file}: cannot read it "
                                            f"({error.strerror})") from error
        # Heartbeats notice a node that stopped answering without closing its sockets.
        return pika.ConnectionParameters(self.host, self.port, self.vhost,
                                         pika.PlainCredentials(self.username, password), heartbeat=10,
                                         blocked_connection_timeout=30, connection_attempts=1, socket_timeout=5)


def parse_amqp_url(url: str, password_file: str | Path | None = None) -> AmqpEndpoint:
    """An endpoint from ``amqp://USER@HOST[:PORT][/VHOST]``; a password in the URL is refused (``ps`` shows
    command lines), it belongs in ``password_file``."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_AMQP_PORT
    except ValueError as error:
        raise ConnectionConfigError(f"AMQP URL {url!r}: {error}") from error
    if parts.scheme != "amqp" or not parts.hostname:
        raise ConnectionConfigError(f"AMQP URL {url!r} is not amqp://USER@HOST[:PORT][/VHOST] (amqps is not "
                                    "supported yet)")
    if parts.password is not None:
        raise ConnectionConfigError(f"AMQP URL {parts.scheme}://{parts.username}:...@{parts.hostname}: put the "
                                    "password in --amqp-password-file, not on the command line")
    if not parts.username:
        raise ConnectionConfigError(f"AMQP URL {url!r} names no user (amqp://USER@HOST)")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return AmqpEndpoint(parts.hostname, port, vhost, unquote(parts.username),
                        None if password_file is None else Path(password_file))


class AmqpTransport:
    """Competing consumer of the request queues of the models in ``served`` ((model hash, request tier))."""

    def __init__(self, endpoints: Sequence[AmqpEndpoint], client_id: str, served: Sequence[tuple[bytes, int]],
                 on_request: Callable[[Incoming], None], prefetch: int) -> None:
        if not endpoints:
            raise DdnnError("the AMQP transport needs at least one amqp:// URL")
        self.endpoints = list(endpoints)
        self.client_id = topics.check_name(client_id, "server id")
        self.queues = [topics.request_queue(model_hash, tier) for model_hash, tier in served]
        self._on_request = on_request
        self._prefetch = prefetch
        self._current = 0
        self._connection: SelectConnection | None = None
        self._channel: Any = None
        self._generation = 0  # connections so far: delivery tags are only valid on their own channel
        self._consumer_tags: list[str] = []
        self._publish_seq = 0
        self._unconfirmed: OrderedDict[int, int] = OrderedDict()  # reply publish seq -> request delivery tag
        self._cond = threading.Condition()
        self._outgoing: list[tuple[Incoming, str | None, bytes]] = []  # (request, reply key or None = ack only)
        self._ready = threading.Event()
        self._cancelled = threading.Event()
        self._closing = False
        self._taking_work = True
        self._thread = threading.Thread(target=self._run, name="ddnn-amqp", daemon=True)
        self._problem: str | None = None
        self._problems = RateLimitedLog(log, interval_s=30.0)
        self.unsent_replies = 0
        self.received = 0
        self.redelivered = 0  # requests another consumer had held unacknowledged (it died, or lost its node)

    @property
    def url(self) -> str:
        return self.endpoints[self._current].url

    @property
    def connection_problem(self) -> str | None:
        return self._problem

    # ---- lifecycle (caller's thread) -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """True once consuming from every request queue."""
        return self._ready.wait(timeout_s)

    def stop_taking_work(self, timeout_s: float = 3.0) -> None:
        """Cancel the consumers: new requests go to the other servers; what was delivered is still answered."""
        self._taking_work = False
        self._cancelled.clear()
        self._call(self._cancel)
        if self._ready.is_set() and not self._cancelled.wait(timeout_s):
            log.warning("no Basic.CancelOk within %.1f s", timeout_s)

    def wait_replies_acked(self, timeout_s: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._unconfirmed and not self._outgoing, timeout_s)

    def close(self) -> None:
        self._closing = True
        self._call(self._close_connection)
        self._thread.join(10.0)
        log.info("AMQP: %d requests received, %d of them redelivered", self.received, self.redelivered)

    # ---- replies (any thread) ------------------------------------------------------------------------

    def drop(self, incoming: Incoming) -> None:
        self._hand_over(incoming, None, b"")

    def reply_many(self, replies: Sequence[tuple[Incoming, str, bytes]]) -> None:
        for incoming, device_id, payload in replies:
            self.reply(incoming, device_id, payload)

    def reply(self, incoming: Incoming, device_id: str, payload: bytes) -> None:
        self._hand_over(incoming, topics.routing_key(topics.reply_topic(device_id)), payload)

    def publish_telemetry(self, payload: bytes) -> None:
        """As the MQTT transport's: this server's load, fire and forget (the next one replaces a lost one)."""
        key = topics.routing_key(topics.server_telemetry_topic(self.client_id))
        self._call(lambda: self._publish_untracked(key, payload))

    def _hand_over(self, incoming: Incoming, key: str | None, payload: bytes) -> None:
        with self._cond:
            wake = not self._outgoing
            self._outgoing.append((incoming, key, payload))
        if wake:
            self._call(self._flush)

    def _call(self, function: Callable[[], None]) -> None:
        connection = self._connection
        if connection is None:
            return  # not connected: what waits is flushed (or dropped as stale) on the next connection
        try:
            connection.ioloop.add_callback_threadsafe(function)
        except Exception:  # the loop is closing; the requests come back to some server anyway
            log.debug("AMQP loop gone; %s not scheduled", getattr(function, "__name__", function))

    # ---- the I/O loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closing:
            endpoint = self.endpoints[self._current]
            try:
                self._connection = SelectConnection(endpoint.parameters(), on_open_callback=self._opened,
                                                    on_open_error_callback=self._open_failed,
                                                    on_close_callback=self._closed)
            except (DdnnError, pika.exceptions.AMQPError) as error:
                self._problem = str(error)
                time.sleep(1.0)
                continue
            self._connection.ioloop.start()
            self._connection = None
            if not self._closing:
                # The next node's URL: the one just lost may be the node that died.
                self._current = (self._current + 1) % len(self.endpoints)
                time.sleep(RECONNECT_DELAY_S)

    def _opened(self, connection: SelectConnection) -> None:
        connection.channel(on_open_callback=self._channel_opened)

    def _open_failed(self, connection: SelectConnection, error: BaseException) -> None:
        self._problem = f"{self.url}: {error!r}"
        self._problems.warning("open", "cannot connect to %s: %r", self.url, error)
        connection.ioloop.stop()

    def _closed(self, connection: SelectConnection, reason: BaseException) -> None:
        self._ready.clear()
        with self._cond:
            # Unconfirmed replies and unacked requests die with the channel: the broker gives those requests
            # to a server again (the reply may have gone out too: devices drop duplicates by request id).
            self._unconfirmed.clear()
            self._outgoing = []
            self._cond.notify_all()
        if not self._closing:
            self._problem = f"lost {self.url}: {reason!r}"
            log.warning("AMQP connection to %s closed (%r); trying the next node", self.url, reason)
        connection.ioloop.stop()

    def _channel_opened(self, channel: Any) -> None:
        self._generation += 1
        self._channel = channel
        self._publish_seq = 0
        self._consumer_tags = []
        channel.add_on_close_callback(self._channel_closed)
        channel.confirm_delivery(ack_nack_callback=self._confirmed,
                                 callback=lambda _frame: channel.basic_qos(prefetch_count=self._prefetch,
                                                                           callback=self._qos_set))

    def _channel_closed(self, channel: Any, reason: BaseException) -> None:
        # A refused consume (no such queue, not allowed) closes the channel: say why, retry the connection.
        self._problem = f"{self.url}: {reason}"
        if not self._closing:
            self._problems.warning("channel", "AMQP channel closed: %s", reason)
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()

    def _qos_set(self, _frame: Any) -> None:
        if not self._taking_work:
            return
        pending = set(self.queues)
        for queue in self.queues:
            def consuming(_frame: Any, queue: str = queue) -> None:
                pending.discard(queue)
                if not pending:
                    self._problem = None
                    log.info("consuming %s on %s as %s (prefetch %d)", ", ".join(self.queues), self.url,
                             self.client_id, self._prefetch)
                    self._ready.set()
            tag = self._channel.basic_consume(queue, self._message, auto_ack=False,
                                              consumer_tag=f"{self.client_id}.{queue}", callback=consuming)
            self._consumer_tags.append(tag)
        self._flush()

    def _cancel(self) -> None:
        channel = self._channel
        if channel is None or not channel.is_open or not self._consumer_tags:
            self._cancelled.set()
            return
        left = list(self._consumer_tags)

        def cancelled(_frame: Any) -> None:
            if left:
                left.pop()
            if not left:
                self._cancelled.set()

        for tag in self._consumer_tags:
            channel.basic_cancel(tag, callback=cancelled)
        self._consumer_tags = []

    def _close_connection(self) -> None:
        connection = self._connection
        if connection is not None and (connection.is_open or connection.is_opening):
            connection.close()
        elif connection is not None:
            connection.ioloop.stop()

    def _message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        incoming = Incoming(body, topics.topic_of(method.routing_key), method.delivery_tag, 1, self._generation)
        self.received += 1
        self.redelivered += bool(method.redelivered)
        try:
            self._on_request(incoming)
        except Exception:  # the loop thread must survive anything a request does
            log.exception("unexpected error handling a request on %s", method.routing_key)
            self._ack(incoming)

    def _flush(self) -> None:
        with self._cond:
            work, self._outgoing = self._outgoing, []
        channel = self._channel
        for incoming, key, payload in work:
            if incoming.generation != self._generation or channel is None or not channel.is_open:
                continue  # its channel is gone: the broker has handed the request to a server again
            if key is None:
                self._ack(incoming)
                continue
            try:
                channel.basic_publish(topics.AMQP_EXCHANGE, key, payload)
            except pika.exceptions.AMQPError as error:
                self.unsent_replies += 1
                self._problems.warning("unsent", "reply on %s not sent: %r", key, error)
                continue
            self._publish_seq += 1
            with self._cond:
                self._unconfirmed[self._publish_seq] = incoming.mid

    def _publish_untracked(self, key: str, payload: bytes) -> None:
        """A publish no request waits on: it takes a confirm sequence number, which _confirmed then ignores."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        try:
            channel.basic_publish(topics.AMQP_EXCHANGE, key, payload)
        except pika.exceptions.AMQPError as error:
            self._problems.warning("telemetry", "telemetry on %s not sent: %r", key, error)
            return
        self._publish_seq += 1

    def _confirmed(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        with self._cond:
            if method.multiple:
                done = []
                while self._unconfirmed and next(iter(self._unconfirmed)) <= method.delivery_tag:
                    done.append(self._unconfirmed.popitem(last=False)[1])
            else:
                tag = self._unconfirmed.pop(method.delivery_tag, None)
                done = [] if tag is None else [tag]
            self._cond.notify_all()
        for request_tag in done:
            if acked:
                self._channel.basic_ack(request_tag)
            else:
                # The broker could not take the reply: the request goes back to the queue to be answered again.
                self._problems.warning("nack", "the broker refused a reply; requeueing its request")
                self._channel.basic_nack(request_tag, requeue=True)

    def _ack(self, incoming: Incoming) -> None:
        if incoming.generation == self._generation and self._channel is not None and self._channel.is_open:
            self._channel.basic_ack(incoming.mid)
