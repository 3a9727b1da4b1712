"""One retained message, published and confirmed: how ``ddnngen threshold set|clear`` and the benches leave a
value on the broker for the devices and edges that subscribe later (docs/protocol.md)."""

from __future__ import annotations

import threading

from ddnn_gen.wire import mqtt_client
from ddnn_gen.wire.connection import BrokerConnection, BrokerError


def publish_retained(broker: BrokerConnection, topic: str, payload: bytes, timeout_s: float = 10.0) -> None:
    """Publish one retained QoS 1 message and wait until the broker has accepted it (PUBACK success)."""
    client = mqtt_client.Client("", broker)
    connected, acked = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def on_connect(_client: object, _userdata: object, _flags: object, reason_code: object, _props: object) -> None:
        outcome["connack"] = reason_code
        connected.set()

    def on_publish(_client: object, _userdata: object, mid: int, reason_code: object, _properties: object) -> None:
        outcome["puback"] = reason_code
        acked.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    try:
        client.connect(broker.host, broker.port, keepalive=10)
    except OSError as error:
        raise BrokerError(f"cannot reach the broker at {broker.url}: {mqtt_client.connect_error_text(error)}") \
            from error
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise BrokerError(f"the broker at {broker.url} did not answer the connection within {timeout_s:.0f} s")
        if getattr(outcome["connack"], "is_failure", False):
            raise BrokerError(f"the broker at {broker.url} refused the connection: {outcome['connack']}")
        client.publish(topic, payload, qos=1, retain=True)
        if not acked.wait(timeout_s):
            raise BrokerError(f"the broker at {broker.url} did not acknowledge the publish within {timeout_s:.0f} s")
        if getattr(outcome["puback"], "is_failure", False):
            raise BrokerError(f"the broker at {broker.url} refused the publish on {topic}: {outcome['puback']}")
    finally:
        client.disconnect()
        client.loop_stop()
