"""The only MQTT-aware module of the server: paho-mqtt 2.x (callback API v2, MQTT 5).

Requests arrive through the shared subscription ``$share/<group>/ddnn/req/+`` and are acknowledged
(manual QoS 1 ack) only once their reply has been accepted by the broker, so a server that dies with
work in flight gets it redelivered when it comes back under the same ``--server-id`` (persistent
session). Replies go to the request's MQTT 5 Response Topic with its Correlation Data, or to
``ddnn/reply/<device-id>`` when the device gave none.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ddnn_gen import mqtt_client, protocol

log = logging.getLogger(__name__)


@dataclass
class Incoming:
    """A request as received: raw bytes plus where its reply goes."""

    payload: bytes
    topic: str
    response_topic: str | None
    correlation: bytes | None
    mid: int
    qos: int


class Transport:
    def __init__(self, host: str, port: int, client_id: str, group: str, on_request: Callable[[Incoming], None],
                 persistent: bool, session_expiry_s: int = 300) -> None:
        self.host, self.port = host, port
        self.client_id = client_id
        self.group = group
        self._on_request = on_request
        self._persistent = persistent
        self._session_expiry = session_expiry_s if persistent else 0
        self._client = mqtt_client.Client(client_id, manual_ack=True)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self._client.on_publish = self._published
        self._client.on_unsubscribe = self._unsubscribed
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(0.1, 2.0)
        status = protocol.server_status_topic(client_id)
        self._client.will_set(status, b"offline", qos=1, retain=True)
        self._ack_lock = threading.Lock()
        self._acks_waiting: dict[int, tuple[int, int]] = {}  # reply mid -> (request mid, request qos)
        self._early_publishes: set[int] = set()
        self._ack_cond = threading.Condition(self._ack_lock)
        self._connected_event = threading.Event()
        self._unsubscribed_event = threading.Event()
        self._taking_work = True

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        self._client.connect_async(self.host, self.port, keepalive=15, clean_start=not self._persistent,
                                   properties=props)
        self._client.loop_start()
        if not self._connected_event.wait(timeout_s):
            log.warning("no broker at %s:%d yet; still trying in the background", self.host, self.port)

    def stop_taking_work(self, timeout_s: float = 3.0) -> None:
        """Unsubscribe so the shared group routes new requests to the other servers."""
        self._taking_work = False
        self._unsubscribed_event.clear()
        result, _ = self._client.unsubscribe(protocol.request_subscription(self.group))
        if result == mqtt.MQTT_ERR_SUCCESS and not self._unsubscribed_event.wait(timeout_s):
            log.warning("no UNSUBACK within %.1f s", timeout_s)

    def wait_replies_acked(self, timeout_s: float = 5.0) -> bool:
        with self._ack_cond:
            return self._ack_cond.wait_for(lambda: not self._acks_waiting, timeout_s)

    def close(self) -> None:
        """Clean disconnect that also ends the session, so nothing queues for a server that has gone."""
        self._client.publish(protocol.server_status_topic(self.client_id), b"offline", qos=1, retain=True)
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    # ---- replies -------------------------------------------------------------------------------------

    def reply(self, incoming: Incoming, device_id: str, payload: bytes) -> None:
        """Publish a reply; the request is acked once the broker has accepted the reply."""
        topic = incoming.response_topic or (protocol.reply_topic(device_id) if device_id else None)
        if topic is None or not _topic_ok(topic):
            log.error("request on %s has no usable reply topic (%r); dropping its reply", incoming.topic, topic)
            self._ack(incoming.mid, incoming.qos)
            return
        props = mqtt_client.PackedPublishProperties(correlation=incoming.correlation or None)
        info = self._client.publish(topic, payload, qos=1, properties=props)  # type: ignore[arg-type]
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            log.error("publishing reply to %s failed: %s", topic, mqtt.error_string(info.rc))
        with self._ack_cond:
            if info.mid in self._early_publishes:
                self._early_publishes.discard(info.mid)
                ack_now = True
            else:
                self._acks_waiting[info.mid] = (incoming.mid, incoming.qos)
                ack_now = False
        if ack_now:
            self._ack(incoming.mid, incoming.qos)

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self._client.ack(mid, qos)

    # ---- paho callbacks (network thread) ------------------------------------------------------------

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                   properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        protocol.tcp_no_delay(client)
        log.info("connected to %s:%d as %s (session present: %s)", self.host, self.port, self.client_id,
                 flags.session_present)
        if self._taking_work:
            client.subscribe(protocol.request_subscription(self.group), options=SubscribeOptions(qos=1))
        client.publish(protocol.server_status_topic(self.client_id), b"online", qos=1, retain=True)
        self._connected_event.set()

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                      properties: Any) -> None:
        self._connected_event.clear()
        if reason_code != 0:
            log.warning("lost the broker (%s); reconnecting", reason_code)
        # Unacked replies will not get their PUBACK on this connection; the requests come back on
        # reconnect (persistent session) or the devices time out and fall back.
        with self._ack_cond:
            self._acks_waiting.clear()
            self._early_publishes.clear()
            self._ack_cond.notify_all()

    def _unsubscribed(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        self._unsubscribed_event.set()

    def _published(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._ack_cond:
            request = self._acks_waiting.pop(mid, None)
            if request is None:
                self._early_publishes.add(mid)
            self._ack_cond.notify_all()
        if request is not None:
            self._ack(*request)

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        incoming = Incoming(message.payload, message.topic, response_topic, correlation, message.mid, message.qos)
        try:
            self._on_request(incoming)
        except Exception:  # the network thread must survive anything a request does
            log.exception("unexpected error handling a request on %s", message.topic)
            self._ack(message.mid, message.qos)


def _topic_ok(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and len(topic.encode()) < 65535

