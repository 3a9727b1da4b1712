"""The MQTT transport on the Paho C library (libpaho-mqtt3as) through cffi: ``ddnn-server --transport paho-c``.

Same topics, shared subscription, status and telemetry as the paho-mqtt transport (server/transport.py), but
the network runs on Paho C's own threads: its message callback (C, c_runtime/ddnn_pahoc.c) copies each
request into a bounded queue, and one thread here takes whole batches out of it (one cffi call, the GIL
released while it waits) and hands them to the server. Replies are published from C, one cffi call each.
Nothing in C calls back into Python.

What it gives up: Paho C acknowledges a QoS 1 PUBLISH as soon as it has read it, before the application
sees it, and has no manual acknowledgement. A request is acknowledged on arrival, not once answered: a
server that dies loses the requests it held (their devices answer locally when their timeout expires and
report the request failed), where the paho-mqtt transport's are delivered again. For the same reason the
broker's Receive Maximum does not bound what this server holds; the C queue (``queue_capacity``) does, and
a request that finds it full is dropped and counted (its device falls back the same way). Deployments that
need redelivery keep the default transport (docs/deployment.md, "Transports").
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ddnn_gen import __version__
from ddnn_gen.codegen.extension import CFLAGS, build_extension
from ddnn_gen.codegen.resources import c_runtime_dir
from ddnn_gen.codegen.toolchain import BuildError
from ddnn_gen.errors import DdnnError
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.connection import BrokerConnection
from ddnn_server.log_limits import RateLimitedLog
from ddnn_server.transport import IN_FLIGHT_REPLIES, QUEUED_REPLIES, RECEIVE_MAXIMUM, Incoming

log = logging.getLogger(__name__)

TAKE_BATCH = 256  # requests one take hands over at most
TAKE_WAIT_MS = 200  # how long one take waits for the first request (the pump re-checks for shutdown between)
# While the server's workers are busy, a take waits this much longer for more requests once one is in: its
# requests could not start sooner anyway, and one take of several costs the server a fraction of several takes
# of one (the C side's read and acknowledgements, the Python loop, the queue's lock and wake-up).
BUSY_LINGER_MS = 3
QUEUE_CAPACITY = 4096  # requests received and not yet taken; more are dropped (counted)
MAX_TOPIC_BYTES = 512  # longer topics name no device a reply could go to: dropped (counted)
KEEPALIVE_S = 15


def header_cdef(header: str) -> str:
    """The cffi declarations of ddnn_pahoc.h: the header itself without its comments and preprocessor lines,
    so the Python side cannot drift from the C one."""
    text = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


# The server-side files of c_runtime/: no device project ships them (tests/test_c_project.py).
RUNTIME_FILES = ("ddnn_pahoc.h", "ddnn_pahoc_core.h", "ddnn_pahoc_core.c", "ddnn_pahoc.c", "ddnn_mqtt_batch.c")
# What both C sides are built with: the interface, and the queue and counters they share.
CORE_FILES = ("ddnn_pahoc.h", "ddnn_pahoc_core.h", "ddnn_pahoc_core.c")
STATS = ("received", "dropped_full", "dropped_topic", "oversized", "published", "completed", "failed", "connects",
         "lost", "connected", "subscribed", "queued")

# The two implementations of ddnn_pahoc.h, by --transport: (source, libraries, what to install when it fails).
CLIENTS = {
    "paho-c": ("ddnn_pahoc.c", ["paho-mqtt3as"], "the Paho C library and its headers (Debian: libpaho-mqtt-dev)"),
    "c-mqtt": ("ddnn_mqtt_batch.c", ["ssl", "crypto"], "OpenSSL's headers (Debian: libssl-dev)"),
}


def load_library(client: str = "paho-c") -> Any:
    """The cffi module of one implementation of ddnn_pahoc.h (built once, then from the cache; see
    ddnn_gen/codegen/extension.py)."""
    source, libraries, needs = CLIENTS[client]
    runtime = c_runtime_dir()
    try:
        cdef = header_cdef((runtime / "ddnn_pahoc.h").read_text())
        module, _ = build_extension(None, f"{client}-{__version__}", cdef, '#include "ddnn_pahoc.h"\n',
                                    [runtime / source, runtime / "ddnn_pahoc_core.c"], [runtime], CFLAGS,
                                    [runtime / name for name in (*CORE_FILES, source)], libraries=libraries)
    except BuildError as error:
        raise DdnnError(f"--transport {client} needs {needs} and a C compiler: {error}") from error
    return module


class PahocTransport:
    """MQTT 5 on Paho C: shared subscriptions, requests in batches, replies from C (a ``ServerTransport``)."""

    def __init__(self, connection: BrokerConnection, client_id: str, group: str, served: Sequence[tuple[bytes, int]],
                 on_request: Callable[[Incoming], None], persistent: bool, session_expiry_s: int = 300,
                 extra_subscriptions: Sequence[str] = (),
                 on_other: Callable[[str, bytes], None] | None = None, receive_maximum: int = RECEIVE_MAXIMUM,
                 queued_replies: int = QUEUED_REPLIES, max_request_bytes: int = codec.MAX_REQUEST_BYTES,
                 queue_capacity: int = QUEUE_CAPACITY, take_batch: int = TAKE_BATCH,
                 on_requests: Callable[[list[Incoming]], None] | None = None, client: str = "paho-c",
                 busy: Callable[[], bool] | None = None) -> None:
        """``client``: which C side (``CLIENTS``): Paho C, or the server's own MQTT client (c_runtime/ddnn_mqtt_batch.c,
        which acknowledges a request when it is taken, and never drops a QoS 1 one for a full queue)."""
        self.connection = connection
        self.client = client
        self.client_id = topics.check_name(client_id, "server id")
        self.subscriptions = [topics.request_subscription(model_hash, group, tier) for model_hash, tier in served]
        self._extra = list(extra_subscriptions)
        self._on_request = on_request
        # A take's requests in one call when the server can take them so (one queue lock, one worker wake-up).
        self._on_requests = on_requests or self._each
        self._on_other = on_other
        self._busy = busy or (lambda: False)
        self._take_batch = take_batch
        self.unsent_replies = 0
        self.takes = 0  # takes that returned requests (received / takes: the mean batch handed over)
        self._problems = RateLimitedLog(log, interval_s=30.0)
        module = load_library(client)
        self._ffi: Any = module.ffi
        self._lib: Any = module.lib
        ffi = self._ffi
        strings = []  # the config's C strings, alive until create has copied them
        self._min_take_bytes = MAX_TOPIC_BYTES + max_request_bytes  # what the C side wants room for
        self._buffer_bytes = max(4 << 20, 2 * self._min_take_bytes)

        def text(value: object) -> Any:
            if value is None:
                return ffi.NULL
            cdata = ffi.new("char[]", str(value).encode())
            strings.append(cdata)
            return cdata

        config = ffi.new("ddnn_pahoc_config *")
        config.uri = text(f"{'ssl' if connection.tls else 'tcp'}://{connection.host}:{connection.port}")
        config.port = connection.port
        config.client_id = text(self.client_id)
        config.username = text(connection.username)
        config.password = text(connection.password())
        config.tls, config.insecure = int(connection.tls), int(connection.insecure)
        config.ca_file, config.cert_file, config.key_file = (text(connection.ca_file), text(connection.cert_file),
                                                             text(connection.key_file))
        config.clean_start = int(not persistent)
        config.session_expiry_s = session_expiry_s if persistent else 0
        config.receive_maximum = receive_maximum
        config.keepalive_s = KEEPALIVE_S
        config.max_inflight = IN_FLIGHT_REPLIES
        config.max_buffered = queued_replies
        config.status_topic = text(topics.server_status_topic(self.client_id))
        config.queue_capacity = queue_capacity
        config.max_topic_bytes = MAX_TOPIC_BYTES
        config.max_payload_bytes = max_request_bytes
        config.keep_oversized_bytes = min(codec.REQUEST_HEADER_BYTES, max_request_bytes)
        error = ffi.new("char[]", 256)
        self._client = self._lib.ddnn_pahoc_create(config, error, len(error))
        if self._client == ffi.NULL:
            raise DdnnError(f"{client} transport to {connection.url}: {ffi.string(error).decode()}")
        self._pump = threading.Thread(target=self._pump_loop, name=f"ddnn-{client}-take", daemon=True)
        self._closed = False

    @property
    def url(self) -> str:
        return self.connection.url

    @property
    def connection_problem(self) -> str | None:
        out = self._ffi.new("char[]", 256)
        self._lib.ddnn_pahoc_problem(self._client, out, len(out))
        return self._ffi.string(out).decode("utf-8", "replace") or None

    def stats(self) -> dict[str, int]:
        """The C side's counters (received, dropped_full, dropped_topic, oversized, published, ...)."""
        stats = self._ffi.new("ddnn_pahoc_stats *")
        self._lib.ddnn_pahoc_get_stats(self._client, stats)
        return {name: int(getattr(stats, name)) for name in STATS}

    # ---- lifecycle -----------------------------------------------------------------------------------

    def _c_strings(self, values: Sequence[str]) -> Any:
        strings = [self._ffi.new("char[]", value.encode()) for value in values]
        array = self._ffi.new("char *[]", strings)
        return array, strings  # the strings must outlive the call

    def start(self) -> None:
        """Connect in the background (Paho retries until the broker answers); requests flow once subscribed."""
        array, _strings = self._c_strings(self.subscriptions + self._extra)
        self._pump.start()
        rc = self._lib.ddnn_pahoc_start(self._client, array, len(self.subscriptions) + len(self._extra))
        if rc != 0:
            log.warning("connecting to %s: %s", self.url, self.connection_problem)

    def wait_ready(self, timeout_s: float) -> bool:
        return bool(self._lib.ddnn_pahoc_wait_ready(self._client, int(timeout_s * 1000)))

    def stop_taking_work(self, timeout_s: float = 3.0) -> None:
        """Unsubscribe so the shared group routes new requests to the other servers."""
        array, _strings = self._c_strings(self.subscriptions)
        if not self._lib.ddnn_pahoc_unsubscribe(self._client, array, len(self.subscriptions), int(timeout_s * 1000)):
            log.warning("no UNSUBACK within %.1f s", timeout_s)

    def wait_replies_acked(self, timeout_s: float = 5.0) -> bool:
        return bool(self._lib.ddnn_pahoc_wait_published(self._client, int(timeout_s * 1000)))

    def close(self) -> None:
        """Offline status, clean disconnect that ends the session, and the C client freed."""
        if self._closed:
            return
        self._closed = True
        self.publish_raw(topics.server_status_topic(self.client_id), b"offline", qos=1, retain=True)
        self._lib.ddnn_pahoc_wait_published(self._client, 1000)
        self._lib.ddnn_pahoc_interrupt(self._client)
        if self._pump.is_alive():
            self._pump.join()
        stats = self.stats()
        if stats["dropped_full"] or stats["dropped_topic"]:
            log.warning("Paho C transport dropped %d requests (queue full) and %d (topic too long)",
                        stats["dropped_full"], stats["dropped_topic"])
        self._lib.ddnn_pahoc_close(self._client, 2000)

    def publish_telemetry(self, payload: bytes) -> None:
        self.publish_raw(topics.server_telemetry_topic(self.client_id), payload, qos=0)

    def publish_feature_request(self, device_id: str, payload: bytes) -> bool:
        """Aggregator, scores first: ask ``device_id`` for an event's split (QoS 1), as the paho-mqtt transport
        does. False when Paho C did not take it."""
        rc = self.publish_raw(topics.feature_request_topic(device_id), payload, qos=1)
        if rc != 0:
            self._problems.warning("unsent", "feature request to %s not sent: Paho C error %d", device_id, rc)
        return rc == 0

    # ---- replies (worker threads) --------------------------------------------------------------------

    def publish_raw(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> int:
        """Hand one message to Paho C as it is (no topic checks): 0 when taken, else Paho's error code."""
        return int(self._lib.ddnn_pahoc_publish(self._client, topic.encode(), payload, len(payload), qos, int(retain)))

    def drop(self, incoming: Incoming) -> None:
        """Nothing to do: Paho C acknowledged the request on arrival."""

    def reply(self, incoming: Incoming, device_id: str, payload: bytes) -> None:
        """Publish a reply (QoS 1) to ``device_id``'s reply topic; ``device_id`` must be valid."""
        topic = topics.reply_topic(device_id)
        rc = self.publish_raw(topic, payload, qos=1)
        if rc != 0:
            # Not queued (disconnected, or the outgoing queue is full): its device falls back locally.
            self.unsent_replies += 1
            self._problems.warning("unsent", "reply to %s not sent: Paho C error %d", topic, rc)

    def reply_many(self, replies: Sequence[tuple[Incoming, str, bytes]]) -> None:
        """A batch's replies (QoS 1), each to its device's reply topic, in one call into C."""
        if not replies:
            return
        topic_blob = bytearray()
        topic_offsets, payload_offsets = [], [0]
        for _, device_id, payload in replies:
            topic_offsets.append(len(topic_blob))
            topic_blob += topics.reply_topic(device_id).encode()
            topic_blob.append(0)
            payload_offsets.append(payload_offsets[-1] + len(payload))
        ffi = self._ffi
        payload_blob = b"".join(payload for _, _, payload in replies)
        results = ffi.new("int[]", len(replies))
        failed = self._lib.ddnn_pahoc_publish_many(
            self._client, ffi.from_buffer("char[]", topic_blob), ffi.new("int64_t[]", topic_offsets),
            ffi.from_buffer("uint8_t[]", payload_blob), ffi.new("int64_t[]", payload_offsets), len(replies), 1,
            results)
        if failed:
            self.unsent_replies += failed
            codes = sorted({int(rc) for rc in ffi.unpack(results, len(replies)) if rc != 0})
            self._problems.warning("unsent", "%d of %d replies not sent: Paho C error %s", failed, len(replies),
                                   codes)

    # ---- the take thread -----------------------------------------------------------------------------

    def _pump_loop(self) -> None:
        ffi, lib = self._ffi, self._lib
        fields = int(lib.DDNN_PAHOC_FIELDS)
        records = ffi.new("int64_t[]", self._take_batch * fields)
        buffer = ffi.new("uint8_t[]", self._buffer_bytes)
        raw = ffi.buffer(buffer)
        root = f"{topics.TOPIC_ROOT}/req/"
        seen = {"connects": 0, "lost": 0}
        checked = 0.0
        while True:
            n = lib.ddnn_pahoc_take(self._client, self._take_batch, TAKE_WAIT_MS, 0, records, buffer, len(buffer))
            if n < 0:
                return
            if n == 0 or time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                self._log_connection_changes(seen)
            if n == 0:
                continue
            self.takes += 1
            flat = ffi.unpack(records, n * fields)
            used = flat[(n - 1) * fields + 2] + flat[(n - 1) * fields + 3]
            # Asked only now, with a request in hand: a lone request never waits for company.
            if n < self._take_batch and len(buffer) - used >= self._min_take_bytes and self._busy():
                more = lib.ddnn_pahoc_take(self._client, self._take_batch - n, 0, BUSY_LINGER_MS,
                                           records + n * fields, buffer + used, len(buffer) - used)
                if more > 0:
                    extra = ffi.unpack(records + n * fields, more * fields)
                    for at in range(0, more * fields, fields):  # offsets were relative to buffer + used
                        extra[at] += used
                        extra[at + 2] += used
                    flat += extra
                    n += more
                    used = flat[(n - 1) * fields + 2] + flat[(n - 1) * fields + 3]
            # One copy of the batch's bytes and one list of its records, then slices of them.
            data = raw[:used]
            requests = []
            for at in range(0, n * fields, fields):
                topic_at, topic_len, payload_at, payload_len, wire_len, arrived_ns, qos = flat[at:at + fields]
                topic = data[topic_at:topic_at + topic_len].decode("utf-8", "replace")
                payload = data[payload_at:payload_at + payload_len]
                if self._on_other is not None and not topic.startswith(root):
                    self._deliver_other(topic, payload)
                    continue
                requests.append(Incoming(payload, topic, 0, qos, received=arrived_ns / 1e9,
                                         truncated_from=wire_len if wire_len != payload_len else 0))
            if not requests:
                continue
            try:
                self._on_requests(requests)
            except Exception:  # the take thread must survive anything a request does
                log.exception("unexpected error handling %d requests", len(requests))

    def _each(self, requests: list[Incoming]) -> None:
        for incoming in requests:
            try:
                self._on_request(incoming)
            except Exception:  # the take thread must survive anything a request does
                log.exception("unexpected error handling a request on %s", incoming.topic)

    def _log_connection_changes(self, seen: dict[str, int]) -> None:
        """Connections and losses since the last look, in the log (C cannot log through Python)."""
        stats = self.stats()
        if stats["lost"] > seen["lost"]:
            log.warning("lost the broker (%s); reconnecting", self.connection_problem)
        if stats["connects"] > seen["connects"]:
            log.info("connected to %s as %s (%d connections so far)", self.url, self.client_id, stats["connects"])
        seen["connects"], seen["lost"] = stats["connects"], stats["lost"]

    def _deliver_other(self, topic: str, payload: bytes) -> None:
        assert self._on_other is not None
        try:
            self._on_other(topic, payload)
        except Exception:
            log.exception("unexpected error handling a message on %s", topic)
