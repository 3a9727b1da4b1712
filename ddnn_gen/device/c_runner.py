"""The generated C device program as a subprocess: compile, build (host, or cross under qemu-user), run on a
sample file. Bit-exact tests across targets (ARM under qemu) and the benchmarks use it; in-process calls go
through the cffi binding (device/c_binding.py) instead."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.codegen.toolchain import RunnerOutput, build_project, run_runner
from ddnn_gen.device.samples import write_samples
from ddnn_gen.fold.program import DeviceProgram


def run_device_c(program: DeviceProgram, images_u8: np.ndarray, threshold: float | None = None,
                 labels: np.ndarray | None = None, cross: str | None = None, opt: str = "-O2") -> RunnerOutput:
    """Compile ``program`` (a DeviceProgram) to C in a temporary folder, build it, run it on
    ``images_u8`` (N, C, H, W) and return the runner's per-sample results and split words."""
    images_u8 = np.asarray(images_u8, dtype=np.uint8)
    labels = np.full(len(images_u8), -1, dtype=np.int32) if labels is None else labels
    with tempfile.TemporaryDirectory(prefix="ddnn_c_") as tmp:
        compile_c(program, tmp)
        binary = build_project(tmp, cross=cross, opt=opt)
        samples_path = Path(tmp) / "samples.bin"
        write_samples(samples_path, images_u8, labels)
        return run_runner(binary, samples_path, threshold=threshold,
                          split_words=program.split_words, cross=cross)
