"""`ddnngen control` on a running fleet (real Mosquitto, real ddnn-server, open-loop simulated devices with
their telemetry): a step to 3x the stated capacity makes it raise the threshold within a bounded number of
intervals, the devices apply it, and the offloaded load comes down under the target."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from net_harness import ControlProcess, Expected, ServerProcess

from ddnn_gen.bench.load_ramp import PacedFleet, calibrated_copy
from ddnn_gen.device.simulated import precomputed
from ddnn_gen.fold.reference import exit_decision
from ddnn_gen.model import datasets
from ddnn_gen.ops.controller import Curve
from ddnn_gen.wire.broker import Broker

CAPACITY = 40.0  # requests/s the controller is told the servers sustain (the real one does far more)
INTERVAL_S = 0.5
STEP_AT_S = 4.0
RUN_S = 12.0
APPLY_GRACE_S = 0.3  # from the controller's exit to its last retained threshold reaching the devices
BOUND_INTERVALS = 4  # the raise must reach the devices within this many intervals (plus telemetry's 0.5 s)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, fmnist_model_path: Path,
               fmnist_test: datasets.Dataset) -> Path:
    return calibrated_copy(fmnist_model_path, fmnist_test.subset(3000),
                           tmp_path_factory.mktemp("control") / "fmnist_32.npz")


def test_step_overload_raises_the_threshold_and_devices_apply_it(calibrated: Path, fmnist_expected: Expected) -> None:
    require_tool("mosquitto")
    from ddnn_gen.model.modelfile import load_model

    expected = fmnist_expected
    loaded = load_model(calibrated)
    assert loaded.hash_bytes == expected.loaded.hash_bytes  # calibrating keeps the model's identity
    curve = Curve.from_calibration(loaded.spec.calibration)
    t0 = expected.program.threshold
    onward0 = float(np.mean(~exit_decision(expected.device.entropy, t0)))
    base_rate = CAPACITY / onward0  # samples/s that offer 1x the capacity at the stored threshold
    part = precomputed(expected.device.split_words, expected.device.entropy, expected.device.local_class)
    with Broker() as broker:
        server = ServerProcess(broker.address, calibrated, workers=1, extra=["--telemetry-interval", "0.5"]).start()
        control = ControlProcess(str(calibrated), "--max-load", "0.8", "--capacity", str(CAPACITY), "--t-min",
                                 repr(t0), "--interval", str(INTERVAL_S), "--duration", str(RUN_S), "--broker",
                                 broker.address)
        assert control.running.wait(60), control.log()
        started = time.monotonic()
        fleet = PacedFleet(broker.connection(), expected.program, expected.loaded.hash_bytes, part,
                           len(expected.server_class), 3,
                           lambda: base_rate * (0.5 if time.monotonic() - started < STEP_AT_S else 3.0),
                           telemetry_interval_s=0.25).start()
        try:
            assert control.process.wait(RUN_S + 30) == 0
            # The last decision may come in the last interval: give every device 20 samples classified after the
            # controller ended (and its retained value had time to arrive) before they are compared with it.
            settled = time.monotonic() + APPLY_GRACE_S
            deadline = settled + 10.0
            while time.monotonic() < deadline and not all(
                    sum(s.device_id == device.device_id and s.sent >= settled for s in list(fleet.samples)) >= 20
                    for device in fleet.devices):
                time.sleep(0.1)
        finally:
            samples = fleet.stop()
            assert server.terminate() == 0, server.output
    log = control.log()
    final = float(re.findall(r"threshold now ([0-9.]+)", log)[-1])
    decisions = re.findall(r"-> threshold ([0-9.]+) \(([^;]+);", log)
    assert decisions, log
    assert all(t0 - 1e-9 <= float(value) <= 1.0 for value, _ in decisions)
    assert any(reason.startswith("over target") for _, reason in decisions), log
    step = started + STEP_AT_S
    before = [s for s in samples if s.sent < step]
    assert before and all(s.threshold == t0 for s in before)  # at 0.5x it held the threshold it started from
    raised = [s.sent for s in samples if s.sent >= step and s.threshold > t0 + 1e-9]
    assert raised, "no device classified with a raised threshold"
    assert raised[0] - step <= BOUND_INTERVALS * INTERVAL_S + 0.5, raised[0] - step
    assert final > t0
    # Every device applied the controller's last threshold (the retained model-wide value).
    for device in fleet.devices:
        last = [s for s in samples if s.device_id == device.device_id and s.sent >= settled]
        assert len(last) >= 20 and {s.threshold for s in last} == {final}, device.device_id
    # And it did what it was for: the offloaded rate in the last 3 s is under the allowed load (0.8 x capacity,
    # with the sampling noise of a few seconds), where at the stored threshold it would be 3x the capacity.
    tail = [s for s in samples if s.sent >= started + RUN_S - 3.0 and s.sent < started + RUN_S]
    offloaded_rate = sum(s.source != "local" for s in tail) / 3.0
    assert offloaded_rate <= 0.8 * CAPACITY * 1.3, offloaded_rate
    assert 0.8 * CAPACITY * 1.3 < 3.0 * CAPACITY * 0.9
    assert all(s.source in ("local", "server") for s in samples)  # nothing lost, nothing refused
    assert curve.accuracy_at(final) < curve.accuracy_at(t0) + 1e-9  # the price, from the calibration curve


def test_control_needs_the_operator_role_on_a_secured_broker(calibrated: Path, fmnist_model_path: Path) -> None:
    from net_harness import secure_broker

    def control(connection: object, seconds: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ddnn_gen", "control", str(calibrated), "--max-load", "0.8",
                               "--capacity", "100", "--interval", "0.2", "--duration", seconds,
                               *connection.runner_args()],  # type: ignore[attr-defined]
                              capture_output=True, text=True, timeout=90)

    with secure_broker({"ops": "operator", "cam1": "device"}) as secure:
        refused = control(secure.connection("cam1"), "1")
        ok = control(secure.connection("ops"), "1")
    assert refused.returncode == 1 and "refused the control's subscriptions" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert ok.returncode == 0, ok.stderr
    assert "ddnngen control: 0 decisions" in ok.stderr  # no devices: nothing to decide, nothing published


def test_control_refuses_what_it_cannot_do(fmnist_model_path: Path, calibrated: Path) -> None:
    def control(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ddnn_gen", "control", *args, "--broker", "127.0.0.1:1"],
                              capture_output=True, text=True, timeout=60)

    for args, message in (([str(fmnist_model_path), "--max-load", "0.8"], "calibrate"),
                          ([str(calibrated)], "exactly one of"),
                          ([str(calibrated), "--max-load", "0.8", "--target-p99-ms", "5"], "exactly one of"),
                          ([str(calibrated), "--max-load", "0.8", "--t-min", "0.6", "--t-max", "0.4"], "above")):
        result = control(*args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
