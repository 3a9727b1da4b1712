"""The live thresholds of a server's early exits, as operators set them: retained messages on
ddnn/tier-threshold/<model>/<tier> (model-wide) and .../<tier>/<device> (one device's requests) for an edge's
tier, ddnn/threshold/<model> for an aggregator's local exit."""

from __future__ import annotations

import logging
import threading

from ddnn_gen.wire import codec, topics

log = logging.getLogger(__name__)


class TierThresholds:
    """Thread-safe: the network thread writes, the workers read."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def subscriptions(model_hash: bytes, tier: int) -> list[str]:
        base = topics.tier_threshold_topic(model_hash, tier)
        return [base, base + "/+"]

    @staticmethod
    def handles(topic: str) -> bool:
        return topic.startswith(f"{topics.TOPIC_ROOT}/tier-threshold/")

    def update(self, topic: str, payload: bytes) -> None:
        """A retained message arrived: an empty one clears, an invalid one is ignored (the last value stays)."""
        if not payload:
            with self._lock:
                self._values.pop(topic, None)
            return
        value = codec.decode_threshold(payload)
        if value is None:
            log.warning("ignoring invalid threshold %r on %s", payload[:64], topic)
            return
        with self._lock:
            old = self._values.get(topic)
            self._values[topic] = value
        if old != value:
            log.info("threshold on %s now %s", topic, value)

    def value(self, topic: str) -> float | None:
        """The value last set on ``topic``, or None (the model file's applies)."""
        with self._lock:
            return self._values.get(topic)

    def for_request(self, model_hash: bytes, tier: int, device_id: str, default: float) -> float:
        """The device's own value, else the model-wide one, else ``default`` (the model file's)."""
        device_topic = topics.tier_threshold_topic(model_hash, tier, device_id)
        model_topic = topics.tier_threshold_topic(model_hash, tier)
        with self._lock:
            for topic in (device_topic, model_topic):
                if topic in self._values:
                    return self._values[topic]
        return default

    def applied(self, model_hash: bytes, tier: int, per_device: bool = True,
                limit: int = 64) -> tuple[float | None, dict[str, float]]:
        """What this server applies to ``tier``'s exit of a model, for its telemetry: the retained model-wide
        value (None: the model file's) and, where it applies them (``per_device``), the devices' own values
        (at most ``limit``, by name)."""
        model_topic = topics.tier_threshold_topic(model_hash, tier)
        prefix = model_topic + "/"
        with self._lock:
            model = self._values.get(model_topic)
            devices = {topic[len(prefix):]: value for topic, value in self._values.items()
                       if per_device and topic.startswith(prefix)}
        return model, dict(sorted(devices.items())[:limit])
