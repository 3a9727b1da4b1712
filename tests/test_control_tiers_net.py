"""`ddnngen control --tier edge` on a running three-tier fleet (real Mosquitto, an edge and a cloud ddnn-server,
open-loop simulated devices on real Fashion-MNIST): when the load the edge sends the cloud steps over the
target, the controller raises the edge exit's threshold (never outside [t_min, t_max]), the edge applies the
retained value, and the share of the edge's requests that the cloud answers falls to what the calibration
curve and `ddnngen eval` predict at that threshold (+-2 points)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MODELS, require_tool
from net_harness import ControlProcess, ServerProcess, wait_for

from ddnn_gen.bench.load_ramp import PacedFleet
from ddnn_gen.device.simulated import precomputed
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.fold.program import fold
from ddnn_gen.fold.reference import run_device
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import answering_exit
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.ops.controller import Curve
from ddnn_gen.wire.broker import Broker

log = logging.getLogger(__name__)

MODEL = MODELS / "fmnist3_32.npz"
N_SAMPLES = 4000
CAPACITY = 30.0  # requests/s the controller is told the cloud sustains (the real one does far more)
MAX_LOAD = 0.8
INTERVAL_S = 0.5
STEP_AT_S = 4.0
RUN_S = 18.0
P99_RUN_S = 8.0  # each p99-mode controller's run
P99_RATE = 300.0  # samples/s over the p99 test's devices
TAIL_S = 6.0  # after the controller stops, its last (retained) value stays: the shares are measured then


@pytest.fixture(scope="module")
def setting(fmnist_test: datasets.Dataset) -> dict[str, Any]:
    loaded = load_model(MODEL)
    data = fmnist_test.subset(N_SAMPLES)
    program = fold(loaded)
    device = run_device(program, data.images)
    return {"loaded": loaded, "program": program, "device": device, "outputs": compute_outputs(loaded, data),
            "full": compute_outputs(loaded, fmnist_test)}


def test_cloud_overload_raises_the_edge_threshold_and_the_cloud_share_falls_to_the_curve(
        setting: dict[str, Any]) -> None:
    require_tool("mosquitto")
    loaded, program, device, outputs = setting["loaded"], setting["program"], setting["device"], setting["outputs"]
    t_device, t_edge = loaded.spec.thresholds
    curve = Curve.for_hop(loaded.spec.calibration, 1)
    reaching = float(np.mean(answering_exit(outputs, (t_device, t_edge)) >= 1))
    cloud_share = curve.onward_at(t_edge)  # of the requests reaching the edge, at its stored threshold
    # Samples/s that offer the cloud 3x the allowed load at the stored edge threshold (0.5x before the step).
    base_rate = MAX_LOAD * CAPACITY / (reaching * cloud_share)
    part = precomputed(device.split_words, device.entropy, device.local_class)
    t_max = 0.9
    with Broker() as broker:
        cloud = ServerProcess(broker.address, MODEL, workers=1, server_id="cloud-1",
                              extra=["--telemetry-interval", "0.5"]).start()
        edge = ServerProcess(broker.address, MODEL, workers=1, server_id="edge-1",
                             extra=["--role", "edge", "--telemetry-interval", "0.5"]).start()
        control = ControlProcess(str(MODEL), "--tier", "edge", "--max-load", str(MAX_LOAD), "--capacity",
                                 str(CAPACITY), "--t-min", repr(t_edge), "--t-max", str(t_max), "--interval",
                                 str(INTERVAL_S), "--duration", str(RUN_S), "--broker", broker.address)
        assert control.running.wait(60), control.log()
        started = time.monotonic()
        fleet = PacedFleet(broker.connection(), program, loaded.hash_bytes, part, N_SAMPLES, 3,
                           lambda: base_rate * (0.5 if time.monotonic() - started < STEP_AT_S else 3.0),
                           telemetry_interval_s=0.5).start()
        try:
            assert control.process.wait(RUN_S + 30) == 0, control.log()
            stopped = time.monotonic()
            time.sleep(TAIL_S)
        finally:
            samples = fleet.stop()
            assert edge.terminate() == 0, edge.output
            assert cloud.terminate() == 0, cloud.output
    said = control.log()
    assert "tier 1 (edge) against tier 2's load" in said, said
    final = float(re.findall(r"threshold now ([0-9.]+)", said)[-1])
    decisions = re.findall(r"control tier 1: .* -> threshold ([0-9.]+) \(([^;]+);", said)
    assert decisions, said
    assert all(t_edge - 1e-4 <= float(value) <= t_max + 1e-9 for value, _ in decisions), decisions
    assert any(reason.startswith("over target") for _, reason in decisions), said
    assert final > t_edge + 0.05, final
    # The edge applied the controller's value (its own log of the retained tier threshold) ...
    applied = [float(v) for v in re.findall(r"threshold on ddnn/tier-threshold/[0-9a-f]+/1 now ([0-9.]+)",
                                            edge.output)]
    assert applied and abs(applied[-1] - final) < 1e-4, (applied, final)
    # ... the devices' own threshold never moved (this controller moves the edge's exit only) ...
    assert {s.threshold for s in samples} == {program.threshold}
    assert all(s.source in ("local", "server") for s in samples)  # nothing lost, nothing refused
    # ... and the settled share of the edge's requests the cloud answers is the curve's at that threshold.
    tail = [s for s in samples if s.sent >= stopped + 0.5 and s.answered_by >= 1]
    assert len(tail) > 200, len(tail)
    got = float(np.mean([s.answered_by == 2 for s in tail]))
    want_exit = answering_exit(outputs, (t_device, final))
    eval_same = float(np.mean([want_exit[s.index] == 2 for s in tail]))  # eval on exactly these samples
    full = setting["full"]
    full_exit = answering_exit(full, (t_device, final))
    eval_full = float(np.mean(full_exit[full_exit >= 1] == 2))  # eval on the whole test set
    predicted = curve.onward_at(final)
    log.info("edge threshold %.4f -> %.4f; cloud share of the edge's requests %.4f (eval on those %.4f, on the test "
             "set %.4f, curve %.4f; at the stored threshold the curve says %.4f); cloud %.1f req/s", t_edge, final, got,
             eval_same, eval_full, predicted, cloud_share, sum(s.answered_by == 2 for s in tail) / (TAIL_S - 0.5))
    assert abs(got - eval_same) <= 0.02, (got, eval_same, decisions)
    assert abs(eval_full - predicted) <= 0.02, (eval_full, predicted)
    assert predicted < cloud_share - 0.2, (predicted, cloud_share)  # the cloud's share did fall
    # The cloud's load in the tail is under the allowed load (with a few seconds' sampling noise), where at the
    # stored edge threshold it would be 3x of it.
    cloud_rate = sum(s.answered_by == 2 for s in tail) / (TAIL_S - 0.5)
    assert cloud_rate <= MAX_LOAD * CAPACITY * 1.3, cloud_rate
    assert curve.accuracy_at(final) <= curve.accuracy_at(t_edge) + 1e-9  # the price, from the calibration curve


def test_p99_mode_raises_the_edge_threshold_when_over_and_lowers_it_with_room(setting: dict[str, Any]) -> None:
    """--target-p99-ms on the edge's exit, against the cloud's receipt-to-reply p99 in its telemetry: a target no
    cloud can keep (0.1 ms) makes the controller raise the edge threshold (never past --t-max), one far above
    any p99 (60 s) makes it come down from where it starts (--threshold); the edge applies each controller's last
    value."""
    require_tool("mosquitto")
    loaded, program, device, outputs = setting["loaded"], setting["program"], setting["device"], setting["outputs"]
    t_device, t_edge = loaded.spec.thresholds
    t_max = 0.9
    part = precomputed(device.split_words, device.entropy, device.local_class)
    # The cloud's load at the stored thresholds, and a capacity whose starting allowed load (0.8 of it) is well
    # above that load and whose floor (0.1 of it) well under: only the p99 rule can make the controller raise.
    cloud_load = P99_RATE * float(np.mean(answering_exit(outputs, (t_device, t_edge)) == 2))
    capacity = 3.5 * cloud_load

    def run(broker: Broker, edge: ServerProcess, target_ms: str, *extra: str) -> tuple[list[tuple[float, str]], float]:
        control = ControlProcess(str(MODEL), "--tier", "edge", "--target-p99-ms", target_ms, "--capacity",
                                 str(capacity), "--t-min", repr(t_edge), "--t-max", str(t_max), "--interval",
                                 str(INTERVAL_S), "--duration", str(P99_RUN_S), "--broker", broker.address, *extra)
        assert control.process.wait(P99_RUN_S + 60) == 0, control.log()
        said = control.log()
        assert f": p99 under {float(target_ms)} ms" in said, said
        decisions = [(float(value), reason) for value, reason in
                     re.findall(r"control tier 1: .* -> threshold ([0-9.]+) \(([^;]+);", said)]
        assert decisions, said
        allowed.append([float(a) for a in re.findall(r"control tier 1: .* req/s of ([0-9.]+) allowed", said)])
        assert all(t_edge - 1e-4 <= value <= t_max + 1e-9 for value, _ in decisions), decisions
        final = float(re.findall(r"threshold now ([0-9.]+)", said)[-1])
        pattern = r"threshold on ddnn/tier-threshold/[0-9a-f]+/1 now ([0-9.]+)"
        assert wait_for(lambda: abs(float((re.findall(pattern, edge.output) or ["nan"])[-1]) - final) < 1e-4,
                        timeout_s=10), (edge.output[-2000:], final)
        return decisions, final

    allowed: list[list[float]] = []
    with Broker() as broker:
        cloud = ServerProcess(broker.address, MODEL, workers=1, server_id="cloud-1",
                              extra=["--telemetry-interval", "0.5"]).start()
        edge = ServerProcess(broker.address, MODEL, workers=1, server_id="edge-1",
                             extra=["--role", "edge", "--telemetry-interval", "0.5"]).start()
        fleet = PacedFleet(broker.connection(), program, loaded.hash_bytes, part, N_SAMPLES, 3, lambda: P99_RATE,
                           telemetry_interval_s=0.5).start()
        try:
            over, raised = run(broker, edge, "0.1")
            room, lowered = run(broker, edge, "60000", "--threshold", str(t_max))
        finally:
            samples = fleet.stop()
            assert edge.terminate() == 0, edge.output
            assert cloud.terminate() == 0, cloud.output
    assert any(reason.startswith("over target") for _, reason in over), over
    assert raised > t_edge + 0.05, (raised, over)
    # It was the p99 that cut the allowed load (multiplicatively, down to the floor), not the load itself.
    assert allowed[0] and min(allowed[0]) < 0.5 * 0.8 * capacity, (allowed[0], capacity)
    assert any(reason.startswith("room") for _, reason in room), room
    assert lowered < t_max - 0.05, (lowered, room)
    assert all(s.source in ("local", "server") for s in samples)  # nothing lost, nothing refused


def test_control_tier_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    def control(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ddnn_gen", "control", *args, "--max-load", "0.8",
                               "--broker", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)

    for args, message in (([str(MODEL), "--tier", "cloud"], "last"),
                          ([str(MODEL), "--tier", "nosuch"], "has no tier"),
                          ([str(MODEL), "--tier", "edge", "--per-device"], "model-wide")):
        result = control(*args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
