"""The DDNS sample file: round trip, layout on disk, and clear errors for malformed files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddnn_gen.cli import cli
from ddnn_gen.device.samples import HEADER_BYTES, SampleFileError, read_samples, write_samples


def test_round_trip_and_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 4, 6), dtype=np.uint8)
    labels = np.array([0, 9, -1, 3, 2**31 - 1], dtype=np.int32)
    path = tmp_path / "s.bin"
    size = write_samples(path, images, labels)
    data = path.read_bytes()
    assert size == len(data) == HEADER_BYTES + 5 * (4 + 3 * 4 * 6)
    assert data[:4] == b"DDNS" and struct.unpack_from("<5I", data, 4) == (1, 5, 4, 6, 3)
    # First record: label, then pixels in HWC order.
    assert struct.unpack_from("<i", data, HEADER_BYTES)[0] == 0
    first = np.frombuffer(data, np.uint8, count=72, offset=HEADER_BYTES + 4)
    np.testing.assert_array_equal(first, images[0].transpose(1, 2, 0).ravel())
    back_images, back_labels = read_samples(path)
    np.testing.assert_array_equal(back_images, images)
    np.testing.assert_array_equal(back_labels, labels)


def test_empty_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    write_samples(path, np.zeros((0, 1, 28, 28), np.uint8), np.zeros(0, np.int32))
    images, labels = read_samples(path)
    assert images.shape == (0, 1, 28, 28) and labels.shape == (0,)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:-1], "needs"),
    (lambda d: d + b"x", "needs"),
    (lambda d: d[:7], "too short"),
    (lambda d: b"NOPE" + d[4:], "magic"),
    (lambda d: d[:4] + struct.pack("<I", 7) + d[8:], "version 7"),
])
def test_malformed_files(tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "s.bin"
    write_samples(path, np.zeros((2, 1, 3, 3), np.uint8), np.zeros(2, np.int32))
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(SampleFileError, match=message):
        read_samples(path)


def test_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(SampleFileError, match="uint8"):
        write_samples(tmp_path / "a.bin", np.zeros((2, 1, 3, 3), np.float32), np.zeros(2))
    with pytest.raises(SampleFileError, match="one label per image"):
        write_samples(tmp_path / "a.bin", np.zeros((2, 1, 3, 3), np.uint8), np.zeros(3))
    with pytest.raises(SampleFileError, match="cannot read"):
        read_samples(tmp_path / "missing.bin")


def test_export_samples_command(fmnist_test, tmp_path: Path) -> None:
    out = tmp_path / "fm.bin"
    result = CliRunner().invoke(cli, ["export-samples", "--dataset", "fashion-mnist", "--split", "test",
                                      "--count", "20", "--offset", "5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    images, labels = read_samples(out)
    np.testing.assert_array_equal(images, fmnist_test.images[5:25])
    np.testing.assert_array_equal(labels, fmnist_test.labels[5:25])
    result = CliRunner().invoke(cli, ["export-samples", "--dataset", "fashion-mnist", "--count", "0", "-o", str(out)])
    assert result.exit_code == 2
    result = CliRunner().invoke(cli, ["export-samples", "--dataset", "fashion-mnist", "--offset", "10000",
                                      "-o", str(out)])
    assert result.exit_code == 2 and "past the end" in result.output
