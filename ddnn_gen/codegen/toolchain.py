"""Build a generated C project with make and run its runner (host, or cross under qemu-user).

Used by tests, benchmarks and ``run-device --impl c``; nothing here is needed on the device.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddnn_gen.errors import DdnnError

log = logging.getLogger(__name__)

# Cross prefix -> (qemu-user binary, sysroot of Debian's cross libc).
CROSS_TARGETS = {
    "aarch64-linux-gnu-": ("qemu-aarch64", "/usr/aarch64-linux-gnu"),
    "arm-linux-gnueabihf-": ("qemu-arm", "/usr/arm-linux-gnueabihf"),
}
WARNING_CFLAGS = ("-Wall", "-Wextra", "-Werror")
OCL_RUNNER = "ddnn_device_ocl"
SANITIZE_CFLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")


class BuildError(DdnnError):
    """The generated project failed to compile, or its runner failed."""


@dataclass
class RunnerOutput:
    label: np.ndarray  # int32 (N,)
    local_class: np.ndarray  # int32 (N,)
    entropy: np.ndarray  # float64 (N,)
    local_exit: np.ndarray  # bool (N,)
    split_words: np.ndarray | None  # uint64 (N, split_words) when requested
    bench: dict[str, float] = field(default_factory=dict)  # stage name / "total" -> us per sample
    stderr: str = ""
    csv_text: str = ""  # the runner's CSV as written


def build_project(out_dir: str | Path, cross: str | None = None, sanitize: bool = False,
                  extra_cflags: Sequence[str] = (), opt: str = "-O2", target: str = "all") -> Path:
    """``make`` the project in ``out_dir`` (warnings are errors); returns the runner's path."""
    out = Path(out_dir)
    cflags = [opt, *WARNING_CFLAGS, *(SANITIZE_CFLAGS if sanitize else ()), *extra_cflags]
    cmd = ["make", "-s", "-B", "-C", str(out), f"CFLAGS={' '.join(cflags)}", target]
    if cross:
        cmd.append(f"CROSS_COMPILE={cross}")
    if sanitize:
        cmd.append(f"LDFLAGS={' '.join(SANITIZE_CFLAGS)}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"building {out} failed ({' '.join(cmd)}):\n{result.stdout}{result.stderr}")
    return out / ("ddnn_device_net" if target == "net" else "ddnn_device")


def runner_command(binary: str | Path, cross: str | None = None) -> list[str]:
    """How to execute a runner built for ``cross`` on this machine (qemu-user for ARM)."""
    if not cross:
        return [str(binary)]
    if cross not in CROSS_TARGETS:
        raise BuildError(f"no qemu mapping for cross prefix {cross!r}; known: {', '.join(CROSS_TARGETS)}")
    qemu, sysroot = CROSS_TARGETS[cross]
    return [qemu, "-L", sysroot, str(binary)]


def parse_bench(stderr: str) -> dict[str, float]:
    bench = {}
    for line in stderr.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "stage" and parts[2].startswith("us_per_sample="):
            bench[parts[1]] = float(parts[2].split("=", 1)[1])
        elif len(parts) == 2 and parts[0] in ("total", "stages_total") and parts[1].startswith("us_per_sample="):
            bench[parts[0]] = float(parts[1].split("=", 1)[1])
    return bench


def run_runner(binary: str | Path, samples_path: str | Path, threshold: float | None = None,
               split_words: int | None = None, bench: bool = False, repeat: int = 1, cross: str | None = None,
               timeout: float = 600.0, extra_args: Sequence[str] = (),
               env: dict[str, str] | None = None) -> RunnerOutput:
    """Run a runner (C ``ddnn_device`` or OpenCL ``ddnn_device_ocl``: same options, same CSV) on a sample
    file and parse its CSV (and split file when ``split_words``)."""
    with tempfile.TemporaryDirectory(prefix="ddnn_run_") as tmp:
        csv_path = Path(tmp) / "results.csv"
        split_path = Path(tmp) / "split.bin"
        cmd = [*runner_command(binary, cross), str(samples_path), "-o", str(csv_path), *extra_args]
        if threshold is not None:
            cmd += ["--threshold", repr(float(threshold))]
        if split_words is not None:
            cmd += ["--split", str(split_path)]
        if bench:
            cmd += ["--bench", "--repeat", str(repeat)]
        run_env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
                       UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        run_env.update(env or {})
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)
        if result.returncode != 0:
            raise BuildError(f"{Path(binary).name} failed with exit code {result.returncode}: {' '.join(cmd)}\n"
                             f"{result.stderr}")
        csv_text = csv_path.read_text(encoding="ascii")
        rows = np.genfromtxt(csv_path, delimiter=",", names=True, dtype=None, encoding="ascii",
                             converters={"entropy": float})
        rows = np.atleast_1d(rows)
        split = None
        if split_words is not None:
            split = np.fromfile(split_path, dtype="<u8").reshape(len(rows), split_words)
    return RunnerOutput(label=rows["label"].astype(np.int32), local_class=rows["class"].astype(np.int32),
                        entropy=rows["entropy"].astype(np.float64), local_exit=rows["exit_local"].astype(bool),
                        split_words=split, bench=parse_bench(result.stderr), stderr=result.stderr,
                        csv_text=csv_text)


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


def build_opencl_runner(out_dir: str | Path, sanitize: bool = False, opt: str = "-O2") -> Path:
    """``make ddnn_device_ocl`` in a project written by ``compile_opencl`` (warnings are errors)."""
    build_project(out_dir, sanitize=sanitize, opt=opt, target=OCL_RUNNER)
    return Path(out_dir) / OCL_RUNNER


def run_opencl_runner(binary: str | Path, samples_path: str | Path, *, threshold: float | None = None,
                      split_words: int | None = None, batch: int = 1, bench: bool = False, repeat: int = 1,
                      extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                      timeout: float = 600.0) -> RunnerOutput:
    """Run ``ddnn_device_ocl`` on a sample file: same options and CSV as the C runner, plus ``--batch``."""
    return run_runner(binary, samples_path, threshold=threshold, split_words=split_words, bench=bench,
                      repeat=repeat, timeout=timeout, extra_args=["--batch", str(batch), *extra_args], env=env)
