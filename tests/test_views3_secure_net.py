"""Configuration (f) on a secured broker (TLS, passwords, broker-config's per-identity rules, as
test_edge_secure_net.py builds it): four cameras -> ``ddnn-server --role aggregator`` running tier 1 of the
three-tier views model as an edge, with the edge role's two identities (towards the cameras, and NAME-up
towards the cloud) -> a cloud server. Every event is answered by the exit and with the class the evaluation
says, event by event; the operator moves the aggregator's tier-1 threshold live; and the broker refuses what
a camera or the aggregator's upstream identity must not do."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from net_harness import SERVER_MAIN, RawClient, ServerProcess, secure_broker, wait_for
from test_views3_net import DEADLINE_MS, MODEL, expected, make_scene, per_event

from ddnn_gen.device.simulated import SimReport, simulate_views
from ddnn_gen.model import datasets
from ddnn_gen.model.spec import exit_decision
from ddnn_gen.wire import deployment, topics
from ddnn_gen.wire.broker import Broker

log = logging.getLogger(__name__)

N_EVENTS = 300
NOT_AUTHORIZED = "Not authorized"
CAMERAS = [f"cam{view}" for view in range(4)]
USERS = {**{camera: "device" for camera in CAMERAS}, "agg1": "aggregator", "cloud1": "server", "ops": "operator"}


@pytest.fixture(scope="module")
def scene(fmnist_test: datasets.Dataset) -> tuple:
    return make_scene(fmnist_test)


def _events(secure: Broker, scene: tuple, n_events: int, first_event_id: int) -> SimReport:
    aggregator, _, _, parts = scene
    # Each camera logs in as itself: its user name is its device id, the broker's rules are written for it.
    return simulate_views(secure.connection, aggregator.programs, aggregator.loaded.hash_bytes, parts, n_events,
                          timeout_s=15.0, first_event_id=first_event_id, device_prefix="cam")


def _servers(secure: Broker) -> tuple[ServerProcess, ServerProcess]:
    assert secure.deployment is not None
    cloud = ServerProcess(secure.connection("cloud1"), MODEL, workers=1, server_id="cloud1").start()
    aggregating = ServerProcess(secure.connection("agg1"), MODEL, workers=2, server_id="agg1", extra=[
        "--role", "aggregator", "--event-deadline-ms", str(DEADLINE_MS), "--upstream-timeout-ms", "5000",
        "--upstream-username", "agg1-up", "--upstream-password-file",
        str(secure.deployment.password_file("agg1-up"))]).start()
    return cloud, aggregating


def test_secured_aggregator_as_edge_answers_as_eval_and_the_operator_steers_it(scene: tuple) -> None:
    aggregator, runs, labels, _ = scene
    outputs = aggregator.outputs(runs, labels)
    reaching = ~exit_decision(outputs.entropy, aggregator.loaded.spec.thresholds[0])
    entropy = outputs.edges[0].entropy[reaching]
    new = float(np.quantile(entropy, 0.9 if np.mean(entropy <= aggregator.loaded.spec.thresholds[1]) < 0.5
                            else 0.1))
    with secure_broker(USERS) as secure:
        assert secure.deployment is not None
        assert secure.deployment.users["agg1-up"] == deployment.UPSTREAM_ROLE  # made with the aggregator
        # One identity is one session on this broker: without its upstream identity the aggregator says so.
        alone = subprocess.run([sys.executable, "-c", SERVER_MAIN, *secure.connection("agg1").runner_args(),
                                "--models", str(MODEL), "--server-id", "agg1", "--role", "aggregator"],
                               capture_output=True, text=True, timeout=120)
        assert alone.returncode == 1 and "--upstream-username" in alone.stderr, alone.stderr
        assert "Traceback" not in alone.stderr
        cloud, aggregating = _servers(secure)
        try:
            first = _events(secure, scene, N_EVENTS, 1)
            done = subprocess.run([sys.executable, "-m", "ddnn_gen", "threshold", "set", str(MODEL), repr(new),
                                   "--tier", "edge", *secure.connection("ops").runner_args()],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            topic = topics.tier_threshold_topic(aggregator.loaded.hash_bytes, 1)
            assert wait_for(lambda: f"threshold on {topic} now {new!r}" in aggregating.output, timeout_s=30), \
                aggregating.output
            second = _events(secure, scene, N_EVENTS, 1_000_001)
        finally:
            assert aggregating.terminate() == 0, aggregating.output
            assert cloud.terminate() == 0, cloud.output
    for report, edge_threshold in ((first, None), (second, new)):
        classes, exits = per_event(report, N_EVENTS)
        want_classes, want_exits = expected(aggregator, outputs, edge_threshold)
        assert np.array_equal(exits, want_exits[:N_EVENTS]), np.flatnonzero(exits != want_exits[:N_EVENTS])[:20]
        assert np.array_equal(classes, want_classes[:N_EVENTS])
        assert min(np.bincount(exits, minlength=3)) > 10, np.bincount(exits, minlength=3)  # all three answered
        log.info("secured, edge threshold %s: exits local/edge/cloud %s", edge_threshold,
                 np.bincount(exits, minlength=3).tolist())


def test_a_camera_cannot_act_as_the_aggregator_nor_its_upstream(scene: tuple) -> None:
    key = topics.model_key(scene[0].loaded.hash_bytes)
    group = topics.DEFAULT_SHARE_GROUP
    with secure_broker(USERS) as secure:
        camera = RawClient(secure.connection("cam0"), "cam0")
        upstream = RawClient(secure.connection("agg1-up"), "agg1")
        try:
            # A camera: not the aggregator's requests, replies, upstream or thresholds, not another camera's
            # feature requests, nothing under the aggregator's name.
            for topic in (f"$share/{group}/ddnn/req/{key}/+", topics.reply_topic("agg1"), topics.reply_topic("cam1"),
                          "ddnn/features/cam1", f"ddnn/tier-threshold/{key}/1"):
                assert camera.subscribe(topic) == NOT_AUTHORIZED, topic
            for topic in (f"ddnn/req/{key}/agg1/t2", f"ddnn/req/{key}/cam0/t2", f"ddnn/req/{key}/cam1",
                          topics.reply_topic("cam1"), "ddnn/features/cam1", topics.server_status_topic("agg1"),
                          topics.server_telemetry_topic("agg1"), f"ddnn/tier-threshold/{key}/1",
                          topics.threshold_topic(scene[0].loaded.hash_bytes)):
                assert camera.publish(topic, b"1") == NOT_AUTHORIZED, topic
            # The aggregator's upstream identity: only the aggregator's requests up, only its replies.
            assert upstream.publish(f"ddnn/req/{key}/agg1/t2", b"x") != NOT_AUTHORIZED
            for topic in (f"ddnn/req/{key}/agg1", f"ddnn/req/{key}/cam0/t2", topics.reply_topic("cam0"),
                          "ddnn/features/cam0"):
                assert upstream.publish(topic, b"x") == NOT_AUTHORIZED, topic
            for topic in (f"$share/{group}/ddnn/req/{key}/+", topics.reply_topic("cam0"), topics.STATUS_SUBSCRIPTION):
                assert upstream.subscribe(topic) == NOT_AUTHORIZED, topic
        finally:
            camera.close()
            upstream.close()


@pytest.mark.parametrize("role", ["edge", "aggregator"])
def test_broker_config_makes_the_aggregators_upstream_identity(role: str) -> None:
    users = deployment.with_upstream_identities({"agg1": role, "cam0": "device"})
    assert users["agg1-up"] == deployment.UPSTREAM_ROLE
    assert deployment.rules_for("agg1", "aggregator") == deployment.rules_for("agg1", "edge")
