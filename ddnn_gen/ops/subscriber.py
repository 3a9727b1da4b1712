"""The operator-side MQTT client the controller and the dashboard share: subscribe (QoS 0) to what they
read, refuse to start with the broker's reason when it denies that (the operator role is needed), publish
retained thresholds; optionally a retained last will (the controller's "offline" state)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from ddnn_gen.wire import mqtt_client
from ddnn_gen.wire.connection import BrokerConnection, BrokerError


class OperatorClient:
    def __init__(self, connection: BrokerConnection, what: str, subscriptions: Sequence[str],
                 on_message: Callable[[str, bytes], None], will: tuple[str, bytes] | None = None) -> None:
        """``will``: (topic, payload) the broker publishes retained (QoS 1) when this client dies without a
        DISCONNECT."""
        self.connection = connection
        self.what = what
        self._subscriptions = list(subscriptions)
        self._ready = threading.Event()
        self._refused: str | None = None
        # A broker that names clients by user name does so anyway; naming it here keeps its rules simple.
        client_id = connection.username or f"ddnn-{what}-{os.getpid()}-{os.urandom(3).hex()}"
        self._client = mqtt_client.Client(client_id, connection)
        self._client.on_connect = self._connected
        self._client.on_subscribe = self._subscribed
        self._client.on_message = lambda _c, _u, message: on_message(message.topic, message.payload)
        self._client.reconnect_delay_set(0.1, 2.0)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = f"the broker refused the connection: {reason_code}"
            self._ready.set()
            return
        client.subscribe([(topic, SubscribeOptions(qos=0)) for topic in self._subscriptions])

    def _subscribed(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            self._refused = (f"the broker refused the {self.what}'s subscriptions ({', '.join(refused)}); it needs "
                             "the operator role")
        self._ready.set()

    def start(self, timeout_s: float = 10.0) -> None:
        self._client.connect_async(self.connection.host, self.connection.port, keepalive=15)
        self._client.loop_start()
        if not self._ready.wait(timeout_s) or self._refused:
            self.stop()
            raise BrokerError(f"{self.what}: {self._refused or f'no broker answered at {self.connection.url}'}")

    def publish_retained(self, topic: str, payload: bytes, wait_s: float | None = None) -> bool:
        """Queue a retained QoS 1 publish (and wait up to ``wait_s`` for the broker); False if not queued."""
        info = self._client.publish(topic, payload, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        if wait_s is not None:
            info.wait_for_publish(wait_s)
        return True

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
