"""The generated C networked runner (ddnn_device_net, Paho C) against a real Mosquitto and ddnn-server:
every sample answered, classes equal the Python evaluation, live thresholds, broker loss and recovery."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from conftest import require_tool
from net_harness import (
    SAN_ENV,
    Expected,
    ServerProcess,
    device_rows,
    finish_device,
    start_device,
    wait_for,
)

from ddnn_gen.cli import cli
from ddnn_gen.fold.reference import exit_decision
from ddnn_gen.wire import topics
from ddnn_gen.wire.broker import Broker

N_SAMPLES = 1000
SOURCES = {"local", "server", "fallback", "error"}


def _device(net_device_bin: Path, samples: Path, out: Path, broker: Broker, device_id: str, *extra: str
            ) -> subprocess.Popen[str]:
    return start_device(net_device_bin, samples, out, device_id, broker.connection(), *extra)


def test_every_sample_answered_and_equal_to_the_python_evaluation(
        net_device_bin: Path, fmnist_samples_file: Path, broker: Broker, fmnist_expected: Expected,
        fmnist_model_path: Path,
        tmp_path: Path) -> None:
    server = ServerProcess(broker.address, fmnist_model_path, workers=2).start()
    out = tmp_path / "results.csv"
    try:
        stderr = finish_device(_device(net_device_bin, fmnist_samples_file, out, broker, "c-dev-1", "--timeout-ms",
                                       "10000"))
    finally:
        assert server.terminate() == 0
    rows = device_rows(out)
    assert [int(r["index"]) for r in rows] == list(range(N_SAMPLES)), stderr
    threshold = fmnist_expected.program.threshold
    local = np.array([r["exit_local"] == "1" for r in rows])
    assert np.array_equal(local, fmnist_expected.device.local_exit)
    assert np.array_equal([int(r["local_class"]) for r in rows], fmnist_expected.device.local_class)
    sources = [r["source"] for r in rows]
    assert all(s == ("local" if lo else "server") for s, lo in zip(sources, local)), \
        {s: sources.count(s) for s in SOURCES}
    assert np.array_equal([int(r["final_class"]) for r in rows], fmnist_expected.final_class(threshold))
    assert all(float(r["threshold"]) == threshold for r in rows)
    assert 0 < local.sum() < N_SAMPLES  # both paths exercised
    assert server.replies_sent() == N_SAMPLES - int(local.sum())
    server_rows = [r for r in rows if r["source"] == "server"]
    assert all(float(r["t_total_us"]) >= float(r["t_device_us"]) + int(r["t_server_us"]) for r in server_rows)


def test_threshold_broadcast_mid_run_moves_the_exit_rate(net_device_bin: Path, fmnist_samples_file: Path,
                                                         broker: Broker, fmnist_expected: Expected,
                                                         fmnist_model_path: Path, tmp_path: Path) -> None:
    entropy = fmnist_expected.device.entropy
    old = fmnist_expected.program.threshold
    # A new threshold far from the old one: exit rate moves by tens of points.
    new = float(np.quantile(entropy[np.isfinite(entropy)], 0.9 if np.mean(entropy <= old) < 0.6 else 0.2))
    server = ServerProcess(broker.address, fmnist_model_path, workers=1).start()
    out = tmp_path / "results.csv"
    try:
        device = _device(net_device_bin, fmnist_samples_file, out, broker, "c-dev-thr", "--timeout-ms", "10000",
                         "--pace-ms", "2")
        assert wait_for(lambda: len(device_rows(out)) >= 250, timeout_s=60)
        # The CLI in-process: a fresh interpreter importing Chainer on a loaded machine can take longer than
        # the rest of the run, and the change would land after the last sample.
        result = CliRunner().invoke(cli, ["threshold", "set", str(fmnist_model_path), repr(new),
                                          "--broker", broker.address])
        assert result.exit_code == 0, result.output
        stderr = finish_device(device)
    finally:
        server.terminate()
    rows = device_rows(out)
    assert len(rows) == N_SAMPLES
    used = np.array([float(r["threshold"]) for r in rows])
    changed = int(np.argmax(used == new))
    assert used[changed] == new and 250 <= changed < N_SAMPLES - 300, changed
    assert np.all(used[:changed] == old) and np.all(used[changed:] == new)
    assert "threshold changed" in stderr
    after = slice(changed, N_SAMPLES)
    local = np.array([r["exit_local"] == "1" for r in rows])
    reference = exit_decision(entropy[after], new)
    assert abs(local[after].mean() - reference.mean()) <= 0.01
    assert np.array_equal(local[after], reference)  # in fact sample by sample
    assert abs(reference.mean() - exit_decision(entropy[after], old).mean()) > 0.05  # the change mattered
    assert np.array_equal([int(r["final_class"]) for r in rows][changed:], fmnist_expected.final_class(new)[after])
    # A device-specific threshold overrides the model-wide one; clearing it restores the model-wide value.
    topic = topics.threshold_topic(fmnist_expected.loaded.hash_bytes, "c-dev-thr")
    assert topic.endswith("/c-dev-thr")


def test_broker_killed_mid_run_falls_back_then_recovers(net_device_bin: Path, fmnist_samples_file: Path, broker: Broker,
                                                       fmnist_expected: Expected, fmnist_model_path: Path,
                                                       tmp_path: Path) -> None:
    timeout_ms = 400
    server = ServerProcess(broker.address, fmnist_model_path, workers=1).start()
    out = tmp_path / "results.csv"
    try:
        # threshold 0: (almost) every sample goes out
        device = _device(net_device_bin, fmnist_samples_file, out, broker, "c-dev-kill", "--timeout-ms",
                         str(timeout_ms), "--pace-ms", "3", "--threshold", "0")
        assert wait_for(lambda: len(device_rows(out)) >= 150, timeout_s=60)
        broker.kill()
        down_at = len(device_rows(out))
        assert wait_for(lambda: len(device_rows(out)) >= down_at + 100, timeout_s=60)
        broker.start()
        stderr = finish_device(device)
    finally:
        server.terminate()
    rows = device_rows(out)
    assert [int(r["index"]) for r in rows] == list(range(N_SAMPLES)), stderr
    sources = [r["source"] for r in rows]
    fallback = [i for i, s in enumerate(sources) if s == "fallback"]
    assert len(fallback) >= 90, {s: sources.count(s) for s in SOURCES}
    assert sources[:100].count("server") >= 95
    # After the broker is back the device answers through the server again.
    assert sources[fallback[-1] + 1:].count("server") >= 100, stderr
    for i in fallback:
        assert float(rows[i]["t_total_us"]) < (timeout_ms + 250) * 1000
        assert int(rows[i]["final_class"]) == int(rows[i]["local_class"])
    server_final = [(int(r["final_class"]), int(fmnist_expected.server_class[int(r["index"])])) for r in rows
                    if r["source"] == "server"]
    assert all(got == want for got, want in server_final)


def test_device_rejects_bad_arguments(net_device_bin: Path, fmnist_samples_file: Path) -> None:
    for args in ([], [str(fmnist_samples_file)], [str(fmnist_samples_file), "--device-id", "a/b"],
                 [str(fmnist_samples_file), "--device-id", "x", "--broker", "host:notaport"],
                 [str(fmnist_samples_file), "--device-id", "x", "--timeout-ms", "-5"],
                 ["/nonexistent.ddns", "--device-id", "x"]):
        result = subprocess.run([str(net_device_bin), *args], capture_output=True, text=True, timeout=30, env=SAN_ENV)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert "ddnn_device_net" in result.stderr or "ddnn_mqtt" in result.stderr


def test_device_without_broker_answers_every_sample_locally(net_device_bin: Path, fmnist_samples_file: Path,
                                                           tmp_path: Path) -> None:
    from ddnn_gen.wire.broker import free_port

    out = tmp_path / "results.csv"
    started = time.monotonic()
    result = subprocess.run([str(net_device_bin), str(fmnist_samples_file), "--device-id", "lonely", "--broker",
                             f"127.0.0.1:{free_port()}", "--connect-wait-ms", "200", "-o", str(out)],
                            capture_output=True, text=True, timeout=120, env=SAN_ENV)
    assert result.returncode == 0, result.stderr
    rows = device_rows(out)
    assert len(rows) == N_SAMPLES and {r["source"] for r in rows} <= {"local", "fallback"}
    assert time.monotonic() - started < 60


def test_demo_runs_the_whole_path(fmnist_model_path: Path) -> None:
    require_tool("mosquitto")
    from ddnn_gen.bench.demo import run_demo

    report = run_demo(fmnist_model_path, count=300, workers=1, timeout_ms=10000)
    assert report.samples == 300 and report.rates["fallback"] == 0 and report.rates["error"] == 0
    assert report.overall_accuracy == report.expected_overall
    assert abs(sum(report.rates.values()) - 1) < 1e-9
    assert "Overall" in report.table() and report.t_total_us > 0


def test_demo_runs_a_three_tier_model_through_an_edge() -> None:
    require_tool("mosquitto")
    from ddnn_gen.bench.demo import run_demo

    model = Path(__file__).resolve().parents[1] / "models" / "fmnist3_32.npz"
    report = run_demo(model, count=300, workers=2, timeout_ms=10000)
    assert report.samples == 300 and report.rates["fallback"] == 0 and report.rates["error"] == 0
    # Same samples, same thresholds: the networked hierarchy answers exactly as the Python evaluation predicts.
    assert report.overall_accuracy == report.expected_overall
    assert report.answered_by is not None and list(report.answered_by) == ["device", "edge", "cloud"]
    assert all(share > 0 for share in report.answered_by.values())
    assert report.t_edge_us > 0 and report.t_cloud_us > 0 and len(report.t_comm_hops_us) == 2
    # Fewer samples cross the second hop than the first, so it carries fewer bytes per sample on average.
    assert report.hop_bytes[0] > report.hop_bytes[1] > 0
    assert "T_Comm(edge-cloud)" in report.table()
