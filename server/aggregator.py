"""The aggregator role of ``ddnn-server`` for a multi-view model (docs/views.md): K devices see one scene, each
sends its view's split with the same event id; the aggregator gathers an event's views until all K are in or
its deadline passes, combines the present views' local exits as the model was trained (absent views left out),
answers every device of the event from that exit when it is confident, and otherwise runs tier 1 on the
present views' aggregated splits and answers every device from it.

What a device sends first is the device's choice, per event (the table takes both; one event's views must
agree):

* "features at once": its packed split, nothing else. Its local exit's integer sums are a function of the split
  (``reference.exit_sums``, the same BLinear the device ran), so the aggregator recomputes them bit for bit.
* "scores first": its local exit's integer sums (packing EXIT_SUMS). The aggregator aggregates them exactly as
  from recomputed sums; when confident it answers every device as above, otherwise it asks each device that
  sent sums for that event's split (a feature request on ``ddnn/features/<device-id>``) and waits for the
  splits (or NO_FEATURES answers, or the devices' deaths) until a second deadline, then runs tier 1 on the
  splits that came. The answer goes to each device's sums request; the splits are acknowledged only.

Both are measured side by side in docs/views.md (bench/bench_views.py).

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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ddnn_gen.fold import reference
from ddnn_gen.fold.views import TierAnswer, ViewAggregator
from ddnn_gen.model.spec import exit_decision
from ddnn_gen.wire.codec import Packing, ProtocolError, Reply, RequestHeader, Status

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
    # uint64 (H, W, words): the view's packed split, as decoded; int32 (classes,) for EXIT_SUMS; empty for
    # NO_FEATURES
    split: np.ndarray
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
    scores_first: bool = False  # its views sent exit sums (the first view decides; the others must agree)
    # Scores first, once the sums were not confident: the local exit's answer (what the devices hear if no
    # split comes) and the answers to the feature requests, by view (a split, or NO_FEATURES).
    local: EventAnswer | None = None
    features: dict[int, ViewRequest] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.views) == self.view_count

    @property
    def fetching(self) -> bool:
        """Its feature requests are out (or were): the next answer is tier 1's on the splits that came."""
        return self.local is not None

    @property
    def split_views(self) -> tuple[int, ...]:
        """The views whose split came back for a feature request."""
        return tuple(sorted(view for view, request in self.features.items() if request.header.packing.bits))


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
    views: tuple[int, ...]  # the views the answer was computed from (scores first: those that sent sums)
    needs_features: bool = False  # scores first: the local exit was not confident; ask for the splits
    fallback: bool = False  # scores first: no split came back, so the unconfident local exit answered
    scores_first: bool = False
    # A three-tier model: tier 1's packed output when its exit was unsure (the event goes on to the cloud; this
    # answer, tier 1's, is the fallback), and the cloud's reply once it came (sent to every view as it is).
    onward: np.ndarray | None = None
    reply: Reply | None = None

    @property
    def fetched(self) -> bool:
        """Scores first, and the splits were asked for (a tier above answered, or no split came)."""
        return self.scores_first and (self.answered_by >= 1 or self.fallback)


@dataclass(frozen=True)
class Admission:
    """EventTable.add's verdict: the event to answer now (all views in), or the earlier answer for a late view."""

    event: Event | None = None
    late_answer: EventAnswer | None = None
    stale: bool = False  # a split or NO_FEATURES for a feature request whose event is answered: ack, no reply


class EventTable:
    """Open events keyed by (model hash, event id), with their deadlines, the closed ones being answered, and
    the recently answered ones.

    Not thread-safe: the caller holds one lock around every call (the network thread adds, a timer expires).
    """

    def __init__(self, deadline_s: float, max_open: int = MAX_OPEN_EVENTS, kept: int = CLOSED_EVENTS_KEPT,
                 devices_kept: int = DEVICES_KEPT, feature_deadline_s: float | None = None) -> None:
        if deadline_s <= 0 or (feature_deadline_s is not None and feature_deadline_s <= 0):
            raise ValueError("the event deadline must be positive")
        # Scores first: how long the splits asked for are waited for (the second phase's deadline).
        self.feature_deadline_s = deadline_s if feature_deadline_s is None else feature_deadline_s
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        self.deadline_s = deadline_s
        self.max_open = max_open
        self._open: dict[tuple[bytes, int], Event] = {}
        # Closed, on their way to a worker: a view arriving now joins the event's answer (it must not open
        # a second event under the same key, answered differently).
        self._closing: dict[tuple[bytes, int], Event] = {}
        self._closed: OrderedDict[tuple[bytes, int], EventAnswer] = OrderedDict()
        # Scores first: events whose feature requests are out, waiting for the splits (they count towards
        # max_open: each holds up to K splits more).
        self._fetching: dict[tuple[bytes, int], Event] = {}
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
        scores = header.packing == Packing.EXIT_SUMS
        if header.packing == Packing.NO_FEATURES or (header.packing.bits and key in self._fetching):
            return self._add_features(key, request, now)
        answered = self._closed.get(key)
        if answered is not None and answered.fetched and not scores and header.view_index in answered.views:
            return Admission(stale=True)  # the split asked for came after the event's second deadline
        if answered is not None:
            if header.view_index in answered.views:
                raise ProtocolError(Status.MALFORMED, f"view {header.view_index} of event {header.event_id} was "
                                    "already answered (a duplicate view)", header.request_id)
            return Admission(late_answer=answered)
        closing = self._closing.get(key)
        if closing is not None and closing.fetching and not scores and header.view_index in closing.views:
            return Admission(stale=True)
        closing = closing or self._fetching.get(key)
        if closing is not None:
            if header.view_index in closing.views or any(late.header.view_index == header.view_index
                                                         for late in closing.late):
                raise ProtocolError(Status.MALFORMED, f"view {header.view_index} of event {header.event_id} arrived "
                                    "twice (a duplicate view)", header.request_id)
            closing.late.append(request)
            return Admission()
        event = self._open.get(key)
        if event is None:
            if len(self._open) + len(self._fetching) >= self.max_open:
                raise ProtocolError(Status.UNAVAILABLE, f"aggregator busy: {self.max_open} events are open",
                                    header.request_id)
            event = self._open[key] = Event(key, view_count, now + self.deadline_s, scores_first=scores)
        elif event.scores_first != scores:
            raise ProtocolError(Status.MALFORMED, f"event {header.event_id}'s views send "
                                f"{'exit sums' if event.scores_first else 'splits'} first: view "
                                f"{header.view_index} may not send {'exit sums' if scores else 'its split'}",
                                header.request_id)
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

    def _close_fetch(self, key: tuple[bytes, int]) -> Event:
        event = self._closing[key] = self._fetching.pop(key)
        return event

    def _add_features(self, key: tuple[bytes, int], request: ViewRequest, now: float) -> Admission:
        """A split or NO_FEATURES answering a feature request: it must be for an event that asked this view,
        under the request id of the view's sums, once."""
        header = request.header
        event = self._fetching.get(key)
        if event is None:
            done = self._closing.get(key)
            answered = self._closed.get(key)
            if (done is not None and done.fetching) or (answered is not None and answered.fetched):
                return Admission(stale=True)
            raise ProtocolError(Status.MALFORMED, f"no feature request of event {header.event_id} is outstanding",
                                header.request_id)
        asked = event.views.get(header.view_index)
        if asked is None or asked.header.request_id != header.request_id:
            raise ProtocolError(Status.MALFORMED, f"event {header.event_id} asked no features of view "
                                f"{header.view_index} under request id {header.request_id}", header.request_id)
        if header.view_index in event.features:
            raise ProtocolError(Status.MALFORMED, f"view {header.view_index} of event {header.event_id} answered "
                                "its feature request twice", header.request_id)
        event.features[header.view_index] = request
        if self._fetch_ready(event):
            return Admission(event=self._close_fetch(key))
        return Admission()

    def _fetch_ready(self, event: Event) -> bool:
        """Every view asked answered, or absent (its devices died between the phases)."""
        model_hash = event.key[0]
        for view in event.views:
            if view not in event.features:
                devices = self._view_devices.get((model_hash, view))
                if devices is None or not devices.absent:
                    return False
        return True

    def fetch(self, event: Event, local: EventAnswer, now: float | None = None) -> bool:
        """Scores first: ``event``'s local exit (``local``) was not confident and its feature requests are going
        out to every view that sent sums. True when it is already ready (every such device offline): the
        caller submits it again at once; otherwise it closes when the splits are in or its second deadline
        passes."""
        now = time.monotonic() if now is None else now
        self._closing.pop(event.key, None)
        event.local = local
        event.deadline = now + self.feature_deadline_s
        self._fetching[event.key] = event
        if self._fetch_ready(event):
            self._close_fetch(event.key)
            return True
        return False

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
        fetched = [key for key, event in self._fetching.items() if self._fetch_ready(event)]
        return [self._close(key) for key in ready] + [self._close_fetch(key) for key in fetched]

    def expire(self, now: float | None = None) -> list[Event]:
        """Close and return the events whose deadline has passed (they are answered with the views present),
        and those a newcomer's birth held that are ready now that it has had a deadline to send its view."""
        now = time.monotonic() if now is None else now
        due = [key for key, event in self._open.items() if event.deadline <= now]
        closed = [self._close(key) for key in due]
        closed += [self._close_fetch(key) for key in [key for key, event in self._fetching.items()
                                                       if event.deadline <= now]]
        if self._forget_newcomers(now):
            closed += self._close_ready(now)
        return closed

    def next_deadline(self) -> float | None:
        return min((event.deadline for event in [*self._open.values(), *self._fetching.values()]), default=None)

    def drain(self) -> list[Event]:
        """Every open event, closed now (shutting down: answer what arrived)."""
        return [self._close(key) for key in list(self._open)] + [self._close_fetch(key) for key in list(self._fetching)]

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


def check_sums(aggregator: ViewAggregator, header: RequestHeader, sums: np.ndarray) -> None:
    """ProtocolError unless ``sums`` can be view ``header.view_index``'s exit sums: a binary dot product over n
    inputs is n - 2 * popcount, so each sum lies in [-n, n] with the parity of n (the count was checked
    against the model's classes with the header)."""
    n = int(np.prod(aggregator.programs[header.view_index].exit.in_hwc))
    values = sums.astype(np.int64)
    if np.any(np.abs(values) > n) or np.any((n - values) % 2):
        raise ProtocolError(Status.MALFORMED, f"exit sums of view {header.view_index} must be integers in [-{n}, {n}] "
                            f"of the parity of {n}", header.request_id)


def _onward(tier: TierAnswer, edge_threshold: float | None) -> np.ndarray:
    """Per row, whether tier 1 is an edge whose exit is unsure (at ``edge_threshold``, default the model
    file's): that event goes on to the cloud with tier 1's output."""
    if tier.output is None:
        return np.zeros(len(tier.classes), dtype=bool)
    return ~(tier.exits if edge_threshold is None else exit_decision(tier.entropy, edge_threshold))


def answer_events(aggregator: ViewAggregator, events: Sequence[Event], threshold: float | None = None,
                  edge_threshold: float | None = None) -> list[EventAnswer]:
    """The answers of closed events, in order: the aggregated local exit where it is confident (at
    ``threshold``, default the model file's), tier 1 on the aggregated splits elsewhere. In a three-tier model
    tier 1 is an edge: where its exit is unsure (at ``edge_threshold``) the answer carries tier 1's output
    ``onward`` for the cloud. Events are batched by the set of views present, through the same
    ``ViewAggregator`` calls `ddnngen eval` makes, so each answer is the evaluation's for that set of views.

    Scores first: an event's first answer is its local exit's, from the sums the devices sent; where it is not
    confident it says ``needs_features`` (the caller fetches the splits, :meth:`EventTable.fetch`). Once fetched,
    its answer is tier 1's on the views whose splits came (the local exit's, marked fallback, if none did)."""
    answers: list[EventAnswer | None] = [None] * len(events)
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for index, event in enumerate(events):
        if event.local is not None:
            present = event.split_views
            if not present:
                answers[index] = replace(event.local, needs_features=False, fallback=True)
                continue
            groups.setdefault(("tier", present), []).append(index)
        else:
            kind = "sums" if event.scores_first else "splits"
            groups.setdefault((kind, tuple(sorted(event.views))), []).append(index)
    height, width, words = aggregator.split_shape
    for (kind, present), indices in groups.items():
        n = len(indices)
        mask = np.zeros((n, aggregator.count), dtype=bool)
        mask[:, list(present)] = True
        splits = np.zeros((aggregator.count, n, height, width, words), dtype=np.uint64)
        if kind == "tier":
            for view in present:
                splits[view] = np.stack([events[i].features[view].split for i in indices])
            tier = aggregator.next_tier_batch(splits, mask)
            onward = _onward(tier, edge_threshold)
            for row, i in enumerate(indices):
                local = events[i].local
                assert local is not None
                answers[i] = EventAnswer(int(tier.classes[row]), tier.logits[row], 1, local.views, scores_first=True,
                                         onward=tier.output[row] if onward[row] else None)
            continue
        logits = np.zeros((aggregator.count, n, aggregator.loaded.spec.n_classes), dtype=np.float64)
        for view in present:
            if kind == "sums":
                sums = np.stack([events[i].views[view].split for i in indices])
            else:
                splits[view] = np.stack([events[i].views[view].split for i in indices])
                # The device's local-exit sums are the BLinear of its split: recomputed here, bit for bit.
                sums = reference.exit_sums(aggregator.programs[view].exit, splits[view])
            logits[view] = aggregator.scores(view, sums)
        local = aggregator.local_exit_batch(logits, mask, threshold)
        scores_first = kind == "sums"
        for row, i in enumerate(indices):
            answers[i] = EventAnswer(int(local.classes[row]), local.logits[row], 0, present,
                                     needs_features=scores_first and not bool(local.exits[row]),
                                     scores_first=scores_first)
        unsure = np.flatnonzero(~local.exits)
        if scores_first or not len(unsure):
            continue
        tier = aggregator.next_tier_batch(splits[:, unsure], mask[unsure])
        onward = _onward(tier, edge_threshold)
        for row, position in enumerate(unsure):
            answers[indices[position]] = EventAnswer(int(tier.classes[row]), tier.logits[row], 1, present,
                                                     onward=tier.output[row] if onward[row] else None)
    return [answer for answer in answers if answer is not None]
