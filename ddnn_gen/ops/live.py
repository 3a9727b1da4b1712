"""The controller on a running fleet (``ddnngen control``): read the telemetry of one model's devices and of
the servers from the broker, turn each interval into an Observation for the ThresholdController, and publish
its threshold as the model's retained threshold whenever it moves.

One interval's observation: the samples the model's devices classified per second and the share they
offloaded (deltas of their cumulative counters, so a lost telemetry message costs resolution, not
correctness), and the p99 round trip: the largest p99 the devices measured in that interval (what the
target is about), else the servers' receipt-to-reply p99. A device whose counters went backwards restarted:
its new counts start a new baseline.

The operator steers it live: a retained {"target_p99_ms": X} or {"max_load": F} on
``ddnn/control/<model>/target`` replaces the command line's target from the next decision on (one off the
schema or out of range is ignored with a log line, the target stays). Its state (target, threshold, the
last decisions, per device what it set) goes out retained on ``ddnn/control/<model>/state`` at start, on each
decision and on each new target, for the dashboard; a stop replaces it with an "offline" state, and so does
the broker, from the controller's last will, when the controller dies without a word.

With a DeviceThresholdController (``--per-device``) each device gets its own retained threshold
(``ddnn/threshold/<model>/<device>``, which a device prefers to the model-wide one) from its own counters, and
the model-wide threshold is the highest of them: what a device not seen yet starts with.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ddnn_gen.ops.allocation import DeviceObservation, DevicesDecision, DeviceThresholdController
from ddnn_gen.ops.controller import Decision, Observation, ThresholdController
from ddnn_gen.ops.subscriber import OperatorClient
from ddnn_gen.wire import codec, telemetry, topics
from ddnn_gen.wire.connection import BrokerConnection

log = logging.getLogger(__name__)

THRESHOLD_EPSILON = 1e-6  # moves smaller than this are not published


@dataclass
class _DeviceState:
    samples: int = 0
    offloaded: int = 0
    threshold: float = math.nan
    rtt_p99_ms: float = math.nan  # the latest message's, cleared once used
    seen: float = 0.0


@dataclass
class FleetView:
    """The latest validated telemetry of one model's devices and of every server (thread-safe)."""

    model_key: str
    tier: int = 0  # the exit whose hop is watched: 0 the devices', N the servers' that run tier N's exit
    devices: dict[str, _DeviceState] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _taken: dict[str, tuple[int, int]] = field(default_factory=dict)  # device -> counters at the last interval
    # Tier N's hop: requests the servers running tier N's exit answered (every one that reached it) and how
    # many of them the tier above answered, summed over their telemetry windows since the last interval.
    _hop: list[int] = field(default_factory=lambda: [0, 0])

    def receive(self, topic: str, payload: bytes) -> None:
        try:
            message = telemetry.parse(topic, payload)
        except telemetry.TelemetryError as error:
            with self._lock:
                self.rejected += 1
                count = self.rejected
            if count <= 10 or count % 1000 == 0:  # hostile traffic must not flood the log
                log.warning("ignoring telemetry (%d so far): %s", count, error)
            return
        now = time.monotonic()
        with self._lock:
            if message.kind == "server":
                self.servers[message.source] = {**message.body, "_seen": now}
                if self.tier:
                    self._count_hop(message.body)
                return
            body = message.body
            if body["model"] != self.model_key:
                return
            state = self.devices.setdefault(message.source, _DeviceState())
            state.samples, state.offloaded, state.threshold, state.seen = (body["samples"], body["offloaded"],
                                                                         body["threshold"], now)
            p99 = (body.get("rtt_ms") or {}).get("p99")
            if p99 is not None:
                state.rtt_p99_ms = p99 if math.isnan(state.rtt_p99_ms) else max(state.rtt_p99_ms, p99)

    def _names_at(self, body: dict[str, Any], tier: int) -> list[str]:
        """The names under which a server's message counts this model, where it takes tier ``tier``'s
        requests (a server before "tiers" was reported: tier 1)."""
        tiers = body.get("tiers") or {}
        return [name for name, key in body["models"].items() if key == self.model_key and tiers.get(name, 1) == tier]

    def _count_hop(self, body: dict[str, Any]) -> None:
        # Each message holds its window's counts, so a lost one loses resolution, not correctness.
        for name in self._names_at(body, self.tier):
            if name not in (body.get("tier_thresholds") or {}):
                continue  # it takes tier N's requests without running its exit (a cloud entered there)
            for answered_by, count in (body["answered_by"].get(name) or {}).items():
                self._hop[0] += count
                if int(answered_by) > self.tier:
                    self._hop[1] += count

    def take_hop(self, since: float) -> tuple[int, int, float]:
        """For a server tier's exit: the requests that reached it and those it sent on (answered above)
        since the previous call, and the largest p99 (ms, NaN when unknown) the tier above's servers
        reported since ``since`` (the load this hop controls)."""
        with self._lock:
            arrived, onward = self._hop
            self._hop = [0, 0]
            recent = [s["latency_ms"]["p99"] for s in self.servers.values() if s["_seen"] >= since
                      and s["latency_ms"]["p99"] is not None and self._names_at(s, self.tier + 1)]
        return arrived, onward, max(recent) if recent else math.nan

    def take(self, since: float) -> tuple[int, int, float]:
        """(samples, offloaded) the devices added since the previous call, and the p99 round trip (ms, NaN
        when unknown) of the messages received since ``since``."""
        each, p99 = self.take_each(since)
        return (sum(seen.samples for seen in each.values()), sum(seen.offloaded for seen in each.values()), p99)

    def take_each(self, since: float) -> tuple[dict[str, DeviceObservation], float]:
        """What each device added since the previous call (with the threshold its latest message says it
        uses), and the p99 as for :meth:`take`."""
        each: dict[str, DeviceObservation] = {}
        p99 = math.nan
        with self._lock:
            for device_id, state in self.devices.items():
                # A device seen for the first time: its counters so far are its baseline, not this interval's.
                last_samples, last_offloaded = self._taken.get(device_id, (state.samples, state.offloaded))
                if state.samples < last_samples or state.offloaded < last_offloaded:
                    last_samples = last_offloaded = 0  # restarted: its counters began again
                each[device_id] = DeviceObservation(state.samples - last_samples, state.offloaded - last_offloaded,
                                                    state.threshold)
                self._taken[device_id] = (state.samples, state.offloaded)
                if not math.isnan(state.rtt_p99_ms):
                    p99 = state.rtt_p99_ms if math.isnan(p99) else max(p99, state.rtt_p99_ms)
                    state.rtt_p99_ms = math.nan
            if math.isnan(p99):
                recent = [s["latency_ms"]["p99"] for s in self.servers.values()
                          if s["_seen"] >= since and s["latency_ms"]["p99"] is not None]
                p99 = max(recent) if recent else math.nan
        return each, p99

    def capacity_estimate(self) -> float | None:
        """Requests/s the servers could answer: each one's served rate over its workers' busy share, where
        busy enough to tell (an upper bound when the network rather than the forward pass limits). For a
        server tier's exit, only the servers of the tier above count: theirs is the load it controls."""
        with self._lock:
            rates = [sum(s.get("OK", 0.0) for s in body["rps"].values()) / body["busy"]
                     for body in self.servers.values() if body["busy"] >= 0.05
                     and (not self.tier or self._names_at(body, self.tier + 1))]
        return sum(rates) if rates else None


Controller = ThresholdController | DeviceThresholdController


class LiveController:
    """Subscribe, decide every ``interval_s``, publish the model's retained threshold when it moves (and, with
    a DeviceThresholdController, each device's own retained threshold when that moves).

    ``tier`` N > 0: the controller of server tier N's exit (an edge's): its observations are the requests that
    reached the servers running that exit and the share they sent on (their telemetry's answered-by counts),
    its load is the tier above's, and it publishes the tier's model-wide retained threshold
    (``ddnn/tier-threshold/<model>/<N>``) that those servers apply; its target and state topics end in
    ``/t<N>``. One such controller per hop of a model, side by side with the devices' (tier 0)."""

    def __init__(self, connection: BrokerConnection, model_hash: bytes, controller: Controller | None,
                 interval_s: float = 2.0, capacity_factory: Any = None, publish_initial: bool = True,
                 tier: int = 0) -> None:
        """``controller`` None: built by ``capacity_factory(capacity)`` once telemetry shows a capacity."""
        if tier and isinstance(controller, DeviceThresholdController):
            raise ValueError("a server tier's exit is controlled model-wide (its servers report no per-device "
                             "counts)")
        self.tier = tier
        self.connection = connection
        self.model_hash = model_hash
        self.controller = controller
        self.interval_s = interval_s
        self._factory = capacity_factory
        self._publish_initial = publish_initial
        self.view = FleetView(topics.model_key(model_hash), tier)
        self.decisions: deque[tuple[float, Observation, Decision | DevicesDecision]] = deque(maxlen=100000)
        self.published: float | None = None
        self.published_devices: dict[str, float] = {}
        self._topic = topics.tier_threshold_topic(model_hash, tier) if tier else topics.threshold_topic(model_hash)
        self._target_topic = topics.control_target_topic(model_hash, tier)
        self._state_topic = topics.control_state_topic(model_hash, tier)
        self._pending: dict[str, float] | None = None  # an operator's target before the controller exists
        self._recent: deque[dict[str, Any]] = deque(maxlen=telemetry.MAX_DECISIONS)
        self._lock = threading.Lock()  # the controller: the MQTT thread sets targets, the loop decides
        self._stop = threading.Event()
        # Killed, the controller's retained state would go on saying it runs: the broker replaces it with this.
        will = (self._state_topic, telemetry.offline_state(self.view.model_key, time.time()))
        self._client = OperatorClient(connection, "control", (*topics.TELEMETRY_SUBSCRIPTIONS, self._target_topic),
                                      self._receive, will=will)
        self._thread = threading.Thread(target=self._loop, name="ddnn-control", daemon=True)

    def start(self, timeout_s: float = 10.0) -> LiveController:
        self._client.start(timeout_s)
        if self.controller is not None and self._publish_initial:
            self._publish(self.controller.threshold)
        self._publish_state()
        self._thread.start()
        return self

    def _receive(self, topic: str, payload: bytes) -> None:
        if topic != self._target_topic:
            self.view.receive(topic, payload)
            return
        if not payload:
            return  # a cleared target: the one in force stays
        try:
            _, target = telemetry.parse_target(topic, payload)
        except telemetry.TelemetryError as error:
            log.warning("control: ignoring the target on %s: %s", topic, error)
            return
        with self._lock:
            if self.controller is None:
                self._pending = target
            else:
                self.controller.set_target(**target)
        log.info("control: new target %s from the operator", _describe(target))
        self._publish_state()

    def _publish_state(self) -> None:
        """The retained state: the target, the threshold, the last decisions (the dashboard shows them)."""
        with self._lock:
            controller = self.controller
            if controller is None and self._pending is None and self._factory is None:
                return
            devices: dict[str, Any] | None = None
            if controller is not None:
                target, threshold = controller.target(), controller.threshold
                capacity: float | None = controller.capacity
                bounds = (controller.t_min, controller.t_max)
                if isinstance(controller, DeviceThresholdController):
                    busiest = sorted(controller.devices.items(), key=lambda item: -(item[1].rate or 0.0))
                    devices = {device_id: {"threshold": state.threshold, "sample_rate": state.rate or 0.0,
                                           "correction": state.correction}
                               for device_id, state in busiest[:telemetry.MAX_STATE_DEVICES]}
                    threshold = self.published if self.published is not None else threshold
            else:
                probe = self._factory(1.0)  # the command line's target and bounds, before any capacity is known
                target = self._pending or probe.target()
                threshold, capacity, bounds = probe.threshold, None, (probe.t_min, probe.t_max)
            body = {"v": telemetry.TELEMETRY_VERSION, "model": self.view.model_key, "time": time.time(),
                    "status": "online", "target": target, "capacity": capacity, "threshold": threshold,
                    "t_min": bounds[0], "t_max": bounds[1], "decisions": list(self._recent)}
            if self.tier:
                body["tier"] = self.tier
            if devices is not None:
                body["devices"] = devices
        if not self._client.publish_retained(self._state_topic, telemetry.encode(body)):
            log.warning("control: publishing the state failed (not connected?)")

    def stop(self) -> None:
        """Stop deciding and say so: the retained state becomes "offline" (what the will says on a crash)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if not self._client.publish_retained(self._state_topic, telemetry.offline_state(self.view.model_key,
                                                                                         time.time()), wait_s=5.0):
            log.warning("control: publishing the offline state failed (not connected?)")
        self._client.stop()

    def _publish(self, threshold: float, device_id: str | None = None) -> None:
        assert device_id is None or not self.tier
        topic = self._topic if device_id is None else topics.threshold_topic(self.model_hash, device_id)
        if not self._client.publish_retained(topic, codec.encode_threshold(threshold)):
            log.warning("control: publishing the threshold %.4f on %s failed (not connected?)", threshold, topic)
            return
        if device_id is None:
            self.published = threshold
        else:
            self.published_devices[device_id] = threshold

    def _loop(self) -> None:
        last = time.monotonic()
        self.view.take(last)  # the counters so far are the baseline
        self.view.take_hop(last)
        while not self._stop.wait(max(0.0, last + self.interval_s - time.monotonic())):
            now = time.monotonic()
            self.step(now - last, last)
            last = now

    def step(self, span_s: float, since: float) -> Decision | DevicesDecision | None:
        each, p99 = self.view.take_each(since)
        samples = sum(seen.samples for seen in each.values())
        offloaded = sum(seen.offloaded for seen in each.values())
        if self.tier:
            # The hop's "samples" are the requests reaching the tier's exit, its offloaded those sent on.
            samples, offloaded, p99 = self.view.take_hop(since)
        with self._lock:
            if self.controller is None:
                capacity = self.view.capacity_estimate()
                if capacity is None or self._factory is None:
                    log.info("control: waiting for a server busy enough to estimate its capacity")
                    return None
                self.controller = self._factory(capacity)
                if self._pending is not None:
                    self.controller.set_target(**self._pending)
                log.info("control: estimated capacity %.0f requests/s from the servers' telemetry", capacity)
            if samples == 0:
                log.info("control: no samples this interval; holding %.4f", self.controller.threshold)
                return None
            seen = Observation(samples / span_s, offloaded / samples, p99)
            decision: Decision | DevicesDecision
            if isinstance(self.controller, DeviceThresholdController):
                decision = self.controller.update(each, span_s, p99)
            else:
                decision = self.controller.update(seen)
            target = self.controller.target()
            now = time.time()
            self.decisions.append((now, seen, decision))
            self._recent.append({"time": now, "sample_rate": seen.sample_rate, "onward_share": seen.onward_share,
                                 "p99_ms": p99 if math.isfinite(p99) else None, "threshold": decision.threshold,
                                 "predicted_load": decision.predicted_load, "allowed_load": decision.allowed_load,
                                 "expected_accuracy": decision.expected_accuracy, "reason": decision.reason,
                                 "target": target})
        moved = self.published is None or abs(decision.threshold - self.published) > THRESHOLD_EPSILON
        per_device = ""
        if isinstance(decision, DevicesDecision):
            spread = decision.thresholds.values()
            per_device = f" [per device {min(spread):.4f}..{max(spread):.4f}, {len(decision.thresholds)} devices]"
        log.info("control%s: %.0f %s/s, %.1f %% offloaded, p99 %.1f ms -> threshold %.4f (%s; predicted "
                 "%.0f req/s of %.0f allowed, expected accuracy %.2f %%; target %s)%s%s",
                 f" tier {self.tier}" if self.tier else "", seen.sample_rate,
                 f"requests reaching tier {self.tier}" if self.tier else "samples",
                 100 * seen.onward_share, p99, decision.threshold, decision.reason, decision.predicted_load,
                 decision.allowed_load, 100 * decision.expected_accuracy, _describe(target), per_device,
                 " published" if moved else "")
        if isinstance(decision, DevicesDecision):
            for device_id, value in decision.thresholds.items():
                old = self.published_devices.get(device_id)
                if old is None or abs(value - old) > THRESHOLD_EPSILON:
                    self._publish(value, device_id)
        if moved:
            self._publish(decision.threshold)
        self._publish_state()
        return decision


def _describe(target: dict[str, float]) -> str:
    if "max_load" in target:
        return f"load under {target['max_load']:g} of capacity"
    return f"p99 under {target['target_p99_ms']:g} ms"
