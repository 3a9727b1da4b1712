"""Big-Little end to end: the generated C device program (little net, its routing rule, raw-input requests) and
a real ddnn-server (the big net) through a real Mosquitto, on 1000 MNIST test images: every sample's class, and
whether the device answered it, equal the Python evaluation's."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, require_tool
from net_harness import SAN_ENV, serving

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.device.samples import write_samples
from ddnn_gen.fold import exits
from ddnn_gen.model import evaluate
from ddnn_gen.model.datasets import Dataset
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire.broker import Broker

N_SAMPLES = 1000


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    require_tool("mosquitto")
    with Broker() as running:
        yield running


@pytest.mark.parametrize("name", ["mnist_bl8_8", "mnist_bl3_8_8"])
def test_c_device_and_server_equal_the_python_evaluation(name: str, broker: Broker, mnist_test: Dataset,
                                                         tmp_path: Path) -> None:
    require_tool("gcc")
    if not Path("/usr/include/MQTTClient.h").exists():
        pytest.skip("Paho C (libpaho-mqtt-dev) not installed")
    model_path = MODELS / f"{name}.npz"
    loaded = load_model(model_path)
    data = mnist_test.subset(N_SAMPLES)
    outputs = exits.compute_outputs(loaded, data)
    answered = evaluate.answering_exit(outputs, loaded.spec.thresholds)
    want_local = answered == 0
    want_class = np.where(want_local, outputs.local_class, outputs.final_class)
    assert 0 < want_local.sum() < N_SAMPLES  # both paths are exercised

    compile_c(model_path, tmp_path / "proj")
    binary = toolchain.build_project(tmp_path / "proj", target="net", sanitize=True)
    samples = tmp_path / "s.ddns"
    write_samples(samples, data.images, data.labels)
    out = tmp_path / "r.csv"
    with serving(broker.address, model_path) as server:
        run = subprocess.run([str(binary), str(samples), "--device-id", f"bl-{name}", "--broker", broker.address,
                              "--timeout-ms", "20000", "-o", str(out)],
                             capture_output=True, text=True, env=SAN_ENV, timeout=600)
        assert run.returncode == 0, run.stderr + server.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == N_SAMPLES
    sources = np.array([row["source"] for row in rows])
    assert set(sources.tolist()) <= {"local", "server"}, run.stderr  # no fallback, no error
    assert np.array_equal(sources == "local", want_local)
    assert np.array_equal(np.array([int(row["final_class"]) for row in rows]), want_class)
    assert [int(row["label"]) for row in rows] == data.labels.tolist()
    # What the little net said, also for the samples it sent on (-1 = "other").
    assert np.array_equal(np.array([int(row["local_class"]) for row in rows]), outputs.local_class)
    assert all(int(row["t_server_us"]) > 0 for row, local in zip(rows, want_local) if not local)
