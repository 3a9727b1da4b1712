"""Shared fixtures: real datasets (MNIST/CIFAR-10 skip when absent), shipped models, tools."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
def fmnist_model_path() -> Path:
    return MODELS / "fmnist_32.npz"


@pytest.fixture(scope="session")
def mnist_model_path() -> Path:
    return MODELS / "mnist_16.npz"


@pytest.fixture(scope="session")
def cifar_model_path() -> Path:
    return MODELS / "cifar10_deep_64.npz"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make setup installs it)")
    return path


@pytest.fixture(scope="session")
def ci() -> bool:
    return bool(os.environ.get("CI"))
