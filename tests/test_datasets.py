"""Loaders on the real files: counts, shapes, label ranges, and clear errors."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from ddnn_gen.errors import DatasetError
from ddnn_gen.model import datasets


def test_fashion_mnist_from_debian_package(fmnist_test: datasets.Dataset) -> None:
    assert fmnist_test.images.shape == (10000, 1, 28, 28)
    assert fmnist_test.images.dtype == np.uint8
    assert fmnist_test.labels.min() == 0 and fmnist_test.labels.max() == 9
    assert np.bincount(fmnist_test.labels).tolist() == [1000] * 10  # Fashion-MNIST test is balanced
    train = datasets.load("fashion-mnist", "train")
    assert train.images.shape == (60000, 1, 28, 28)


def test_mnist(mnist_test: datasets.Dataset, mnist_train: datasets.Dataset) -> None:
    assert mnist_test.images.shape == (10000, 1, 28, 28)
    assert mnist_train.images.shape == (60000, 1, 28, 28)
    assert set(np.unique(mnist_test.labels)) == set(range(10))
    assert mnist_test.images.max() == 255


def test_cifar10(cifar_test: datasets.Dataset) -> None:
    assert cifar_test.images.shape == (10000, 3, 32, 32)
    assert np.bincount(cifar_test.labels).tolist() == [1000] * 10


def test_missing_dataset_names_what_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DatasetError) as error:
        datasets.load("mnist", "test", tmp_path)
    message = str(error.value)
    assert "t10k-images-idx3-ubyte" in message and str(tmp_path) in message


def test_truncated_idx_file_is_reported(tmp_path: Path, fmnist_test: datasets.Dataset) -> None:
    source = datasets.DEBIAN_FASHION_MNIST
    folder = tmp_path / "mnist"
    folder.mkdir()
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        src = next(source.glob(stem + "*"))
        data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        (folder / stem).write_bytes(data[: len(data) // 2] if "images" in stem else data)
    with pytest.raises(DatasetError, match="images-idx3-ubyte"):
        datasets.load("mnist", "test", tmp_path)


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets.load("imagenet")
    with pytest.raises(DatasetError, match="unknown split"):
        datasets.load("fashion-mnist", "validation")


def test_data_dir_flag_beats_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "flag" / "fashion-mnist"
    folder.mkdir(parents=True)
    for path in datasets.DEBIAN_FASHION_MNIST.glob("t10k-*"):
        shutil.copy(path, folder / path.name)
    monkeypatch.setenv("DDNN_DATA_DIR", str(tmp_path / "nowhere"))
    assert datasets.candidate_dirs("fashion-mnist", tmp_path / "flag")[0] == folder
    assert len(datasets.load("fashion-mnist", "test", tmp_path / "flag")) == 10000
