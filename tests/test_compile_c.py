"""The generated C program against the bitwise NumPy reference on real test data: host build
(warnings are errors), ASan + UBSan, aarch64 and armhf under qemu-user, and bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_tool

from ddnn_gen.cli import cli
from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c, load_program
from ddnn_gen.device.samples import write_samples
from ddnn_gen.errors import CompileError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram

CROSS = {"aarch64": "aarch64-linux-gnu-", "armhf": "arm-linux-gnueabihf-"}


@dataclasses.dataclass
class Project:
    program: DeviceProgram
    out: Path


def _project(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    program = load_program(model_path)
    out = tmp_path_factory.mktemp(program.spec.name)
    compile_c(program, out)
    return Project(program, out)


@pytest.fixture(scope="module")
def fmnist_project(fmnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    return _project(fmnist_model_path, tmp_path_factory)


@pytest.fixture(scope="module")
def cifar_project(cifar_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    return _project(cifar_model_path, tmp_path_factory)


@pytest.fixture(scope="module")
def mnist_project(mnist_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    return _project(mnist_model_path, tmp_path_factory)


def _samples(tmp: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    path = tmp / f"samples_{len(images)}.bin"
    write_samples(path, images, labels)
    return path


def assert_matches_reference(program: DeviceProgram, images: np.ndarray, out: toolchain.RunnerOutput,
                             threshold: float | None = None) -> reference.DeviceResult:
    ref = reference.run_device(program, images, threshold)
    np.testing.assert_array_equal(out.local_class, ref.local_class)
    np.testing.assert_array_equal(out.local_exit, ref.local_exit)
    assert out.split_words is not None
    np.testing.assert_array_equal(out.split_words, ref.split_words.reshape(len(images), -1))
    # exp and log are built from IEEE arithmetic (c_runtime/ddnn_exit.c, reference.exp_ieee): the entropy
    # is bit-identical on every target, not only close.
    np.testing.assert_array_equal(out.entropy, ref.entropy)
    return ref


def _check(project: Project, images: np.ndarray, labels: np.ndarray, tmp: Path, cross: str | None = None,
           sanitize: bool = False, threshold: float | None = None) -> toolchain.RunnerOutput:
    build_dir = tmp / f"build_{cross or 'host'}_{int(sanitize)}"
    compile_c(project.program, build_dir)
    binary = toolchain.build_project(build_dir, cross=cross, sanitize=sanitize)
    out = toolchain.run_runner(binary, _samples(tmp, images, labels), threshold=threshold,
                            split_words=project.program.split_words, cross=cross)
    np.testing.assert_array_equal(out.label, labels)
    assert_matches_reference(project.program, images, out, threshold)
    return out


def test_fmnist_host_bit_exact(fmnist_project: Project, fmnist_test, tmp_path: Path) -> None:
    data = fmnist_test.subset(1000)
    out = _check(fmnist_project, data.images, data.labels, tmp_path)
    assert 0 < out.local_exit.sum() < len(data), "the test must see both exit decisions"


def test_mnist_host_bit_exact(mnist_project: Project, mnist_test, tmp_path: Path) -> None:
    data = mnist_test.subset(1000)
    _check(mnist_project, data.images, data.labels, tmp_path)


def test_threshold_override_and_exact_tie(fmnist_project: Project, fmnist_test, tmp_path: Path) -> None:
    data = fmnist_test.subset(200)
    ref = reference.run_device(fmnist_project.program, data.images)
    # A threshold equal to a sample's entropy: that sample exits (<=), the slightly larger one not.
    tie = float(np.sort(ref.entropy)[100])
    out = _check(fmnist_project, data.images, data.labels, tmp_path, threshold=tie)
    assert out.local_exit.sum() == 101
    for threshold in (0.0, 0.2, 1.0):
        binary = toolchain.build_project(tmp_path / "build_host_0")
        out = toolchain.run_runner(binary, _samples(tmp_path, data.images, data.labels), threshold=threshold,
                                split_words=fmnist_project.program.split_words)
        assert_matches_reference(fmnist_project.program, data.images, out, threshold)


def test_sanitizers_clean(fmnist_project: Project, fmnist_test, tmp_path: Path) -> None:
    """ASan + UBSan (no recovery: any report aborts the runner and fails the test) on 500 samples."""
    data = fmnist_test.subset(500, offset=1000)
    out = _check(fmnist_project, data.images, data.labels, tmp_path, sanitize=True)
    assert "runtime error" not in out.stderr and "AddressSanitizer" not in out.stderr


@pytest.mark.parametrize("arch", sorted(CROSS))
def test_cross_under_qemu(arch: str, fmnist_project: Project, fmnist_test, tmp_path: Path) -> None:
    cross = CROSS[arch]
    require_tool(cross + "gcc")
    require_tool(toolchain.CROSS_TARGETS[cross][0])
    data = fmnist_test.subset(300, offset=2000)
    out = _check(fmnist_project, data.images, data.labels, tmp_path, cross=cross)
    host = _check(fmnist_project, data.images, data.labels, tmp_path)
    np.testing.assert_array_equal(out.local_class, host.local_class)
    np.testing.assert_array_equal(out.split_words, host.split_words)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["fmnist", "mnist", "cifar"])
@pytest.mark.parametrize("arch", ["host", "aarch64", "armhf"])
def test_full_test_set(model: str, arch: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    project = request.getfixturevalue(f"{model}_project")
    data = request.getfixturevalue(f"{model}_test")
    cross = CROSS.get(arch)
    if cross:
        require_tool(cross + "gcc")
        require_tool(toolchain.CROSS_TARGETS[cross][0])
    assert len(data) == 10000
    _check(project, data.images, data.labels, tmp_path, cross=cross)


@pytest.mark.slow
@pytest.mark.parametrize("model, count", [("fmnist", 10000), ("cifar", 2000)])
def test_every_target_writes_the_same_csv(model: str, count: int, request: pytest.FixtureRequest,
                                          tmp_path: Path) -> None:
    """The whole CSV, entropy digits (%.17g) included, of the host build, aarch64 and armhf under qemu, the
    OpenCL runner (all stages on PoCL, logits and entropy on its host) and the NumPy reference."""
    from ddnn_gen.codegen.opencl_target import compile_opencl
    from ddnn_gen.codegen.toolchain import build_opencl_runner, run_opencl_runner
    from ddnn_gen.commands.device_commands import write_results_csv

    project = request.getfixturevalue(f"{model}_project")
    data = request.getfixturevalue(f"{model}_test").subset(count)
    samples = _samples(tmp_path, data.images, data.labels)
    csvs = {}
    for arch in ("host", "aarch64", "armhf"):
        cross = CROSS.get(arch)
        if cross:
            require_tool(cross + "gcc")
            require_tool(toolchain.CROSS_TARGETS[cross][0])
        build_dir = tmp_path / arch
        compile_c(project.program, build_dir)
        binary = toolchain.build_project(build_dir, cross=cross)
        csvs[arch] = toolchain.run_runner(binary, samples, cross=cross).csv_text
    require_tool("clinfo")
    compile_opencl(project.program, tmp_path / "opencl", opencl_layers="all")
    ocl = build_opencl_runner(tmp_path / "opencl")
    csvs["opencl"] = run_opencl_runner(ocl, samples, batch=64).csv_text
    numpy_csv = tmp_path / "numpy.csv"
    with numpy_csv.open("w", encoding="ascii", newline="") as handle:
        write_results_csv(handle, data.labels, reference.run_device(project.program, data.images))
    csvs["numpy"] = numpy_csv.read_text(encoding="ascii")
    assert len(csvs["host"].splitlines()) == count + 1
    for name, text in csvs.items():
        assert text == csvs["host"], f"{name} CSV differs from the host's"


# --- bad input -------------------------------------------------------------------------------


def _run_raw(binary: Path, path: Path) -> tuple[int, str]:
    import subprocess

    result = subprocess.run([str(binary), str(path)], capture_output=True, text=True)
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def fmnist_binary(fmnist_project: Project) -> Path:
    return toolchain.build_project(fmnist_project.out)


def test_runner_rejects_wrong_shape(fmnist_binary: Path, tmp_path: Path) -> None:
    images = np.zeros((3, 1, 27, 28), dtype=np.uint8)
    path = _samples(tmp_path, images, np.zeros(3, dtype=np.int32))
    code, err = _run_raw(fmnist_binary, path)
    assert code != 0 and "27x28x1" in err and "expects 28x28x1" in err


def test_runner_rejects_wrong_size(fmnist_binary: Path, fmnist_test, tmp_path: Path) -> None:
    path = _samples(tmp_path, fmnist_test.images[:4], fmnist_test.labels[:4])
    data = path.read_bytes()
    for name, blob, needle in [("truncated", data[:-1], "needs"), ("extra", data + b"\0", "needs"),
                               ("header", data[:10], "too short"), ("magic", b"XXXX" + data[4:], "magic"),
                               ("version", data[:4] + b"\x02" + data[5:], "version 2")]:
        bad = tmp_path / f"{name}.bin"
        bad.write_bytes(blob)
        code, err = _run_raw(fmnist_binary, bad)
        assert code != 0 and needle in err, (name, err)
    code, err = _run_raw(fmnist_binary, tmp_path / "missing.bin")
    assert code != 0 and "cannot open" in err


def test_runner_rejects_bad_arguments(fmnist_binary: Path, fmnist_test, tmp_path: Path) -> None:
    import subprocess

    path = _samples(tmp_path, fmnist_test.images[:2], fmnist_test.labels[:2])
    for args in (["--threshold", "abc"], ["--repeat", "0"], ["--bogus"], []):
        result = subprocess.run([str(fmnist_binary), *([str(path)] if args else []), *args],
                                capture_output=True, text=True)
        assert result.returncode == 2, args


def _replace_layer(program: DeviceProgram, index: int, **changes: object) -> DeviceProgram:
    layers = list(program.layers)
    layers[index] = dataclasses.replace(layers[index], **changes)
    return dataclasses.replace(program, layers=tuple(layers))


def test_compiler_rejects_unsupported(fmnist_project: Project, tmp_path: Path) -> None:
    program = fmnist_project.program
    cases = [
        (_replace_layer(program, 1, kind="conv"), "'conv2' (conv)"),
        (dataclasses.replace(program, layers=program.layers[::-1]), "fconv must be the first"),
        (_replace_layer(program, 1, ksize=13), "larger than the C runtime's 11x11"),
        (_replace_layer(program, 1, in_hwc=(14, 14, 2_000_000)), "beyond 2^24"),
        (_replace_layer(program, 0, in_hwc=(28, 28, 8000)), "'conv1' (fconv)"),
        (dataclasses.replace(program, layers=()), "no layers"),
    ]
    for bad, needle in cases:
        with pytest.raises(CompileError, match=None) as info:
            compile_c(bad, tmp_path / "bad")
        assert needle in str(info.value), str(info.value)


def test_cli_compile_and_run_device(fmnist_model_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["compile", str(fmnist_model_path), "--target", "c", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "RAM bytes:" in result.output and "flash weight bytes:" in result.output
    assert (tmp_path / "p" / "fmnist_32_model.h").is_file() and (tmp_path / "p" / "Makefile").is_file()
    outputs = {}
    for impl in ("numpy", "c"):
        result = runner.invoke(cli, ["run-device", str(fmnist_model_path), "--impl", impl, "--dataset",
                                     "fashion-mnist", "--count", "50", "--offset", "7"])
        assert result.exit_code == 0, result.output
        outputs[impl] = result.output
    assert outputs["numpy"] == outputs["c"]
    assert outputs["c"].splitlines()[0] == "index,label,class,entropy,exit_local"


def test_cli_bad_input(fmnist_model_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    result = runner.invoke(cli, ["compile", str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and "not a readable .npz" in result.output
    result = runner.invoke(cli, ["compile", str(fmnist_model_path), "--target", "vhdl", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "vhdl" in result.output
    result = runner.invoke(cli, ["run-device", str(fmnist_model_path), "--impl", "fpga", "--dataset", "fashion-mnist"])
    assert result.exit_code == 2


def test_generated_header_contract(fmnist_project: Project) -> None:
    header = (fmnist_project.out / "fmnist_32_model.h").read_text()
    for name in ("FMNIST_32_INPUT_H", "FMNIST_32_INPUT_BYTES", "FMNIST_32_N_CLASSES", "FMNIST_32_SPLIT_WORDS",
                 "FMNIST_32_DEFAULT_THRESHOLD", "fmnist_32_model_hash[32]", "FMNIST_32_MODEL_NAME",
                 "void fmnist_32_infer(const uint8_t *input_hwc", "extern const ddnn_model fmnist_32_model;"):
        assert name in header
    source = (fmnist_project.out / "fmnist_32_model.c").read_text()
    digest = bytes.fromhex(fmnist_project.program.content_hash)
    assert ", ".join(f"0x{b:02x}" for b in digest[:16]) in source
    assert "malloc" not in source and all("malloc" not in p.read_text() for p in fmnist_project.out.glob("ddnn_*.c")
                                          if p.name != "ddnn_samples.c")
