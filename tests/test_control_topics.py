"""The controller's topics offline: ddnn/control/<model>/target (the operator's) and .../state (the
controller's) are validated on receipt like the other telemetry, and a target moves the controller's next
decision; the dashboard ignores hostile state and thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddnn_gen.ops.controller import ControlError, Curve, Observation, ThresholdController
from ddnn_gen.ops.dashboard import FleetState, ModelInfo
from ddnn_gen.wire import telemetry, topics

HASH = bytes(range(16))
KEY = topics.model_key(HASH)
TARGET = topics.control_target_topic(HASH)
STATE = topics.control_state_topic(HASH)
CURVE = Curve(np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.4, 0.0]), np.array([0.95, 0.9, 0.7]))


def _state(**changes: object) -> dict[str, object]:
    decision = {"time": 1.0, "sample_rate": 100.0, "onward_share": 0.4, "p99_ms": None, "threshold": 0.5,
                "predicted_load": 40.0, "allowed_load": 32.0, "expected_accuracy": 0.9, "reason": "holding",
                "target": {"max_load": 0.8}}
    body: dict[str, object] = {"v": 1, "model": KEY, "time": 2.0, "target": {"max_load": 0.8}, "capacity": 40.0,
                               "threshold": 0.5, "t_min": 0.0, "t_max": 1.0, "decisions": [decision]}
    body.update(changes)
    return body


def test_topics_round_trip() -> None:
    assert TARGET == f"ddnn/control/{KEY}/target" and STATE == f"ddnn/control/{KEY}/state"
    assert topics.parse_control_topic(TARGET) == (KEY, "target")
    assert topics.parse_control_topic(STATE) == (KEY, "state")
    for bad in (f"ddnn/control/{KEY}", f"ddnn/control/{KEY[:-1]}/state", f"ddnn/control/{KEY}/state/x",
                f"ddnn/control/{KEY.upper()}/target", f"ddnn/other/{KEY}/state"):
        assert topics.parse_control_topic(bad) is None, bad


def test_valid_targets_and_state_are_read() -> None:
    assert telemetry.parse_target(TARGET, b'{"max_load": 0.5}') == (KEY, {"max_load": 0.5})
    assert telemetry.parse_target(TARGET, b'{"target_p99_ms": 50}') == (KEY, {"target_p99_ms": 50.0})
    key, body = telemetry.parse_state(STATE, telemetry.encode(_state()))
    assert key == KEY and body["decisions"][0]["threshold"] == 0.5


@pytest.mark.parametrize("payload", [
    b"", b"{", b"[]", b'"max_load"', b'{"max_load": NaN}', b'{"max_load": Infinity}', b'{"max_load": 1.5}',
    b'{"max_load": 0}', b'{"max_load": -0.3}', b'{"max_load": true}', b'{"max_load": "0.5"}',
    b'{"target_p99_ms": 0}', b'{"target_p99_ms": 1e9}', b'{"max_load": 0.5, "target_p99_ms": 50}', b'{}',
    b'{"max_load": 0.5, "x": 1}', b"\xff\xfe", b'{"max_load": ' + b"1" * 20000 + b"}",
])
def test_hostile_targets_are_refused(payload: bytes) -> None:
    with pytest.raises(telemetry.TelemetryError):
        telemetry.parse_target(TARGET, payload)


@pytest.mark.parametrize("changes", [
    {"model": "0" * 32},  # another model than the topic's
    {"v": 2}, {"threshold": 1.5}, {"target": {"max_load": 2.0}}, {"capacity": -1.0}, {"extra": 1},
    {"decisions": [{}]}, {"decisions": [_state()["decisions"][0]] * 21},  # type: ignore[index]
    {"decisions": [{**_state()["decisions"][0], "reason": "x" * 65}]},  # type: ignore[index]
])
def test_hostile_states_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(telemetry.TelemetryError):
        telemetry.parse_state(STATE, json.dumps(_state(**changes)).encode())


def test_hostile_state_bytes_and_topics_are_refused() -> None:
    for topic, payload in ((STATE, b'{"v": NaN}'), (STATE, b"x" * 20000), (TARGET, telemetry.encode(_state())),
                           ("ddnn/control/zz/state", telemetry.encode(_state()))):
        with pytest.raises(telemetry.TelemetryError):
            telemetry.parse_state(topic, payload)


def test_a_new_target_drives_the_next_decision() -> None:
    controller = ThresholdController(CURVE, 100.0, 0.0, max_load=0.8)
    assert controller.target() == {"max_load": 0.8}
    first = controller.update(Observation(100.0, 1.0))
    assert first.allowed_load == pytest.approx(80.0)
    controller.set_target(max_load=0.3)
    second = controller.update(Observation(100.0, controller.curve.onward_at(controller.threshold)))
    assert controller.target() == {"max_load": 0.3} and second.allowed_load == pytest.approx(30.0)
    assert second.threshold > first.threshold  # a lower allowed load needs more local exits
    controller.set_target(target_p99_ms=20.0)
    assert controller.target() == {"target_p99_ms": 20.0} and controller.allowed == pytest.approx(30.0)
    with pytest.raises(ControlError):
        controller.set_target()


def test_dashboard_state_ignores_hostile_control_and_thresholds() -> None:
    state = FleetState(models={KEY: ModelInfo(KEY, "m", 0.5, CURVE)})
    state.receive(STATE, telemetry.encode(_state()))
    state.receive(STATE, json.dumps(_state(threshold=7)).encode())
    state.receive(STATE, b"x" * 20000)
    state.receive(f"ddnn/threshold/{KEY}", b"0.9")
    state.receive(f"ddnn/threshold/{KEY}", b"NaN")
    state.receive(f"ddnn/threshold/{KEY}", b"1.5")
    state.receive("ddnn/threshold/nothex", b"0.1")
    snapshot = state.snapshot()
    assert snapshot["rejected"] == 5
    [model] = snapshot["models"]
    assert model["control"]["threshold"] == 0.5  # the valid state stayed
    assert model["threshold"] == 0.9 and model["source"] == "retained"
    assert model["expected_accuracy"] == CURVE.accuracy_at(0.9)
    state.receive(f"ddnn/threshold/{KEY}", b"")  # cleared: the model file's threshold applies again
    [model] = state.snapshot()["models"]
    assert model["threshold"] == 0.5 and model["expected_accuracy"] == CURVE.accuracy_at(0.5)


def test_on_a_rabbitmq_cluster_only_the_operator_writes_the_controllers_topics() -> None:
    import re

    from ddnn_gen.wire.rabbitmq_cluster import permissions_for

    keys = [topics.routing_key(t) for t in (TARGET, STATE)]
    for role in ("device", "server", "monitor"):
        _, permissions = permissions_for("x1", role)
        assert not any(re.match(permissions["write"].replace("{username}", "x1"), k) for k in keys), role
    _, operator = permissions_for("ops", "operator")
    assert all(re.match(operator["write"], k) and re.match(operator["read"], k) for k in keys)
    assert not re.match(operator["write"], "ddnn.control.zz.target")


def test_offline_and_per_device_states_are_read_and_hostile_ones_refused() -> None:
    _, offline = telemetry.parse_state(STATE, telemetry.offline_state(KEY, 3.0))
    assert offline == {"v": 1, "model": KEY, "time": 3.0, "status": "offline"}
    devices = {"cam1": {"threshold": 0.4, "sample_rate": 50.0, "correction": 0.6}}
    _, body = telemetry.parse_state(STATE, telemetry.encode(_state(status="online", devices=devices)))
    assert body["devices"]["cam1"]["threshold"] == 0.4
    for hostile in ({"v": 1, "model": KEY, "time": 3.0, "status": "offline", "threshold": 0.5},  # offline is bare
                    {"v": 1, "model": KEY, "time": 3.0, "status": "dead"}, _state(status="offline"),
                    _state(devices={"cam/1": devices["cam1"]}), _state(devices={"cam1": {"threshold": 2.0,
                                                                                          "sample_rate": 1.0,
                                                                                          "correction": 1.0}}),
                    _state(devices={f"d{i}": devices["cam1"] for i in range(telemetry.MAX_STATE_DEVICES + 1)})):
        with pytest.raises(telemetry.TelemetryError):
            telemetry.parse_state(STATE, json.dumps(hostile).encode())
    with pytest.raises(telemetry.TelemetryError, match="claims model"):
        telemetry.parse_state(STATE, telemetry.offline_state("0" * 32, 3.0))


def test_dashboard_keeps_a_dead_controllers_last_state_marked_offline() -> None:
    state = FleetState(models={KEY: ModelInfo(KEY, "m", 0.5, CURVE)})
    devices = {"cam1": {"threshold": 0.4, "sample_rate": 50.0, "correction": 0.6}}
    state.receive(STATE, telemetry.encode(_state(status="online", devices=devices)))
    state.receive("ddnn/device/cam1/telemetry", telemetry.encode(
        {"v": 1, "device": "cam1", "model": KEY, "time": 1.0, "samples": 10, "local": 6, "offloaded": 4,
         "fallback": 0, "error": 0, "threshold": 0.4, "thresholds": {"model": 0.5, "device": 0.4, "default": 0.3}}))
    [device] = state.snapshot()["devices"]
    assert device["threshold_from"] == "controller"  # its own retained value, the one the controller set
    state.receive(STATE, telemetry.offline_state(KEY, 9.0))
    snapshot = state.snapshot()
    [model] = snapshot["models"]
    assert model["control"]["status"] == "offline" and model["control"]["offline_since"] == 9.0
    assert model["control"]["threshold"] == 0.5 and model["control"]["decisions"]  # the last state stays
    [device] = snapshot["devices"]
    assert device["threshold_from"] == "device"  # nobody controls it now: an operator's value as any other


def test_a_server_tiers_controller_has_its_own_topics_and_states() -> None:
    state, target = topics.control_state_topic(HASH, 1), topics.control_target_topic(HASH, 1)
    assert (state, target) == (f"{STATE}/t1", f"{TARGET}/t1")
    assert topics.parse_control_tier_topic(state) == (KEY, "state", 1)
    assert topics.parse_control_tier_topic(STATE) == (KEY, "state", 0)
    assert topics.parse_control_topic(state) is None  # the device exit's readers never take a tier's
    for bad in (f"{STATE}/t0", f"{STATE}/t8", f"{STATE}/1", f"{STATE}/t1/x", f"{STATE}/t01"):
        assert topics.parse_control_tier_topic(bad) is None, bad
    with pytest.raises(ValueError):
        topics.control_state_topic(HASH, 8)
    assert telemetry.parse_state(state, telemetry.encode(_state(tier=1)))[1]["tier"] == 1
    assert telemetry.parse_target(target, b'{"max_load": 0.5}') == (KEY, {"max_load": 0.5})
    telemetry.parse_state(state, telemetry.offline_state(KEY, 3.0))  # a will names no tier
    for topic, body in ((state, _state()), (STATE, _state(tier=1)), (state, _state(tier=2)),
                        (state, _state(tier=9))):
        with pytest.raises(telemetry.TelemetryError):
            telemetry.parse_state(topic, telemetry.encode(body))


def _server(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "v": 1, "server": "edge-1", "time": 1.0, "interval_s": 0.5, "workers": 1, "models": {"m3": KEY},
        "rps": {"m3": {"OK": 10.0}}, "answered_by": {"m3": {"1": 3, "2": 2}}, "queue_depth": 0,
        "batch": {"count": 1, "mean": 5.0, "max": 5}, "busy": 0.1, "service_ms": {"p50": 1.0, "p99": 2.0},
        "latency_ms": {"p50": 1.0, "p99": 2.0}, "cpu_percent": 5.0, "tiers": {"m3": 1},
        "tier_thresholds": {"m3": {"tier": 1, "default": 0.2, "model": 0.4, "devices": {"cam1": 0.5}}}}
    body.update(changes)
    return body


def test_server_telemetry_carries_the_tier_thresholds_it_applies_and_hostile_ones_are_refused() -> None:
    topic = topics.server_telemetry_topic("edge-1")
    assert telemetry.parse(topic, telemetry.encode(_server())).body["tier_thresholds"]["m3"]["model"] == 0.4
    telemetry.parse(topic, telemetry.encode({k: v for k, v in _server().items()
                                             if k not in ("tiers", "tier_thresholds")}))  # an older server's
    too_many = {f"cam{i}": 0.5 for i in range(telemetry.MAX_TIER_DEVICES + 1)}
    for changes in ({"tiers": {"m3": 0}}, {"tiers": {"m3": 8}}, {"tiers": {"m 3": 1}},
                    {"tier_thresholds": {"m3": {"tier": 1, "default": 0.2, "model": 1.5, "devices": {}}}},
                    {"tier_thresholds": {"m3": {"tier": 1, "default": 0.2, "model": None, "devices": too_many}}},
                    {"tier_thresholds": {"m3": {"tier": 1, "default": 0.2, "model": None, "devices": {"a/b": 0.1}}}},
                    {"tier_thresholds": {"m3": {"tier": 1, "default": 0.2, "model": None}}},
                    {"tier_thresholds": {"m3": {"tier": 1, "default": 0.2, "model": None, "devices": {}, "x": 1}}}):
        with pytest.raises(telemetry.TelemetryError):
            telemetry.parse(topic, telemetry.encode(_server(**changes)))


def test_a_tiers_fleet_view_counts_what_reached_the_exit_and_went_on() -> None:
    from ddnn_gen.ops.live import FleetView

    view = FleetView(KEY, tier=1)
    edge = topics.server_telemetry_topic("edge-1")
    cloud = topics.server_telemetry_topic("cloud-1")
    view.receive(edge, telemetry.encode(_server()))
    view.receive(edge, telemetry.encode(_server(answered_by={"m3": {"1": 4, "2": 6}})))
    # The cloud takes tier 2's requests and runs no exit of tier 1: not counted, but its p99 is the hop's.
    view.receive(cloud, telemetry.encode(_server(server="cloud-1", tiers={"m3": 2}, tier_thresholds={},
                                                 answered_by={"m3": {"2": 8}}, latency_ms={"p50": 1.0, "p99": 9.0})))
    # Another model's counts are not this one's.
    view.receive(edge, telemetry.encode(_server(models={"other": "0" * 32}, answered_by={"other": {"2": 50}},
                                                tiers={"other": 1}, tier_thresholds={})))
    assert view.take_hop(0.0) == (15, 8, 9.0)
    assert view.take_hop(0.0)[:2] == (0, 0)


def test_dashboard_shows_tier_thresholds_retained_and_applied_and_ignores_hostile_ones() -> None:
    state = FleetState(models={KEY: ModelInfo(KEY, "m3", 0.5, CURVE)})
    tier = topics.tier_threshold_topic(HASH, 1)
    state.receive(tier, b"0.4")
    state.receive(f"{tier}/cam1", b"0.7")
    for topic, payload in ((tier, b"NaN"), (tier, b"1.5"), (f"ddnn/tier-threshold/{KEY}/0", b"0.1"),
                           (f"ddnn/tier-threshold/{KEY}/8", b"0.1"), (f"ddnn/tier-threshold/{KEY}/x", b"0.1"),
                           (f"{tier}/a b", b"0.1"), (f"{tier}/cam1/x", b"0.1"), ("ddnn/tier-threshold/zz/1", b"0.1")):
        state.receive(topic, payload)
    state.receive(topics.server_telemetry_topic("edge-1"), telemetry.encode(_server()))
    state.receive(topics.control_state_topic(HASH, 1), telemetry.encode(_state(tier=1, threshold=0.4)))
    snapshot = state.snapshot()
    assert snapshot["rejected"] == 8
    rows = {(row["tier"], row["device"]): row for row in snapshot["tier_thresholds"]}
    assert rows[(1, None)]["retained"] == 0.4 and rows[(1, None)]["applied"] == {"edge-1": 0.4}
    assert rows[(1, None)]["control"]["threshold"] == 0.4 and rows[(1, None)]["name"] == "m3"
    assert rows[(1, "cam1")]["retained"] == 0.7 and rows[(1, "cam1")]["applied"] == {"edge-1": 0.5}  # not yet
    assert snapshot["models"][0]["control"] is None  # a tier's controller is not the devices'
    state.receive(tier, b"")  # cleared: the edge still reports what it applies
    rows = {(row["tier"], row["device"]): row for row in state.snapshot()["tier_thresholds"]}
    assert rows[(1, None)]["retained"] is None and rows[(1, None)]["applied"] == {"edge-1": 0.4}
