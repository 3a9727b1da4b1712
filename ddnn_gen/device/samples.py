"""The binary sample file the C runner reads (`ddnngen export-samples`).

Little-endian. Header (24 bytes): magic ``DDNS``, uint32 version (1), uint32 count, uint32
height, uint32 width, uint32 channels. Then ``count`` records: int32 label followed by
height * width * channels uint8 pixels in HWC order (the device's layout, so the runner
feeds records to ``<name>_infer`` as they are). Reader: ``c_runtime/ddnn_samples.c``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ddnn_gen.errors import DdnnError

MAGIC = b"DDNS"
VERSION = 1
_HEADER = struct.Struct("<4s5I")
HEADER_BYTES = _HEADER.size


class SampleFileError(DdnnError):
    """A sample file is missing, truncated or not in the DDNS format."""


def _records(images_u8: np.ndarray, labels: np.ndarray) -> np.ndarray:
    images = np.asarray(images_u8)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise SampleFileError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise SampleFileError(f"need one label per image: {len(images)} images, labels shaped {labels.shape}")
    count, channels, height, width = images.shape
    record = np.dtype([("label", "<i4"), ("pixels", np.uint8, (height * width * channels,))])
    out = np.empty(count, dtype=record)
    out["label"] = labels.astype("<i4")
    out["pixels"] = images.transpose(0, 2, 3, 1).reshape(count, height * width * channels)
    return out


def write_samples(path: str | Path, images_u8: np.ndarray, labels: np.ndarray) -> int:
    """Write images (N, C, H, W) uint8 and labels (N,); returns the number of bytes written."""
    records = _records(images_u8, labels)
    _, channels, height, width = np.asarray(images_u8).shape
    header = _HEADER.pack(MAGIC, VERSION, len(records), height, width, channels)
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(header)
            handle.write(records.tobytes())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SampleFileError(f"{path}: cannot write the sample file ({exc.strerror})") from exc
    return HEADER_BYTES + records.nbytes


def read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`write_samples`: images (N, C, H, W) uint8 and labels int32."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SampleFileError(f"{path}: cannot read sample file ({exc.strerror})") from exc
    if len(data) < HEADER_BYTES:
        raise SampleFileError(f"{path}: too short for a sample file header ({HEADER_BYTES} bytes)")
    magic, version, count, height, width, channels = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SampleFileError(f"{path}: not a ddnn sample file (magic is not DDNS)")
    if version != VERSION:
        raise SampleFileError(f"{path}: sample file version {version} is not supported (reads {VERSION})")
    pixels = height * width * channels
    expected = HEADER_BYTES + count * (4 + pixels)
    if len(data) != expected:
        raise SampleFileError(f"{path}: file is {len(data)} bytes but a header announcing {count} samples of "
                              f"{height}x{width}x{channels} needs {expected}")
    record = np.dtype([("label", "<i4"), ("pixels", np.uint8, (pixels,))])
    records = np.frombuffer(data, dtype=record, offset=HEADER_BYTES, count=count)
    images = records["pixels"].reshape((count, height, width, channels)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), records["label"].astype(np.int32)
