"""Simulated devices: a device part (the generated C through the cffi binding, or answers computed beforehand
by the NumPy reference) plus the same MQTT client behaviour as the C networked runner (request, wait with
timeout, fall back to the local answer), for load tests and the benchmark. Each device counts lost,
duplicated and misrouted replies so tests can assert on them.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import paho.mqtt.client as mqtt

from ddnn_gen.device.c_binding import LocalAnswer
from ddnn_gen.device.features import FEATURES_KEPT, FeatureBuffer
from ddnn_gen.errors import DdnnError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram
from ddnn_gen.fold.reference import exit_decision
from ddnn_gen.wire import codec, mqtt_client, telemetry, topics
from ddnn_gen.wire.codec import Packing, Reply, RequestHeader
from ddnn_gen.wire.connection import BrokerConnection, BrokerError

log = logging.getLogger(__name__)

SOURCES = ("local", "server", "fallback", "error")
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: another client connected with this client id
MAX_QUEUED_REQUESTS = 10000  # publishes waiting behind the in-flight window; beyond it a request falls back


@dataclass
class Pending:
    """A request a simulated device sent and waits the reply of (SimDevice.send, SimDevice.wait)."""

    event: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None
    sent: float = 0.0
    received: float = 0.0
    payload: bytes = b""  # kept for sending again after a fail-over (resend_pending)
    topic: str = ""


@dataclass
class SampleOutcome:
    device_id: str
    index: int  # sample index in the data set
    request_id: int
    source: str  # local | server | fallback | error
    final_class: int
    local_class: int
    threshold: float
    status: int = -1  # reply status, -1 when no reply
    t_round_trip_us: int = 0
    t_server_us: int = 0
    t_device_us: int = 0  # the device part's time for this sample
    answered_by: int = -1  # the reply's answering tier (0: an aggregator's aggregated local exit); -1: no reply


class SimDevice:
    """One MQTT device. Thread-safe ``request``; several may be outstanding at once.

    The MQTT client id is the device id, as the C device's, so a broker can tie it to the credentials
    (``use_username_as_clientid``, ``%c`` patterns). A second client with the same id takes the session
    over; a broker that says so (MQTT 5 DISCONNECT 0x8E) makes this device stop using the network: its
    requests then fall back at once instead of both processes taking the session from each other.

    Bookkeeping is bounded: a request is forgotten once answered or timed out; replies that come later are
    told apart from misrouted ones by the request-id range this device issued (plus the last
    ``RECENT_CUSTOM_IDS`` ids passed to :meth:`send` from outside that range).

    ``connection`` may be a list of brokers (the nodes of a cluster, same credentials and TLS settings): a lost
    connection is retried on the next one. ``protocol`` 4 is MQTT 3.1.1 (RabbitMQ's MQTT plugin), which the
    protocol needs nothing beyond (no MQTT 5 property is used). With ``resend_pending`` (the default with
    more than one broker) the requests still waiting for a reply are published again, same request id, once
    the reply topic is subscribed on the new connection: a reply routed to the old node's subscription is
    gone with it. The server may then answer twice; the second reply is dropped by request id (counted in
    ``duplicates``).

    ``subscribe_qos`` 0 is for RabbitMQ clusters: its MQTT plugin (3.10) keeps a clean session's QoS 1
    subscriptions in a *durable* queue homed on the node the device is connected to, which cannot be declared
    again on another node while that node is down, so the device could subscribe nowhere after a fail-over.
    A QoS 0 subscription's queue is transient and goes with its node; a reply lost with it is covered by
    ``resend_pending``. Requests stay QoS 1 either way.
    """

    RECENT_CUSTOM_IDS = 4096

    def __init__(self, device_id: str, connection: BrokerConnection | Sequence[BrokerConnection], model_hash: bytes,
                 timeout_s: float = 2.0, default_threshold: float = 0.5, *, protocol: int = mqtt.MQTTv5,
                 resend_pending: bool | None = None, subscribe_qos: int = 1,
                 telemetry_interval_s: float = 2.0,
                 on_feature_request: Callable[[SimDevice, bytes], None] | None = None) -> None:
        self.device_id = topics.check_device_id(device_id)
        self.connections = [connection] if isinstance(connection, BrokerConnection) else list(connection)
        if not self.connections:
            raise BrokerError(f"device {device_id}: no broker to connect to")
        self.connection = self.connections[0]
        self.protocol = protocol
        self.resend_pending = len(self.connections) > 1 if resend_pending is None else resend_pending
        self._broker_index = 0
        self._connections_made = 0
        self._stopping = False
        self.failovers = 0
        self.subscribe_qos = subscribe_qos
        self.resent = 0
        self.model_hash = model_hash
        self.timeout_s = timeout_s
        self.reply_topic = topics.reply_topic(device_id)
        self.request_topic = topics.request_topic(model_hash, device_id)
        self._model_threshold_topic = topics.threshold_topic(model_hash)
        self._device_threshold_topic = topics.threshold_topic(model_hash, device_id)
        # A multi-view camera sending scores first: an aggregator's requests for its splits (called from the
        # network thread with the raw payload; hostile until decoded).
        self.on_feature_request = on_feature_request
        self._feature_topic = topics.feature_request_topic(device_id)
        # Application bytes this device published on its request topic (requests, and splits asked for).
        self.bytes_sent = 0
        self._thresholds: dict[str, float | None] = {}
        self.default_threshold = default_threshold
        self._pending: dict[int, Pending] = {}
        self._first_id = int.from_bytes(os.urandom(4), "little") << 24 | 1
        self._next_id = self._first_id
        self._custom_ids: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.duplicates = 0
        self.misrouted = 0
        self.undecodable = 0
        self.taken_over = False
        self.problem: str | None = None  # why the broker refused this device, if it did
        self._connected = threading.Event()
        self._settled = threading.Event()  # first SUBACK, or a refusal
        self._client = mqtt_client.Client(device_id, self.connection, protocol=protocol)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_connect_fail = self._on_connect_fail
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(MAX_QUEUED_REQUESTS)
        self._client.reconnect_delay_set(0.05, 1.0)
        self._client.will_set(topics.status_topic(device_id), b"offline", qos=1, retain=True)
        # What the device's telemetry reports: counters since start, round trips since the last message.
        self.counters = dict.fromkeys(("samples", "offloaded", *SOURCES), 0)
        self._round_trips_us: list[int] = []
        self._telemetry_topic = topics.device_telemetry_topic(device_id)
        self.telemetry_interval_s = telemetry_interval_s
        self._telemetry_stop = threading.Event()
        self._telemetry_thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> SimDevice:
        self._connect_async()
        self._client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self._settled.wait(0.1) and time.monotonic() < deadline:
            if (self._client.last_connect_error or "").startswith("TLS"):
                break  # a certificate that fails now fails on every retry
        if not self._settled.is_set() or self.problem is not None:
            self._client.disconnect()
            self._client.loop_stop()
            why = self._client.last_connect_error
            if self.problem is not None or (why or "").startswith("TLS"):
                raise BrokerError(f"device {self.device_id}: cannot use the broker at {self.connection.url}: "
                                  f"{self.problem or why}")
            raise BrokerError(f"device {self.device_id}: no broker answered at {self.connection.url} within "
                              f"{timeout_s:.0f} s" + (f" ({why})" if why else ""))
        if self.telemetry_interval_s > 0:
            self._telemetry_thread = threading.Thread(target=self._telemetry_loop, daemon=True,
                                                      name=f"telemetry-{self.device_id}")
            self._telemetry_thread.start()
        return self

    def _connect_async(self) -> None:
        # Clean start (MQTT 3.1.1: clean session, paho's default there): a reply for an earlier connection is stale.
        clean = {"clean_start": True} if self.protocol == mqtt.MQTTv5 else {}
        self._client.connect_async(self.connection.host, self.connection.port, keepalive=15, **clean)

    def stop(self) -> None:
        self._stopping = True
        if self._telemetry_thread is not None:
            self._telemetry_stop.set()
            self._telemetry_thread.join()
            self.publish_telemetry()  # the final counts, so a reader sees every sample
        if not self.taken_over:
            self._client.publish(topics.status_topic(self.device_id), b"offline", qos=1, retain=True)
        self._client.disconnect()
        self._client.loop_stop()

    def kill(self) -> None:
        """Die as a crashed device does: the network loop stops and the connection drops without an MQTT
        DISCONNECT, so the broker publishes the device's will (offline) on its own."""
        self._telemetry_stop.set()
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def threshold(self) -> float:
        """Device-specific retained threshold, else the model-wide one, else the default."""
        with self._lock:
            for topic in (self._device_threshold_topic, self._model_threshold_topic):
                value = self._thresholds.get(topic)
                if value is not None:
                    return value
        return self.default_threshold

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered or given up (what the bookkeeping holds)."""
        with self._lock:
            return len(self._pending)

    # ---- telemetry -----------------------------------------------------------------------------------

    def note_sample(self, local: bool) -> None:
        """Count one classified sample, when its exit decision is taken (local, or offloaded)."""
        with self._lock:
            self.counters["samples"] += 1
            self.counters["local" if local else "offloaded"] += 1

    def note_answer(self, source: str, round_trip_us: int) -> None:
        """Count how an offloaded sample was answered (server, fallback, error) and its round trip."""
        with self._lock:
            self.counters[source] += 1
            if len(self._round_trips_us) < 100000:
                self._round_trips_us.append(round_trip_us)

    def telemetry(self) -> dict[str, object]:
        """The next telemetry message's body (wire/telemetry.py DEVICE_SCHEMA)."""
        with self._lock:
            counts = dict(self.counters)
            model_wide = self._thresholds.get(self._model_threshold_topic)
            own = self._thresholds.get(self._device_threshold_topic)
            trips, self._round_trips_us = self._round_trips_us, []
        rtt: dict[str, float | None] = {"p50": None, "p99": None}
        if trips:
            p50, p99 = np.percentile(np.asarray(trips, float) / 1000.0, [50, 99])
            rtt = {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}
        return {"v": telemetry.TELEMETRY_VERSION, "device": self.device_id, "model": topics.model_key(self.model_hash),
                "time": time.time(), "samples": counts["samples"], "local": counts["local"],
                "offloaded": counts["offloaded"], "fallback": counts["fallback"],
                "error": counts["error"], "threshold": self.threshold,
                "thresholds": {"model": model_wide, "device": own, "default": self.default_threshold},
                "rtt_ms": rtt}

    def publish_telemetry(self) -> None:
        if not self.taken_over:
            self._client.publish(self._telemetry_topic, telemetry.encode(self.telemetry()), qos=0)

    def _telemetry_loop(self) -> None:
        while not self._telemetry_stop.wait(self.telemetry_interval_s):
            self.publish_telemetry()

    # ---- requests ------------------------------------------------------------------------------------

    def next_request_id(self) -> int:
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
        return request_id

    def send(self, payload: bytes, request_id: int, topic: str | None = None) -> Pending:
        """Publish raw request bytes (also malformed ones) carrying ``request_id``; the reply is matched by the
        request id it echoes, as the C device does."""
        pending = Pending(sent=time.monotonic(), payload=payload if self.resend_pending else b"",
                           topic=topic or self.request_topic)
        with self._lock:
            self._pending[request_id] = pending
            if not self._first_id <= request_id < self._next_id:
                self._custom_ids[request_id] = None
                while len(self._custom_ids) > self.RECENT_CUSTOM_IDS:
                    self._custom_ids.popitem(last=False)
        if self.taken_over:
            pending.event.set()  # another process is this device now: answer locally at once
            return pending
        with self._lock:
            self.bytes_sent += len(payload)
        info = self._client.publish(topic or self.request_topic, payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("device %s: publish failed: %s", self.device_id, mqtt.error_string(info.rc))
            pending.event.set()  # nothing will answer it: fall back now, not at the timeout
        return pending

    def wait(self, request_id: int, pending: Pending, timeout_s: float | None = None) -> Reply | None:
        pending.event.wait(self.timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            self._pending.pop(request_id, None)
        return pending.reply

    def request(self, header: RequestHeader, split: np.ndarray) -> tuple[Reply | None, int]:
        """Send one split and wait for its reply; (reply or None on timeout, round trip us)."""
        pending = self.send(codec.encode_request(header, split), header.request_id)
        reply = self.wait(header.request_id, pending)
        end = pending.received if reply is not None else time.monotonic()
        return reply, int((end - pending.sent) * 1e6)

    # ---- paho callbacks ------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self.problem = f"the broker refused the connection: {reason_code}"
            log.error("device %s: %s", self.device_id, self.problem)
            self._settled.set()
            return
        mqtt_client.tcp_no_delay(client)
        self._connections_made += 1
        # Plain QoS numbers: the same SUBSCRIBE for MQTT 5 and 3.1.1.
        qos = self.subscribe_qos
        client.subscribe([(topic, qos) for topic in self._subscribed_topics])
        client.publish(topics.status_topic(self.device_id), b"online", qos=1, retain=True)
        self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        refused = [(topic, str(code)) for topic, code in zip(self._subscribed_topics, reason_codes)
                   if code.is_failure]
        if refused and refused[0][0] in (self.reply_topic, self._feature_topic):
            # Without its reply topic a device gets no answers (without its feature requests, a scores-first
            # camera none of tier 1's): say so instead of timing out on every request.
            self.problem = f"the broker refused the subscription to {refused[0][0]}: {refused[0][1]}"
            log.error("device %s: %s", self.device_id, self.problem)
        elif refused:
            log.warning("device %s: the broker refused %s; thresholds from there will not arrive", self.device_id,
                        refused)
        self._settled.set()
        if self.resend_pending and self._connections_made > 1 and self.problem is None:
            self._resend()

    @property
    def _subscribed_topics(self) -> tuple[str, ...]:
        asked = (self.reply_topic, self._model_threshold_topic, self._device_threshold_topic)
        return asked + ((self._feature_topic,) if self.on_feature_request is not None else ())

    def publish_raw(self, payload: bytes, topic: str | None = None) -> None:
        """Publish without waiting for a reply (a split an aggregator asked for: the answer comes on the request
        that sent the scores)."""
        with self._lock:
            self.bytes_sent += len(payload)
        self._client.publish(topic or self.request_topic, payload, qos=1)

    def _resend(self) -> None:
        """After a reconnection: publish again what still waits for its reply (same bytes, same request id)."""
        with self._lock:
            waiting = [p for p in self._pending.values() if p.reply is None and not p.event.is_set() and p.payload]
        for pending in waiting:
            self._client.publish(pending.topic, pending.payload, qos=1)
        if waiting:
            self.resent += len(waiting)
            log.info("device %s: sent %d unanswered requests again on %s", self.device_id, len(waiting),
                     self.connection.url)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if reason_code == SESSION_TAKEN_OVER and not self.taken_over:
            self.taken_over = True
            log.error("device %s: another client connected with this device id and took the session over; "
                      "this one answers locally from now on", self.device_id)
            client.disconnect()  # no reconnection: two processes of one id must not take turns
            with self._lock:
                waiting = list(self._pending.values())
            for pending in waiting:
                pending.event.set()
            return
        self._fail_over(client)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._fail_over(client)

    def _fail_over(self, client: mqtt.Client) -> None:
        """With several brokers, the next one: paho's loop reconnects to the address connect_async sets."""
        if len(self.connections) < 2 or self._stopping:
            return
        self._broker_index = (self._broker_index + 1) % len(self.connections)
        self.connection = self.connections[self._broker_index]
        self.failovers += 1
        log.warning("device %s: lost the broker; trying %s", self.device_id, self.connection.url)
        self._connect_async()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._feature_topic and self.on_feature_request is not None:
            self.on_feature_request(self, message.payload)
            return
        if message.topic in (self._model_threshold_topic, self._device_threshold_topic):
            value = codec.decode_threshold(message.payload)
            if value is None and message.payload:
                # Same rule as the C device: an invalid threshold is ignored, the previous one stays.
                log.warning("device %s: ignoring invalid threshold %r on %s", self.device_id, message.payload[:64],
                            message.topic)
                return
            with self._lock:
                old = self._thresholds.get(message.topic)
                self._thresholds[message.topic] = value
            if value != old:
                log.info("device %s: threshold on %s now %s", self.device_id, message.topic, value)
            return
        received = time.monotonic()
        try:
            reply = codec.decode_reply(message.payload)
        except codec.ProtocolError as error:
            log.warning("device %s: undecodable reply: %s", self.device_id, error)
            with self._lock:
                self.undecodable += 1
            return
        request_id = reply.request_id
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.reply is not None:
                sent_by_us = self._first_id <= request_id < self._next_id or request_id in self._custom_ids
                if pending is not None or sent_by_us:
                    self.duplicates += 1
                else:
                    self.misrouted += 1
                return
            pending.reply = reply
            pending.received = received
        pending.event.set()


# ---- whole simulations -----------------------------------------------------------------------------

@dataclass
class SimReport:
    outcomes: list[SampleOutcome]
    duplicates: int
    misrouted: int
    wall_s: float
    failovers: int = 0  # connections moved to the next broker of a device's list
    resent: int = 0  # requests published again after a fail-over (resend_pending)
    bytes_sent: int = 0  # application bytes the devices published on their request topics
    feature_requests: int = 0  # scores first: valid feature requests the cameras received
    withheld: int = 0  # ... answered NO_FEATURES (the event no longer held)

    def count(self, source: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.source == source)

    @property
    def lost(self) -> int:
        return self.count("fallback")


def split_header(program: DeviceProgram, model_hash: bytes, request_id: int, event_id: int = 0, view_index: int = 0,
                 view_count: int = 0) -> RequestHeader:
    """The request header of one split (the device's identity is its topic's, not the header's); dense packing,
    as the C device sends it: encode_request packs the split's words into its bits."""
    height, width, channels = program.split_hwc
    return RequestHeader(model_hash, program.split_layer, channels, height, width, request_id,
                         time.monotonic_ns() // 1000, Packing.BITS_DENSE, event_id, view_index, view_count)


def sums_header(program: DeviceProgram, model_hash: bytes, request_id: int, event_id: int, view_index: int,
                view_count: int) -> RequestHeader:
    """Scores first: the header of one view's local-exit sums (int32, one per class)."""
    return RequestHeader(model_hash, program.split_layer, program.spec.n_classes, 1, 1, request_id,
                         time.monotonic_ns() // 1000, Packing.EXIT_SUMS, event_id, view_index, view_count)


def no_features_request(program: DeviceProgram, view_index: int, view_count: int,
                        request: codec.FeatureRequest) -> bytes:
    """The answer to a feature request for an event this camera no longer holds (empty payload)."""
    header = RequestHeader(request.model_hash, program.split_layer, 0, 0, 0, request.request_id,
                           time.monotonic_ns() // 1000, Packing.NO_FEATURES, request.event_id, view_index, view_count)
    return codec.encode_request(header, np.zeros(0, np.uint8))


#: (sample index, the device's live threshold) -> the device part's answer for that sample. Called from the
#: device threads, so it must be thread-safe (the cffi binding holds its model's lock).
DevicePart = Callable[[int, float], LocalAnswer]


def precomputed(split_words: np.ndarray, entropy: np.ndarray, local_class: np.ndarray) -> DevicePart:
    """A device part answering from arrays computed beforehand (e.g. reference.run_device over the data set);
    the exit decision is taken at the live threshold, as the C code would."""
    def part(index: int, threshold: float) -> LocalAnswer:
        local = bool(exit_decision(entropy[index:index + 1], threshold)[0])
        return LocalAnswer(int(local_class[index]), float(entropy[index]), local, split_words[index])

    return part


Brokers = Union[BrokerConnection, Callable[[str], Union[BrokerConnection, Sequence[BrokerConnection]]]]


def run_devices(connection: Brokers, program: DeviceProgram, model_hash: bytes, split_words: np.ndarray,
                entropy: np.ndarray, local_class: np.ndarray, n_devices: int, requests_per_device: int,
                **options: Any) -> SimReport:
    """:func:`simulate` with the device part's answers computed beforehand for all N samples."""
    return simulate(connection, program, model_hash, precomputed(split_words, entropy, local_class),
                    len(split_words), n_devices, requests_per_device, **options)


def simulate(connection: Brokers, program: DeviceProgram, model_hash: bytes, device_part: DevicePart,
             n_samples: int, n_devices: int, requests_per_device: int, timeout_s: float = 5.0,
             all_to_server: bool = False, window: int = 1, sample_indices: Sequence[int] | None = None,
             device_prefix: str = "sim", on_outcome: Callable[[SampleOutcome], None] | None = None,
             protocol: int = mqtt.MQTTv5, subscribe_qos: int = 1,
             telemetry_interval_s: float = 2.0) -> SimReport:
    """``n_devices`` concurrent devices each classifying ``requests_per_device`` of ``n_samples`` samples with
    ``device_part``; device d takes samples (d * requests_per_device + i) mod N. ``window`` requests may be
    outstanding per device. The exit decision uses each device's live threshold (retained threshold topics),
    as the C runner does. ``on_outcome`` sees every answer as it happens (from the device threads).
    ``connection`` is the broker, or a function giving each device id its own credentials (or its list of
    brokers to fail over between); ``protocol`` and ``subscribe_qos`` as for SimDevice."""
    if program.spec.big_little:
        # These devices send the split; a Big-Little device sends its raw image and routes on priority classes.
        raise DdnnError(f"{program.spec.name} is a Big-Little model: simulated devices do not implement its "
                        "routing; run the generated C device program (ddnn_device_net)")
    devices = _start_devices(connection, [f"{device_prefix}{d}" for d in range(n_devices)], model_hash, timeout_s,
                             [program.threshold] * n_devices, protocol=protocol, subscribe_qos=subscribe_qos,
                             telemetry_interval_s=telemetry_interval_s)
    outcomes: list[list[SampleOutcome]] = [[] for _ in devices]

    def record(d: int, outcome: SampleOutcome) -> None:
        outcomes[d].append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    def drive(d: int) -> None:
        device = devices[d]
        in_flight: list[tuple[int, int, Pending, int, int]] = []

        def finish(index: int, request_id: int, pending: Pending, local_class: int, device_us: int) -> None:
            reply = device.wait(request_id, pending)
            end = pending.received if reply is not None else time.monotonic()
            rtt = int((end - pending.sent) * 1e6)
            device.note_answer("fallback" if reply is None else "server" if reply.status == codec.Status.OK
                               else "error", rtt)
            if reply is None:
                source, final, status, server_us = "fallback", local_class, -1, 0
            elif reply.status != codec.Status.OK:
                source, final, status, server_us = "error", local_class, int(reply.status), 0
            else:
                source, final, status, server_us = "server", reply.class_id, 0, reply.server_us
            record(d, SampleOutcome(device.device_id, index, request_id, source, final, local_class,
                                    device.threshold, status, rtt, server_us, device_us))

        for i in range(requests_per_device):
            position = d * requests_per_device + i
            index = int(sample_indices[position % len(sample_indices)]) if sample_indices is not None \
                else position % n_samples
            threshold = device.threshold
            started_ns = time.perf_counter_ns()
            answer = device_part(index, threshold)
            device_us = (time.perf_counter_ns() - started_ns) // 1000
            device.note_sample(not all_to_server and answer.local_exit)
            if not all_to_server and answer.local_exit:
                record(d, SampleOutcome(device.device_id, index, 0, "local", answer.local_class, answer.local_class,
                                        threshold, t_device_us=device_us))
                continue
            request_id = device.next_request_id()
            header = split_header(program, model_hash, request_id)
            pending = device.send(codec.encode_request(header, answer.split_words), request_id)
            in_flight.append((index, request_id, pending, answer.local_class, device_us))
            if len(in_flight) >= window:
                finish(*in_flight.pop(0))
        for item in in_flight:
            finish(*item)

    started = time.monotonic()
    try:
        _run_threads(drive, n_devices)
    finally:
        for device in devices:
            device.stop()
    wall = time.monotonic() - started
    return SimReport([o for per_device in outcomes for o in per_device], sum(dev.duplicates for dev in devices),
                     sum(dev.misrouted for dev in devices), wall, sum(dev.failovers for dev in devices),
                     sum(dev.resent for dev in devices))


# ---- several cameras, one scene (multi-view models, docs/views.md) ------------------------------------------

def simulate_views(connection: Brokers, programs: Sequence[DeviceProgram], model_hash: bytes,
                   device_parts: Sequence[DevicePart], n_events: int, timeout_s: float = 5.0,
                   device_prefix: str = "cam", first_event_id: int = 1,
                   dies_after: dict[int, int] | None = None, *, scores_first: bool = False,
                   keep_events: int | Sequence[int] = FEATURES_KEPT, dies_between: dict[int, int] | None = None,
                   telemetry_interval_s: float = 2.0) -> SimReport:
    """K cameras (one per view, ``programs[k]`` and ``device_parts[k]`` being view k's) looking at the same
    ``n_events`` scenes: for scene e each sends its view's split tagged with event id ``first_event_id + e``,
    its view index and K, waits for the reply (the event's answer, whoever of the K it went to) and moves on,
    as cameras capturing together would. No camera answers locally: the decision is the aggregator's, on
    every view's exit together. ``dies_after`` {view: n} makes camera ``view`` die (:meth:`SimDevice.kill`:
    it drops its connection and sends nothing more) after its first n events, as a device that crashes
    mid-run. Outcomes: one per camera and event sent (``index`` = the event's scene index, ``source`` server /
    error / fallback).

    ``scores_first``: each camera sends its view's local-exit sums (the BLinear of its split, bit for bit what
    the device's exit computes) instead of its split, keeps the split of its last ``keep_events`` events (per
    view, or one number for all) and publishes it when the aggregator's feature request for that event comes,
    under the sums' request id (NO_FEATURES for an event it no longer holds); the reply to the sums is the
    event's answer either way. ``dies_between`` {view: e} makes camera ``view`` die between the phases of its
    event e: it sends the sums and is killed when the feature request for them arrives (or after
    ``timeout_s`` if none does)."""
    count = len(programs)
    if len(device_parts) != count or not 1 < count <= codec.MAX_VIEWS:
        raise ValueError(f"{len(device_parts)} device parts for {count} views (2..{codec.MAX_VIEWS})")
    dies_after = dies_after or {}
    dies_between = dies_between or {}
    if dies_between and not scores_first:
        raise ValueError("dies_between is a scores-first camera's death (between sums and features)")
    kept = [keep_events] * count if isinstance(keep_events, int) else list(keep_events)
    buffers = [FeatureBuffer(model_hash, functools.partial(no_features_request, program, view, count), kept[view])
               for view, program in enumerate(programs)]
    doomed = [threading.Event() for _ in programs]
    ids = [f"{device_prefix}{view}" for view in range(count)]

    def feature_request(device: SimDevice, payload: bytes) -> None:
        view = ids.index(device.device_id)
        try:
            request = codec.decode_feature_request(payload)
        except codec.ProtocolError as error:
            log.warning("camera %s: ignoring a feature request: %s", device.device_id, error)
            return
        if view in dies_between and request.event_id == first_event_id + dies_between[view]:
            doomed[view].set()  # die now, before answering (the driving thread kills the device)
            return
        out = buffers[view].answer(request)
        if out is not None:
            device.publish_raw(out)

    devices = _start_devices(connection, ids, model_hash, timeout_s, [program.threshold for program in programs],
                             telemetry_interval_s=telemetry_interval_s,
                             on_feature_request=feature_request if scores_first else None)
    outcomes: list[list[SampleOutcome]] = [[] for _ in devices]

    def drive(view: int) -> None:
        device, program = devices[view], programs[view]
        for event in range(min(n_events, dies_after.get(view, n_events), dies_between.get(view, n_events) + 1)):
            started_ns = time.perf_counter_ns()
            answer = device_parts[view](event, device.threshold)
            device_us = (time.perf_counter_ns() - started_ns) // 1000
            request_id = device.next_request_id()
            event_id = first_event_id + event
            split = codec.encode_request(split_header(program, model_hash, request_id, event_id, view, count),
                                         answer.split_words)
            if scores_first:
                buffers[view].keep(event_id, request_id, split)
                sums = reference.exit_sums(program.exit, answer.split_words[None])[0]
                payload = codec.encode_request(sums_header(program, model_hash, request_id, event_id, view, count),
                                               sums)
            else:
                payload = split
            pending = device.send(payload, request_id)
            if dies_between.get(view) == event:
                doomed[view].wait(device.timeout_s)
                device.kill()
                return
            reply = device.wait(request_id, pending)
            end = pending.received if reply is not None else time.monotonic()
            if reply is None:
                source, final, status, by = "fallback", answer.local_class, -1, -1
            elif reply.status != codec.Status.OK:
                source, final, status, by = "error", answer.local_class, int(reply.status), -1
            else:
                source, final, status, by = "server", reply.class_id, 0, reply.answered_by
            outcomes[view].append(SampleOutcome(device.device_id, event, request_id, source, final,
                                                answer.local_class, device.threshold, status,
                                                int((end - pending.sent) * 1e6),
                                                reply.server_us if reply is not None else 0, device_us, by))
        if view in dies_after:
            device.kill()

    started = time.monotonic()
    try:
        _run_threads(drive, count)
    finally:
        for view, device in enumerate(devices):
            if view not in dies_after and view not in dies_between:
                device.stop()
    return SimReport([o for per_device in outcomes for o in per_device], sum(dev.duplicates for dev in devices),
                     sum(dev.misrouted for dev in devices), time.monotonic() - started,
                     bytes_sent=sum(dev.bytes_sent for dev in devices),
                     feature_requests=sum(b.answered + b.withheld for b in buffers),
                     withheld=sum(b.withheld for b in buffers))


def _start_devices(connection: Brokers, device_ids: Sequence[str], model_hash: bytes, timeout_s: float,
                   thresholds: Sequence[float], protocol: int = mqtt.MQTTv5,
                   subscribe_qos: int = 1, telemetry_interval_s: float = 2.0,
                   on_feature_request: Callable[[SimDevice, bytes], None] | None = None) -> list[SimDevice]:
    """Every device connected, or none (BrokerError after stopping the ones that were)."""
    devices: list[SimDevice] = []
    try:
        for device_id, threshold in zip(device_ids, thresholds):
            broker = connection(device_id) if callable(connection) else connection
            devices.append(SimDevice(device_id, broker, model_hash, timeout_s, default_threshold=threshold,
                                     protocol=protocol, subscribe_qos=subscribe_qos,
                                     telemetry_interval_s=telemetry_interval_s,
                                     on_feature_request=on_feature_request).start())
    except BrokerError:
        for device in devices:
            device.stop()
        raise
    return devices


def _run_threads(drive: Callable[[int], None], count: int) -> None:
    """``drive(i)`` for i in 0..count-1, each on its own thread, until all are done."""
    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(0.2)  # late duplicates would arrive within a moment of the last reply
