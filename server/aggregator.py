"""The aggregator role of ``ddnn-server`` for a multi-view model (docs/views.md): K devices see one scene, each
sends its view's split with the same event id; the aggregator gathers an event's views until all K are in or
its deadline passes, combines the present views' local exits as the model was trained (absent views left out),
answers every device of the event from that exit when it is confident, and otherwise runs tier 1 on the
present views' aggregated splits and answers every device from it.

What a device sends ("features at once"): its packed split, nothing else. Its local exit's integer sums are a
function of the split (``reference.exit_sums``, the same BLinear the device ran), so the aggregator recomputes
them bit for bit instead of having them sent; the trade-off against "exit scores first, features on demand"
is measured in docs/views.md.

:class:`EventTable` (pure: no MQTT, no threads) is the bookkeeping and holds the hostile-input rules; the
server (app.py) feeds it from the network thread, a timer thread expires events, and the workers run
:func:`answer_events` on batches of closed events.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddnn_gen.fold import reference
from ddnn_gen.fold.views import ViewAggregator
from ddnn_gen.wire.codec import ProtocolError, RequestHeader, Status

# Events open at once, by default; past it a new event's first view is answered UNAVAILABLE (a flood of event
# ids must cost replies, not memory). Each open event holds at most MAX_VIEWS splits.
MAX_OPEN_EVENTS = 256
# Devices remembered with the view they send (a device is one camera: it may not speak for another view).
DEVICES_KEPT = 65536
# Answered events remembered, so that a view arriving after its event was answered (late, past the deadline)
# gets the event's answer at once, and a second copy of an answered view is recognised as a duplicate.
CLOSED_EVENTS_KEPT = 4096


@dataclass
class ViewRequest:
    """One device's view of an event, and what its reply needs."""

    header: RequestHeader
    split: np.ndarray  # uint64 (H, W, words): the view's packed split, as decoded
    context: Any  # the server's (the MQTT message to ack, the device id the reply goes to)
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Event:
    """The views of one event gathered so far."""

    key: tuple[bytes, int]  # (model hash, event id)
    view_count: int
    deadline: float
    views: dict[int, ViewRequest] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.views) == self.view_count


@dataclass(frozen=True)
class EventAnswer:
    """What every device of an answered event is told."""

    class_id: int
    logits: np.ndarray  # float64 (classes,): of the exit that answered
    answered_by: int  # 0: the aggregated local exit; 1: tier 1 on the aggregated splits
    views: tuple[int, ...]  # the views the answer was computed from


@dataclass(frozen=True)
class Admission:
    """EventTable.add's verdict: the event to answer now (all views in), or the earlier answer for a late view."""

    event: Event | None = None
    late_answer: EventAnswer | None = None


class EventTable:
    """Open events keyed by (model hash, event id), with their deadlines, and the recently answered ones.

    Not thread-safe: the caller holds one lock around every call (the network thread adds, a timer expires).
    """

    def __init__(self, deadline_s: float, max_open: int = MAX_OPEN_EVENTS, kept: int = CLOSED_EVENTS_KEPT,
                 devices_kept: int = DEVICES_KEPT) -> None:
        if deadline_s <= 0:
            raise ValueError("the event deadline must be positive")
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        self.deadline_s = deadline_s
        self.max_open = max_open
        self._open: dict[tuple[bytes, int], Event] = {}
        self._closed: OrderedDict[tuple[bytes, int], EventAnswer] = OrderedDict()
        self._kept = kept
        self._device_views: OrderedDict[tuple[bytes, str], int] = OrderedDict()
        self._devices_kept = devices_kept

    def __len__(self) -> int:
        return len(self._open)

    def add(self, model_hash: bytes, view_count: int, request: ViewRequest, device_id: str,
            now: float | None = None) -> Admission:
        """Take one view from ``device_id`` (the topic's); ProtocolError for a view that breaks the rules (the
        caller answers it with the error).

        ``view_count`` is the model's K: a request must say the same (the header's range checks were done when
        it was decoded). A device is bound to the first view index it sends (one camera cannot fill in
        another's view of an event), for as long as it is among the last ``devices_kept`` devices seen."""
        header = request.header
        now = time.monotonic() if now is None else now
        if header.view_count != view_count or header.event_id == 0:
            raise ProtocolError(Status.MALFORMED, f"this model has {view_count} views: a request carries an event id "
                                f"and view count {view_count}, not event {header.event_id} of "
                                f"{header.view_count} views", header.request_id)
        self._bind(bytes(model_hash), device_id, header)
        key = (bytes(model_hash), header.event_id)
        answered = self._closed.get(key)
        if answered is not None:
            if header.view_index in answered.views:
                raise ProtocolError(Status.MALFORMED, f"view {header.view_index} of event {header.event_id} was "
                                    "already answered (a duplicate view)", header.request_id)
            return Admission(late_answer=answered)
        event = self._open.get(key)
        if event is None:
            if len(self._open) >= self.max_open:
                raise ProtocolError(Status.UNAVAILABLE, f"aggregator busy: {self.max_open} events are open",
                                    header.request_id)
            event = self._open[key] = Event(key, view_count, now + self.deadline_s)
        elif header.view_index in event.views:
            raise ProtocolError(Status.MALFORMED, f"view {header.view_index} of event {header.event_id} arrived "
                                "twice (a duplicate view)", header.request_id)
        event.views[header.view_index] = request
        if event.complete:
            del self._open[key]
            return Admission(event=event)
        return Admission()

    def _bind(self, model_hash: bytes, device_id: str, header: RequestHeader) -> None:
        device = (model_hash, device_id)
        bound = self._device_views.get(device)
        if bound is not None and bound != header.view_index:
            raise ProtocolError(Status.MALFORMED, f"device {device_id} sends view {bound} of this model, not view "
                                f"{header.view_index}", header.request_id)
        self._device_views[device] = header.view_index
        self._device_views.move_to_end(device)
        while len(self._device_views) > self._devices_kept:
            self._device_views.popitem(last=False)

    def expire(self, now: float | None = None) -> list[Event]:
        """Close and return the events whose deadline has passed (they are answered with the views present)."""
        now = time.monotonic() if now is None else now
        due = [key for key, event in self._open.items() if event.deadline <= now]
        return [self._open.pop(key) for key in due]

    def next_deadline(self) -> float | None:
        return min((event.deadline for event in self._open.values()), default=None)

    def drain(self) -> list[Event]:
        """Every open event, closed now (shutting down: answer what arrived)."""
        events = list(self._open.values())
        self._open.clear()
        return events

    def answered(self, event: Event, answer: EventAnswer) -> None:
        """Remember ``event``'s answer for views that arrive after it (bounded: the oldest are forgotten)."""
        self._closed[event.key] = answer
        while len(self._closed) > self._kept:
            self._closed.popitem(last=False)


def answer_events(aggregator: ViewAggregator, events: Sequence[Event]) -> list[EventAnswer]:
    """The answers of closed events, in order: the aggregated local exit where it is confident, tier 1 on the
    aggregated splits elsewhere. Events are batched by the set of views present, through the same
    ``ViewAggregator`` calls `ddnngen eval` makes, so each answer is the evaluation's for that set of views."""
    answers: list[EventAnswer | None] = [None] * len(events)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, event in enumerate(events):
        groups.setdefault(tuple(sorted(event.views)), []).append(index)
    height, width, words = aggregator.split_shape
    for present, indices in groups.items():
        n = len(indices)
        mask = np.zeros((n, aggregator.count), dtype=bool)
        mask[:, list(present)] = True
        splits = np.zeros((aggregator.count, n, height, width, words), dtype=np.uint64)
        logits = np.zeros((aggregator.count, n, aggregator.loaded.spec.n_classes), dtype=np.float64)
        for view in present:
            splits[view] = np.stack([events[i].views[view].split for i in indices])
            # The device's local-exit sums are the BLinear of its split: recomputed here, bit for bit.
            sums = reference.exit_sums(aggregator.programs[view].exit, splits[view])
            logits[view] = aggregator.scores(view, sums)
        local = aggregator.local_exit_batch(logits, mask)
        unsure = np.flatnonzero(~local.exits)
        tier = aggregator.next_tier_batch(splits[:, unsure], mask[unsure]) if len(unsure) else None
        for row, i in enumerate(indices):
            answers[i] = EventAnswer(int(local.classes[row]), local.logits[row], 0, present)
        for row, position in enumerate(unsure):
            assert tier is not None
            answers[indices[position]] = EventAnswer(int(tier.classes[row]), tier.logits[row], 1, present)
    return [answer for answer in answers if answer is not None]
