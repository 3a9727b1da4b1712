"""Random-shape models on OpenCL: non-square inputs, 37/65 channels (partial and multi-word),
stride 2, kernel 5, pool 3/1/1 and 3/2/1, hidden BLinear layers. Bit-exact with the reference.

The builders here give every BN random statistics centred on the layer's real pre-activations,
so thresholds fall inside the reachable range and both bit values occur (a model whose
thresholds are all out of range would pass any kernel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import chainer
import numpy as np
import pytest

from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model.links import input_to_float, max_pool
from ddnn_gen.model.modelfile import load_model, save_model
from ddnn_gen.model.network import DDNN
from ddnn_gen.model.spec import parse_spec

pytest.importorskip("pyopencl")

from test_c_shapes import conv, spec_dict  # noqa: E402  (after the skip: one builder for both targets)


def shape_spec(name: str, channels: int, height: int, width: int, device: list[dict[str, Any]],
               n_classes: int = 7) -> dict[str, Any]:
    """The C shape tests' spec builder, at threshold 0.5 (the exit decision splits the samples)."""
    return {**spec_dict(name, channels, height, width, device, n_classes), "threshold": 0.5}


#: name -> spec. Together they cover every shape feature the issue lists.
SHAPE_SPECS: dict[str, dict[str, Any]] = {
    "k5s2_pool311_37_65_hidden": shape_spec("shapes_a", 3, 19, 23, [
        conv("f1", "fconv", 37, 5, 2, 2, (3, 1, 1)),
        conv("b1", "bconv", 65, 3, 1, 1, (2, 2, 0)),
        {"name": "h1", "type": "blinear", "out_channels": 70},
    ]),
    "nonsquare_65_37_s2_k5_two_hidden": shape_spec("shapes_b", 1, 16, 12, [
        conv("f1", "fconv", 65, 3, 1, 0),
        conv("b1", "bconv", 37, 5, 2, 2, (3, 2, 1)),
        {"name": "h1", "type": "blinear", "out_channels": 129},
        {"name": "h2", "type": "blinear", "out_channels": 33},
    ], n_classes=10),
    "wide_128_then_conv_only": shape_spec("shapes_c", 2, 9, 14, [
        conv("f1", "fconv", 128, 3, 1, 1),
        conv("b1", "bconv", 64, 3, 2, 0, (3, 1, 1)),
        conv("b2", "bconv", 31, 1, 1, 0),
    ], n_classes=3),
}


def _calibrate_bn(bn: chainer.links.BatchNormalization, pre: np.ndarray, rng: np.random.Generator) -> None:
    """Random BN whose zero crossing sits inside the observed pre-activations of each channel."""
    axes = tuple(i for i in range(pre.ndim) if i != 1)
    channels = pre.shape[1]
    low, high = np.percentile(pre, 20, axis=axes), np.percentile(pre, 80, axis=axes)
    bn.avg_mean[...] = (low + (high - low) * rng.random(channels)).astype(np.float32)
    bn.avg_var[...] = (np.var(pre, axis=axes) * rng.uniform(0.5, 2.0, channels) + 1e-3).astype(np.float32)
    bn.gamma.array[...] = (rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels, p=[0.3, 0.7])
                           ).astype(np.float32)
    bn.beta.array[...] = rng.normal(0, 0.1, channels).astype(np.float32)


def build_random_model(raw: dict[str, Any], path: Path, seed: int = 0, n_calibration: int = 64) -> Path:
    """A random-weight model for ``raw`` with calibrated BN statistics, saved to ``path``."""
    rng = np.random.default_rng(seed)
    spec = parse_spec(raw)
    model = DDNN(spec)
    for param in model.params():
        param.array[...] = rng.normal(0, 1, param.shape).astype(np.float32)
    images = rng.integers(0, 256, (n_calibration,) + spec.input.shape, dtype=np.uint8)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        h = chainer.Variable(input_to_float(images, spec.input.scale))
        for layer, block in zip(spec.device.layers, model.device_layers):
            if layer.type == "blinear":
                pre = block.fc(h)
            else:
                pre = max_pool(block.conv(h), layer.pool)
            _calibrate_bn(block.bn, pre.array, rng)
            h = block(h)
        _calibrate_bn(model.local_exit.bn, model.local_exit.fc(h).array, rng)
    save_model(path, model)
    return path


def random_images(program: DeviceProgram, count: int, seed: int) -> np.ndarray:
    channels, height, width = program.spec.input.shape
    return np.random.default_rng(seed).integers(0, 256, (count, channels, height, width), dtype=np.uint8)


@pytest.fixture(scope="module")
def shape_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DeviceProgram]:
    folder = tmp_path_factory.mktemp("shapes")
    return {name: fold(load_model(build_random_model(raw, folder / f"{name}.npz", seed=index)))
            for index, (name, raw) in enumerate(SHAPE_SPECS.items())}


def test_random_models_have_both_bit_values(shape_programs: dict[str, DeviceProgram]) -> None:
    """Guards the builder: a layer stuck at all-0 or all-1 would make the bit-exact tests vacuous."""
    for name, program in shape_programs.items():
        outputs = reference.device_activations(program, random_images(program, 32, 1))
        for layer, output in zip(program.layers, outputs):
            ones = np.unpackbits(output.view(np.uint8)).sum()
            total = output.shape[0] * int(np.prod(layer.out_hwc))
            assert 0.05 < ones / total < 0.95, (name, layer.name, ones / total)


@pytest.mark.parametrize("placement", ["all", "alternate"])
def test_random_shapes_bit_exact_pyopencl(shape_programs: dict[str, DeviceProgram], placement: str) -> None:
    from ddnn_gen.device.opencl import OpenCLDevice

    for name, program in shape_programs.items():
        images = random_images(program, 40, 2)
        expected = reference.device_activations(program, images)
        # Threshold at the median entropy so both exit decisions occur.
        threshold = float(np.median(reference.run_device(program, images).entropy))
        want = reference.run_device(program, images, threshold)
        assert 0 < want.local_exit.sum() < len(images)
        layers = "all" if placement == "all" else [index % 2 == 0 for index in range(len(program.layers) + 1)]
        if placement != "all":
            layers[-1] = layers[-2]  # the exit's sums run on OpenCL only with the last layer
        # max_batch 16 so the batch loop runs with a partial last batch too.
        with OpenCLDevice(program, opencl_layers=layers, max_batch=16) as device:
            outputs, sums = device.activations(images)
            got = device.run(images, threshold)
        for layer, out, exp in zip(program.layers, outputs, expected):
            assert np.array_equal(out, exp), f"{name}: layer {layer.name} differs"
        assert np.array_equal(sums, want.exit_sums), name
        assert np.array_equal(got.local_class, want.local_class), name
        assert np.array_equal(got.local_exit, want.local_exit), name
        assert np.array_equal(got.split_words, want.split_words), name


def test_kernels_build_without_warnings(shape_programs: dict[str, DeviceProgram], fmnist_model_path: Path) -> None:
    """-Werror: a warning on PoCL's clang is a likely error on a stricter GPU compiler."""
    import pyopencl as cl

    from ddnn_gen.codegen.opencl_target import render_kernels
    from ddnn_gen.device.opencl import select_device

    context = cl.Context([select_device()])
    for program in [fold(load_model(fmnist_model_path)), *shape_programs.values()]:
        cl.Program(context, render_kernels(program)).build(options=["-cl-std=CL1.2", "-Werror"])
