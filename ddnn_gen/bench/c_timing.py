"""The generated C runner as a timer: build a model's runner, write the samples, read its --bench figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.device.samples import write_samples
from ddnn_gen.fold.program import DeviceProgram


def build_runner(model: str | Path | DeviceProgram, name: str, images: np.ndarray, tmp: Path,
                 cflags: str) -> tuple[Path, Path]:
    """``ddnn_device`` for ``model`` built with ``cflags`` in ``tmp``, and a sample file of ``images``."""
    out = tmp / f"c_{name}_{abs(hash(cflags))}"
    compile_c(model, out)
    binary = toolchain.build_project(out, opt=cflags)
    samples = tmp / f"samples_{name}.bin"
    write_samples(samples, images, np.zeros(len(images), dtype=np.int32))
    return binary, samples


def runner_bench(binary: Path, samples: Path, repeat: int) -> dict[str, float]:
    """The runner's own per-sample times (us): every stage, ``stages_total`` and ``total`` (<name>_infer)."""
    return toolchain.run_runner(binary, samples, bench=True, repeat=repeat).bench
