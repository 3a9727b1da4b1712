"""Wiring: transport -> validation -> per-model batcher -> worker pool -> replies."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ddnn_gen.errors import DdnnError
from ddnn_gen.model.spec import exit_decision
from ddnn_gen.wire import codec, telemetry, topics
from ddnn_gen.wire.codec import ProtocolError, Reply, Status
from ddnn_gen.wire.connection import BrokerConnection
from ddnn_server.aggregator import (
    MAX_OPEN_EVENTS,
    STATUSES,
    Event,
    EventAnswer,
    EventTable,
    ViewRequest,
    answer_events,
    check_sums,
)
from ddnn_server.allocator import keep_freed_memory
from ddnn_server.batching import Batcher, Job, QueueFull
from ddnn_server.edge import Forward, Upstream
from ddnn_server.log_limits import RateLimitedLog
from ddnn_server.metrics import NO_MODEL, RequestMetrics
from ddnn_server.store import ModelStore, ServedModel
from ddnn_server.thresholds import TierThresholds
from ddnn_server.transport import RECEIVE_MAXIMUM, Incoming, ServerTransport, Transport

if TYPE_CHECKING:  # pika is imported only when an AMQP transport is asked for
    from ddnn_server.amqp_transport import AmqpEndpoint

log = logging.getLogger(__name__)

BUSY_MESSAGE = "server busy: the model's request queue is full"


@dataclass
class ServerConfig:
    broker: BrokerConnection
    models: str | Path
    workers: int = 2
    max_batch: int = 32
    max_wait_ms: float = 0.0
    group: str = topics.DEFAULT_SHARE_GROUP
    server_id: str | None = None  # a fixed id makes the session persistent (crash recovery)
    session_expiry_s: int = 300
    max_request_bytes: int = codec.MAX_REQUEST_BYTES
    top_k: int = 3
    gpu: int | None = None
    forward: str = "numpy"  # server tiers' forward: the NumPy one (model/fast_forward.py) or Chainer's
    max_queue: int = 1024  # requests waiting per model; beyond it the server answers UNAVAILABLE
    receive_maximum: int = RECEIVE_MAXIMUM  # MQTT 5: requests the broker may have in flight to this server
    role: str = "cloud"  # or "edge": answer at the edge tier's exit when confident, else ask the tier above
    from_tier: int | None = None  # cloud: the tier requests resume at (default: where they come from)
    upstream: BrokerConnection | None = None  # edge: the broker of the tier above (default: the same broker)
    upstream_timeout_ms: float = 1000.0
    plan: str | None = None  # a plan file (ddnngen plan): its model runs what the plan puts at ``location``
    location: str = "cloud"
    metrics_port: int = 0  # Prometheus /metrics on this loopback port (0: not exposed)
    metrics_address: str = "127.0.0.1"
    log_requests: bool = False  # one log line per request (on the ddnn_server.requests logger)
    telemetry_interval_s: float = 2.0  # load on ddnn/server/<id>/telemetry this often (0: off)
    event_deadline_ms: float = 100.0  # aggregator: how long an event waits for its missing views
    feature_deadline_ms: float | None = None  # aggregator, scores first: the splits' wait (None: event_deadline_ms)
    max_open_events: int = MAX_OPEN_EVENTS  # aggregator: events gathering views at once; more: UNAVAILABLE
    # RabbitMQ cluster nodes (one per node, tried in turn): consume the models' quorum queues over AMQP instead
    # of subscribing on ``broker``; ``receive_maximum`` is then the prefetch count.
    amqp: Sequence[AmqpEndpoint] = ()
    # MQTT client library: "paho-mqtt" (Python; a request is acked once answered, so a crash redelivers it) or
    # "paho-c" (Paho C through cffi, requests in batches; acked on arrival: see server/pahoc_transport.py) or
    # "c-mqtt" (the server's own MQTT client in C, c_runtime/ddnn_mqtt_batch.c: batches both ways; acked when taken).
    transport: str = "paho-mqtt"


@dataclass
class _Work:
    header: codec.RequestHeader
    payload: np.ndarray
    incoming: Incoming
    model: ServedModel
    device_id: str  # from the topic: where the reply goes


@dataclass
class _EventWork:
    """A closed multi-view event on its way to a worker (aggregator role)."""

    model: ServedModel
    event: Event


@dataclass
class _EventForward:
    """An event on its way to the cloud (aggregator of a three-tier model), and tier 1's answer for it."""

    model: ServedModel
    event: Event
    answer: EventAnswer


class Server:
    def __init__(self, config: ServerConfig, store: ModelStore | None = None) -> None:
        self.config = config
        keep_freed_memory()
        if store is None:
            store = ModelStore(gpu=config.gpu, forward=config.forward, role=config.role, from_tier=config.from_tier,
                               plan=config.plan, location=config.location)
            store.load_dir(config.models)
        self.store = store
        self.batcher = Batcher(config.max_batch, config.max_wait_ms, config.max_queue)
        self.metrics = RequestMetrics(config.max_batch, lambda: self.batcher.pending, config.workers,
                                      config.log_requests)
        persistent = config.server_id is not None
        # A broker that identifies clients by user name (use_username_as_clientid) uses it as client id
        # anyway; naming it here keeps the status topic the one the broker's rules grant this server.
        client_id = (config.server_id or config.broker.username
                     or f"ddnn-srv-{os.getpid()}-{os.urandom(4).hex()}")
        self.thresholds = TierThresholds()
        edges = [model for model in store.models() if model.role == "edge"]
        # An aggregator of a three-tier multi-view model runs tier 1 as an edge does: same way up, same live
        # tier threshold (model-wide only: one event's devices share the answer).
        edges += [model for model in store.models() if model.views is not None and model.views.onward]
        extra = [topic for model in edges for topic in TierThresholds.subscriptions(model.hash_bytes,
                                                                                    model.entry_tier)]
        aggregating = any(model.views is not None for model in store.models())
        if aggregating:
            # The cameras' births and wills: a view whose devices are offline is not waited for (docs/views.md).
            extra.append(topics.STATUS_SUBSCRIPTION)
            # The aggregated local exit's threshold, live: the model-wide device threshold an operator sets
            # (`ddnngen threshold set MODEL V`). A per-device value cannot apply to an event several devices share.
            extra += [topics.threshold_topic(model.hash_bytes) for model in store.models() if model.views is not None]
        served = [(model.hash_bytes, model.topic_tier) for model in store.models()]
        self.transport: ServerTransport
        if config.amqp:
            from ddnn_server.amqp_transport import AmqpTransport

            if edges or aggregating:
                raise DdnnError("edge and aggregator servers run on MQTT brokers only (their tier above, live "
                                "thresholds and device status are MQTT); --amqp serves cloud models")
            client_id = config.server_id or config.amqp[0].username
            self.transport = AmqpTransport(config.amqp, client_id, served, self._on_request, config.receive_maximum)
        elif config.transport in ("paho-c", "c-mqtt"):
            from ddnn_server.pahoc_transport import PahocTransport

            self.transport = PahocTransport(config.broker, client_id, config.group, served, self._on_request,
                                            persistent, config.session_expiry_s, extra,
                                            self._on_other if extra else None, config.receive_maximum,
                                            max_request_bytes=config.max_request_bytes,
                                            on_requests=self._on_requests, client=config.transport,
                                            busy=self._workers_busy)
        elif config.transport == "paho-mqtt":
            self.transport = Transport(config.broker, client_id, config.group, served, self._on_request, persistent,
                                       config.session_expiry_s, extra, self._on_other if extra else None,
                                       config.receive_maximum)
        else:
            raise DdnnError(f"unknown MQTT transport {config.transport!r} (paho-mqtt, paho-c or c-mqtt)")
        self.upstream: Upstream | None = None
        if edges:
            up = config.upstream or config.broker
            if (up.tls and up.address == config.broker.address and (up.username, up.cert_file)
                    == (config.broker.username, config.broker.cert_file) and (up.username or up.cert_file)):
                # A secured broker names each session by its identity: the edge's two would take each other's.
                raise DdnnError("an edge keeps two sessions, towards its devices and towards the tier above, and on "
                                "this broker one identity is one session: give the upstream one its own "
                                "(--upstream-username NAME-up --upstream-password-file ..., from broker-config's "
                                "edge role)")
            self.upstream = Upstream(config.upstream or config.broker, client_id, config.upstream_timeout_ms / 1000.0,
                                     self._answer_forward)
        self._workers = [threading.Thread(target=self._work_loop, name=f"ddnn-worker-{i}", daemon=True)
                         for i in range(max(1, config.workers))]
        self.stats = {"ok": 0, "errors": 0, "dropped": 0, "busy": 0, "batches": 0}
        self._batches_running = 0  # under _stats_lock
        self._bad_requests = RateLimitedLog(log)
        self._stats_lock = threading.Lock()
        self._telemetry_stop = threading.Event()
        self._telemetry = threading.Thread(target=self._telemetry_loop, name="ddnn-telemetry", daemon=True)
        # Aggregator: the events gathering their views, closed by the deadline thread or by their last view.
        feature_deadline_s = None if config.feature_deadline_ms is None else config.feature_deadline_ms / 1000.0
        self.events = EventTable(config.event_deadline_ms / 1000.0, config.max_open_events,
                                 feature_deadline_s=feature_deadline_s)
        self._events_lock = threading.Lock()
        self._events_stop = threading.Event()
        self._deadlines: threading.Thread | None = None
        if aggregating:
            self._deadlines = threading.Thread(target=self._deadline_loop, name="ddnn-event-deadlines", daemon=True)

    def start(self) -> Server:
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_address)
        for worker in self._workers:
            worker.start()
        if self.upstream is not None:
            self.upstream.start()
        if self._deadlines is not None:
            self._deadlines.start()
        self.transport.start()
        if self.config.telemetry_interval_s > 0:
            self._telemetry.start()
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the broker has granted the subscriptions: requests can arrive."""
        return self.transport.wait_ready(timeout_s)

    def stop(self) -> None:
        """Stop taking work, answer everything already received, then disconnect cleanly."""
        log.info("stopping: no new requests; finishing %d queued", self.batcher.pending)
        self.transport.stop_taking_work()
        if self._deadlines is not None:
            self._events_stop.set()
            self._deadlines.join()
            with self._events_lock:
                open_events = self.events.drain()
            if open_events:
                log.info("answering %d events with the views that arrived", len(open_events))
            for event in open_events:
                self._submit_event(event)
        self.batcher.close()
        for worker in self._workers:
            worker.join()
        if self.upstream is not None:
            # What the tier above still owes is waited for as long as a device would wait, then answered here.
            self.upstream.drain(self.config.upstream_timeout_ms / 1000.0)
        self.transport.wait_replies_acked()
        self._telemetry_stop.set()
        if self._telemetry.is_alive():
            self._telemetry.join()
        self.transport.close()
        if self.upstream is not None:
            self.upstream.close()
        self.metrics.close()
        log.info("stopped after %d replies, %d errors, %d dropped, %d batches", self.stats["ok"],
                 self.stats["errors"], self.stats["dropped"], self.stats["batches"])
        if self.stats["busy"] or self.transport.unsent_replies:
            log.warning("%d requests answered UNAVAILABLE (queue full), %d replies not sent (outgoing queue full)",
                        self.stats["busy"], self.transport.unsent_replies)
        if self.upstream is not None:
            up = self.upstream.stats
            log.info("edge: %d sent to the tier above, %d answered by it, %d answered here as fallback, %d late "
                     "replies", up["forwarded"], up["answered"], up["fallback"], up["late"])

    def telemetry(self) -> dict[str, object]:
        """The next telemetry message's body (wire/telemetry.py SERVER_SCHEMA): figures since the last one."""
        return {"v": telemetry.TELEMETRY_VERSION, "server": self.transport.client_id, "time": time.time(),
                "workers": len(self._workers),
                "models": {m.name: topics.model_key(m.hash_bytes) for m in self.store.models()},
                **self.metrics.take_window(),
                "tiers": {m.name: m.topic_tier for m in self.store.models()},
                "tier_thresholds": self._tier_thresholds()}

    def _tier_thresholds(self) -> dict[str, object]:
        """The thresholds this server applies to the early exits it runs (telemetry's "tier_thresholds"):
        an edge's tier, model-wide and per device; an aggregator's tier 1, model-wide only (one event's
        devices share its answer, so a device's own value cannot apply)."""
        applied: dict[str, object] = {}
        for model in self.store.models():
            if model.edge_program is not None:
                tier, default, per_device = model.entry_tier, model.edge_program.threshold, True
            elif model.views is not None and model.views.onward:
                tier, default, per_device = 1, float(model.loaded.spec.thresholds[1]), False
            else:
                continue
            value, devices = self.thresholds.applied(model.hash_bytes, tier, per_device, telemetry.MAX_TIER_DEVICES)
            applied[model.name] = {"tier": tier, "default": float(default), "model": value, "devices": devices}
        return applied

    def _telemetry_loop(self) -> None:
        while not self._telemetry_stop.wait(self.config.telemetry_interval_s):
            try:
                self.transport.publish_telemetry(telemetry.encode(self.telemetry()))
            except Exception:  # telemetry must never take the server down
                log.exception("publishing telemetry failed")

    # ---- request intake (network thread) -------------------------------------------------------------

    def _on_request(self, incoming: Incoming) -> None:
        work = self._admit(incoming)
        if work is not None:
            self._queue([work])

    def _on_requests(self, requests: list[Incoming]) -> None:
        """A transport's batch of requests (Paho C's take): each checked as :meth:`_on_request` does, then
        queued together, so the workers wake once for the batch rather than once a request."""
        works = []
        for incoming in requests:
            try:
                work = self._admit(incoming)
            except Exception:  # one request's bug must not cost the others of its batch
                log.exception("unexpected error handling a request on %s", incoming.topic)
                continue
            if work is not None:
                works.append(work)
        self._queue(works)

    def _admit(self, incoming: Incoming) -> _Work | None:
        """A request checked and decoded, ready for a worker; None when it was answered (an error), dropped or
        went to its event (aggregator)."""
        data = incoming.payload
        routed = topics.parse_request_topic(incoming.topic)
        if routed is None or routed[2] != self._topic_tier(routed[0]):
            # No valid device id in the topic means no topic a reply could be addressed to: ack and count it,
            # so it is neither redelivered nor able to make the server publish where it should not.
            self._bad_requests.warning("dropped", "dropped request (%d bytes) on %r: the topic names no valid "
                                       "device id", len(data), incoming.topic)
            self.transport.drop(incoming)
            self.metrics.dropped()
            with self._stats_lock:
                self.stats["dropped"] += 1
            return None
        topic_model, device_id, _ = routed
        model_name = NO_MODEL
        try:
            # Size first: an oversized payload is rejected before anything looks inside it.
            if incoming.truncated_from:
                raise ProtocolError(Status.TOO_LARGE, f"request of {incoming.truncated_from} bytes exceeds the "
                                    f"{self.config.max_request_bytes}-byte limit", codec.peek_request_id(data))
            header = codec.decode_request_header(data, self.config.max_request_bytes)
            model = self.store.get(header.model_hash)
            if model is None:
                raise ProtocolError(Status.UNKNOWN_MODEL, f"unknown model hash {header.model_hash.hex()}",
                                    header.request_id)
            model_name = model.name
            if topics.model_key(header.model_hash) != topic_model:
                raise ProtocolError(Status.MALFORMED, "header model hash is not the topic's model",
                                    header.request_id)
            model.check(header)
            payload = codec.decode_payload(header, data)
            if model.views is not None:
                if header.packing == codec.Packing.EXIT_SUMS:
                    check_sums(model.views, header, payload)
                self._admit_view(model, ViewRequest(header, payload, (incoming, device_id)))
                return None
        except ProtocolError as error:
            request_id = error.request_id or codec.peek_request_id(data[:codec.REQUEST_HEADER_BYTES])
            self._bad_requests.warning(error.status.name, "bad request (%d bytes) from %s: %s: %s", len(data),
                                       device_id, error.status.name, error)
            self._send(incoming, device_id, Reply(request_id, error.status, message=str(error)), ok=False,
                       model=model_name)
            return None
        return _Work(header, payload, incoming, model, device_id)

    def _queue(self, works: list[_Work]) -> None:
        """Checked requests to the workers; those a full queue refuses are answered UNAVAILABLE."""
        if not works:
            return
        try:
            refused = self.batcher.put_many([Job(work.model.hash_bytes, work, work.incoming) for work in works])
        except RuntimeError:
            for work in works:
                self._run_batch([work], time.monotonic())  # arrived while draining: answer them here
            return
        for job in refused:
            work = job.payload
            self._bad_requests.warning("busy", "%s's queue is full (%d requests): answering UNAVAILABLE",
                                       work.model.name, self.config.max_queue)
            with self._stats_lock:
                self.stats["busy"] += 1
            self._send(work.incoming, work.device_id, Reply(work.header.request_id, Status.UNAVAILABLE,
                                                            message=BUSY_MESSAGE), ok=False, model=work.model.name)

    def _on_other(self, topic: str, payload: bytes) -> None:
        """A message on an extra subscription: a device's status (aggregator) or a retained threshold (an edge's
        tier, an aggregator's local exit)."""
        if topic.startswith(f"{topics.TOPIC_ROOT}/status/"):
            self._on_device_status(topic, payload)
        else:
            self.thresholds.update(topic, payload)

    # ---- multi-view events (aggregator role) ---------------------------------------------------------

    def _on_device_status(self, topic: str, payload: bytes) -> None:
        """A device's birth or will: the events waiting only for views of offline devices are answered now.
        Anyone may publish here on a broker without ACLs: a topic without a valid id, a payload that is not a
        status, or the status of a device bound to no view changes nothing."""
        device_id = topics.parse_status_topic(topic)
        if device_id is None or payload not in STATUSES:
            self._bad_requests.warning("status", "ignoring %d bytes on %r: not a device status (online, offline)",
                                       len(payload), topic[:200])
            return
        with self._events_lock:
            ready = self.events.device_status(device_id, payload)
        if ready:
            log.info("device %s is offline: answering %d events without its view", device_id, len(ready))
        for event in ready:
            self._submit_event(event)

    def _admit_view(self, model: ServedModel, request: ViewRequest) -> None:
        """One view into its event (ProtocolError for a hostile one); a complete event goes to the workers."""
        assert model.views is not None
        with self._events_lock:
            admission = self.events.add(model.hash_bytes, model.views.count, request, request.context[1])
        if admission.stale:
            # The answer to a feature request whose event was already answered (its second deadline passed):
            # the device heard the answer on its sums request; nothing to reply, only the ack.
            self._bad_requests.warning("late features", "features of an event already answered arrived late")
            self.transport.drop(request.context[0])
            return
        if admission.late_answer is not None:
            self._bad_requests.warning("late view", "a view arrived after its event was answered: answering it with "
                                    "the event's answer")
            self._answer_view(request, admission.late_answer, 0, 0, model.name)
        if admission.event is not None:
            self._submit_event(admission.event)

    def _submit_event(self, event: Event) -> None:
        model = self.store.get(event.key[0])
        assert model is not None
        work = _EventWork(model, event)
        try:
            self.batcher.put(Job(model.hash_bytes, work, None))
        except QueueFull:
            self._bad_requests.warning("busy", "%s's queue is full: answering an event's %d views UNAVAILABLE",
                                       model.name, len(event.views))
            with self._stats_lock:
                self.stats["busy"] += len(event.views)
            self._fail_events([event], Status.UNAVAILABLE, BUSY_MESSAGE, model.name)
        except RuntimeError:
            self._run_events([work], time.monotonic())  # closed while draining: answer it here

    def _fail_events(self, events: list[Event], status: Status, message: str, model: str) -> None:
        """Events that cannot be answered: each of their views (those that joined them once closed too) hears
        why."""
        with self._events_lock:
            late = [self.events.failed(event) for event in events]
        for event, joined in zip(events, late):
            for request in [*event.views.values(), *joined]:
                incoming, device_id = request.context
                self._send(incoming, device_id, Reply(request.header.request_id, status, message=message), ok=False,
                           model=model)
            self._ack_features(event)

    def _ack_features(self, event: Event) -> None:
        """The splits a scores-first event asked for are answered through its sums requests: acked only."""
        for request in event.features.values():
            self.transport.drop(request.context[0])

    def _deadline_loop(self) -> None:
        # A few ms of lateness against deadlines of tens of ms; cheaper than a timer per event.
        while not self._events_stop.wait(0.002):
            with self._events_lock:
                due = self.events.expire()
            for event in due:
                self._submit_event(event)

    def _run_events(self, works: list[_EventWork], started: float) -> None:
        model = works[0].model
        assert model.views is not None
        events = [work.event for work in works]
        try:
            threshold = self.thresholds.value(topics.threshold_topic(model.hash_bytes))
            edge_threshold = self.thresholds.value(topics.tier_threshold_topic(model.hash_bytes, 1))
            answers = answer_events(model.views, events, threshold, edge_threshold)
        except Exception:  # a model bug must cost these events, not the server
            log.exception("aggregating %d events of %s failed", len(events), model.name)
            self._fail_events(events, Status.INTERNAL, "internal server error", model.name)
            return
        server_us = int((time.monotonic() - started) * 1e6)
        if any(answer.needs_features for answer in answers):
            if self._events_stop.is_set():
                # Stopping: no second phase; the devices hear the local exit's answer, marked fallback.
                answers = [replace(answer, needs_features=False, fallback=True) if answer.needs_features else answer
                           for answer in answers]
            else:
                self._fetch_features([(event, answer) for event, answer in zip(events, answers)
                                      if answer.needs_features])
                kept = [index for index, answer in enumerate(answers) if not answer.needs_features]
                events, answers = [events[i] for i in kept], [answers[i] for i in kept]
        onward = [(event, answer) for event, answer in zip(events, answers) if answer.onward is not None]
        done = [(event, answer) for event, answer in zip(events, answers) if answer.onward is None]
        with self._events_lock:
            late = [self.events.answered(event, answer) for event, answer in done]
        for (event, answer), joined in zip(done, late):
            for request in [*event.views.values(), *joined]:
                self._answer_view(request, answer, server_us, int((started - request.arrived) * 1e6), model.name)
            self._ack_features(event)
        for event, answer in onward:
            self._forward_event(model, event, answer, server_us, started)
        with self._stats_lock:
            self.stats["batches"] += 1

    def _fetch_features(self, unsure: list[tuple[Event, EventAnswer]]) -> None:
        """Scores first, the local exit not confident: ask every device that sent sums for its split. An event
        closes again when its splits are in (or its devices died, or its second deadline passed) and comes
        back to a worker; one whose devices are all offline already comes back at once."""
        # Aggregators run on MQTT only (checked at start): either MQTT transport publishes feature requests.
        assert hasattr(self.transport, "publish_feature_request")
        for event, answer in unsure:
            with self._events_lock:
                ready = self.events.fetch(event, answer)
            if ready:
                self._submit_event(event)
                continue
            for request in event.views.values():
                payload = codec.encode_feature_request(codec.FeatureRequest(event.key[0], event.key[1],
                                                                            request.header.request_id))
                # One not sent costs its view: the event closes at its second deadline without that split.
                self.transport.publish_feature_request(request.context[1], payload)

    def _forward_event(self, model: ServedModel, event: Event, answer: EventAnswer, server_us: int,
                       started: float) -> None:
        """An event tier 1's exit was unsure of goes on to the cloud with tier 1's output; its views stay
        unanswered in the event table (late views join it) until the cloud's reply or the fallback comes."""
        assert self.upstream is not None and answer.onward is not None and answer.logits is not None
        top_classes, top_probabilities = self._top_k(answer.logits[None, :])
        own = Reply(0, Status.OK, answer.class_id, tuple(zip(top_classes[0].tolist(), top_probabilities[0].tolist())),
                    server_us, int((started - min(r.arrived for r in event.views.values())) * 1e6), answered_by=1)
        spec = model.loaded.spec
        chw = spec.tier_output_shape(1)
        self.upstream.forward(Forward(_EventForward(model, event, answer), 0, own), model.hash_bytes,
                              spec.split_layer(2), (chw[0], chw[1], chw[2]), answer.onward, 2)

    def _answer_view(self, request: ViewRequest, answer: EventAnswer, server_us: int, queue_us: int,
                     model: str) -> None:
        """Every device of an event gets the event's answer (queue_us: from its view's arrival, the wait for the
        other views included); a cloud's reply is passed on as it came, with the device's request id."""
        if answer.reply is not None:
            incoming, device_id = request.context
            self._send(incoming, device_id, replace(answer.reply, request_id=request.header.request_id), ok=True,
                       model=model)
            return
        assert answer.logits is not None
        top_classes, top_probabilities = self._top_k(answer.logits[None, :])
        top_k = tuple(zip(top_classes[0].tolist(), top_probabilities[0].tolist()))
        incoming, device_id = request.context
        self._send(incoming, device_id, Reply(request.header.request_id, Status.OK, answer.class_id, top_k,
                                              server_us, queue_us, answered_by=answer.answered_by,
                                              flags=codec.REPLY_FALLBACK if answer.fallback else 0), ok=True,
                   model=model)

    # ---- workers -------------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while True:
            batch = self.batcher.next_batch()
            if batch is None:
                return
            started = time.monotonic()
            if isinstance(batch[0].payload, _EventWork):
                self._run_events([job.payload for job in batch], started)  # a model's queue holds one kind
                continue
            works: list[_Work] = [job.payload for job in batch]
            queue_us = [int((started - job.arrived) * 1e6) for job in batch]
            with self._stats_lock:
                self._batches_running += 1
            try:
                self._run_batch(works, started, queue_us)
            finally:
                with self._stats_lock:
                    self._batches_running -= 1

    def _workers_busy(self) -> bool:
        """A batch is being computed or waits for a worker: the transport may linger to take more at once."""
        return self._batches_running > 0 or self.batcher.pending > 0

    def _topic_tier(self, model_key: str) -> int:
        """The request tier this server takes for a model (0 when it does not serve it)."""
        model = self.store.get(bytes.fromhex(model_key))
        return model.topic_tier if model is not None else 0

    def _top_k(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities = _softmax(logits)
        k = min(self.config.top_k, probabilities.shape[1])
        top_classes = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return top_classes, np.take_along_axis(probabilities, top_classes, axis=1)

    def _run_edge(self, works: list[_Work], indices: list[int], started: float, queue_us: list[int]) -> None:
        """An edge's batch: its tier, its exit decision per request at the live threshold, and the
        requests it is not confident about on to the tier above."""
        model = works[indices[0]].model
        assert model.edge_program is not None and self.upstream is not None
        result = model.edge_forward([works[i].payload for i in indices])
        server_us = int((time.monotonic() - started) * 1e6)
        top_classes, top_probabilities = self._top_k(result.logits)
        next_tier = model.entry_tier + 1
        spec = model.loaded.spec
        chw = spec.tier_output_shape(model.entry_tier)
        chw3 = (chw[0], 1, 1) if len(chw) == 1 else (chw[0], chw[1], chw[2])
        for row, i in enumerate(indices):
            work = works[i]
            threshold = self.thresholds.for_request(model.hash_bytes, model.entry_tier, work.device_id,
                                                    model.edge_program.threshold)
            top_k = tuple(zip(top_classes[row].tolist(), top_probabilities[row].tolist()))
            own = Reply(work.header.request_id, Status.OK, int(result.local_class[row]), top_k, server_us, queue_us[i],
                        answered_by=model.entry_tier)
            if bool(exit_decision(result.entropy[row:row + 1], threshold)[0]):
                self._send(work.incoming, work.device_id, own, ok=True, model=model.name)
                continue
            self.upstream.forward(Forward(work, work.header.request_id, own), model.hash_bytes,
                                  spec.split_layer(next_tier), chw3, result.split_words[row], next_tier)

    def _answer_forward(self, forward: Forward, reply: Reply) -> None:
        if isinstance(forward.context, _EventForward):
            self._answer_forwarded_event(forward.context, reply)
            return
        work: _Work = forward.context
        self._send(work.incoming, work.device_id, reply, ok=True, model=work.model.name)

    def _answer_forwarded_event(self, forwarded: _EventForward, reply: Reply) -> None:
        """The cloud's reply to an event (or tier 1's own answer marked fallback): every view of it hears it."""
        event = forwarded.event
        answer = replace(forwarded.answer, class_id=reply.class_id, answered_by=reply.answered_by, onward=None,
                         reply=reply)
        with self._events_lock:
            joined = self.events.answered(event, answer)
        for request in [*event.views.values(), *joined]:
            self._answer_view(request, answer, reply.server_us, reply.queue_us, forwarded.model.name)
        self._ack_features(event)

    def _run_batch(self, works: list[_Work], started: float, queue_us: list[int] | None = None) -> None:
        queue_us = queue_us or [0] * len(works)
        # One model per batch by construction; packings may differ (bits, float tooling, raw server-only input).
        # Both bit packings decode to the same words, so dense and word-packed requests share a forward.
        groups: dict[codec.Packing, list[int]] = {}
        for index, work in enumerate(works):
            groups.setdefault(work.header.packing.decoded, []).append(index)
        for packing, indices in groups.items():
            model = works[indices[0]].model
            try:
                if model.edge_program is not None and packing.bits:
                    self._run_edge(works, indices, started, queue_us)
                    continue
                logits = model.logits([works[i].payload for i in indices], packing)
            except Exception:  # a model bug must cost this batch, not the server
                log.exception("forward failed for %d requests of %s", len(indices), model.name)
                for i in indices:
                    self._send(works[i].incoming, works[i].device_id,
                               Reply(works[i].header.request_id, Status.INTERNAL, message="internal server error"),
                               ok=False, model=model.name)
                continue
            server_us = int((time.monotonic() - started) * 1e6)
            top_classes, top_probabilities = self._top_k(logits)
            final_classes = logits.argmax(axis=1).tolist()
            last_tier = len(model.loaded.spec.tiers) - 1
            replies = [(works[i].incoming, works[i].device_id,
                        Reply(works[i].header.request_id, Status.OK, final_classes[row],
                              tuple(zip(classes, probabilities)), server_us, queue_us[i], answered_by=last_tier))
                       for row, (i, classes, probabilities) in enumerate(zip(indices, top_classes.tolist(),
                                                                             top_probabilities.tolist()))]
            self._send_many(replies, model.name)
        self.metrics.batch(len(works), time.monotonic() - started)
        with self._stats_lock:
            self.stats["batches"] += 1

    def _send_many(self, replies: list[tuple[Incoming, str, Reply]], model: str) -> None:
        """A batch's OK replies: one call into the transport, one metrics update."""
        self.transport.reply_many([(incoming, device_id, codec.encode_reply(reply))
                                   for incoming, device_id, reply in replies])
        self.metrics.replies_ok(model, replies)
        with self._stats_lock:
            self.stats["ok"] += len(replies)

    def _send(self, incoming: Incoming, device_id: str, reply: Reply, ok: bool, model: str = NO_MODEL) -> None:
        self.transport.reply(incoming, device_id, codec.encode_reply(reply))
        self.metrics.reply(model, device_id, reply.status, incoming.received, reply.server_us, reply.queue_us,
                           reply.answered_by if reply.status == Status.OK else None)
        with self._stats_lock:
            self.stats["ok" if ok else "errors"] += 1


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exps = np.exp(shifted)
    return exps / exps.sum(axis=1, keepdims=True)
