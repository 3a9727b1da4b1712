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

Liveness: devices publish a retained ``online`` on ``ddnn/status/<device-id>`` and leave a last will
``offline`` there (docs/protocol.md). The table follows the status of the devices bound to views
(:meth:`EventTable.device_status`): a view all of whose bound devices are offline is absent, so an event
closes as soon as every view of a live device is in instead of waiting the deadline for a dead camera; a
birth makes the view waited for again. The deadline still bounds a live camera's late view and a device
whose status is unknown.
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
from ddnn_gen.model.spec import exit_decision
from ddnn_gen.wire.codec import ProtocolError, Reply, RequestHeader, Status

# Events open at once, by default; past it a new event's first view is answered UNAVAILABLE (a flood of event
# ids must cost replies, not memory). Each open event holds at most MAX_VIEWS splits.
MAX_OPEN_EVENTS = 256
# Devices remembered with the view they send (a device is one camera: it may not speak for another view).
DEVICES_KEPT = 65536
# Status payloads (docs/protocol.md); anything else on a status topic is ignored.
ONLINE, OFFLINE = b"online", b"offline"
STATUSES = (ONLINE, OFFLINE, b"")  # empty: the retained status was cleared (unknown, so waited for)
# Births of devices bound to no view that hold absent views waited for (EventTable._newcomers).
NEWCOMERS_KEPT = 1024
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
    late: list[ViewRequest] = field(default_factory=list)  # arrived once closed, before its answer

    @property
    def complete(self) -> bool:
        return len(self.views) == self.view_count


@dataclass
class _ViewDevices:
    """How many devices are bound to one view of a model, and how many of them are offline."""

    bound: int = 0
    offline: int = 0

    @property
    def absent(self) -> bool:
        """Every device that ever sent this view (as far as the table remembers) is offline."""
        return self.bound > 0 and self.offline == self.bound


@dataclass(frozen=True)
class EventAnswer:
    """What every device of an answered event is told."""

    class_id: int
    logits: np.ndarray | None  # float64 (classes,): of the exit that answered here; None: the tier above's
    answered_by: int  # 0: the aggregated local exit; 1: tier 1 on the aggregated splits; 2: the cloud's
    views: tuple[int, ...]  # the views the answer was computed from
    # A three-tier model: tier 1's packed output when its exit was unsure (the event goes on to the cloud; this
    # answer, tier 1's, is the fallback), and the cloud's reply once it came (sent to every view as it is).
    onward: np.ndarray | None = None
    reply: Reply | None = None


@dataclass(frozen=True)
class Admission:
    """EventTable.add's verdict: the event to answer now (all views in), or the earlier answer for a late view."""

    event: Event | None = None
    late_answer: EventAnswer | None = None


class EventTable:
    """Open events keyed by (model hash, event id), with their deadlines, the closed ones being answered, and
    the recently answered ones.

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
        # Closed, on their way to a worker: a view arriving now joins the event's answer (it must not open
        # a second event under the same key, answered differently).
        self._closing: dict[tuple[bytes, int], Event] = {}
        self._closed: OrderedDict[tuple[bytes, int], EventAnswer] = OrderedDict()
        self._kept = kept
        self._device_views: OrderedDict[tuple[bytes, str], int] = OrderedDict()
        self._devices_kept = devices_kept
        # Liveness of the bound devices: only bound ids are tracked (a status for any other id is ignored
        # but for a birth, below), so this is as bounded as the bindings.
        self._models_of: dict[str, set[bytes]] = {}
        self._view_devices: dict[tuple[bytes, int], _ViewDevices] = {}
        self._offline: set[str] = set()
        # Births of devices bound to no view, in the last deadline: one may be the replacement of an offline
        # camera (a new id for its view), so while any is here no view counts as absent (the deadline bounds
        # the wait). Bounded; past the bound the oldest birth is dropped.
        self._newcomers: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, model_hash: bytes, view_count: int, request: ViewRequest, device_id: str,
            now: float | None = None) -> Admission:
        """Take one view from ``device_id`` (the topic's); ProtocolError for a view that breaks the rules (the
        caller answers it with the error).

        ``view_count`` is the model's K: a request must say the same (the header's range checks were done when
        it was decoded). A device is bound to the first view index it sends (one camera cannot fill in
        another's view of an event), for as long as it is among the last ``devices_kept`` devices seen. A view
        of an event that is closed but not answered yet joins it: :meth:`answered` hands it back."""
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
        closing = self._closing.get(key)
        if closing is not None:
            if header.view_index in closing.views or any(late.header.view_index == header.view_index
                                                         for late in closing.late):
                raise ProtocolError(Status.MALFORMED, f"view {header.view_index} of event {header.event_id} arrived "
                                    "twice (a duplicate view)", header.request_id)
            closing.late.append(request)
            return Admission()
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
        if self._ready(event, now):
            return Admission(event=self._close(key))
        return Admission()

    def _close(self, key: tuple[bytes, int]) -> Event:
        event = self._closing[key] = self._open.pop(key)
        return event

    def _ready(self, event: Event, now: float) -> bool:
        """Every view is in, or known absent (its devices are offline and no newcomer may be replacing one)."""
        if event.complete:
            return True
        self._forget_newcomers(now)
        if self._newcomers:
            return False
        model_hash = event.key[0]
        for view in range(event.view_count):
            if view not in event.views:
                devices = self._view_devices.get((model_hash, view))
                if devices is None or not devices.absent:
                    return False
        return True

    def _forget_newcomers(self, now: float) -> bool:
        """Drop the births older than a deadline; True when some were dropped."""
        dropped = False
        while self._newcomers and next(iter(self._newcomers.values())) + self.deadline_s <= now:
            self._newcomers.popitem(last=False)
            dropped = True
        return dropped

    def _bind(self, model_hash: bytes, device_id: str, header: RequestHeader) -> None:
        device = (model_hash, device_id)
        bound = self._device_views.get(device)
        if bound is not None and bound != header.view_index:
            raise ProtocolError(Status.MALFORMED, f"device {device_id} sends view {bound} of this model, not view "
                                f"{header.view_index}", header.request_id)
        if bound is None:
            self._count(model_hash, device_id, header.view_index, +1)
            self._models_of.setdefault(device_id, set()).add(model_hash)
            self._newcomers.pop(device_id, None)
        self._device_views[device] = header.view_index
        self._device_views.move_to_end(device)
        while len(self._device_views) > self._devices_kept:
            (old_hash, old_id), old_view = self._device_views.popitem(last=False)
            self._count(old_hash, old_id, old_view, -1)
            models = self._models_of[old_id]
            models.discard(old_hash)
            if not models:
                del self._models_of[old_id]
                self._offline.discard(old_id)

    def _count(self, model_hash: bytes, device_id: str, view: int, step: int) -> None:
        devices = self._view_devices.setdefault((model_hash, view), _ViewDevices())
        devices.bound += step
        if device_id in self._offline:
            devices.offline += step
        if devices.bound == 0:
            del self._view_devices[(model_hash, view)]

    def device_status(self, device_id: str, payload: bytes, now: float | None = None) -> list[Event]:
        """A message on ``device_id``'s status topic (the caller validated the id): ``offline`` makes a bound
        device's views absent and returns the open events that are now ready (every other view in);
        ``online`` or an empty payload (the retained status cleared: unknown) makes them waited for again.
        The birth of a device bound to no view holds every absent view waited for, for one deadline (it may
        be a camera's replacement). Anything else is ignored."""
        now = time.monotonic() if now is None else now
        if payload not in STATUSES:
            return []
        if device_id not in self._models_of:
            if payload == ONLINE:
                self._newcomers.pop(device_id, None)
                self._newcomers[device_id] = now
                while len(self._newcomers) > NEWCOMERS_KEPT:
                    self._newcomers.popitem(last=False)
            return []
        offline = payload == OFFLINE
        if offline == (device_id in self._offline):
            return []
        step = 1 if offline else -1
        if offline:
            self._offline.add(device_id)
        else:
            self._offline.discard(device_id)
        for model_hash in self._models_of[device_id]:
            self._view_devices[(model_hash, self._device_views[(model_hash, device_id)])].offline += step
        return self._close_ready(now) if offline else []

    def _close_ready(self, now: float) -> list[Event]:
        ready = [key for key, event in self._open.items() if self._ready(event, now)]
        return [self._close(key) for key in ready]

    def expire(self, now: float | None = None) -> list[Event]:
        """Close and return the events whose deadline has passed (they are answered with the views present),
        and those a newcomer's birth held that are ready now that it has had a deadline to send its view."""
        now = time.monotonic() if now is None else now
        due = [key for key, event in self._open.items() if event.deadline <= now]
        closed = [self._close(key) for key in due]
        if self._forget_newcomers(now):
            closed += self._close_ready(now)
        return closed

    def next_deadline(self) -> float | None:
        return min((event.deadline for event in self._open.values()), default=None)

    def drain(self) -> list[Event]:
        """Every open event, closed now (shutting down: answer what arrived)."""
        return [self._close(key) for key in list(self._open)]

    def answered(self, event: Event, answer: EventAnswer) -> list[ViewRequest]:
        """Remember ``event``'s answer for views that arrive after it (bounded: the oldest are forgotten);
        returns the views that arrived while it was being answered (they get the same answer)."""
        self._closing.pop(event.key, None)
        self._closed[event.key] = answer
        while len(self._closed) > self._kept:
            self._closed.popitem(last=False)
        return event.late

    def failed(self, event: Event) -> list[ViewRequest]:
        """``event`` could not be answered (the caller tells its views why); returns the views that arrived
        while it was closing, which are told the same. A view arriving later opens a new event."""
        self._closing.pop(event.key, None)
        return event.late


def answer_events(aggregator: ViewAggregator, events: Sequence[Event], threshold: float | None = None,
                  edge_threshold: float | None = None) -> list[EventAnswer]:
    """The answers of closed events, in order: the aggregated local exit where it is confident (at
    ``threshold``, default the model file's), tier 1 on the aggregated splits elsewhere. In a three-tier model
    tier 1 is an edge: where its exit is unsure (at ``edge_threshold``, default the model file's) the answer
    carries tier 1's output ``onward`` for the cloud. Events are batched by the set of views present, through
    the same ``ViewAggregator`` calls `ddnngen eval` makes, so each answer is the evaluation's for that set of
    views."""
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
        local = aggregator.local_exit_batch(logits, mask, threshold)
        unsure = np.flatnonzero(~local.exits)
        tier = aggregator.next_tier_batch(splits[:, unsure], mask[unsure]) if len(unsure) else None
        for row, i in enumerate(indices):
            answers[i] = EventAnswer(int(local.classes[row]), local.logits[row], 0, present)
        onward = None if tier is None or tier.output is None else (
            ~tier.exits if edge_threshold is None else ~exit_decision(tier.entropy, edge_threshold))
        for row, position in enumerate(unsure):
            assert tier is not None
            answers[indices[position]] = EventAnswer(
                int(tier.classes[row]), tier.logits[row], 1, present,
                onward=tier.output[row] if onward is not None and onward[row] else None)
    return [answer for answer in answers if answer is not None]
