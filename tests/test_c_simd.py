"""Every popcount path of the C runtime (c_runtime/ddnn_popcount.h) against the bitwise NumPy reference
on real Fashion-MNIST images: the scalar path (forced with -DDDNN_FORCE_SCALAR), each SIMD path this host
runs (AVX-512 VPOPCNTDQ, AVX2 with AVX-512 switched off), and NEON on aarch64 and armhf under qemu-user.

The models have random weights and BN (tests/test_c_shapes.py builds them) with odd channel counts on
both sides of every binary layer, 1, 31, 32, 33, 63, 64, 65 and 127, so that every path meets partial
vectors and partial words: BConv with and without pool (the AVX-512 path writes unpooled output bits
straight from its counters), stride 2, kernel 5 over two input words (50 steps a pixel: the 8-bit
counters of AVX2 and NEON widen mid-pixel), hidden BLinear layers and the exit. Each build reports the
path it compiled (the runner's ``simd=`` field), so a test never passes on another path than it names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from test_c_shapes import conv, random_model, spec_dict

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c, load_program
from ddnn_gen.codegen.resources import c_runtime_dir
from ddnn_gen.device.samples import write_samples
from ddnn_gen.fold import reference

MODELS = {
    # FConv 31 + pool 2; BConv 31 -> 33 and 33 -> 65 stride 2, both unpooled; 65 -> 127 with kernel 5 over
    # two input words and pool 3/1/1; 127 -> 64 with pool 2/2/0; BLinear 63 and 1; the exit.
    "odd_a": spec_dict("odd_a", 1, 28, 28, [
        conv("conv1", "fconv", 31, pool=(2, 2, 0)),
        conv("conv2", "bconv", 33),
        conv("conv3", "bconv", 65, stride=2),
        conv("conv4", "bconv", 127, ksize=5, pad=2, pool=(3, 1, 1)),
        conv("conv5", "bconv", 64, pool=(2, 2, 0)),
        {"name": "fc1", "type": "blinear", "out_channels": 63},
        {"name": "fc2", "type": "blinear", "out_channels": 1},
    ]),
    # FConv 32; BConv 32 -> 1 (pad 0) and 1 -> 63, unpooled; 63 -> 32 with pool 2/2/0; a 5-class exit.
    "odd_b": spec_dict("odd_b", 1, 28, 28, [
        conv("conv1", "fconv", 32, pool=(1, 1, 0)),
        conv("conv2", "bconv", 1, pad=0),
        conv("conv3", "bconv", 63),
        conv("conv4", "bconv", 32, pool=(2, 2, 0)),
    ], n_classes=5),
}

CROSS = {"aarch64": "aarch64-linux-gnu-", "armhf": "arm-linux-gnueabihf-"}
# What the generated Makefile adds for each cross prefix (ARCH_CFLAGS).
CROSS_ARCH_CFLAGS = {"aarch64-linux-gnu-": (), "arm-linux-gnueabihf-": ("-march=armv7-a", "-mfpu=neon",
                                                                        "-mfloat-abi=hard")}
KERNELS_CHECK = Path(__file__).with_name("simd_kernels_check.c")
SAMPLES = 40


def native_macros() -> set[str]:
    result = subprocess.run(["gcc", "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True,
                            check=True)
    return {line.split()[1] for line in result.stdout.splitlines() if line.startswith("#define ")}


def host_paths() -> dict[str, tuple[str, ...]]:
    """Popcount path -> extra CFLAGS after the Makefile's -march=native, for the paths this host runs."""
    macros = native_macros()
    paths: dict[str, tuple[str, ...]] = {"scalar": ("-DDDNN_FORCE_SCALAR",)}
    if "__AVX2__" in macros:
        paths["avx2-pshufb"] = ("-mno-avx512f",)
    if {"__AVX512F__", "__AVX512VPOPCNTDQ__"} <= macros:
        paths["avx512-vpopcntdq"] = ()
    return paths


def built_path(stderr: str) -> str:
    match = re.search(r"\bsimd=(\S+)", stderr)
    assert match, stderr
    return match.group(1)


@pytest.fixture(scope="module")
def fashion_images(fmnist_test) -> np.ndarray:
    return fmnist_test.images[:SAMPLES]


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory, fashion_images: np.ndarray) -> dict[str, tuple]:
    """Per model: its folded program, generated project folder and sample file."""
    out = {}
    for index, (name, raw) in enumerate(sorted(MODELS.items())):
        tmp = tmp_path_factory.mktemp(name)
        model_path = random_model(raw, tmp / f"{name}.npz", seed=100 + index)
        program = load_program(model_path)
        compile_c(program, tmp / "c")
        samples = tmp / "samples.bin"
        write_samples(samples, fashion_images, np.arange(len(fashion_images), dtype=np.int32))
        out[name] = (program, tmp / "c", samples)
    return out


def check_build(program, project: Path, samples: Path, images: np.ndarray, path: str, cross: str | None = None,
                sanitize: bool = False, extra_cflags: tuple[str, ...] = ()) -> None:
    binary = toolchain.build_project(project, cross=cross, sanitize=sanitize, extra_cflags=extra_cflags)
    entropy = reference.run_device(program, images).entropy
    threshold = float(np.median(entropy))  # both exit decisions occur
    out = toolchain.run_runner(binary, samples, threshold=threshold, split_words=program.split_words, bench=True,
                               cross=cross)
    assert built_path(out.stderr) == path
    ref = reference.run_device(program, images, threshold)
    np.testing.assert_array_equal(out.split_words, ref.split_words.reshape(len(images), -1))
    np.testing.assert_array_equal(out.local_class, ref.local_class)
    np.testing.assert_array_equal(out.local_exit, ref.local_exit)
    np.testing.assert_array_equal(out.entropy, ref.entropy)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("path", ["scalar", "avx2-pshufb", "avx512-vpopcntdq"])
def test_host_path_bit_exact(path: str, model: str, projects, fashion_images: np.ndarray) -> None:
    paths = host_paths()
    if path not in paths:
        pytest.skip(f"this host's -march=native has no {path}")
    program, project, samples = projects[model]
    check_build(program, project, samples, fashion_images, path, sanitize=True, extra_cflags=paths[path])


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("arch", sorted(CROSS))
def test_neon_bit_exact(arch: str, model: str, projects, fashion_images: np.ndarray) -> None:
    cross = CROSS[arch]
    require_tool(cross + "gcc")
    require_tool(toolchain.CROSS_TARGETS[cross][0])
    program, project, samples = projects[model]
    check_build(program, project, samples, fashion_images, "neon-cnt", cross=cross)


def run_kernels_check(tmp: Path, cross: str | None, cflags: tuple[str, ...], sanitize: bool) -> str:
    binary = tmp / "simd_kernels_check"
    arch = CROSS_ARCH_CFLAGS[cross] if cross else ("-march=native",)
    cmd = [f"{cross or ''}gcc", "-std=c99", "-O2", *toolchain.WARNING_CFLAGS, *arch, *cflags,
           *(toolchain.SANITIZE_CFLAGS if sanitize else ()), "-I", str(c_runtime_dir()), "-o", str(binary),
           str(KERNELS_CHECK)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = subprocess.run(toolchain.runner_command(binary, cross), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return built_path(result.stdout)


@pytest.mark.parametrize("path", ["scalar", "avx2-pshufb", "avx512-vpopcntdq"])
def test_host_kernels_on_saturating_words(path: str, tmp_path: Path) -> None:
    """tests/simd_kernels_check.c: all-mismatch and random words through ddnn_mismatches, BConv sums and BConv
    output bits, 1..300 words and 1..256 input x 1..130 output channels, kernels 1/3/5, strides 1/2."""
    paths = host_paths()
    if path not in paths:
        pytest.skip(f"this host's -march=native has no {path}")
    assert run_kernels_check(tmp_path, None, paths[path], sanitize=True) == path


@pytest.mark.parametrize("arch", sorted(CROSS))
def test_neon_kernels_on_saturating_words(arch: str, tmp_path: Path) -> None:
    cross = CROSS[arch]
    require_tool(cross + "gcc")
    require_tool(toolchain.CROSS_TARGETS[cross][0])
    assert run_kernels_check(tmp_path, cross, (), sanitize=False) == "neon-cnt"


def test_models_reach_every_kernel_branch(projects) -> None:
    """The shapes above exercise what they claim: partial and full words and channel groups on both sides of
    the binary layers, unpooled BConv, and a pixel longer than the 8-bit counters' 31 steps."""
    channels = set()
    steps = []
    unpooled = 0
    for program, _, _ in projects.values():
        for layer in program.layers:
            if layer.kind == "fconv":
                continue
            channels |= {layer.in_hwc[2], layer.out_hwc[2]}
            if layer.kind == "bconv":
                steps.append(layer.ksize * layer.ksize * -(-layer.in_hwc[2] // 64))
                unpooled += layer.pool is None or (layer.pool.ksize, layer.pool.stride, layer.pool.pad) == (1, 1, 0)
    assert {1, 31, 32, 33, 63, 64, 65, 127} <= channels
    assert max(steps) > 31 and min(steps) <= 31
    assert unpooled >= 2
