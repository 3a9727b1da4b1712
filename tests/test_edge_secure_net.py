"""Device -> edge -> cloud on a secured broker (TLS, passwords, broker-config's rules): the edge runs with the
edge role's two identities (towards its devices, and NAME-up towards the cloud), every request a device
offloads is answered by the exit `ddnngen eval`'s rule names, the operator moves the edge tier's threshold
live and the edge applies it, and a device's credentials can neither act as the edge nor reach the cloud."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from net_harness import SERVER_MAIN, RawClient, ServerProcess, secure_broker, wait_for

from ddnn_gen.device.simulated import SimDevice, split_header
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.fold.program import fold
from ddnn_gen.fold.reference import run_device
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import answering_exit
from ddnn_gen.wire import codec, deployment, topics
from ddnn_gen.wire.broker import Broker

N_SAMPLES = 300
NOT_AUTHORIZED = "Not authorized"
USERS = {"cam1": "device", "edge1": "edge", "cloud1": "server", "ops": "operator"}


@pytest.fixture(scope="module")
def setting(small_three_tier: Any, fmnist_test: datasets.Dataset) -> dict[str, Any]:
    data = fmnist_test.subset(N_SAMPLES)
    outputs = compute_outputs(small_three_tier, data)
    program = fold(small_three_tier)
    device = run_device(program, data.images)
    t_device = float(np.quantile(outputs.entropy, 0.3))
    reaching_edge = outputs.entropy > t_device
    edge_entropy = outputs.edges[0].entropy[reaching_edge]
    return {"loaded": small_three_tier, "outputs": outputs, "program": program, "split": device.split_words,
            "offloaded": np.nonzero(reaching_edge)[0], "t_device": t_device,
            "t_edge": (float(np.quantile(edge_entropy, 0.3)), float(np.quantile(edge_entropy, 0.8)))}


def _threshold_set(secure: Broker, user: str, model: Path, value: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ddnn_gen", "threshold", "set", str(model), repr(value), "--tier",
                           "edge", *secure.connection(user).runner_args()], capture_output=True, text=True, timeout=60)


def _answered_by(device: SimDevice, setting: dict[str, Any]) -> np.ndarray:
    """Each offloaded sample's answering exit, as the replies say (the edge's 1, the cloud's 2)."""
    program, model_hash = setting["program"], setting["loaded"].hash_bytes
    exits = []
    for index in setting["offloaded"]:
        request_id = device.next_request_id()
        reply, _ = device.request(split_header(program, model_hash, request_id), setting["split"][index])
        assert reply is not None and reply.status == codec.Status.OK and not reply.flags & codec.REPLY_FALLBACK
        exits.append(reply.answered_by)
    return np.array(exits)


def test_an_edge_with_the_edge_role_serves_and_the_operator_steers_it(setting: dict[str, Any]) -> None:
    loaded, outputs = setting["loaded"], setting["outputs"]
    model_hash = loaded.hash_bytes
    t_first, t_second = setting["t_edge"]
    with secure_broker(USERS) as secure:
        assert secure.deployment is not None
        assert secure.deployment.users["edge1-up"] == deployment.UPSTREAM_ROLE  # made with the edge
        done = _threshold_set(secure, "ops", loaded.path, t_first)
        assert done.returncode == 0, done.stderr
        # One identity is one session on this broker: an edge without its upstream identity says so and stops.
        alone = subprocess.run([sys.executable, "-c", SERVER_MAIN, *secure.connection("edge1").runner_args(),
                                "--models", str(loaded.path), "--server-id", "edge1", "--role", "edge"],
                               capture_output=True, text=True, timeout=120)
        assert alone.returncode == 1 and "--upstream-username" in alone.stderr, alone.stderr
        assert "Traceback" not in alone.stderr
        cloud = ServerProcess(secure.connection("cloud1"), loaded.path, workers=1, server_id="cloud1").start()
        edge = ServerProcess(secure.connection("edge1"), loaded.path, workers=1, server_id="edge1", extra=[
            "--role", "edge", "--upstream-username", "edge1-up", "--upstream-password-file",
            str(secure.deployment.password_file("edge1-up"))]).start()
        device = SimDevice("cam1", secure.connection("cam1"), model_hash, timeout_s=30.0,
                           default_threshold=setting["t_device"]).start()
        try:
            first = _answered_by(device, setting)
            # The operator moves the edge exit's threshold; the edge says it applied it.
            done = _threshold_set(secure, "ops", loaded.path, t_second)
            assert done.returncode == 0, done.stderr
            assert wait_for(lambda: f"now {t_second}" in edge.output, timeout_s=60), edge.output
            second = _answered_by(device, setting)
            refused = _threshold_set(secure, "cam1", loaded.path, 1.0)
            assert refused.returncode == 1 and NOT_AUTHORIZED in refused.stderr, refused.stderr
        finally:
            device.stop()
            assert edge.terminate() == 0, edge.output
            assert cloud.terminate() == 0, cloud.output
    offloaded = setting["offloaded"]
    for got, t_edge in ((first, t_first), (second, t_second)):
        want = answering_exit(outputs, (setting["t_device"], t_edge))[offloaded]
        assert np.array_equal(got, want), f"{int((got != want).sum())} samples answered elsewhere"
        assert min(np.bincount(got, minlength=3)[1:]) > 10  # both the edge and the cloud answered
    assert np.mean(second == 1) > np.mean(first == 1) + 0.2  # the raised edge threshold answers more at the edge


def test_a_device_cannot_act_as_the_edge_nor_reach_the_cloud(setting: dict[str, Any]) -> None:
    key = topics.model_key(setting["loaded"].hash_bytes)
    group = topics.DEFAULT_SHARE_GROUP
    with secure_broker(USERS) as secure:
        device = RawClient(secure.connection("cam1"), "cam1")
        upstream = RawClient(secure.connection("edge1-up"), "edge1", subscribe_replies=True)
        try:
            for topic in (f"$share/{group}/ddnn/req/{key}/+", f"$share/{group}/ddnn/req/{key}/+/t2",
                          topics.reply_topic("edge1"), f"ddnn/tier-threshold/{key}/1", "ddnn/tier-threshold/#"):
                assert device.subscribe(topic) == NOT_AUTHORIZED, topic
            for topic in (f"ddnn/req/{key}/edge1/t2", f"ddnn/req/{key}/cam1/t2", topics.reply_topic("cam2"),
                          topics.server_status_topic("edge1"), f"ddnn/tier-threshold/{key}/1",
                          f"ddnn/tier-threshold/{key}/1/cam1"):
                assert device.publish(topic, b"1") == NOT_AUTHORIZED, topic
            # The edge's upstream identity only sends the edge's requests up and reads the edge's replies.
            assert upstream.publish(f"ddnn/req/{key}/edge1/t2", b"x") != NOT_AUTHORIZED
            for topic in (f"ddnn/req/{key}/edge1", f"ddnn/req/{key}/other/t2", topics.reply_topic("cam1")):
                assert upstream.publish(topic, b"x") == NOT_AUTHORIZED, topic
            for topic in (f"$share/{group}/ddnn/req/{key}/+", topics.reply_topic("cam1")):
                assert upstream.subscribe(topic) == NOT_AUTHORIZED, topic
        finally:
            device.close()
            upstream.close()
        # And the edge's name with a device's password is no login.
        impostor = secure.connection("cam1").as_user("edge1", secure.deployment.password_file("cam1"))
        result = subprocess.run([sys.executable, "-m", "ddnn_gen", "threshold", "set", str(setting["loaded"].path),
                                 "0.5", "--tier", "edge", *impostor.runner_args()],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "refused the connection" in result.stderr, result.stderr
