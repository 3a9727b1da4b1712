"""Any number of tiers: version 2 specs, joint training of every exit, binary edge tiers folded and exact,
evaluation and calibration per exit; version 1 files unchanged."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import chainer
import numpy as np
import pytest

from ddnn_gen.errors import SpecError
from ddnn_gen.fold import reference
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.fold.program import fold, unpack_bits
from ddnn_gen.model import datasets, zoo
from ddnn_gen.model.evaluate import answering_exit, calibrate, metrics_at
from ddnn_gen.model.modelfile import load_model, save_model
from ddnn_gen.model.network import DDNN, predict_exits
from ddnn_gen.model.spec import parse_spec


def _linear_tier(name: str, kind: str, exit_name: str) -> dict[str, Any]:
    return {"name": name, "kind": kind, "layers": [{"name": f"{name}_fc", "type": "linear", "out_channels": 16}],
            "exit": {"name": exit_name, "type": "linear"}}


def test_configurations_a_b_d_are_specs() -> None:
    three = zoo.build("fashion-mnist-3tier")
    two = zoo.build("fashion-mnist")
    cloud_only = copy.deepcopy(two)
    cloud_only["tiers"] = [_linear_tier("cloud", "cloud", "final")]
    cloud_only["thresholds"], cloud_only["loss_weights"] = [], [1.0]
    for raw, kinds in ((cloud_only, ["cloud"]), (two, ["device", "cloud"]), (three, ["device", "edge", "cloud"])):
        spec = parse_spec(raw)
        assert [tier.kind for tier in spec.tiers] == kinds
        assert len(spec.thresholds) == len(kinds) - 1
        model = DDNN(spec)
        logits = predict_exits(model, np.zeros((2, 1, 28, 28), dtype=np.uint8))
        assert [x.shape for x in logits] == [(2, 10)] * len(kinds)


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["tiers"].insert(1, _linear_tier("fl", "edge", "fl_exit")), "cannot follow a float one"),
    (lambda raw: raw.update(thresholds=[0.3]), "one threshold per early exit (2)"),
    (lambda raw: raw.update(threshold=0.3), "lists 'thresholds'"),
    (lambda raw: raw["tiers"][1].update(kind="cloud"), "must have kind 'edge'"),
    (lambda raw: raw["tiers"][1]["layers"][0].update(type="fconv"), "only the first layer of the device tier"),
    (lambda raw: (raw["tiers"].pop(2), raw["tiers"][1].update(kind="cloud")), "gives the final answer with a float"),
    (lambda raw: raw["tiers"][2]["exit"].update(name="local"), "also a layer or exit name"),
    (lambda raw: raw.update(thresholds=[0.3, 1.2]), "not in [0, 1]"),
])
def test_bad_tiers_are_rejected(edit: Any, message: str) -> None:
    raw = zoo.build("fashion-mnist-3tier")
    edit(raw)
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(raw)


def test_version_1_files_keep_their_identity(fmnist_model_path: Path, tmp_path: Path) -> None:
    loaded = load_model(fmnist_model_path)
    assert loaded.spec.raw["version"] == 1 and loaded.spec.thresholds == (loaded.spec.threshold,)
    moved = loaded.spec.with_threshold(0.42)
    assert moved.raw["threshold"] == 0.42 and "thresholds" not in moved.raw
    path = tmp_path / "recalibrated.npz"
    assert save_model(path, loaded.model, moved) == loaded.content_hash  # thresholds are not identity


@pytest.fixture(scope="module")
def three_tier(small_three_tier: Any) -> Any:
    return small_three_tier


def test_binary_edge_tier_is_exact_against_chainer(three_tier: Any, fmnist_test: datasets.Dataset) -> None:
    images = fmnist_test.images[:400]
    device = fold(three_tier)
    edge = fold(three_tier, tier=1)
    assert (edge.tier, edge.threshold, edge.input_hwc) == (1, three_tier.spec.thresholds[1], device.split_hwc)
    assert edge.split_layer == three_tier.spec.split_layer(2) == 3
    split = reference.run_device(device, images).split_words
    ours = reference.device_activations(edge, split)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        h = reference.split_to_server_input(device, split)
        for layer, block, packed in zip(edge.layers, three_tier.model.tier_layers(1), ours):
            h = block(h).array
            want = (h > 0).transpose(0, 2, 3, 1)
            assert np.array_equal(unpack_bits(packed, layer.out_hwc[2]), want), layer.name
        chainer_logits = three_tier.model.tier_exit(1)(h).array
    result = reference.run_device(edge, split)
    np.testing.assert_allclose(result.logits, chainer_logits, rtol=1e-5, atol=1e-4)


def test_every_exit_evaluated_and_calibrated(three_tier: Any, fmnist_test: datasets.Dataset) -> None:
    data = fmnist_test.subset(2000)
    outputs = compute_outputs(three_tier, data)
    assert outputs.n_early == 2 and outputs.hop_bytes == [98, 36]  # 7x7x16 and 3x3x32 bits, dense (wire packing 4)
    metrics = metrics_at(outputs, (0.2, 0.4))
    assert metrics.thresholds == (0.2, 0.4) and len(metrics.exit_rates) == 3
    assert sum(metrics.exit_rates) == pytest.approx(1.0)
    answered = answering_exit(outputs, (0.2, 0.4))
    assert np.array_equal(np.bincount(answered, minlength=3) / len(data), metrics.exit_rates)
    assert metrics.local_exit_rate == metrics.exit_rates[0]
    assert metrics.hop_bytes_per_sample == (pytest.approx(98 * (1 - metrics.exit_rates[0])),
                                            pytest.approx(36 * metrics.exit_rates[2]))
    # The edge's exit answers nothing at threshold 0 (its entropies are > 0): two tiers' numbers come back.
    two = metrics_at(outputs, (0.2, 0.0))
    assert two.exit_rates[1] == 0.0 and two.overall_accuracy == pytest.approx(
        np.mean(np.where(answered == 0, outputs.local_class, outputs.final_class) == data.labels), abs=0.02)
    by_rate = calibrate(outputs, target_exit_rate=(0.3, 0.3))
    assert by_rate.metrics.exit_rates[0] >= 0.3 and by_rate.metrics.exit_rates[1] >= 0.3
    by_accuracy = calibrate(outputs, min_accuracy=metrics.overall_accuracy)
    assert by_accuracy.metrics.overall_accuracy >= metrics.overall_accuracy
    assert by_accuracy.metrics.exit_rates[-1] <= metrics.exit_rates[-1] + 1e-9  # no more cloud traffic than (0.2, 0.4)
