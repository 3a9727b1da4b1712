"""`ddnngen control --per-device` on a running fleet (real Mosquitto, real ddnn-server, open-loop simulated
devices with their telemetry), with two groups of devices whose data differ: one sees the Fashion-MNIST test
images of five classes the local exit finds easy, the other the rest. The controller gives each device its
own retained threshold, the two groups different ones, and the offloaded load comes under the target. Then
its liveness: its retained state says "offline" when it stops, and when it is killed (its last will)."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from net_harness import ControlProcess, Expected, ServerProcess, expectations, wait_for

from ddnn_gen.bench.load_ramp import PacedFleet, calibrated_copy
from ddnn_gen.device.simulated import precomputed
from ddnn_gen.fold.reference import exit_decision
from ddnn_gen.model import datasets
from ddnn_gen.wire import mqtt_client, telemetry, topics
from ddnn_gen.wire.broker import Broker

CAPACITY = 40.0  # requests/s the controller is told the server sustains (the real one does far more)
INTERVAL_S = 0.5
RUN_S = 14.0
EASY_CLASSES = (1, 5, 7, 8, 9)  # trouser, sandal, sneaker, bag, ankle boot
PER_GROUP = 600  # test images per group


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, fmnist_model_path: Path,
               fmnist_test: datasets.Dataset) -> Path:
    return calibrated_copy(fmnist_model_path, fmnist_test.subset(3000),
                           tmp_path_factory.mktemp("control-devices") / "fmnist_32.npz")


@pytest.fixture(scope="module")
def groups(calibrated: Path, fmnist_test: datasets.Dataset) -> dict[str, Expected]:
    easy = np.isin(fmnist_test.labels, EASY_CLASSES)
    return {name: expectations(calibrated, fmnist_test.images[np.nonzero(mask)[0][:PER_GROUP]])
            for name, mask in (("easy", easy), ("hard", ~easy))}


def _control(calibrated: Path, broker: Broker, *args: str) -> tuple[subprocess.Popen[str], list[str], threading.Event]:
    control = ControlProcess(str(calibrated), "--interval", str(INTERVAL_S), "--broker", broker.address, *args)
    return control.process, control.lines, control.running


def test_devices_whose_data_differ_get_their_own_thresholds(calibrated: Path, groups: dict[str, Expected]) -> None:
    require_tool("mosquitto")
    t0 = groups["easy"].program.threshold
    onward = {name: float(np.mean(~exit_decision(g.device.entropy, t0))) for name, g in groups.items()}
    assert onward["hard"] > 1.5 * onward["easy"], onward  # the groups do differ at the same threshold
    rate = 3.0 * CAPACITY / sum(onward.values())  # samples/s per group: 3x the capacity at the stored threshold
    with Broker() as broker:
        server = ServerProcess(broker.address, calibrated, workers=1, extra=["--telemetry-interval", "0.5"]).start()
        control, lines, running = _control(calibrated, broker, "--per-device", "--max-load", "0.8", "--capacity",
                                           str(CAPACITY), "--t-min", "0.05", "--t-max", "0.95", "--duration",
                                           str(RUN_S))
        assert running.wait(60), "".join(lines)
        started = time.monotonic()
        fleets = {name: PacedFleet(broker.connection(), g.program, g.loaded.hash_bytes,
                                   precomputed(g.device.split_words, g.device.entropy, g.device.local_class),
                                   len(g.server_class), 3, lambda: rate, telemetry_interval_s=0.25,
                                   prefix=name).start()
                  for name, g in groups.items()}
        try:
            assert control.wait(RUN_S + 30) == 0, "".join(lines)
        finally:
            samples = {name: fleet.stop() for name, fleet in fleets.items()}
            assert server.terminate() == 0, server.output
    log = "".join(lines)
    final = dict(re.findall(r"; ((?:easy|hard)\d) ([0-9.]+)", log.splitlines()[-1]))
    assert sorted(final) == [f"{g}{d}" for g in ("easy", "hard") for d in range(3)], log.splitlines()[-1]
    thresholds = {device_id: float(value) for device_id, value in final.items()}
    assert all(0.05 <= value <= 0.95 for value in thresholds.values())
    easy = np.mean([v for d, v in thresholds.items() if d.startswith("easy")])
    hard = np.mean([v for d, v in thresholds.items() if d.startswith("hard")])
    assert easy > hard + 0.01, thresholds  # not one threshold for all: the easy data's devices exit more locally
    # Each device applied its own retained threshold (it prefers it to the model-wide one).
    for name, fleet in fleets.items():
        for device in fleet.devices:
            last = [s for s in samples[name] if s.device_id == device.device_id][-10:]
            assert len({s.threshold for s in last}) == 1, device.device_id
            assert last[-1].threshold == pytest.approx(thresholds[device.device_id], abs=5e-5)  # logged to 4 places
    # And the load target is met: the offloaded rate of the last 3 s under the allowed load (0.8 x capacity, with
    # the sampling noise of a few seconds), where at the stored threshold it would be 3x the capacity.
    everything = [s for fleet_samples in samples.values() for s in fleet_samples]
    tail = [s for s in everything if started + RUN_S - 3.0 <= s.sent < started + RUN_S]
    assert sum(s.source != "local" for s in tail) / 3.0 <= 0.8 * CAPACITY * 1.3
    assert all(s.source in ("local", "server") for s in everything)  # nothing lost, nothing refused


def _retained_state(broker: Broker, topic: str) -> dict[str, object] | None:
    """The retained state on ``topic`` as a fresh subscriber gets it (None: nothing retained)."""
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt_client.Client(f"probe-{time.monotonic_ns()}", broker.connection())
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: threading.Timer(0.5, done.set).start()
    client.on_message = lambda _c, _u, message: (got.append(message.payload), done.set())
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    if not got:
        return None
    return telemetry.parse_state(topic, got[-1])[1]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_controllers_state_says_offline_once_it_stops_or_dies(calibrated: Path, how: str) -> None:
    require_tool("mosquitto")
    from ddnn_gen.model.modelfile import load_model

    topic = topics.control_state_topic(load_model(calibrated).hash_bytes)
    with Broker() as broker:
        control, lines, running = _control(calibrated, broker, "--max-load", "0.8", "--capacity", "100")
        assert running.wait(60), "".join(lines)
        assert wait_for(lambda: (_retained_state(broker, topic) or {}).get("status") == "online", timeout_s=30)
        control.send_signal(getattr(signal, how))
        assert control.wait(30) == (0 if how == "SIGTERM" else -signal.SIGKILL), "".join(lines)
        # A kill leaves no goodbye: the broker sees the socket close and publishes the will, retained.
        assert wait_for(lambda: (_retained_state(broker, topic) or {}).get("status") == "offline", timeout_s=30)
        state = _retained_state(broker, topic)
    assert state is not None and state["model"] == topic.split("/")[2]
