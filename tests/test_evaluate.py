"""Evaluation definitions (paper's Local/Server/Overall/Ideal) and calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddnn_gen.cli import cli
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import ExitOutputs, calibrate, metrics_at
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.network import predict


def _toy() -> ExitOutputs:
    # 4 samples: exits at t=0.5 are samples 0 and 1; sample 1 is wrong locally.
    return ExitOutputs(labels=np.array([0, 1, 2, 3]), local_class=np.array([0, 0, 2, 0]),
                       entropy=np.array([0.1, 0.2, 0.9, math.nan]), final_class=np.array([0, 1, 1, 3]),
                       split_bytes=100, device_bytes=1000)


def test_metric_definitions() -> None:
    metrics = metrics_at(_toy(), 0.5)
    assert metrics.local_accuracy == 0.25  # exited and correct / all
    assert metrics.server_accuracy == 0.5  # samples 2 (wrong) and 3 (right)
    assert metrics.overall_accuracy == 0.5  # 0 right, 1 wrong, 2 wrong, 3 right
    assert metrics.ideal_accuracy == 1.0  # every sample right at some exit
    assert metrics.local_exit_rate == 0.5 and metrics.server_exit_rate == 0.5
    assert metrics.offload_bytes_per_sample == 50.0
    everything_local = metrics_at(_toy(), 1.0)
    assert everything_local.local_exit_rate == 0.75, "NaN entropy never exits locally"


def test_calibrate_goals() -> None:
    outputs = _toy()
    by_rate = calibrate(outputs, target_exit_rate=0.5)
    assert by_rate.threshold == pytest.approx(0.2) and by_rate.metrics.local_exit_rate == 0.5
    by_accuracy = calibrate(outputs, min_accuracy=0.75)
    # overall is 0.75 at t=0.1 (sample 1 goes to the server), 0.5 at t=0.2, 0.75 again from t=0.9
    # (sample 2 exits locally and is right there): the largest qualifying threshold wins.
    assert by_accuracy.threshold == 1.0 and by_accuracy.metrics.overall_accuracy == 0.75
    unreachable = calibrate(outputs, min_accuracy=0.9)
    assert unreachable.threshold == 0.0 and "unreachable" in unreachable.goal


def test_server_exit_matches_chainer_forward(fmnist_model_path: Path, fmnist_test: datasets.Dataset) -> None:
    """Resuming from the reference's split bits gives the same final class as Chainer end to end."""
    loaded = load_model(fmnist_model_path)
    subset = fmnist_test.subset(500)
    outputs = compute_outputs(loaded, subset)
    _, final_logits = predict(loaded.model, subset.images)
    assert np.array_equal(outputs.final_class, final_logits.argmax(axis=1))


def test_eval_cli_json_and_sweep(tmp_path: Path, fmnist_model_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(fmnist_model_path), "--threshold", "0.4", "0.8", "--count", "400",
                                 "--json", "--sweep", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [row["threshold"] for row in report["results"]] == [0.4, 0.8]
    low, high = report["results"]
    assert high["local_exit_rate"] >= low["local_exit_rate"]
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 52
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_calibrate_cli_stores_threshold(tmp_path: Path, fmnist_model_path: Path) -> None:
    out = tmp_path / "calibrated.npz"
    result = CliRunner().invoke(cli, ["calibrate", str(fmnist_model_path), "--target-exit-rate", "0.7",
                                      "--val-count", "500", "-o", str(out)])
    assert result.exit_code == 0, result.output
    calibrated = load_model(out)
    assert calibrated.content_hash == load_model(fmnist_model_path).content_hash
    train_tail = datasets.load("fashion-mnist", "train").subset(500, offset=59500)
    rate = metrics_at(compute_outputs(calibrated, train_tail), calibrated.spec.threshold).local_exit_rate
    assert rate >= 0.7


def test_calibrate_stores_what_each_threshold_costs(tmp_path: Path, fmnist_model_path: Path) -> None:
    out = tmp_path / "calibrated.npz"
    result = CliRunner().invoke(cli, ["calibrate", str(fmnist_model_path), "--target-exit-rate", "0.6",
                                      "--val-count", "500", "-o", str(out)])
    assert result.exit_code == 0, result.output
    calibrated = load_model(out)
    curve = calibrated.spec.calibration
    assert curve is not None and curve["samples"] == "fashion-mnist train[59500:]"
    assert curve["thresholds"] == [calibrated.spec.threshold]
    (local,) = curve["exits"]
    assert local["exit"] == "local" and len(local["thresholds"]) == 101
    assert local["exit_rate"] == sorted(local["exit_rate"]) and local["exit_rate"][-1] > 0.95
    assert all(abs(a + b - 1) < 1e-5 for a, b in zip(local["exit_rate"], local["onward_rate"]))
    # The curve is the evaluation on those samples: its point nearest the stored threshold agrees.
    train_tail = datasets.load("fashion-mnist", "train").subset(500, offset=59500)
    outputs = compute_outputs(calibrated, train_tail)
    for t, rate, accuracy in list(zip(local["thresholds"], local["exit_rate"], local["overall_accuracy"]))[::10]:
        metrics = metrics_at(outputs, t)
        assert (round(metrics.local_exit_rate, 6), round(metrics.overall_accuracy, 6)) == (rate, accuracy)
    assert calibrated.content_hash == load_model(fmnist_model_path).content_hash  # not part of the identity
