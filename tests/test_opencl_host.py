"""The generated OpenCL host program (`ddnngen compile --target opencl`, runner ddnn_device_ocl) on
PoCL: same CSV and split bytes as the C runner and the same decisions as the NumPy reference,
every placement, random shapes, no leaked OpenCL objects, ASan/UBSan clean, clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool

from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.codegen.opencl_target import compile_opencl
from ddnn_gen.codegen.toolchain import (
    OCL_RUNNER,
    BuildError,
    build_opencl_runner,
    build_project,
    run_opencl_runner,
    run_runner,
)
from ddnn_gen.device.samples import write_samples
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model

CI_SAMPLES = 500


def _have_opencl_headers() -> bool:
    return any(Path(folder, "CL", "cl.h").exists() for folder in ("/usr/include", "/usr/local/include"))


pytestmark = pytest.mark.skipif(not _have_opencl_headers(), reason="OpenCL headers missing (opencl-headers, "
                                "ocl-icd-opencl-dev)")


@dataclass
class Built:
    program: DeviceProgram
    folder: Path
    ocl: Path  # ddnn_device_ocl
    c: Path  # ddnn_device, built from the same project


def build(program: DeviceProgram, folder: Path, opencl_layers: str = "all", sanitize: bool = False) -> Built:
    require_tool("make")
    compile_opencl(program, folder, opencl_layers=opencl_layers)
    ocl = build_opencl_runner(folder, sanitize=sanitize)
    return Built(program, folder, ocl, folder / "ddnn_device")


def samples_file(folder: Path, name: str, data: datasets.Dataset, count: int | None = None) -> Path:
    path = folder / f"{name}.bin"
    images, labels = (data.images, data.labels) if count is None else (data.images[:count], data.labels[:count])
    write_samples(path, images, labels)
    return path


def assert_matches_c_and_reference(built: Built, samples: Path, images: np.ndarray, batch: int = 1,
                                   threshold: float | None = None) -> None:
    program = built.program
    got = run_opencl_runner(built.ocl, samples, threshold=threshold, split_words=program.split_words, batch=batch)
    want = reference.run_device(program, images, threshold)
    assert np.array_equal(got.split_words, want.split_words.reshape(len(images), -1))
    assert np.array_equal(got.local_class, want.local_class)
    assert np.array_equal(got.local_exit, want.local_exit)
    assert np.array_equal(got.entropy, want.entropy, equal_nan=True)  # %.17g round-trips doubles exactly
    if not built.c.exists():
        build_project(built.folder)
    c_out = run_runner(built.c, samples, threshold=threshold, split_words=program.split_words)
    assert np.array_equal(got.split_words, c_out.split_words)
    assert np.array_equal(got.local_class, c_out.local_class)
    assert np.array_equal(got.local_exit, c_out.local_exit)
    assert np.array_equal(got.entropy, c_out.entropy, equal_nan=True)


@pytest.fixture(scope="module")
def fmnist_program(fmnist_model_path: Path) -> DeviceProgram:
    return fold(load_model(fmnist_model_path))


@pytest.fixture(scope="module")
def fmnist_built(fmnist_program: DeviceProgram, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(fmnist_program, tmp_path_factory.mktemp("ocl_fmnist"))


@pytest.fixture(scope="module")
def fmnist_samples(fmnist_built: Built, fmnist_test: datasets.Dataset) -> Path:
    return samples_file(fmnist_built.folder, "subset", fmnist_test, CI_SAMPLES)


@pytest.mark.parametrize("batch", [1, 64])
def test_fmnist_subset_same_as_c_and_reference(fmnist_built: Built, fmnist_samples: Path,
                                               fmnist_test: datasets.Dataset, batch: int) -> None:
    assert_matches_c_and_reference(fmnist_built, fmnist_samples, fmnist_test.images[:CI_SAMPLES], batch)


def test_csv_and_split_bytes_identical_to_c(fmnist_built: Built, fmnist_samples: Path, tmp_path: Path) -> None:
    """Batched (with a partial last batch) and per-sample runs write the C runner's exact bytes."""
    build_project(fmnist_built.folder)
    subprocess.run([str(fmnist_built.c), str(fmnist_samples), "-o", str(tmp_path / "c.csv"), "--split",
                    str(tmp_path / "c.split"), "--threshold", "0.3"], check=True, capture_output=True)
    for batch in ("1", "37"):
        subprocess.run([str(fmnist_built.ocl), str(fmnist_samples), "-o", str(tmp_path / "o.csv"), "--split",
                        str(tmp_path / "o.split"), "--threshold", "0.3", "--batch", batch], check=True,
                       capture_output=True)
        assert (tmp_path / "o.csv").read_bytes() == (tmp_path / "c.csv").read_bytes()
        assert (tmp_path / "o.split").read_bytes() == (tmp_path / "c.split").read_bytes()


def test_mnist_subset_same_as_c_and_reference(mnist_model_path: Path, mnist_test: datasets.Dataset,
                                              tmp_path: Path) -> None:
    built = build(fold(load_model(mnist_model_path)), tmp_path)
    samples = samples_file(tmp_path, "subset", mnist_test, CI_SAMPLES)
    assert_matches_c_and_reference(built, samples, mnist_test.images[:CI_SAMPLES], batch=16)


@pytest.mark.parametrize("placement", ["none", "conv1", "conv2", "auto"])
def test_placements_same_as_c(fmnist_program: DeviceProgram, fmnist_test: datasets.Dataset, tmp_path: Path,
                              placement: str) -> None:
    built = build(fmnist_program, tmp_path, opencl_layers=placement)
    header = (tmp_path / f"{fmnist_program.spec.name}_ocl_model.h").read_text()
    assert f"--opencl-layers {placement}" in header
    samples = samples_file(tmp_path, "s", fmnist_test, 100)
    assert_matches_c_and_reference(built, samples, fmnist_test.images[:100], batch=8)


@pytest.mark.slow
def test_fmnist_full_test_set(fmnist_built: Built, fmnist_test: datasets.Dataset) -> None:
    samples = samples_file(fmnist_built.folder, "full", fmnist_test)
    assert_matches_c_and_reference(fmnist_built, samples, fmnist_test.images, batch=1)


@pytest.mark.slow
def test_mnist_full_test_set(mnist_model_path: Path, mnist_test: datasets.Dataset, tmp_path: Path) -> None:
    built = build(fold(load_model(mnist_model_path)), tmp_path)
    samples = samples_file(tmp_path, "full", mnist_test)
    assert_matches_c_and_reference(built, samples, mnist_test.images, batch=1)


@pytest.mark.slow
def test_cifar_full_test_set(cifar_model_path: Path, cifar_test: datasets.Dataset, tmp_path: Path) -> None:
    """The CIFAR-10 deep device part (FConv 3->64 on 32x32): batched, with its layers on OpenCL."""
    built = build(fold(load_model(cifar_model_path)), tmp_path)
    samples = samples_file(tmp_path, "full", cifar_test)
    assert_matches_c_and_reference(built, samples, cifar_test.images, batch=64)


def test_random_shapes_same_as_c_and_reference(tmp_path: Path) -> None:
    from test_opencl_shapes import SHAPE_SPECS, build_random_model, random_images

    for index, (name, raw) in enumerate(SHAPE_SPECS.items()):
        program = fold(load_model(build_random_model(raw, tmp_path / f"{name}.npz", seed=index)))
        images = random_images(program, 30, 5)
        threshold = float(np.median(reference.run_device(program, images).entropy))
        for placement in ("all", program.layers[-1].name):
            folder = tmp_path / f"{name}_{placement}"
            built = build(program, folder, opencl_layers=placement)
            samples = folder / "s.bin"
            write_samples(samples, images, np.zeros(len(images), dtype=np.int32))
            assert_matches_c_and_reference(built, samples, images, batch=7, threshold=threshold)


# ---- resources: no leaked OpenCL objects, ASan/UBSan/LSan clean ---------------------------------

# Counts OpenCL objects created and released by the runner (LD_PRELOAD interposer over the ICD
# loader). LeakSanitizer cannot see a forgotten clRelease*: PoCL keeps every live object
# reachable from its own globals, so the counts are the real leak check for OpenCL objects.
COUNT_SHIM = r"""
#define _GNU_SOURCE
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <dlfcn.h>
#include <stdio.h>
static long created[5], released[5], launches;
static const char *const kinds[5] = {"buffer", "kernel", "program", "queue", "context"};
#define NEXT(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))
cl_mem clCreateBuffer(cl_context c, cl_mem_flags f, size_t s, void *h, cl_int *e)
{ cl_mem m = NEXT(clCreateBuffer)(c, f, s, h, e); if (m) ++created[0]; return m; }
cl_int clReleaseMemObject(cl_mem m) { ++released[0]; return NEXT(clReleaseMemObject)(m); }
cl_kernel clCreateKernel(cl_program p, const char *n, cl_int *e)
{ cl_kernel k = NEXT(clCreateKernel)(p, n, e); if (k) ++created[1]; return k; }
cl_int clReleaseKernel(cl_kernel k) { ++released[1]; return NEXT(clReleaseKernel)(k); }
cl_program clCreateProgramWithSource(cl_context c, cl_uint n, const char **s, const size_t *l, cl_int *e)
{ cl_program p = NEXT(clCreateProgramWithSource)(c, n, s, l, e); if (p) ++created[2]; return p; }
cl_int clReleaseProgram(cl_program p) { ++released[2]; return NEXT(clReleaseProgram)(p); }
cl_command_queue clCreateCommandQueue(cl_context c, cl_device_id d, cl_command_queue_properties p, cl_int *e)
{ cl_command_queue q = NEXT(clCreateCommandQueue)(c, d, p, e); if (q) ++created[3]; return q; }
cl_int clReleaseCommandQueue(cl_command_queue q) { ++released[3]; return NEXT(clReleaseCommandQueue)(q); }
cl_context clCreateContext(const cl_context_properties *p, cl_uint n, const cl_device_id *d,
                           void (CL_CALLBACK *f)(const char *, const void *, size_t, void *), void *u, cl_int *e)
{ cl_context c = NEXT(clCreateContext)(p, n, d, f, u, e); if (c) ++created[4]; return c; }
cl_int clReleaseContext(cl_context c) { ++released[4]; return NEXT(clReleaseContext)(c); }
cl_int clEnqueueNDRangeKernel(cl_command_queue q, cl_kernel k, cl_uint d, const size_t *o, const size_t *g,
                              const size_t *l, cl_uint n, const cl_event *w, cl_event *ev)
{ ++launches; return NEXT(clEnqueueNDRangeKernel)(q, k, d, o, g, l, n, w, ev); }
__attribute__((destructor)) static void report(void)
{
    int i;
    for (i = 0; i < 5; ++i)
        fprintf(stderr, "oclcount %s created=%ld released=%ld\n", kinds[i], created[i], released[i]);
    fprintf(stderr, "oclcount launches=%ld\n", launches);
}
"""


def _counts(stderr: str) -> dict[str, tuple[int, int]]:
    counts = {}
    for line in stderr.splitlines():
        parts = line.split()
        if parts[:1] == ["oclcount"] and len(parts) == 4:
            counts[parts[1]] = (int(parts[2].split("=")[1]), int(parts[3].split("=")[1]))
        elif parts[:1] == ["oclcount"]:
            counts["launches"] = (int(parts[1].split("=")[1]), 0)
    return counts


def test_opencl_objects_created_once_and_all_released(fmnist_built: Built, fmnist_test: datasets.Dataset,
                                                      tmp_path: Path) -> None:
    compiler = require_tool("gcc")
    shim = tmp_path / "oclcount.so"
    (tmp_path / "oclcount.c").write_text(COUNT_SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(shim), str(tmp_path / "oclcount.c"), "-ldl"],
                   check=True, capture_output=True)
    per_size = {}
    for count in (1, 200):
        samples = samples_file(tmp_path, f"s{count}", fmnist_test, count)
        result = subprocess.run([str(fmnist_built.ocl), str(samples), "-o", str(tmp_path / "o.csv")],
                                capture_output=True, text=True, env=dict(os.environ, LD_PRELOAD=str(shim)),
                                timeout=300)
        assert result.returncode == 0, result.stderr
        per_size[count] = _counts(result.stderr)
    for kind in ("buffer", "kernel", "program", "queue", "context"):
        created, released = per_size[200][kind]
        assert created == released, f"{kind}: {created} created, {released} released"
        assert per_size[1][kind] == per_size[200][kind], f"{kind} count grows with the number of samples"
    assert per_size[200]["buffer"][0] > 0 and per_size[200]["kernel"][0] == len(fmnist_built.program.layers) + 1
    assert per_size[1]["launches"][0] == len(fmnist_built.program.layers) + 1  # fmnist: no split pool kernels
    assert per_size[200]["launches"][0] == 200 * per_size[1]["launches"][0]  # batch 1: one launch per kernel


def test_asan_ubsan_lsan_clean_over_200_samples(fmnist_program: DeviceProgram, fmnist_test: datasets.Dataset,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sanitized host program over 200 samples: any ASan/UBSan report or leak fails the run
    (run_opencl_runner enables detect_leaks; a sanitizer report exits non-zero)."""
    samples = samples_file(tmp_path, "s", fmnist_test, 200)
    # PoCL compiles kernels with LLVM on first use, and LLVM keeps ~1.5 MB for the life of the process,
    # which LeakSanitizer reports (none of it ours). Compile once, unsanitized, into a private PoCL
    # cache: the sanitized runs then load the kernel binaries, and the leak check sees our code and
    # PoCL's runtime only, without a suppression file that could also hide our own leaks.
    monkeypatch.setenv("POCL_CACHE_DIR", str(tmp_path / "pocl-cache"))
    warm = build(fmnist_program, tmp_path / "warm")
    for batch in (1, 64):
        run_opencl_runner(warm.ocl, samples, split_words=fmnist_program.split_words, batch=batch)
    built = build(fmnist_program, tmp_path / "sanitized", sanitize=True)
    for batch in (1, 64):
        got = run_opencl_runner(built.ocl, samples, split_words=fmnist_program.split_words, batch=batch)
        assert "Sanitizer" not in got.stderr and "runtime error" not in got.stderr
        want = reference.run_device(fmnist_program, fmnist_test.images[:200])
        assert np.array_equal(got.local_class, want.local_class)
        assert np.array_equal(got.split_words, want.split_words.reshape(200, -1))


# ---- errors ------------------------------------------------------------------------------------

def test_no_platform_says_how_to_install_pocl(fmnist_built: Built, fmnist_samples: Path, tmp_path: Path) -> None:
    empty = tmp_path / "vendors"
    empty.mkdir()
    result = subprocess.run([str(fmnist_built.ocl), str(fmnist_samples)], capture_output=True, text=True,
                            env=dict(os.environ, OCL_ICD_VENDORS=str(empty)), timeout=120)
    assert result.returncode == 1
    assert "no OpenCL platform found" in result.stderr
    assert "apt-get install pocl-opencl-icd" in result.stderr
    assert result.stdout == ""  # nothing half-written


def test_broken_kernel_prints_build_log(fmnist_program: DeviceProgram, fmnist_samples: Path, tmp_path: Path) -> None:
    compile_opencl(fmnist_program, tmp_path)
    header = tmp_path / "fmnist_32_ocl_kernels.h"
    text = header.read_text()
    anchor = "static const char fmnist_32_ocl_kernel_source[] =\n"
    assert anchor in text
    header.write_text(text.replace(anchor, anchor + '    "this is not OpenCL C;\\n"\n', 1))
    binary = build_opencl_runner(tmp_path)
    result = subprocess.run([str(binary), str(fmnist_samples)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "clBuildProgram" in result.stderr and "CL_BUILD_PROGRAM_FAILURE" in result.stderr
    assert "kernel build log:" in result.stderr
    assert "error:" in result.stderr.split("kernel build log:", 1)[1]


def test_unknown_device_and_bad_arguments(fmnist_built: Built, fmnist_samples: Path) -> None:
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(fmnist_built.ocl), str(fmnist_samples), *args], capture_output=True, text=True,
                              env=dict(os.environ, **(env or {})), timeout=120)

    result = run("--device", "no-such-gpu")
    assert result.returncode == 1 and "no OpenCL device matches 'no-such-gpu'" in result.stderr
    assert "available: 0: " in result.stderr
    result = run(env={"DDNN_OCL_PLATFORM": "9"})
    assert result.returncode == 1 and "no OpenCL platform matches '9'" in result.stderr
    for args in (("--batch", "0"), ("--batch", "65"), ("--batch", "x"), ("--threshold", "nan"), ("--bogus",)):
        result = run(*args)
        assert result.returncode == 2, args
        assert "ddnn_device_ocl:" in result.stderr


def test_runner_error_is_reported(fmnist_built: Built, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"DDNS" + b"\x00" * 10)
    with pytest.raises(BuildError, match="exit code 1"):
        run_opencl_runner(fmnist_built.ocl, bad)


def test_cli_compile_opencl_and_option_errors(fmnist_model_path: Path, tmp_path: Path) -> None:
    ddnngen = [sys.executable, "-m", "ddnn_gen"]
    result = subprocess.run([*ddnngen, "compile", str(fmnist_model_path), "--target", "opencl", "-o",
                             str(tmp_path / "p"), "--opencl-layers", "conv2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "opencl: wrote" in result.stdout
    assert (tmp_path / "p" / "fmnist_32_ocl_kernels.cl").exists() and (tmp_path / "p" / "ddnn_runner_ocl.c").exists()
    assert '"c",\n    "opencl",\n    "c",\n};' in (tmp_path / "p" / "fmnist_32_ocl_model.c").read_text()
    result = subprocess.run([*ddnngen, "compile", str(fmnist_model_path), "--target", "opencl", "-o",
                             str(tmp_path / "q"), "--opencl-layers", "conv9"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "--opencl-layers 'conv9'" in result.stderr and "unknown: conv9" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([*ddnngen, "compile", str(fmnist_model_path), "--target", "c", "-o",
                             str(tmp_path / "r"), "--opencl-layers", "all"], capture_output=True, text=True)
    assert result.returncode != 0 and "does not apply to --target c" in result.stderr


def test_c_target_projects_do_not_need_opencl(fmnist_program: DeviceProgram, tmp_path: Path) -> None:
    """The C target ships no OpenCL host file and its Makefile never names one."""
    compile_c(fmnist_program, tmp_path)
    shipped = {path.name for path in tmp_path.iterdir()}
    for name in ("ocl_runtime.c", "ocl_runtime.h", "ddnn_ocl_api.h", "ddnn_runner_ocl.c"):
        assert name not in shipped
    assert not any("ocl" in name for name in shipped), shipped
    makefile = (tmp_path / "Makefile").read_text()
    assert "ocl_runtime" not in makefile and OCL_RUNNER not in makefile
    shutil.rmtree(tmp_path)
