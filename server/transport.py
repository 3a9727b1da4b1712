"""The server's transports behind one interface (:class:`ServerTransport`), and the MQTT one: paho-mqtt 2.x
(callback API v2, MQTT 5), the only MQTT-aware module of the server. The AMQP one (a RabbitMQ cluster's
quorum queues) is server/amqp_transport.py.

A server subscribes, for each model it holds, to ``$share/<group>/ddnn/req/<model>/+``: servers of one
group split that model's requests, and no server sees a model it cannot answer. Requests are
acknowledged (manual QoS 1 ack) only once their reply has been accepted by the broker, so a server that
dies with work in flight gets it redelivered when it comes back under the same ``--server-id``
(persistent session). Replies go only to ``ddnn/reply/<device-id>`` of the device id in the request's
topic (which a broker ACL ties to the sender's credentials); nothing in a request chooses where the
server publishes.

Bounded: the CONNECT asks for an MQTT 5 Receive Maximum, so the broker keeps at most that many requests
unacknowledged with this server (the rest wait in the broker, where its own limits apply); replies waiting
to go out are capped too (paho's own queue is unlimited by default). A reply that finds the queue full is
dropped and counted; its device answers locally when its timeout expires.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ddnn_gen.wire import mqtt_client, topics
from ddnn_gen.wire.connection import BrokerConnection
from ddnn_server.acks import AckLedger
from ddnn_server.log_limits import RateLimitedLog

log = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 512  # requests the broker may have in flight to this server (MQTT 5 Receive Maximum)
IN_FLIGHT_REPLIES = 1000  # replies in flight to the broker (QoS 1, awaiting PUBACK)
QUEUED_REPLIES = 10000  # replies waiting behind those; beyond this a reply is dropped (counted, logged)


@dataclass
class Incoming:
    """A request as received: raw bytes, its topic (MQTT's, also for AMQP routing keys), and what its ack
    needs: MQTT packet id and QoS, or AMQP delivery tag and the connection it came on (``generation``). A
    transport that bounds what it holds (Paho C) keeps only the header of an oversized request."""

    payload: bytes
    topic: str
    mid: int
    qos: int
    generation: int = 0
    received: float = field(default_factory=time.monotonic)  # when it arrived (the server's latency starts)
    truncated_from: int = 0  # > 0: the payload's size on the wire, of which the transport kept only the start


class ServerTransport(Protocol):
    """What the server needs of a transport. Requests arrive through the ``on_request`` callback given at
    construction (from the transport's own thread); a request is acknowledged to the broker only once its
    reply is accepted (or, for :meth:`drop`, at once), so a server that dies leaves it to be delivered again."""

    unsent_replies: int
    client_id: str

    @property
    def url(self) -> str:
        """Where it is connected (for log lines)."""

    @property
    def connection_problem(self) -> str | None:
        """Why the last connection attempt failed, or None."""

    def start(self) -> None: ...

    def wait_ready(self, timeout_s: float) -> bool:
        """True once requests can arrive."""

    def stop_taking_work(self, timeout_s: float = 3.0) -> None:
        """New requests go to the other servers from now on."""

    def wait_replies_acked(self, timeout_s: float = 5.0) -> bool: ...

    def close(self) -> None: ...

    def drop(self, incoming: Incoming) -> None:
        """Acknowledge a request that cannot be answered."""

    def reply(self, incoming: Incoming, device_id: str, payload: bytes) -> None:
        """Send ``payload`` to ``device_id``'s reply topic; acknowledge ``incoming`` once it is accepted."""

    def reply_many(self, replies: Sequence[tuple[Incoming, str, bytes]]) -> None:
        """:meth:`reply` for each (incoming, device id, payload) of a batch."""

    def publish_telemetry(self, payload: bytes) -> None:
        """This server's load on its telemetry topic, fire and forget."""


class Transport:
    """MQTT 5: shared subscriptions on a Mosquitto (or any MQTT 5 broker)."""

    def __init__(self, connection: BrokerConnection, client_id: str, group: str, served: Sequence[tuple[bytes, int]],
                 on_request: Callable[[Incoming], None], persistent: bool, session_expiry_s: int = 300,
                 extra_subscriptions: Sequence[str] = (),
                 on_other: Callable[[str, bytes], None] | None = None, receive_maximum: int = RECEIVE_MAXIMUM,
                 queued_replies: int = QUEUED_REPLIES) -> None:
        """``served``: (model hash, request topic tier) for every model. ``extra_subscriptions`` (retained
        thresholds, say) are delivered to ``on_other`` instead of ``on_request``."""
        self.connection = connection
        self.client_id = topics.check_name(client_id, "server id")
        self.subscriptions = [topics.request_subscription(model_hash, group, tier) for model_hash, tier in served]
        self._extra = list(extra_subscriptions)
        self._on_other = on_other
        self._on_request = on_request
        self._persistent = persistent
        self._session_expiry = session_expiry_s if persistent else 0
        self._receive_maximum = receive_maximum
        self._client = mqtt_client.Client(client_id, connection, manual_ack=True)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self._client.on_publish = self._published
        self._client.on_subscribe = self._subscribed
        self._client.on_unsubscribe = self._unsubscribed
        self._client.max_inflight_messages_set(IN_FLIGHT_REPLIES)
        self._client.max_queued_messages_set(queued_replies)
        self._client.reconnect_delay_set(0.1, 2.0)
        status = topics.server_status_topic(client_id)
        self._client.will_set(status, b"offline", qos=1, retain=True)
        self._acks: AckLedger[tuple[int, int]] = AckLedger()  # reply mid -> (request mid, request qos)
        self._subscribed_event = threading.Event()
        self._unsubscribed_event = threading.Event()
        self._taking_work = True
        self.unsent_replies = 0
        self._problems = RateLimitedLog(log, interval_s=30.0)
        self._refused: str | None = None

    @property
    def connection_problem(self) -> str | None:
        """Why the last connection attempt failed (refused, TLS), or None."""
        return self._refused or self._client.last_connect_error

    @property
    def url(self) -> str:
        return self.connection.url

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; :meth:`wait_ready` says when requests can arrive."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        props.ReceiveMaximum = self._receive_maximum
        self._client.connect_async(self.connection.host, self.connection.port, keepalive=15,
                                   clean_start=not self._persistent, properties=props)
        self._client.loop_start()

    def wait_ready(self, timeout_s: float) -> bool:
        """True once connected and every model's subscription was granted."""
        return self._subscribed_event.wait(timeout_s)

    def stop_taking_work(self, timeout_s: float = 3.0) -> None:
        """Unsubscribe so the shared group routes new requests to the other servers."""
        self._taking_work = False
        self._unsubscribed_event.clear()
        result, _ = self._client.unsubscribe(self.subscriptions)
        if result == mqtt.MQTT_ERR_SUCCESS and not self._unsubscribed_event.wait(timeout_s):
            log.warning("no UNSUBACK within %.1f s", timeout_s)

    def wait_replies_acked(self, timeout_s: float = 5.0) -> bool:
        return self._acks.wait_empty(timeout_s)

    def close(self) -> None:
        """Clean disconnect that also ends the session, so nothing queues for a server that has gone."""
        self._client.publish(topics.server_status_topic(self.client_id), b"offline", qos=1, retain=True)
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    def publish_telemetry(self, payload: bytes) -> None:
        """This server's load on ddnn/server/<id>/telemetry: QoS 0, not retained (a reader wants the current
        figures, and a lost one is replaced by the next)."""
        self._client.publish(topics.server_telemetry_topic(self.client_id), payload, qos=0)

    def publish_feature_request(self, device_id: str, payload: bytes) -> bool:
        """Aggregator, scores first: ask ``device_id`` for an event's split on its ``ddnn/features`` topic (QoS 1:
        a lost request would cost the event its second deadline). False when it could not be queued."""
        info = self._client.publish(topics.feature_request_topic(device_id), payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._problems.warning("unsent", "feature request to %s not sent: %s", device_id,
                                   mqtt.error_string(info.rc))
            return False
        return True

    # ---- replies -------------------------------------------------------------------------------------

    def drop(self, incoming: Incoming) -> None:
        """Ack a request that cannot be answered (no valid device id to reply to), so it never comes back."""
        self._ack(incoming.mid, incoming.qos)

    def reply_many(self, replies: Sequence[tuple[Incoming, str, bytes]]) -> None:
        for incoming, device_id, payload in replies:
            self.reply(incoming, device_id, payload)

    def reply(self, incoming: Incoming, device_id: str, payload: bytes) -> None:
        """Publish a reply to ``device_id``'s reply topic; the request is acked once the broker has accepted
        the reply. ``device_id`` must be valid (topics.check_device_id)."""
        topic = topics.reply_topic(device_id)
        started = self._acks.before_publish()
        info = self._client.publish(topic, payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            # Not queued (the outgoing queue is full, or worse): no PUBACK will come. Ack the request so it
            # does not hold one of the broker's in-flight slots forever; its device falls back locally.
            self.unsent_replies += 1
            self._problems.warning("unsent", "reply to %s not sent: %s", topic, mqtt.error_string(info.rc))
            self._ack(incoming.mid, incoming.qos)
            return
        if self._acks.after_publish(info.mid, started, (incoming.mid, incoming.qos)):
            self._ack(incoming.mid, incoming.qos)

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self._client.ack(mid, qos)

    # ---- paho callbacks (network thread) ------------------------------------------------------------

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                   properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = f"the broker refused the connection: {reason_code}"
            self._problems.warning("refused", "%s (%s)", self._refused, self.connection.url)
            return
        self._refused = None
        mqtt_client.tcp_no_delay(client)
        log.info("connected to %s as %s (session present: %s)", self.connection.url, self.client_id,
                 flags.session_present)
        if self._taking_work:
            client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in self.subscriptions + self._extra])
        client.publish(topics.server_status_topic(self.client_id), b"online", qos=1, retain=True)

    def _subscribed(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        refused = [(topic, str(code)) for topic, code in zip(self.subscriptions + self._extra, reason_codes)
                   if code.is_failure]
        if refused:
            self._refused = f"the broker refused the subscriptions {refused}"
            log.error("%s; this server receives no requests for them", self._refused)
            return
        self._subscribed_event.set()

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                      properties: Any) -> None:
        self._subscribed_event.clear()
        if reason_code != 0:
            log.warning("lost the broker (%s); reconnecting", reason_code)
        # Unacked replies will not get their PUBACK on this connection; the requests come back on
        # reconnect (persistent session) or the devices time out and fall back.
        self._acks.reset()

    def _unsubscribed(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        self._unsubscribed_event.set()

    def _published(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        request = self._acks.puback(mid)
        if request is not None:
            self._ack(*request)

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._on_other is not None and not message.topic.startswith(f"{topics.TOPIC_ROOT}/req/"):
            self._on_other(message.topic, message.payload)
            self._ack(message.mid, message.qos)
            return
        incoming = Incoming(message.payload, message.topic, message.mid, message.qos)
        try:
            self._on_request(incoming)
        except Exception:  # the network thread must survive anything a request does
            log.exception("unexpected error handling a request on %s", message.topic)
            self._ack(message.mid, message.qos)
