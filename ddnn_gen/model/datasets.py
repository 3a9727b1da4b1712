"""Loaders for MNIST, Fashion-MNIST (idx, optionally gzipped) and CIFAR-10 (binary batches).

Images come back as uint8 arrays shaped (N, C, H, W): the device part consumes the raw
8-bit pixels (see ``spec.InputSpec.scale``), so no float normalisation happens here.

Where the files are looked for, in order: the ``data_dir`` argument (CLI ``--data-dir``),
the ``DDNN_DATA_DIR`` environment variable, the user cache dir (``~/.cache/ddnngen``), and
for Fashion-MNIST Debian's ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddnn_gen.errors import DatasetError

DATASETS = ("mnist", "fashion-mnist", "cifar10")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
    "cifar10": [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ],
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_BIN = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_CIFAR_PICKLE = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_RECORD = 1 + 3 * 32 * 32


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset: uint8 images (N, C, H, W) and int32 labels (N,)."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray

    @property
    def class_names(self) -> list[str]:
        return CLASS_NAMES[self.name]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, count: int | None, offset: int = 0) -> Dataset:
        end = None if count is None else offset + count
        return Dataset(self.name, self.split, self.images[offset:end], self.labels[offset:end])


def candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for dataset ``name``, most specific first."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    env = os.environ.get("DDNN_DATA_DIR")
    if env:
        roots.append(Path(env))
    roots.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddnngen")
    subdirs = {
        "mnist": ["mnist"],
        "fashion-mnist": ["fashion-mnist", "fashion_mnist"],
        "cifar10": ["cifar10/cifar-10-batches-bin", "cifar-10-batches-bin",
                    "cifar10/cifar-10-batches-py", "cifar-10-batches-py", "cifar10"],
    }[name]
    dirs = [root / sub for root in roots for sub in subdirs]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def load(name: str, split: str = "test", data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load ``split`` ("train" or "test") of dataset ``name``."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; use 'train' or 'test'")
    dirs = candidate_dirs(name, data_dir)
    for folder in dirs:
        if name == "cifar10":
            found = _load_cifar_dir(folder, split)
        else:
            found = _load_idx_dir(folder, split)
        if found is not None:
            images, labels = found
            return Dataset(name, split, images, labels)
    wanted = (" + ".join(_CIFAR_BIN[split]) + " (or python pickles)" if name == "cifar10"
              else " + ".join(f + "[.gz]" for f in _IDX_FILES[split]))
    searched = ", ".join(str(d) for d in dirs)
    hint = ("install Debian's dataset-fashion-mnist or pass --data-dir"
            if name == "fashion-mnist" else "pass --data-dir or set DDNN_DATA_DIR")
    raise DatasetError(f"{name} {split} split not found ({hint}): looked for {wanted} in {searched}")


def _open_maybe_gz(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (uint8 data only, as used by MNIST-style datasets)."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated idx header ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not a uint8 idx file (magic {raw[:4].hex()})")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DatasetError(f"{path}: truncated idx header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header_end])
    expected = int(np.prod(shape))
    if len(raw) - header_end != expected:
        raise DatasetError(
            f"{path}: expected {expected} data bytes for shape {shape}, found {len(raw) - header_end} "
            "(truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def _load_idx_dir(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    image_stem, label_stem = _IDX_FILES[split]
    image_path = _open_maybe_gz(folder, image_stem)
    label_path = _open_maybe_gz(folder, label_stem)
    if image_path is None or label_path is None:
        return None
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{folder}: image shape {images.shape} and label shape {labels.shape} do not match")
    if labels.max(initial=0) > 9:
        raise DatasetError(f"{label_path}: label {labels.max()} out of range 0..9")
    return images[:, None, :, :].copy(), labels.astype(np.int32)


def _load_cifar_dir(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    bin_paths = [folder / f for f in _CIFAR_BIN[split]]
    if all(p.is_file() for p in bin_paths):
        parts = [_read_cifar_bin(p) for p in bin_paths]
    else:
        pickle_paths = [folder / f for f in _CIFAR_PICKLE[split]]
        if not all(p.is_file() for p in pickle_paths):
            return None
        parts = [_read_cifar_pickle(p) for p in pickle_paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise DatasetError(
            f"{path}: size {len(raw)} is not a multiple of the {_CIFAR_RECORD}-byte CIFAR-10 record "
            "(truncated or corrupt file)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int32)
    if labels.max() > 9:
        raise DatasetError(f"{path}: label {labels.max()} out of range 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int32)
    except (OSError, pickle.UnpicklingError, KeyError, EOFError, TypeError) as exc:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if data.shape[1:] != (3072,) or data.shape[0] != labels.shape[0]:
        raise DatasetError(f"{path}: unexpected data shape {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels
