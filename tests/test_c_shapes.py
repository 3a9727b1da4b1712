"""Shape coverage of the C target with small random-weight models: odd channel counts (one and
several words), non-square and 3-channel input, stride 2, kernel 5, overlapping and
skipping pools, a hidden blinear layer. Each model is saved and loaded as a real model file
and must be bit-exact against the NumPy reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c, load_program
from ddnn_gen.device.samples import write_samples
from ddnn_gen.fold import reference
from ddnn_gen.model.modelfile import save_model
from ddnn_gen.model.network import DDNN
from ddnn_gen.model.spec import SPEC_FORMAT, parse_spec


def conv(name: str, kind: str, out: int, ksize: int = 3, stride: int = 1, pad: int = 1,
         pool: tuple[int, int, int] | None = None) -> dict[str, Any]:
    layer: dict[str, Any] = {"name": name, "type": kind, "out_channels": out, "ksize": ksize, "stride": stride,
                             "pad": pad}
    if pool is not None:
        layer["pool"] = {"ksize": pool[0], "stride": pool[1], "pad": pool[2]}
    return layer


def spec_dict(name: str, channels: int, height: int, width: int, device: list[dict[str, Any]],
              n_classes: int = 10) -> dict[str, Any]:
    return {
        "format": SPEC_FORMAT, "version": 1, "name": name, "dataset": "",
        "input": {"channels": channels, "height": height, "width": width, "scale": 1.0 / 256.0},
        "classes": [f"c{i}" for i in range(n_classes)],
        "tiers": [
            {"name": "device", "kind": "device", "layers": device, "exit": {"name": "local", "type": "bexit"}},
            {"name": "server", "kind": "server", "layers": [{"name": "sfc", "type": "linear", "out_channels": 8}],
             "exit": {"name": "final", "type": "linear"}},
        ],
        "threshold": 0.9, "loss_weights": [1.0, 1.0],
    }


def randomize_bn(bn: Any, n_inputs: float, unit: float, rng: np.random.Generator) -> None:
    """BN statistics inside the reachable range of S * unit, so thresholds are non-trivial;
    gamma includes negative values (flip) and exact zeros (constant output)."""
    size = bn.gamma.array.shape[0]
    spread = np.sqrt(n_inputs) * unit
    bn.avg_mean[...] = rng.normal(0.0, spread, size).astype(np.float32)
    bn.avg_var[...] = (rng.uniform(0.3, 2.0, size) * spread ** 2).astype(np.float32)
    gamma = rng.normal(0.0, 1.0, size)
    gamma[rng.random(size) < 0.15] = 0.0
    bn.gamma.array[...] = gamma.astype(np.float32)
    bn.beta.array[...] = rng.normal(0.0, 0.3, size).astype(np.float32)


def random_model(raw: dict[str, Any], path: Path, seed: int) -> Path:
    """A DDNN with random weights and random BN, saved as a real model file."""
    rng = np.random.default_rng(seed)
    spec = parse_spec(raw)
    model = DDNN(spec)
    shapes = spec.tier_shapes(0)
    for layer, block, in_shape in zip(spec.device.layers, model.device_layers, shapes):
        if layer.type == "blinear":
            n_inputs, unit = float(np.prod(in_shape)), 1.0
        else:
            n_inputs = float(layer.ksize * layer.ksize * in_shape[0])
            # FConv sums are pixel values (mean ~128) times the input scale 1/256.
            unit = 128.0 * spec.input.scale if layer.type == "fconv" else 1.0
        randomize_bn(block.bn, n_inputs, unit, rng)
    randomize_bn(model.local_exit.bn, float(np.prod(shapes[-1])), 1.0, rng)
    save_model(path, model, spec)
    return path


def images_for(raw: dict[str, Any], count: int, seed: int) -> np.ndarray:
    """Random images with varied statistics, plus all-black and all-white ones."""
    rng = np.random.default_rng(seed)
    shape = (count, raw["input"]["channels"], raw["input"]["height"], raw["input"]["width"])
    levels = rng.integers(0, 256, size=(count, 1, 1, 1))
    images = np.clip(levels + rng.normal(0, 60, size=shape), 0, 255).astype(np.uint8)
    images[0] = 0
    images[1] = 255
    return images


CASES = {
    # 3-channel, non-square; 37 (one partial word) and 65 (two words) channels; overlapping pool 3/1/1;
    # kernel 5 with stride 2.
    "nonsquare_37_65": spec_dict("nonsquare_37_65", 3, 13, 17, [
        conv("conv1", "fconv", 37, pool=(3, 1, 1)),
        conv("conv2", "bconv", 65, ksize=5, stride=2, pad=2),
    ]),
    # 1-channel, kernel 5 stride 2 on the input, pool 2/2/0; pool 3/2/1; hidden blinear of 70.
    "stride_blinear": spec_dict("stride_blinear", 1, 20, 12, [
        conv("conv1", "fconv", 65, ksize=5, stride=2, pad=1, pool=(2, 2, 0)),
        conv("conv2", "bconv", 37, pool=(3, 2, 1)),
        {"name": "fc1", "type": "blinear", "out_channels": 70},
    ], n_classes=7),
    # Exact multiples of 64 (1 and 2 words), no padding, a pool that skips rows (1/2/0), two
    # stacked blinear layers, 3 classes.
    "words_64_128": spec_dict("words_64_128", 3, 16, 16, [
        conv("conv1", "fconv", 64, pad=0),
        conv("conv2", "bconv", 128, pool=(1, 2, 0)),
        conv("conv3", "bconv", 64, pool=(2, 2, 0)),
        {"name": "fc1", "type": "blinear", "out_channels": 64},
        {"name": "fc2", "type": "blinear", "out_channels": 33},
    ], n_classes=3),
    # A single FConv layer (as the CIFAR-10 deep family's device part), 3x3 pad 1 + pool 2/2/0.
    "fconv_only": spec_dict("fconv_only", 3, 12, 10, [conv("conv1", "fconv", 16, pool=(2, 2, 0))]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_model_bit_exact(case: str, tmp_path: Path) -> None:
    raw = CASES[case]
    model_path = random_model(raw, tmp_path / f"{case}.npz", seed=len(case))
    program = load_program(model_path)
    # The random BN must give non-trivial thresholds and some flipped channels.
    assert any(layer.flip.any() for layer in program.layers)
    images = images_for(raw, 48, seed=1)
    out_dir = tmp_path / "c"
    compile_c(model_path, out_dir)
    binary = toolchain.build_project(out_dir, sanitize=True)
    samples = tmp_path / "samples.bin"
    write_samples(samples, images, np.arange(len(images), dtype=np.int32))
    entropy = reference.run_device(program, images).entropy
    threshold = float(np.median(entropy))  # both exit decisions occur
    out = toolchain.run_runner(binary, samples, threshold=threshold, split_words=program.split_words)
    ref = reference.run_device(program, images, threshold)
    assert 0 < ref.local_exit.sum() < len(images)
    split = ref.split_words.reshape(len(images), -1)
    assert len(np.unique(split, axis=0)) > 1, "the split must depend on the input"
    np.testing.assert_array_equal(out.split_words, split)
    np.testing.assert_array_equal(out.local_class, ref.local_class)
    np.testing.assert_array_equal(out.local_exit, ref.local_exit)
    np.testing.assert_array_equal(out.entropy, ref.entropy)
