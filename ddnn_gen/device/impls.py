"""The registry of device-part implementations (`ddnngen run-device --impl`): each runs a DeviceProgram on
uint8 images (N, C, H, W) and returns per-sample ``local_class``, ``entropy``, ``local_exit`` and
``split_words`` (a ddnn_gen.fold.reference.DeviceResult has them). All of them give the same answers; the
NumPy reference defines what correct is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram

# run(program, images_u8_NCHW, threshold) -> object with local_class, entropy, local_exit, split_words
DeviceFn = Callable[[DeviceProgram, np.ndarray, "float | None"], Any]


@dataclass(frozen=True)
class Impl:
    name: str
    function: DeviceFn
    help: str


def _numpy(program: DeviceProgram, images_u8: np.ndarray, threshold: float | None = None) -> Any:
    return reference.run_device(program, images_u8, threshold)


def _c(program: DeviceProgram, images_u8: np.ndarray, threshold: float | None = None) -> Any:
    from ddnn_gen.device import c_binding

    return c_binding.load(program).run(images_u8, threshold)


def _c_runner(program: DeviceProgram, images_u8: np.ndarray, threshold: float | None = None) -> Any:
    from ddnn_gen.device.c_runner import run_device_c

    return run_device_c(program, images_u8, threshold)


def _opencl(program: DeviceProgram, images_u8: np.ndarray, threshold: float | None = None) -> Any:
    from ddnn_gen.device.opencl import run_device

    return run_device(program, images_u8, threshold)


IMPLS = {impl.name: impl for impl in (
    Impl("numpy", _numpy, "the bitwise NumPy reference (the definition of correct)"),
    Impl("c", _c, "the generated C, built for this host and called in-process (cffi)"),
    Impl("c-runner", _c_runner, "the generated C runner program, built for this host and run on a sample file"),
    Impl("opencl", _opencl, "the generated OpenCL kernels through PyOpenCL (all layers)"),
)}


def device_impls() -> dict[str, Impl]:
    return dict(IMPLS)
