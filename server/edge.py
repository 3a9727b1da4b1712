"""An edge's way up: requests its own exit was not confident about go on to the tier above, and every one of
them comes back to its device answered, by the tier above or, when that does not answer in time, by the
edge's own exit marked fallback.

The reply path runs through the edge (the cloud answers the edge, the edge the device) rather than from the
cloud straight to the device: identity stays bound to topics at every hop (the cloud answers only the sender
of what it received, the edge; the edge only the device it heard from), an edge keeps its devices answered
when the cloud is gone, and the cloud needs no rights on any device's topics. The cost is one more MQTT hop
on the way back for the samples that go up.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from ddnn_gen.wire import codec, mqtt_client, topics
from ddnn_gen.wire.codec import Packing, Reply, RequestHeader
from ddnn_gen.wire.connection import BrokerConnection
from ddnn_server.log_limits import RateLimitedLog

log = logging.getLogger(__name__)

# Forwards waiting for the tier above at once; past it a request is answered by the edge's own exit at once
# rather than queued without bound.
MAX_PENDING = 10000


@dataclass
class Forward:
    """One device request sent on, and what to answer if the tier above does not."""

    context: Any  # the caller's (the device's request and where its reply goes)
    request_id: int  # the device's
    own: Reply  # the edge's own answer (its exit), sent marked fallback if nothing comes back
    sent: float = 0.0
    deadline: float = 0.0


class Upstream:
    """The edge's client of the tier above: one MQTT connection (its own broker address), requests published
    as the edge's id on the next tier's request topic, replies matched by request id on its reply topic."""

    def __init__(self, connection: BrokerConnection, edge_id: str, timeout_s: float,
                 answer: Callable[[Forward, Reply], None]) -> None:
        self.edge_id = topics.check_name(edge_id, "edge id")
        self.connection = connection
        self.timeout_s = timeout_s
        self._answer = answer
        self._pending: dict[int, Forward] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 24 | 1)
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._late = RateLimitedLog(log)
        self.stats = {"forwarded": 0, "answered": 0, "fallback": 0, "late": 0}
        self._client = mqtt_client.Client(f"{self.edge_id}-up", connection)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *args: self._connected.clear()
        self._client.on_message = self._on_message
        self._client.max_inflight_messages_set(1000)
        self._client.reconnect_delay_set(0.1, 2.0)
        self._timer = threading.Thread(target=self._expire_loop, name="ddnn-upstream-timeouts", daemon=True)

    def start(self) -> Upstream:
        self._client.connect_async(self.connection.host, self.connection.port, keepalive=15, clean_start=True)
        self._client.loop_start()
        self._timer.start()
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def forward(self, forward: Forward, model_hash: bytes, split_layer: int, chw: tuple[int, int, int],
                split_words: np.ndarray, tier: int) -> None:
        """Send ``split_words`` (the edge tier's packed output) to tier ``tier``; answer ``forward`` later."""
        with self._lock:
            full = len(self._pending) >= MAX_PENDING
        if full or not self.connected:
            self._fallback(forward, "the tier above is not reachable" if not full else "too many requests pending")
            return
        request_id = next(self._ids)
        header = RequestHeader(model_hash, split_layer, chw[0], chw[1], chw[2], request_id,
                               time.monotonic_ns() // 1000, Packing.BITS_DENSE)
        forward.sent = time.monotonic()
        forward.deadline = forward.sent + self.timeout_s
        with self._lock:
            self._pending[request_id] = forward
        info = self._client.publish(topics.request_topic(model_hash, self.edge_id, tier),
                                    codec.encode_request(header, split_words), qos=1)
        self.stats["forwarded"] += 1
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS,):
            with self._lock:
                lost = self._pending.pop(request_id, None)
            if lost is not None:
                self._fallback(lost, f"publishing upstream failed: {mqtt.error_string(info.rc)}")

    def drain(self, timeout_s: float) -> None:
        """Wait for what is pending (at most ``timeout_s``), then answer the rest with the edge's own exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    break
            time.sleep(0.01)
        with self._lock:
            left = list(self._pending.values())
            self._pending.clear()
        for forward in left:
            self._fallback(forward, "shutting down")

    def close(self) -> None:
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()

    # ---- internals -------------------------------------------------------------------------------------

    def _fallback(self, forward: Forward, why: str) -> None:
        self.stats["fallback"] += 1
        self._late.warning("fallback", "answering with the edge's own exit: %s", why)
        elapsed = int((time.monotonic() - forward.sent) * 1e6) if forward.sent else 0
        own = forward.own
        self._answer(forward, Reply(forward.request_id, own.status, own.class_id, own.top_k, own.server_us,
                                    own.queue_us, "", elapsed, 0, own.answered_by, codec.REPLY_FALLBACK))

    def _expire_loop(self) -> None:
        while not self._stopping.wait(0.01):
            now = time.monotonic()
            with self._lock:
                expired = [rid for rid, forward in self._pending.items() if forward.deadline <= now]
                late = [self._pending.pop(rid) for rid in expired]
            for forward in late:
                self._fallback(forward, f"no answer within {self.timeout_s * 1e3:.0f} ms")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("the tier above's broker refused the edge: %s", reason_code)
            return
        mqtt_client.tcp_no_delay(client)
        client.subscribe(topics.reply_topic(self.edge_id), options=SubscribeOptions(qos=1))
        self._connected.set()
        log.info("edge %s connected to the tier above at %s", self.edge_id, self.connection.url)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = time.monotonic()
        try:
            reply = codec.decode_reply(message.payload)
        except codec.ProtocolError as error:
            self._late.warning("undecodable", "undecodable reply from the tier above: %s", error)
            return
        with self._lock:
            forward = self._pending.pop(reply.request_id, None)
        if forward is None:
            self.stats["late"] += 1  # answered by the edge already (timed out), or a duplicate
            return
        if reply.status != codec.Status.OK:
            self._fallback(forward, f"the tier above answered {reply.status.name}")
            return
        self.stats["answered"] += 1
        own = forward.own
        self._answer(forward, Reply(forward.request_id, codec.Status.OK, reply.class_id, reply.top_k, own.server_us,
                                    own.queue_us, "", int((received - forward.sent) * 1e6),
                                    reply.server_us + reply.upstream_server_us, reply.answered_by, reply.flags))
