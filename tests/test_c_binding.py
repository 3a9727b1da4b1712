"""The cffi binding of the generated C (ddnn_gen/device/c_binding.py): bit-exact with the runner binary and the
NumPy reference on the whole Fashion-MNIST test set, per-sample and batch entry points, one lock per model
under concurrent threads, the build cache, and simulated devices whose device part is the binding."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_tool
from net_harness import ServerProcess, expectations

from ddnn_gen.cli import cli
from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.commands.device_commands import write_results_csv
from ddnn_gen.device import c_binding
from ddnn_gen.device.samples import write_samples
from ddnn_gen.device.simulated import simulate
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire.broker import Broker


@pytest.fixture(scope="module")
def program(fmnist_model_path: Path) -> DeviceProgram:
    require_tool("cc")
    return fold(load_model(fmnist_model_path))


@pytest.fixture(scope="module")
def model(program: DeviceProgram) -> c_binding.CModel:
    return c_binding.load(program)


def test_whole_test_set_bit_exact_with_the_runner_and_the_reference(model: c_binding.CModel, program: DeviceProgram,
                                                                    fmnist_test, tmp_path: Path) -> None:
    assert len(fmnist_test) == 10000
    got = model.run(fmnist_test.images)
    ref = reference.run_device(program, fmnist_test.images)
    compile_c(program, tmp_path / "project")
    binary = toolchain.build_project(tmp_path / "project", opt="-O3 -march=native")
    samples = tmp_path / "samples.bin"
    write_samples(samples, fmnist_test.images, fmnist_test.labels)
    runner = toolchain.run_runner(binary, samples, split_words=program.split_words)
    for name, want in (("reference", ref), ("runner", runner)):
        assert np.array_equal(got.local_class, want.local_class), name
        assert np.array_equal(got.local_exit, want.local_exit), name
        assert np.array_equal(got.entropy, want.entropy), name  # bit-identical doubles
        assert want.split_words is not None
        assert np.array_equal(got.split_words.reshape(len(got.local_class), -1),
                              want.split_words.reshape(len(got.local_class), -1)), name
    assert np.array_equal(got.logits, ref.logits)
    csv = tmp_path / "binding.csv"
    with csv.open("w", encoding="ascii", newline="") as handle:
        write_results_csv(handle, fmnist_test.labels, got)
    assert csv.read_text(encoding="ascii") == runner.csv_text
    assert 0 < got.local_exit.sum() < len(fmnist_test)


def test_one_sample_entry_point_and_thresholds(model: c_binding.CModel, program: DeviceProgram,
                                               fmnist_test) -> None:
    images = fmnist_test.images[:200]
    ref = reference.run_device(program, images)
    tie = float(np.sort(ref.entropy)[100])
    hwc = reference.images_to_hwc(images)
    for threshold in (0.0, tie, 1.0, None):
        batch = model.run(images, threshold)
        want = reference.run_device(program, images, threshold)
        assert np.array_equal(batch.local_exit, want.local_exit)
        for index in (0, 57, 100, 199):
            answer = model.infer(hwc[index], threshold)
            assert answer.local_class == want.local_class[index]
            assert answer.entropy == want.entropy[index]
            assert answer.local_exit == bool(want.local_exit[index])
            assert np.array_equal(answer.split_words, want.split_words[index])
    assert model.run(images, tie).local_exit.sum() == 101  # entropy <= threshold exits


def test_result_exposes_the_exit_sums(model: c_binding.CModel, program: DeviceProgram, fmnist_test) -> None:
    """result.sums (what a scores-first camera sends) are the reference's exit sums, and map to its logits."""
    images = fmnist_test.images[:100]
    ref = reference.run_device(program, images)
    hwc = reference.images_to_hwc(images)
    want = reference.exit_sums(program.exit, ref.split_words)
    got = np.stack([model.exit_sums(image) for image in hwc])
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert np.array_equal(reference.exit_logits(program.exit, got), ref.logits)


def test_threads_take_turns_on_one_model(model: c_binding.CModel, program: DeviceProgram, fmnist_test) -> None:
    """The generated code's buffers are static: without the binding's lock, concurrent calls would mix them."""
    images = fmnist_test.images[:1200]
    ref = reference.run_device(program, images)
    hwc = reference.images_to_hwc(images)
    wrong: list[int] = []

    def work(part: int) -> None:
        for index in range(part, len(images), 4):
            answer = model.infer(hwc[index])
            if not (answer.local_class == ref.local_class[index] and answer.entropy == ref.entropy[index]
                    and np.array_equal(answer.split_words, ref.split_words[index])):
                wrong.append(index)
            if index % 8 == part:
                model.run(images[index:index + 3])

    threads = [threading.Thread(target=work, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, f"{len(wrong)} samples answered wrongly under concurrency, e.g. {wrong[:5]}"


def test_extensions_are_cached_by_content(program: DeviceProgram, fmnist_model_path: Path, tmp_path: Path) -> None:
    first = c_binding.CModel(program, cache_dir=tmp_path)
    entries = sorted(tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith(f"{program.spec.name}-{program.content_hash[:16]}-")
    built = next(entries[0].glob("*.so"))
    stamp = built.stat().st_mtime_ns
    # Another process finds it on disk and builds nothing (it could not: it has no subprocess module).
    child = ("import sys; from ddnn_gen.device import c_binding; from ddnn_gen.fold.program import fold; "
             "from ddnn_gen.model.modelfile import load_model; c_binding.subprocess = None; "
             "m = c_binding.CModel(fold(load_model(sys.argv[1])), cache_dir=sys.argv[2]); "
             "print(m.descriptor.n_classes)")
    result = subprocess.run([sys.executable, "-c", child, str(fmnist_model_path), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "10", result.stderr
    assert built.stat().st_mtime_ns == stamp and sorted(tmp_path.iterdir()) == entries
    # In this process a second binding of the same sources shares the module and its lock.
    second = c_binding.CModel(program, cache_dir=tmp_path)
    assert second.lib is first.lib and second._lock is first._lock
    # The threshold is in the generated sources but not in the content hash: another extension.
    other = DeviceProgram(program.spec, program.content_hash, program.layers, program.exit, 0.375)
    assert c_binding.CModel(other, cache_dir=tmp_path).descriptor.default_threshold == 0.375
    assert len(list(tmp_path.iterdir())) == 2


def test_bad_images_are_refused(model: c_binding.CModel, fmnist_test) -> None:
    with pytest.raises(ValueError, match="uint8"):
        model.run(fmnist_test.images[:2].astype(np.float32))
    with pytest.raises(ValueError, match=r"expects \(28, 28, 1\)"):
        model.run(fmnist_test.images[:2, :, :27])
    with pytest.raises(ValueError, match=r"expects \(28, 28, 1\)"):
        model.infer(np.zeros((28, 27, 1), np.uint8))


def test_run_device_impls_write_the_same_csv(fmnist_model_path: Path) -> None:
    outputs = {}
    for impl in ("numpy", "c", "c-runner"):
        result = CliRunner().invoke(cli, ["run-device", str(fmnist_model_path), "--impl", impl, "--count", "300",
                                          "--offset", "1234", "--threshold", "0.3"])
        assert result.exit_code == 0, result.output
        outputs[impl] = result.output
    assert len(outputs["c"].splitlines()) == 301
    assert outputs["c"] == outputs["numpy"] == outputs["c-runner"]


@pytest.mark.broker
def test_simulated_devices_run_the_binding(broker: Broker, model: c_binding.CModel, fmnist_model_path: Path,
                                           fmnist_test) -> None:
    images = fmnist_test.images[:300]
    expected = expectations(fmnist_model_path, images)
    server = ServerProcess(broker.address, fmnist_model_path, workers=1).start()
    try:
        report = simulate(broker.connection(), expected.program, expected.loaded.hash_bytes,
                          model.answers(images), len(images), 3, 100, timeout_s=30.0)
        result = CliRunner().invoke(cli, ["device-sim", str(fmnist_model_path), "--broker", broker.address,
                                          "--devices", "2", "--requests", "50", "--count", "300", "--impl", "c"])
    finally:
        assert server.terminate() == 0
    assert len(report.outcomes) == 300 and report.duplicates == 0 and report.misrouted == 0
    want = expected.final_class(expected.program.threshold)
    assert sorted(o.index for o in report.outcomes) == list(range(300))
    for outcome in report.outcomes:
        assert outcome.source in ("local", "server"), outcome
        assert outcome.local_class == expected.device.local_class[outcome.index]
        assert outcome.final_class == want[outcome.index], outcome
        assert outcome.t_device_us > 0
    assert report.count("local") == int(expected.device.local_exit.sum())
    assert result.exit_code == 0, result.output
    assert "fallback 0, error 0" in result.output and "device part (generated C, in-process)" in result.output
