"""Smoke test of the whole-system benchmark: one model, few samples, one small workload, real Mosquitto,
real C device program and real ddnn-server. Checks every field is there and the numbers agree with
each other and with ddnn_gen.model.evaluate on the same samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import require_tool

from ddnn_gen.bench.report import write_report
from ddnn_gen.bench.system import BenchConfig, clean_json, load_model_data, publish_packet_bytes, run_bench, write_json
from ddnn_gen.model import evaluate

SAMPLES = 60
VIEWS_MODEL = Path(__file__).resolve().parent.parent / "models" / "views" / "fmnist_views_16.npz"
TIME_KEYS = ("device", "server", "comm", "total", "total_offloaded")


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory: pytest.TempPathFactory, fmnist_model_path: Path) -> dict:
    require_tool("gcc")
    require_tool("mosquitto")
    if not Path("/usr/include/MQTTClient.h").exists():
        pytest.skip("Paho C (libpaho-mqtt-dev) not installed")
    out = tmp_path_factory.mktemp("bench")
    # The multi-view model is not driven through the system runs, but its request sizes are reported.
    config = BenchConfig(models=[fmnist_model_path, VIEWS_MODEL], out_dir=out, samples=SAMPLES, thresholds=(0.4,),
                         workloads=(2,), rates=(20, 40), step_s=0.5)
    result = run_bench(config)
    write_json(result, out / "bench_system.json")
    files = write_report(clean_json(result), out)
    for path in files.values():
        assert path.stat().st_size > 0
    tables = files["tables"].read_text()
    assert "Request bytes per split sent" in tables and "| fmnist_views_16 | device (view 3 of 4) |" in tables
    return json.loads((out / "bench_system.json").read_text())


def test_every_field_is_there(bench_result: dict) -> None:
    assert {"environment", "config", "models", "workloads", "wall_s", "server_peak_rss_bytes"} <= set(bench_result)
    env = bench_result["environment"]
    assert len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3
    (model,) = bench_result["models"]
    assert {"name", "content_hash", "calibrated_threshold", "encoding", "sweep", "runs"} <= set(model)
    (skipped,) = bench_result["skipped_models"]
    assert skipped["path"] == str(VIEWS_MODEL) and "multi-view" in skipped["reason"]
    # Issue 18's bound, from the encoder: ceil(bits / 8) + 64 for the system run's model and each camera.
    encoding = model["encoding"]
    assert encoding["split_request_bytes"] == (encoding["split_values"] + 7) // 8 + 64
    sizes = bench_result["request_sizes"]
    assert [row["model"] for row in sizes] == ["fmnist_32"] + ["fmnist_views_16"] * 4
    assert all(row["request_bytes"] <= row["bound_bytes"] == (row["split_bits"] + 7) // 8 + 64 for row in sizes)
    configurations = [(run["configuration"], run["threshold"]) for run in model["runs"]]
    assert ("Server-only", None) in configurations
    assert ("Device&Server", 0.4) in configurations
    assert ("Device&Server", model["calibrated_threshold"]) in configurations
    for run in model["runs"]:
        assert set(run["times_us"]) == set(TIME_KEYS)
        for key in TIME_KEYS:
            assert {"mean", "p50", "p99", "n"} <= set(run["times_us"][key])
        assert {"local", "server", "overall", "ideal"} <= set(run["accuracy"])
        assert {"local", "server", "fallback", "error"} == set(run["exit_rates"])
        assert {"payload_bytes_per_sample", "mqtt_publish_bytes_per_sample", "requests", "replies"} <= set(run["wire"])
        assert run["server_cpu_utilisation"] is not None and run["server_cpu_utilisation"] >= 0
        assert "devices_supported" in run
    (load,) = bench_result["workloads"]
    assert load["models"] == 2 and load["random_copies"] == 1 and len(set(load["model_files"])) == 2
    assert load["peak_rss_bytes"] >= load["idle_rss_bytes"] > 0
    assert load["steps"] and all("server_cpu_utilisation" in step for step in load["steps"])


def test_numbers_are_consistent(bench_result: dict) -> None:
    (model,) = bench_result["models"]
    for run in model["runs"]:
        assert run["samples"] == SAMPLES
        assert math.isclose(sum(run["exit_rates"].values()), 1.0, abs_tol=1e-9)
        times = run["times_us"]
        assert times["total"]["mean"] >= times["device"]["mean"]
        per = run["mean_per_sample_us"]
        assert math.isclose(per["device"] + per["server"] + per["comm"], per["total"], rel_tol=1e-6, abs_tol=1e-3)
        assert run["exit_rates"]["fallback"] == 0 and run["exit_rates"]["error"] == 0
        assert run["mismatches_vs_python"] == 0
        offloaded = round(run["exit_rates"]["server"] * SAMPLES)
        assert run["wire"]["requests"] == run["wire"]["replies"] == offloaded
        if offloaded:
            assert times["comm"]["mean"] > 0 and times["server"]["mean"] > 0
            assert run["wire"]["payload_bytes_per_offloaded_sample"] == pytest.approx(
                (64 + (784 if run["threshold"] is None else model["encoding"]["split_bits_payload_bytes"]))
                + model["encoding"]["reply_payload_bytes"])
        if run["threshold"] is None:
            assert run["exit_rates"]["server"] == 1.0
            assert times["device"]["p99"] < 1000  # the device computes nothing in server-only
    (load,) = bench_result["workloads"]
    ok = [step for step in load["steps"] if step["ok"]]
    assert load["sustained_rate"] == (ok[-1]["offered_rate"] if ok else 0.0)


def test_accuracies_equal_python_evaluation(bench_result: dict, fmnist_model_path: Path) -> None:
    data = load_model_data(fmnist_model_path, SAMPLES, None)
    (model,) = bench_result["models"]
    for run in model["runs"]:
        if run["threshold"] is None:
            expected_overall = float((data.full_model_class == data.labels).mean())
            assert run["accuracy"]["overall"] == pytest.approx(expected_overall)
            continue
        metrics = evaluate.metrics_at(data.outputs, run["threshold"])
        assert run["accuracy"]["local"] == pytest.approx(metrics.local_accuracy)
        assert run["accuracy"]["overall"] == pytest.approx(metrics.overall_accuracy)
        assert run["accuracy"]["ideal"] == pytest.approx(metrics.ideal_accuracy)
        if math.isnan(metrics.server_accuracy):
            assert run["accuracy"]["server"] is None
        else:
            assert run["accuracy"]["server"] == pytest.approx(metrics.server_accuracy)
        assert run["exit_rates"]["local"] == pytest.approx(metrics.local_exit_rate)


def test_publish_packet_size() -> None:
    # fixed header 1 + remaining-length 1; topic 2+5; packet id 2; empty property section 1; payload 10
    assert publish_packet_bytes("ddnn/", 10) == 2 + 7 + 2 + 1 + 10
    # remaining length 208 needs a two-byte varint
    assert publish_packet_bytes("t", 200) == 1 + 2 + 3 + 2 + 1 + 200


def test_secure_bench_runs_everything_over_tls_with_per_role_identities(tmp_path: Path,
                                                                         fmnist_model_path: Path) -> None:
    """`ddnngen bench --secure`: C devices, load devices, server and the byte counter each log in as
    themselves on a TLS broker with the deployment's rules; the answers are the same as without."""
    require_tool("gcc")
    require_tool("mosquitto")
    require_tool("openssl")
    config = BenchConfig(models=[fmnist_model_path], out_dir=tmp_path, samples=SAMPLES, thresholds=(),
                         workloads=(2,), rates=(20,), step_s=0.5, multi_blas_w1=False, secure=True)
    result = run_bench(config)
    assert result["config"]["secure"] is True
    (model,) = result["models"]
    for run in model["runs"]:
        assert run["mismatches_vs_python"] == 0
        assert run["exit_rates"]["fallback"] == 0 and run["exit_rates"]["error"] == 0
        assert run["wire"]["requests"] == run["wire"]["replies"] > 0  # the monitor saw every request and reply
    (load,) = result["workloads"]
    assert load["steps"][0]["lost"] == 0 and load["steps"][0]["errors"] == 0
