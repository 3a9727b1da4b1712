"""Training on real data: a tiny model learns, checkpoints resume, odd shapes go end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _checks import assert_reference_matches_chainer

from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import metrics_at
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.spec import parse_spec
from ddnn_gen.model.train import TrainConfig, train


def odd_spec(height: int, width: int) -> dict[str, Any]:
    """Non-square input, a 37-channel FConv (not a multiple of 8 or 64), a BLinear hidden layer."""
    return {
        "format": "ddnn-spec", "version": 1, "name": "odd", "dataset": "fashion-mnist",
        "input": {"channels": 1, "height": height, "width": width},
        "classes": [str(i) for i in range(10)],
        "tiers": [
            {"name": "device", "kind": "device",
             "layers": [{"name": "c1", "type": "fconv", "out_channels": 37, "ksize": 3, "pad": 1,
                         "pool": {"ksize": 2, "stride": 2}},
                        {"name": "c2", "type": "bconv", "out_channels": 65, "ksize": 3, "stride": 2, "pad": 1},
                        {"name": "h1", "type": "blinear", "out_channels": 40}],
             "exit": {"name": "local", "type": "bexit"}},
            {"name": "server", "kind": "server",
             "layers": [{"name": "s1", "type": "linear", "out_channels": 64}],
             "exit": {"name": "final", "type": "linear"}},
        ],
        "threshold": 0.5,
    }


def crop(dataset: datasets.Dataset, width: int) -> datasets.Dataset:
    left = (dataset.images.shape[3] - width) // 2
    images = np.ascontiguousarray(dataset.images[:, :, :, left:left + width])
    return datasets.Dataset(dataset.name, dataset.split, images, dataset.labels)


def test_tiny_model_beats_chance_and_odd_shapes_go_end_to_end(tmp_path: Path,
                                                              fmnist_test: datasets.Dataset) -> None:
    spec = parse_spec(odd_spec(28, 20))
    train_set = crop(datasets.load("fashion-mnist", "train").subset(12000), 20)
    out = tmp_path / "odd.npz"
    result = train(spec, train_set, TrainConfig(epochs=1, batch_size=50, max_steps=240, progress=False), out=out)
    assert out.exists() and out.with_suffix(".opt.npz").exists()
    loaded = load_model(out)
    test_set = crop(fmnist_test.subset(1000), 20)
    metrics = metrics_at(compute_outputs(loaded, test_set), 0.5)
    # chance is 10 %; 240 steps of a small binary net on real Fashion-MNIST reach well above 50 %
    assert metrics.local_classifier_accuracy > 0.5, metrics
    assert metrics.server_classifier_accuracy > 0.5, metrics
    assert result.history[-1]["loss"] < 2.0
    assert_reference_matches_chainer(loaded, test_set.images)


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    spec = parse_spec(odd_spec(28, 20))
    train_set = crop(datasets.load("fashion-mnist", "train").subset(400), 20)
    out = tmp_path / "resume.npz"
    train(spec, train_set, TrainConfig(epochs=1, batch_size=100, progress=False), out=out)
    first = load_model(out)
    resumed = train(spec, train_set, TrainConfig(epochs=2, batch_size=100, progress=False), out=out, resume=True)
    assert [record["epoch"] for record in resumed.history] == [1, 2]
    assert load_model(out).content_hash != first.content_hash


def test_progress_without_a_terminal_is_periodic_lines(fmnist_test: datasets.Dataset, monkeypatch: Any,
                                                       caplog: Any, capsys: Any) -> None:
    import logging

    from ddnn_gen.model import train as train_module

    monkeypatch.setattr(train_module, "PROGRESS_LINE_S", 0.0)  # a line at every batch, to see them in a short run
    spec = parse_spec(odd_spec(28, 28))
    with caplog.at_level(logging.INFO, logger="ddnn_gen.model.train"):
        train(spec, fmnist_test.subset(64), TrainConfig(epochs=1, batch_size=16, progress=True))
    lines = [record.getMessage() for record in caplog.records if "batches" in record.getMessage()]
    assert lines and lines[0].startswith("epoch 1/1: 1/4 batches (25%), loss ")
    assert "\r" not in capsys.readouterr().err  # no progress bar written to a file


def test_augmentation_crops_and_flips_real_images(cifar_test: datasets.Dataset) -> None:
    import numpy as np

    from ddnn_gen.model.train import augment_batch, parse_augment

    images = cifar_test.images[:64]
    rng = np.random.RandomState(0)
    flipped = augment_batch(images, parse_augment("flip"), rng)
    same = [np.array_equal(a, b) for a, b in zip(flipped, images)]
    mirrored = [np.array_equal(a, b[..., ::-1]) for a, b in zip(flipped, images)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    cropped = augment_batch(images, parse_augment("crop:4"), np.random.RandomState(1))
    assert cropped.shape == images.shape and cropped.dtype == np.uint8
    for got, original in zip(cropped, images):  # each is the original shifted by <= 4 pixels, zeros coming in
        padded = np.pad(original, ((0, 0), (4, 4), (4, 4)))
        assert any(np.array_equal(got, padded[:, dy:dy + 32, dx:dx + 32]) for dy in range(9) for dx in range(9))
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_augment("rotate:10")
