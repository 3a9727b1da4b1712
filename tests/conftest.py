"""Shared fixtures: real datasets (MNIST/CIFAR-10 skip when absent), shipped models, tools; and the markers
that say what a test needs, so `make test-fast` can leave the slow parts out."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ddnn_gen.errors import DatasetError
from ddnn_gen.model import datasets

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


def _load_or_skip(name: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load(name, split)
    except DatasetError as error:
        pytest.skip(f"{name} not available (set DDNN_DATA_DIR): {error}")


@pytest.fixture(scope="session")
def fmnist_test() -> datasets.Dataset:
    # Fashion-MNIST always runs: Debian's dataset-fashion-mnist is part of the setup.
    return datasets.load("fashion-mnist", "test")


@pytest.fixture(scope="session")
def mnist_test() -> datasets.Dataset:
    return _load_or_skip("mnist", "test")


@pytest.fixture(scope="session")
def mnist_train() -> datasets.Dataset:
    return _load_or_skip("mnist", "train")


@pytest.fixture(scope="session")
def cifar_test() -> datasets.Dataset:
    return _load_or_skip("cifar10", "test")


@pytest.fixture(scope="session")
def small_three_tier(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small device + edge + cloud Fashion-MNIST model trained here for one short epoch on real data (a few
    seconds): its exits are weak but disagree, which is what tests of the tiers need."""
    from ddnn_gen.model import zoo
    from ddnn_gen.model.modelfile import load_model, save_model
    from ddnn_gen.model.spec import parse_spec
    from ddnn_gen.model.train import TrainConfig, train

    train_set = datasets.load("fashion-mnist", "train").subset(6000)
    spec = parse_spec(zoo.build("fashion-mnist-3tier", 8))
    result = train(spec, train_set, TrainConfig(epochs=1, batch_size=50, progress=False, seed=3))
    path = tmp_path_factory.mktemp("tiers") / "fmnist3_8.npz"
    save_model(path, result.model)
    return load_model(path)


@pytest.fixture(scope="session")
def fmnist_model_path() -> Path:
    return MODELS / "fmnist_32.npz"


@pytest.fixture(scope="session")
def mnist_model_path() -> Path:
    return MODELS / "mnist_16.npz"


@pytest.fixture(scope="session")
def cifar_model_path() -> Path:
    return MODELS / "cifar10_deep_64.npz"


# What each test module needs beyond Python: a real Mosquitto, or an OpenCL driver (PoCL). Cross builds run
# under qemu-user wherever a test is parametrised over a cross architecture.
BROKER_MODULES = {"test_broker", "test_mqtt_client", "test_server", "test_server_only", "test_server_recovery",
                  "test_device_net", "test_bench_server", "test_bench_system", "test_security", "test_fuzz_server",
                  "test_device_tls", "test_hierarchy_net", "test_plan", "test_plan_bench", "test_metrics_net",
                  "test_telemetry_net", "test_control_net", "test_control_tiers_net", "test_dashboard_net",
                  "test_views_net", "test_views3_secure_net", "test_biglittle_net", "test_scores_first_net",
                  "test_scores_first_c_net", "test_control_devices_net", "test_edge_secure_net", "test_views3_net"}
# A real RabbitMQ cluster (they also start Mosquitto or devices, so they count as broker tests too).
RABBITMQ_MODULES = {"test_rabbitmq_cluster", "test_cluster_net"}
OPENCL_MODULES = {"test_opencl", "test_opencl_host", "test_opencl_shapes"}
CROSS_ARCHS = {"aarch64", "armhf"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if getattr(item, "module", None) else ""  # type: ignore[attr-defined]
        if module in BROKER_MODULES or module in RABBITMQ_MODULES:
            item.add_marker(pytest.mark.broker)
        if module in RABBITMQ_MODULES:
            item.add_marker(pytest.mark.rabbitmq)
        if module in OPENCL_MODULES:
            item.add_marker(pytest.mark.opencl)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("arch") in CROSS_ARCHS:
            item.add_marker(pytest.mark.cross)


NET_SAMPLES = 1000  # Fashion-MNIST test images the networked device tests classify


@pytest.fixture(scope="session")
def net_device_bin(tmp_path_factory: pytest.TempPathFactory, fmnist_model_path: Path) -> Path:
    """The generated networked C runner of the shipped Fashion-MNIST model, built with ASan/UBSan."""
    from ddnn_gen.codegen import toolchain
    from ddnn_gen.codegen.c_target import compile_c

    require_tool("gcc")
    if not Path("/usr/include/MQTTClient.h").exists():
        pytest.skip("Paho C (libpaho-mqtt-dev) not installed")
    out = tmp_path_factory.mktemp("netproj")
    compile_c(fmnist_model_path, out)
    return toolchain.build_project(out, target="net", sanitize=True)


@pytest.fixture(scope="session")
def fmnist_expected(fmnist_test: datasets.Dataset, fmnist_model_path: Path) -> object:
    """What the Python evaluation says about the first NET_SAMPLES test images (net_harness.Expected)."""
    from net_harness import expectations

    return expectations(fmnist_model_path, fmnist_test.images[:NET_SAMPLES])


@pytest.fixture()
def broker() -> Iterator[Any]:
    """A real Mosquitto on a free loopback port for one test (ddnn_gen.wire.broker.Broker)."""
    from ddnn_gen.wire.broker import Broker

    require_tool("mosquitto")
    with Broker() as running:
        yield running


@pytest.fixture(scope="session")
def fmnist_samples_file(tmp_path_factory: pytest.TempPathFactory, fmnist_test: datasets.Dataset) -> Path:
    """The first NET_SAMPLES Fashion-MNIST test images as a sample file for the runners."""
    from ddnn_gen.device.samples import write_samples

    path = tmp_path_factory.mktemp("samples") / "fmnist.ddns"
    write_samples(path, fmnist_test.images[:NET_SAMPLES], fmnist_test.labels[:NET_SAMPLES])
    return path


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make setup installs it)")
    return path


@pytest.fixture(scope="session")
def ci() -> bool:
    return bool(os.environ.get("CI"))
