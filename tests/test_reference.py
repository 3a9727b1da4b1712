"""The bitwise reference against Chainer's test-mode forward, on real data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from _checks import assert_reference_matches_chainer, chainer_device_bits

from ddnn_gen.fold import reference
from ddnn_gen.fold.program import fold, pack_bits, unpack_bits
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model


def test_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(0)
    for channels in (1, 37, 64, 65, 130):
        bits = rng.random((3, 5, channels)) > 0.5
        words = pack_bits(bits)
        assert words.dtype == np.uint64 and words.shape[-1] == (channels + 63) // 64
        assert np.array_equal(unpack_bits(words, channels), bits)
        high = words[..., -1] >> np.uint64(channels % 64) if channels % 64 else np.zeros(1, np.uint64)
        assert not high.any(), "padding bits must be zero"


def test_fmnist_reference_equals_chainer(fmnist_model_path: Path, fmnist_test: datasets.Dataset) -> None:
    loaded = load_model(fmnist_model_path)
    assert_reference_matches_chainer(loaded, fmnist_test.images[:1500])


def test_mnist_reference_equals_chainer(mnist_model_path: Path, mnist_test: datasets.Dataset) -> None:
    loaded = load_model(mnist_model_path)
    assert_reference_matches_chainer(loaded, mnist_test.images[:1500])


def test_cifar_reference_equals_chainer(cifar_model_path: Path, cifar_test: datasets.Dataset) -> None:
    loaded = load_model(cifar_model_path)
    assert_reference_matches_chainer(loaded, cifar_test.images[:1000])


def test_popcount_path_equals_gemm_path(fmnist_model_path: Path, fmnist_test: datasets.Dataset) -> None:
    program = fold(load_model(fmnist_model_path))
    first, second = program.layers[0], program.layers[1]
    images = reference.images_to_hwc(fmnist_test.images[:64])
    packed = pack_bits(reference.threshold_bits(first, reference.max_pool_int(reference.fconv_sums(first, images),
                                                                               first)))
    assert np.array_equal(reference.bconv_sums(second, packed), reference.bconv_sums_popcount(second, packed))


def test_threshold_ties_match_chainer(fmnist_model_path: Path, fmnist_test: datasets.Dataset) -> None:
    """Put BN's mean exactly on pre-activations that real samples produce, so BN(S) == 0 exactly."""
    loaded = load_model(fmnist_model_path)
    images = fmnist_test.images[:300]
    program = fold(loaded)
    first = program.layers[0]
    preact = reference.max_pool_int(reference.fconv_sums(first, reference.images_to_hwc(images)), first)
    bn = loaded.model.device_layers[0].bn
    scale = loaded.spec.input.scale
    tie_values = np.median(preact.reshape(-1, preact.shape[-1]), axis=0).astype(np.int64)
    bn.avg_mean[...] = (tie_values * scale).astype(np.float32)
    bn.beta.array[...] = 0
    bn.gamma.array[::2] = np.abs(bn.gamma.array[::2]) + 0.1
    bn.gamma.array[1::2] = -np.abs(bn.gamma.array[1::2]) - 0.1  # negative gamma: flipped comparison
    ties = int((preact == tie_values).sum())
    assert ties > 1000, "the test must really exercise exact ties"
    folded = fold(loaded).layers[0]
    assert folded.flip[1::2].all() and not folded.flip[::2].any()
    assert_reference_matches_chainer(loaded, images)
    bits, _ = chainer_device_bits(loaded, images)
    at_tie = preact == tie_values
    assert bits[0][at_tie].all(), "BN(S) == 0 must give +1 (sign(0) = +1)"


def test_normalized_entropy_edges() -> None:
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [1000.0, -1000.0, 0.0, 0.0], [math.nan, 0, 0, 0],
                       [math.inf, 0, 0, 0], [-1e308, 1e308, 0, 0]])
    entropy = reference.normalized_entropy(logits)
    assert entropy[0] == pytest.approx(1.0)
    assert entropy[1] == pytest.approx(0.0, abs=1e-300)
    assert math.isnan(entropy[2]) and math.isnan(entropy[3])
    assert math.isfinite(entropy[4]) and entropy[4] >= 0
    decision = reference.exit_decision(entropy, 0.5)
    assert decision.tolist() == [False, True, False, False, True]


def test_threshold_margin_reported(fmnist_model_path: Path, fmnist_test: datasets.Dataset) -> None:
    from ddnn_gen.model.evaluate import threshold_margin

    program = fold(load_model(fmnist_model_path))
    result = reference.run_device(program, fmnist_test.images[:2000])
    margin = threshold_margin(result.entropy, program.threshold)
    # Double-precision entropies from C and NumPy agree to ~1e-15; a margin far above that means
    # no sample can flip its exit decision between implementations.
    assert margin > 1e-12
