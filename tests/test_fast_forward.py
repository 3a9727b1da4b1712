"""The NumPy forward of the server tiers equals Chainer's test-mode forward bit for bit, on every shipped model's
full test set, on the inputs ddnn-server feeds it (the device's split as the bitwise reference produces it, a
binary edge's split, the views' aggregated splits, raw images): the whole set in batches of 256, its first 1000
samples also one and seven at a time (lone requests; a batch-1 Chainer pass over all of CIFAR-10 alone would cost
CI minutes and cover no other code path). Chainer stays the reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import chainer
import numpy as np
import pytest

from ddnn_gen.errors import DatasetError, DdnnError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import fold
from ddnn_gen.fold.views import ViewAggregator
from ddnn_gen.model import datasets
from ddnn_gen.model.fast_forward import FastForward
from ddnn_gen.model.links import input_to_float
from ddnn_gen.model.modelfile import LoadedModel, load_model
from ddnn_gen.wire.codec import Packing
from ddnn_server.store import ModelStore

REPO = Path(__file__).resolve().parent.parent
MODELS = sorted((REPO / "models").glob("*.npz"))
VIEWS_MODELS = sorted((REPO / "models" / "views").glob("*.npz"))
BATCHES = (1, 7, 256)
SMALL_BATCH_SAMPLES = 1000  # batches below 256 run over this many samples

Forward = Callable[[np.ndarray], np.ndarray]


def _test_images(loaded: LoadedModel) -> np.ndarray:
    try:
        return datasets.load(loaded.spec.dataset, "test").images
    except DatasetError as error:
        pytest.skip(f"{loaded.spec.dataset} not available (set DDNN_DATA_DIR): {error}")


def _assert_bit_identical(chainer_forward: Forward, numpy_forward: Forward, inputs: np.ndarray) -> None:
    """Both forwards over ``inputs`` in every batch size: float32 logits with the same bits."""
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for batch in BATCHES:
            for start in range(0, len(inputs) if batch >= 256 else min(len(inputs), SMALL_BATCH_SAMPLES), batch):
                chunk = inputs[start:start + batch]
                expected = chainer_forward(chunk)
                got = numpy_forward(chunk)
                assert got.dtype == expected.dtype == np.float32
                assert got.shape == expected.shape
                if not np.array_equal(got.view(np.uint32), expected.view(np.uint32)):
                    worst = float(np.abs(got.astype(np.float64) - expected).max())
                    pytest.fail(f"batch {batch} at sample {start}: logits differ (max |diff| {worst:g})")


@pytest.mark.slow
@pytest.mark.parametrize("path", MODELS, ids=lambda path: path.stem)
def test_server_tiers_equal_chainer_bit_for_bit(path: Path) -> None:
    loaded = load_model(path)
    spec, model = loaded.spec, loaded.model
    fast = FastForward(model)
    images = _test_images(loaded)
    last = len(spec.tiers) - 1
    if last == 0 or spec.big_little:
        # Served from raw input: the whole model (a Big-Little model's big net reads the raw image).
        _assert_bit_identical(lambda chunk: model.forward_images(chunk).exit_logits[-1].array, fast.images, images)
        return
    device = fold(loaded)
    split = reference.run_device(device, images).split_words
    cloud_input = reference.split_to_server_input(device, split)
    # The cloud resumed after the device (a two-tier model, or --from-tier 1 of a deeper one).
    _assert_bit_identical(lambda chunk: model.resume_forward(chunk, 1).array,
                          lambda chunk: fast.resume(chunk, 1), cloud_input)
    if last >= 2 and spec.tiers[1].binary:
        # The cloud above a binary edge, on the edge's split as the bitwise reference computes it.
        edge = fold(loaded, tier=1)
        edge_input = reference.split_to_server_input(edge, reference.run_device(edge, split).split_words)
        _assert_bit_identical(lambda chunk: model.resume_forward(chunk, 2).array,
                              lambda chunk: fast.resume(chunk, 2), edge_input)


@pytest.mark.slow
@pytest.mark.parametrize("path", VIEWS_MODELS, ids=lambda path: path.stem)
def test_views_tier1_equals_chainer_bit_for_bit(path: Path) -> None:
    loaded = load_model(path)
    model = loaded.model
    fast = FastForward(model)
    images = _test_images(loaded)
    aggregator = ViewAggregator(loaded)
    runs = aggregator.run_devices(images)
    # Every view present, and a random subset per sample (at least one), as the aggregator batches them.
    rng = np.random.default_rng(18)
    partial = rng.random((len(images), aggregator.count)) < 0.6
    partial[np.arange(len(images)), rng.integers(0, aggregator.count, len(images))] = True
    for mask in (np.ones_like(partial), partial):
        if loaded.spec.tiers[1].binary:
            # Tier 1 is a binary edge (the bitwise reference runs it): the float cloud above it, on the edge's
            # split of the views' OR, is what the NumPy forward serves.
            edge = aggregator.next_tier_batch(runs.splits, mask)
            assert edge.output is not None
            cloud_input = reference.split_to_server_input(fold(loaded, tier=1), edge.output)
            _assert_bit_identical(lambda chunk: model.resume_forward(chunk, 2).array,
                                  lambda chunk: fast.resume(chunk, 2), cloud_input)
            continue
        features = aggregator.features_batch(runs.splits, mask)
        _assert_bit_identical(lambda chunk: model.run_tiers(chunk, 1, 2).exit_logits[0].array,
                              lambda chunk: fast.run_tier(chunk, 1)[0], features)


@pytest.mark.parametrize("path", MODELS[:1] + VIEWS_MODELS, ids=lambda path: path.stem)
def test_tier_outputs_equal_chainer(path: Path) -> None:
    """run_tier's output (what a float tier forwards upwards) has Chainer's values too."""
    loaded = load_model(path)
    fast = FastForward(loaded.model)
    rng = np.random.default_rng(5)
    spec = loaded.spec
    images = rng.integers(0, 256, (9, spec.input.channels, spec.input.height, spec.input.width), dtype=np.uint8)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        if spec.views is not None:
            with pytest.raises(DdnnError, match="multi-view"):
                fast.images(images)
            return
        x = input_to_float(images, spec.input.scale)
        expected = loaded.model.run_tiers(x, 0, 1)
    logits, output = fast.run_tier(x, 0)
    assert np.array_equal(logits, expected.exit_logits[0].array)
    assert np.array_equal(output, expected.tier_outputs[0].array)


@pytest.mark.parametrize("name", ["fmnist_32.npz", "mnist_bl8_8.npz", "views/fmnist_views_16.npz"])
def test_server_store_forwards_agree(name: str, fmnist_test: datasets.Dataset) -> None:
    """ddnn-server's two --forward choices give the same float64 logits on the paths a server takes (resumed
    splits, raw requests, an aggregator's tier 1); an unknown one is refused."""
    path = REPO / "models" / name
    role = "aggregator" if name.startswith("views/") else "cloud"
    fast, slow = (ModelStore(forward=forward, role=role).add_file(path) for forward in ("numpy", "chainer"))
    assert fast.fast is not None and slow.fast is None
    spec = fast.loaded.spec
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (13, spec.input.channels, spec.input.height, spec.input.width), dtype=np.uint8)
    if spec.views is not None:
        assert fast.views is not None and slow.views is not None and fast.views.fast is fast.fast
        runs = fast.views.run_devices(images)
        mask = rng.random((len(images), fast.views.count)) < 0.7
        mask[:, 0] = True
        expected = slow.views.next_tier_batch(runs.splits, mask)
        got = fast.views.next_tier_batch(runs.splits, mask)
        assert np.array_equal(got.logits, expected.logits) and np.array_equal(got.classes, expected.classes)
        return
    hwc = images.transpose(0, 2, 3, 1)
    assert np.array_equal(fast.forward_raw(hwc), slow.forward_raw(hwc))
    if fast.entry_tier:
        assert fast.program is not None
        words = list(reference.run_device(fast.program, fmnist_test.images[:13]).split_words)
        assert np.array_equal(fast.logits(words, Packing.BITS_U64), slow.logits(words, Packing.BITS_U64))
    with pytest.raises(DdnnError, match="unknown forward"):
        ModelStore(forward="torch")
