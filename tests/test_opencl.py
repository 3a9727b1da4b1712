"""The OpenCL kernels through PyOpenCL (PoCL here) against the bitwise NumPy reference on the
shipped models and real test sets, plus the Python path's error handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddnn_gen.codegen.opencl_target import parse_opencl_layers, render_kernels
from ddnn_gen.errors import CompileError, OpenCLError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model

pytest.importorskip("pyopencl")

from ddnn_gen.device.opencl import OpenCLDevice  # noqa: E402  (needs pyopencl)

CI_SAMPLES = 500


@pytest.fixture(scope="module")
def fmnist_program(fmnist_model_path: Path) -> DeviceProgram:
    return fold(load_model(fmnist_model_path))


@pytest.fixture(scope="module")
def mnist_program(mnist_model_path: Path) -> DeviceProgram:
    return fold(load_model(mnist_model_path))


def assert_same_as_reference(program: DeviceProgram, images: np.ndarray, opencl_layers: str = "all") -> None:
    expected_layers = reference.device_activations(program, images)
    want = reference.run_device(program, images)
    with OpenCLDevice(program, opencl_layers=opencl_layers) as device:
        layers, sums = device.activations(images)
        got = device.run(images)
    for layer, out, exp in zip(program.layers, layers, expected_layers):
        assert np.array_equal(out, exp), f"layer {layer.name} differs on {opencl_layers}"
    assert np.array_equal(sums, want.exit_sums)
    assert np.array_equal(got.split_words, want.split_words)
    assert np.array_equal(got.local_class, want.local_class)
    assert np.array_equal(got.local_exit, want.local_exit)
    # Same integer sums and the same host code give the same doubles, bit for bit.
    assert np.array_equal(got.entropy, want.entropy, equal_nan=True)


def test_fmnist_subset_bit_exact(fmnist_program: DeviceProgram, fmnist_test: datasets.Dataset) -> None:
    assert_same_as_reference(fmnist_program, fmnist_test.images[:CI_SAMPLES])


def test_mnist_subset_bit_exact(mnist_program: DeviceProgram, mnist_test: datasets.Dataset) -> None:
    assert_same_as_reference(mnist_program, mnist_test.images[:CI_SAMPLES])


@pytest.mark.parametrize("placement", ["none", "conv1", "conv2", "auto", "conv2,local"])
def test_mixed_placement_bit_exact(fmnist_program: DeviceProgram, fmnist_test: datasets.Dataset,
                                   placement: str) -> None:
    assert_same_as_reference(fmnist_program, fmnist_test.images[:100], placement)


@pytest.mark.slow
def test_fmnist_full_test_set_bit_exact(fmnist_program: DeviceProgram, fmnist_test: datasets.Dataset) -> None:
    assert_same_as_reference(fmnist_program, fmnist_test.images)


@pytest.mark.slow
def test_mnist_full_test_set_bit_exact(mnist_program: DeviceProgram, mnist_test: datasets.Dataset) -> None:
    assert_same_as_reference(mnist_program, mnist_test.images)


def test_kernels_are_portable_opencl_c(fmnist_program: DeviceProgram) -> None:
    """No fp64, no extensions, no printf: the source must build on GPU drivers without cl_khr_fp64."""
    source = render_kernels(fmnist_program)
    for token in ("double", "#pragma OPENCL EXTENSION", "printf", "pocl", "atomic"):
        assert token not in source, token


def test_broken_kernel_reports_build_log(fmnist_program: DeviceProgram) -> None:
    broken = render_kernels(fmnist_program).replace("ulong bits = 0;", "ulong bits = 0 this_is_not_c;", 1)
    with pytest.raises(OpenCLError) as info:
        OpenCLDevice(fmnist_program, source=broken)
    message = str(info.value)
    assert "failed to build" in message
    assert "error:" in message and "expected ';'" in message  # PoCL's (clang's) build log


def test_unknown_device_lists_available(fmnist_program: DeviceProgram) -> None:
    with pytest.raises(OpenCLError, match="no OpenCL device matches 'no-such-gpu'.*available: 0: "):
        OpenCLDevice(fmnist_program, device="no-such-gpu")
    with pytest.raises(OpenCLError, match="no OpenCL platform matches '7'"):
        OpenCLDevice(fmnist_program, platform="7")


def test_no_platform_says_how_to_install_pocl(tmp_path: Path) -> None:
    """With an empty ICD vendor folder the loader finds no platform: one clear line, no traceback."""
    env = dict(os.environ, OCL_ICD_VENDORS=str(tmp_path))
    code = "from ddnn_gen.device.opencl import select_device\nselect_device()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no OpenCL platform found" in result.stderr
    assert "pocl-opencl-icd" in result.stderr


@pytest.mark.parametrize(("value", "expected"), [("all", (True, True, True)), ("none", (False, False, False)),
                                                 ("conv2", (False, True, False)),
                                                 (" conv1 , conv2 ", (True, True, False)),
                                                 ("conv2,local", (False, True, True)),
                                                 ("auto", (False, False, False)), (None, (False, False, False))])
def test_parse_opencl_layers(fmnist_program: DeviceProgram, value: str | None, expected: tuple[bool, ...]) -> None:
    """auto (the default) keeps all of fmnist on C: each stage takes the C runtime less time than one
    OpenCL stage costs (see docs/opencl_target.md)."""
    assert parse_opencl_layers(value, fmnist_program) == expected


@pytest.mark.parametrize("value", ["conv3", "", ",", "conv1,fc9", "conv1,local"])
def test_parse_opencl_layers_rejects_unknown(fmnist_program: DeviceProgram, value: str) -> None:
    with pytest.raises(CompileError, match="--opencl-layers"):
        parse_opencl_layers(value, fmnist_program)


def test_run_device_three_impls_identical_csv(fmnist_model_path: Path, tmp_path: Path) -> None:
    """`ddnngen run-device --impl numpy|c|opencl`: the same CSV bytes from all three."""
    outputs = {}
    for impl in ("numpy", "c", "opencl"):
        out = tmp_path / f"{impl}.csv"
        result = subprocess.run([sys.executable, "-m", "ddnn_gen", "run-device", str(fmnist_model_path), "--impl",
                                 impl, "--dataset", "fashion-mnist", "--count", "150", "--offset", "25",
                                 "--threshold", "0.4", "-o", str(out)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        outputs[impl] = out.read_bytes()
    assert outputs["numpy"].count(b"\n") == 151
    assert outputs["c"] == outputs["numpy"]
    assert outputs["opencl"] == outputs["numpy"]


def test_auto_placement_rule(fmnist_program: DeviceProgram) -> None:
    """auto = stage on OpenCL iff its estimated C time reaches the measured per-stage overhead,
    the exit only with the last layer; a layer 20x fmnist's conv1 goes to OpenCL."""
    from dataclasses import replace

    from ddnn_gen.codegen.opencl_target import OPENCL_STAGE_OVERHEAD_US, auto_placement, estimated_c_us

    costs = estimated_c_us(fmnist_program)
    flags = auto_placement(fmnist_program)
    assert list(flags[:-1]) == [cost >= OPENCL_STAGE_OVERHEAD_US for cost in costs[:-1]]
    assert not flags[-1]
    conv1 = fmnist_program.layers[0]
    big = replace(conv1, out_hwc=(conv1.out_hwc[0], conv1.out_hwc[1], 320),
                  weights=np.ones((320,) + conv1.weights.shape[1:], np.int8))
    big_program = replace(fmnist_program, layers=(big,) + fmnist_program.layers[1:])
    assert estimated_c_us(big_program)[0] >= OPENCL_STAGE_OVERHEAD_US
    assert auto_placement(big_program)[0]
