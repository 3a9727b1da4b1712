"""A scores-first camera's memory of its last splits (docs/views.md): a multi-view camera sends its local exit's
integer sums first and keeps the event's split here, ready for the aggregator's feature request. Bounded: past
``capacity`` events the oldest is forgotten, and a request for an event no longer held (or under another
request id than the one that sent the sums) is answered NO_FEATURES, so the aggregator proceeds with the views
it has instead of waiting its second deadline. Pure: no MQTT, thread-safe (the device thread keeps, the
network thread answers)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from ddnn_gen.wire.codec import FeatureRequest

# Events a simulated camera keeps by default: it waits for each event's answer before the next, so one is
# enough; the margin covers an aggregator asking late (its first deadline) while later events are captured.
FEATURES_KEPT = 16


class FeatureBuffer:
    """Event id -> (request id of its sums, the split request ready to publish), the last ``capacity`` events."""

    def __init__(self, model_hash: bytes, no_features: Callable[[FeatureRequest], bytes],
                 capacity: int = FEATURES_KEPT) -> None:
        if capacity < 0:
            raise ValueError("a feature buffer holds 0 or more events")
        self.model_hash = bytes(model_hash)
        self.capacity = capacity
        self._no_features = no_features
        self._held: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.answered = 0  # feature requests answered with a split
        self.withheld = 0  # ... answered NO_FEATURES
        self.ignored = 0  # requests for another model

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def keep(self, event_id: int, request_id: int, split_request: bytes) -> None:
        """Hold ``split_request`` (the encoded split of event ``event_id``, under the sums' ``request_id``)."""
        if self.capacity == 0:
            return
        with self._lock:
            self._held.pop(event_id, None)
            self._held[event_id] = (request_id, split_request)
            while len(self._held) > self.capacity:
                self._held.popitem(last=False)

    def answer(self, request: FeatureRequest) -> bytes | None:
        """What to publish for a decoded feature request: the split held for it (once: it is then forgotten),
        NO_FEATURES for an event not held, None for another model's request (nothing to say to it)."""
        if request.model_hash != self.model_hash:
            with self._lock:
                self.ignored += 1
            return None
        with self._lock:
            held = self._held.get(request.event_id)
            if held is not None and held[0] == request.request_id:
                del self._held[request.event_id]
                self.answered += 1
                return held[1]
            self.withheld += 1
        return self._no_features(request)
