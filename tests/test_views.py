"""Horizontal DDNN: several devices see crops of one real Fashion-MNIST image; their device parts folded and
exact per view, their local exits and splits aggregated (MP / AP / CC) with views missing, and the evaluation
tables, on small models trained here on real data and on the shipped one."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import chainer
import numpy as np
import pytest
from _checks import assert_reference_matches_chainer
from click.testing import CliRunner

from ddnn_gen.cli import cli
from ddnn_gen.errors import CompileError, DdnnError, ModelFileError, SpecError
from ddnn_gen.fold import reference
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.fold.program import fold
from ddnn_gen.fold.views import ViewAggregator
from ddnn_gen.model import datasets, zoo
from ddnn_gen.model.evaluate import by_device_count, metrics_at, view_rows, view_subsets
from ddnn_gen.model.modelfile import load_model, save_model
from ddnn_gen.model.spec import parse_spec
from ddnn_gen.model.train import TrainConfig, train
from ddnn_gen.model.views import (
    aggregate_chainer,
    aggregate_features,
    aggregate_scores,
    dropout_mask,
    extract_views,
    present_mask,
)

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "views" / "fmnist_views_16.npz"


def _views_raw(filters: int = 8) -> dict[str, Any]:
    return zoo.build("fashion-mnist-views", filters)


def _float_edge(raw: dict[str, Any]) -> None:
    """Insert a float edge tier between the devices and the cloud (aggregation at the edge)."""
    raw["tiers"].insert(1, {"name": "edge", "kind": "edge", "exit": {"name": "edge", "type": "linear"},
                            "layers": [{"name": "econv1", "type": "conv", "out_channels": 32, "ksize": 3, "pad": 1}]})
    raw["thresholds"], raw["loss_weights"] = [0.3, 0.3], [1.0, 1.0, 1.0]


def _binary_edge(raw: dict[str, Any]) -> None:
    """Insert a binary edge tier (a BConv reading the OR of the views' bits) between the devices and the cloud."""
    raw["tiers"].insert(1, {"name": "edge", "kind": "edge", "exit": {"name": "edge", "type": "bexit"},
                            "layers": [{"name": "econv1", "type": "bconv", "out_channels": 32, "ksize": 3,
                                        "pad": 1}]})
    raw["thresholds"], raw["loss_weights"] = [0.3, 0.3], [1.0, 1.0, 1.0]


def _variant(local: str, split: str, weights: str, edge: Any = None) -> dict[str, Any]:
    raw = _views_raw()
    raw["name"] = f"views_{local}_{split}_{weights}"
    raw["views"].update(local_aggregation=local, split_aggregation=split, weights=weights)
    if edge is not None:
        edge(raw)
    return raw


# The paper's MP-CC with separate weights (the zoo's), AP-AP with shared weights and aggregation at a float
# edge, CC-MP with shared weights and a binary edge reading the OR of the views' bits.
VARIANTS = {
    "mp_cc": lambda: _variant("max", "concat", "separate"),
    "ap_ap": lambda: _variant("average", "average", "shared", _float_edge),
    "cc_mp": lambda: _variant("concat", "max", "shared", _binary_edge),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each variant trained here for a few dozen batches on real Fashion-MNIST, with views left out at random:
    weak, but the exits disagree and every view matters, which is what these tests need."""
    train_set = datasets.load("fashion-mnist", "train").subset(3000)
    folder = tmp_path_factory.mktemp("views")
    models = {}
    for name, build in VARIANTS.items():
        result = train(parse_spec(build()), train_set, TrainConfig(epochs=1, batch_size=50, progress=False, seed=1))
        save_model(folder / f"{name}.npz", result.model)
        models[name] = load_model(folder / f"{name}.npz")
    return models


@pytest.fixture(scope="module")
def scenes(fmnist_test: datasets.Dataset) -> datasets.Dataset:
    return fmnist_test.subset(600)


# --- views from real images ------------------------------------------------------------------------------

def test_views_are_crops_of_the_scene(fmnist_test: datasets.Dataset) -> None:
    spec = parse_spec(_views_raw())
    views = spec.views
    assert views is not None and views.count == 4 and spec.input.shape == (1, 28, 28)
    images = fmnist_test.images[:50]
    crops = extract_views(views, images)
    assert len(crops) == 4 and all(crop.shape == (50, 1, 20, 20) and crop.dtype == np.uint8 for crop in crops)
    corners = [(0, 0), (0, 8), (8, 0), (8, 8)]
    for crop, (top, left) in zip(crops, corners):
        assert np.array_equal(crop, images[:, :, top:top + 20, left:left + 20])
    # Overlapping cameras: views 0 and 3 share the 12x12 middle of the scene.
    assert np.array_equal(crops[0][:, :, 8:, 8:], crops[3][:, :, :12, :12])
    assert spec.tier_input_shape(0) == (1, 20, 20) and spec.split_shape == (16, 5, 5)
    assert spec.tier_input_shape(1) == (4 * 16, 5, 5), "the cloud reads the four splits concatenated"


def test_training_forward_uses_the_same_views(trained: dict[str, Any], scenes: datasets.Dataset) -> None:
    loaded = trained["mp_cc"]
    model = loaded.model
    images = scenes.images[:100]
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        result = model.forward_images(images)
        x = images.astype(np.float32) * np.float32(loaded.spec.input.scale)
        for view, crop in enumerate(extract_views(loaded.spec.views, x)):
            h = crop
            for block in model.view_layers(view):
                h = block(h)
            np.testing.assert_array_equal(result.view_splits[view].array, h.array)
            np.testing.assert_array_equal(result.view_logits[view].array, model.view_exit(view)(h).array)


# --- spec ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda v: v.update(cameras=4), "unknown key 'cameras'"),
    (lambda v: v["crops"][1].update(right=3), "views.crops[1]: unknown key 'right'"),
    (lambda v: v["crops"].__setitem__(2, [8, 0]), "views.crops[2]: a view must be an object"),
    (lambda v: v["crops"][3].update(top=9), "views.crops[3]: a 20x20 view at top 9, left 8 reaches past"),
    (lambda v: v["crops"][0].update(left=-1), "field 'left' must be >= 0"),
    (lambda v: v.update(crops=v["crops"][:1]), "'crops' must list 2..16 views"),
    (lambda v: v.update(crops=v["crops"] * 5), "'crops' must list 2..16 views"),
    (lambda v: v.update(height=29), "a 29x20 view does not fit the 28x28 input image"),
    (lambda v: v.pop("width"), "missing required field 'width'"),
    (lambda v: v.update(local_aggregation="sum"), "'local_aggregation' must be one of 'max', 'average', 'concat'"),
    (lambda v: v.update(split_aggregation="MP"), "'split_aggregation' must be one of"),
    (lambda v: v.update(weights="tied"), "'weights' must be one of 'shared', 'separate'"),
    (lambda v: v.update(dropout=1.0), "'dropout' (the share of views training leaves out) must be in [0, 1)"),
    (lambda v: v.update(dropout=True), "'dropout'"),
])
def test_bad_views_are_rejected(edit: Any, message: str) -> None:
    raw = _views_raw()
    edit(raw["views"])
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(raw)


def test_views_need_a_tier_to_aggregate_at_and_a_fitting_one() -> None:
    raw = _views_raw()
    raw["views"] = "four"
    with pytest.raises(SpecError, match="'views' must be an object"):
        parse_spec(raw)
    binary = _variant("max", "concat", "shared", _binary_edge)
    with pytest.raises(SpecError, match=re.escape("tier 1 (edge) is binary, so it can only aggregate the views' "
                                                  "split bits by 'max' (their OR); 'concat' needs a float tier 1")):
        parse_spec(binary)
    v1 = json.loads(json.dumps(parse_spec(zoo.build("fashion-mnist")).to_dict()))
    v1.update(version=1, threshold=0.5, views=_views_raw()["views"])
    v1.pop("thresholds")
    v1["tiers"][1]["kind"] = "server"
    with pytest.raises(SpecError, match="'views' needs a version 2 spec"):
        parse_spec(v1)


def test_views_are_part_of_the_identity_and_plain_specs_keep_theirs(fmnist_model_path: Path) -> None:
    raw = _views_raw()
    one = parse_spec(raw)
    moved = copy.deepcopy(raw)
    moved["views"]["crops"][0]["top"] = 1
    assert parse_spec(moved).identity_hash() != one.identity_hash()
    plain = load_model(fmnist_model_path)
    assert plain.spec.views is None and "views" not in plain.spec.identity_json()
    assert plain.spec.tier_input_shape(0) == plain.spec.input.shape == (1, 28, 28)


def test_a_file_with_other_views_does_not_load(trained: dict[str, Any], tmp_path: Path) -> None:
    """K mismatch: a spec with three views cannot take the parameters of a four-view model."""
    for name, message in (("mp_cc", "parameters do not match the spec; the file also has view3_exit/"),
                          ("cc_mp", "parameter local_concat/W has shape (10, 40), the spec needs (10, 30)")):
        raw = trained[name].spec.to_dict()
        raw["views"]["crops"] = raw["views"]["crops"][:3]
        arch = tmp_path / f"{name}_three.json"
        arch.write_text(json.dumps(raw))
        with pytest.raises(ModelFileError, match=re.escape(message)):
            load_model(trained[name].path, str(arch))


# --- per-view device parts: ordinary binary device tiers, exact ------------------------------------------

@pytest.mark.parametrize("name", ["mp_cc", "ap_ap"])
def test_every_view_folds_exactly(trained: dict[str, Any], scenes: datasets.Dataset, name: str) -> None:
    loaded = trained[name]
    views = loaded.spec.views
    crops = extract_views(views, scenes.images)
    for view, crop in enumerate(crops):
        program = fold(loaded, view=view)
        assert (program.view, program.tier, program.input_hwc) == (view, 0, (20, 20, 1))
        assert program.split_hwc == (5, 5, 16) and program.split_layer == 2
        assert program.threshold == loaded.spec.thresholds[0]
        assert_reference_matches_chainer(loaded, crop, view)
    shared = [fold(loaded, view=view) for view in range(4)]
    same = [np.array_equal(shared[0].layers[0].weights, program.layers[0].weights) for program in shared[1:]]
    assert all(same) == views.shared


def test_fold_names_the_view_it_needs(trained: dict[str, Any]) -> None:
    separate = trained["mp_cc"]
    with pytest.raises(CompileError, match=re.escape("its 4 views have separate device weights; fold one view at a "
                                                     "time (view 0..3; `ddnngen compile --view K`)")):
        fold(separate)
    with pytest.raises(CompileError, match=re.escape("view 4 is not one of its views 0..3")):
        fold(separate, view=4)
    with pytest.raises(CompileError, match="tier 1 is not the devices'"):
        fold(trained["cc_mp"], tier=1, view=2)
    assert fold(trained["ap_ap"]).view == 0, "shared weights: every view is the same program"


# --- aggregation and missing views -----------------------------------------------------------------------

MASKS = [(0, 1, 2, 3), (1, 2, 3), (0, 2), (3,)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_numpy_aggregation_is_chainers(trained: dict[str, Any], scenes: datasets.Dataset, name: str) -> None:
    """The deployed aggregator (NumPy, on the folded devices' outputs) against the training graph (Chainer, test
    mode), with every view and with views missing: features exactly, local scores within float32."""
    loaded = trained[name]
    views = loaded.spec.views
    aggregator = ViewAggregator(loaded)
    images = scenes.images[:200]
    runs = aggregator.run_devices(images)
    for present in MASKS:
        mask = present_mask(views, len(images), present)
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            result = loaded.model.forward_images(images, mask)
        features = aggregator.features_batch(runs.splits, mask)
        chainer_features = result.tier_outputs[0].array
        if aggregator.programs[0].spec.tiers[1].binary:
            bits = reference.split_to_server_input(aggregator.programs[0], features)  # the OR, as +-1
            np.testing.assert_array_equal(bits, chainer_features)
        else:
            np.testing.assert_array_equal(features, chainer_features)
        local = aggregator.local_exit_batch(runs.logits, mask)
        np.testing.assert_allclose(local.logits, result.exit_logits[0].array, rtol=1e-5, atol=1e-3)
        assert (local.classes == result.exit_logits[0].array.argmax(axis=1)).mean() > 0.99
        outputs = aggregator.outputs(runs, scenes.labels[:200], present)
        assert np.array_equal(outputs.final_class, result.exit_logits[-1].array.argmax(axis=1)), present


def test_aggregation_rules_with_views_missing(trained: dict[str, Any], scenes: datasets.Dataset) -> None:
    """MP: max over the present views; AP: their mean; CC: zeros in the absent views' places."""
    spec = trained["mp_cc"].spec
    runs = ViewAggregator(trained["mp_cc"]).run_devices(scenes.images[:100])
    mask = present_mask(spec.views, 100, (0, 2))
    garbage = runs.logits.copy()
    garbage[[1, 3]] = np.nan  # whatever an absent view's slot holds is ignored
    views = spec.views
    mp = aggregate_scores(views, garbage, mask, None)
    np.testing.assert_array_equal(mp, np.maximum(runs.logits[0], runs.logits[2]))
    average = replace(views, local_aggregation="average", split_aggregation="average")
    np.testing.assert_array_equal(aggregate_scores(average, garbage, mask, None),
                                  (runs.logits[0] + runs.logits[2]) / 2)
    concat = replace(views, local_aggregation="concat")
    weight = np.random.default_rng(0).standard_normal((10, 40))
    bias = np.arange(10.0)
    got = aggregate_scores(concat, garbage, mask, (weight, bias))
    stacked = np.concatenate([runs.logits[0], np.zeros((100, 10)), runs.logits[2], np.zeros((100, 10))], axis=1)
    np.testing.assert_allclose(got, stacked @ weight.T + bias, rtol=1e-12, atol=1e-9)
    values = np.stack([reference.split_to_server_input(fold(trained["mp_cc"], view=v), runs.splits[v])
                       for v in range(4)])
    features = aggregate_features(views, values, mask)  # CC of the splits
    assert features.shape == (100, 64, 5, 5) and not features[:, 16:32].any() and not features[:, 48:].any()
    np.testing.assert_array_equal(features[:, :16], values[0])
    np.testing.assert_array_equal(aggregate_features(average, values, mask), (values[0] + values[2]) / 2)
    maxed = aggregate_features(replace(views, split_aggregation="max"), values, mask)
    np.testing.assert_array_equal(maxed, np.maximum(values[0], values[2]))
    # The Chainer (training) rule is the same on the same inputs.
    chained = aggregate_chainer([chainer.Variable(v) for v in values], mask, "average", -1.0).array
    np.testing.assert_array_equal(chained, (values[0] + values[2]) / 2)


def test_dropout_mask_leaves_views_out_and_never_all(scenes: datasets.Dataset) -> None:
    views = parse_spec(_views_raw()).views
    mask = dropout_mask(views, 20000, np.random.RandomState(5))
    assert mask.any(axis=1).all()
    assert abs((~mask).mean() - views.dropout) < 0.01
    assert np.array_equal(mask, dropout_mask(views, 20000, np.random.RandomState(5))), "seeded"
    # Each view independently absent with p = 0.25: binomial counts, and the 0.25^4 with none keep one.
    shares = np.bincount(mask.sum(axis=1), minlength=5) / len(mask)
    p = views.dropout
    expected = [0.0, 4 * p ** 3 * (1 - p) + p ** 4, 6 * p ** 2 * (1 - p) ** 2, 4 * p * (1 - p) ** 3, (1 - p) ** 4]
    np.testing.assert_allclose(shares, expected, atol=0.01)
    assert shares[1] > 0.03, "one view alone is trained too"


def test_per_event_calls_equal_the_batch(trained: dict[str, Any], scenes: datasets.Dataset) -> None:
    """What the aggregator calls for one event ({view: its outputs}) gives what the evaluation counts."""
    for name in ("mp_cc", "cc_mp"):
        aggregator = ViewAggregator(trained[name])
        runs = aggregator.run_devices(scenes.images[:40])
        rng = np.random.default_rng(3)
        for event in range(40):
            present = tuple(sorted(rng.choice(4, rng.integers(1, 5), replace=False)))
            mask = present_mask(aggregator.views, 40, present)
            batch_local = aggregator.local_exit_batch(runs.logits, mask)
            batch_tier = aggregator.next_tier_batch(runs.splits, mask)
            local = aggregator.local_exit({v: runs.logits[v, event] for v in present})
            assert local.logits.tobytes() == batch_local.logits[event:event + 1].tobytes()
            assert (local.classes[0], local.exits[0]) == (batch_local.classes[event], batch_local.exits[event])
            tier = aggregator.next_tier({v: runs.splits[v, event].reshape(-1) for v in present})
            assert tier.classes[0] == batch_tier.classes[event]
            np.testing.assert_allclose(tier.logits[0], batch_tier.logits[event], rtol=1e-5, atol=1e-5)
        sums = reference.run_device(aggregator.programs[1], extract_views(aggregator.views, scenes.images[:5])[1])
        np.testing.assert_array_equal(aggregator.scores(1, sums.exit_sums), runs.logits[1, :5])


def test_bad_aggregator_input_is_one_clear_error(trained: dict[str, Any], scenes: datasets.Dataset) -> None:
    aggregator = ViewAggregator(trained["mp_cc"])
    runs = aggregator.run_devices(scenes.images[:3])
    one = runs.logits[0, 0]
    with pytest.raises(DdnnError, match="no view is present"):
        aggregator.local_exit({})
    with pytest.raises(DdnnError, match=re.escape("view 4 is not one of views_max_concat_separate's views 0..3")):
        aggregator.local_exit({4: one})
    with pytest.raises(DdnnError, match=re.escape("view 1: local-exit logits of shape (9,) do not fit (10,)")):
        aggregator.local_exit({0: one, 1: one[:9]})
    with pytest.raises(DdnnError, match=re.escape("hold different numbers of events: [1, 3]")):
        aggregator.local_exit({0: one, 1: runs.logits[1]})
    with pytest.raises(DdnnError, match=re.escape("split words of shape (24,) do not fit (5, 5, 1)")):
        aggregator.next_tier({2: runs.splits[2, 0].reshape(-1)[:24]})
    with pytest.raises(DdnnError, match=re.escape("presence mask must be bool (3, 4)")):
        aggregator.local_exit_batch(runs.logits, np.ones((3, 3), dtype=bool))
    with pytest.raises(DdnnError, match="sample 1 has no view present"):
        aggregator.local_exit_batch(runs.logits, np.array([[True] * 4, [False] * 4, [True] * 4]))
    with pytest.raises(DdnnError, match="name a view twice"):
        aggregator.outputs(runs, scenes.labels[:3], (1, 1))
    with pytest.raises(DdnnError, match="not a multi-view model"):
        ViewAggregator(load_model(SHIPPED.parent.parent / "fmnist_32.npz"))


# --- evaluation tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_all_views_present_is_the_plain_evaluation(trained: dict[str, Any], scenes: datasets.Dataset,
                                                   name: str) -> None:
    loaded = trained[name]
    aggregator = ViewAggregator(loaded)
    runs = aggregator.run_devices(scenes.images)
    plain = compute_outputs(loaded, scenes)
    every = aggregator.outputs(runs, scenes.labels, (0, 1, 2, 3))
    for field in ("local_class", "entropy", "final_class"):
        assert np.array_equal(getattr(plain, field), getattr(every, field), equal_nan=True), field
    assert [edge.name for edge in plain.edges] == [edge.name for edge in every.edges] == (
        ["edge"] if len(loaded.spec.tiers) == 3 else [])
    for ours, theirs in zip(plain.edges, every.edges):
        assert np.array_equal(ours.classes, theirs.classes) and np.array_equal(ours.entropy, theirs.entropy)
    # Each view's split travels dense (wire packing 4): ceil(H*W*C / 8) bytes, not its 64-bit words.
    split_bytes = aggregator.programs[0].split_bytes
    height, width, channels = aggregator.programs[0].split_hwc
    assert split_bytes == (height * width * channels + 7) // 8 < aggregator.programs[0].split_words * 8
    assert plain.split_bytes == 4 * split_bytes and plain.score_bytes == 4 * 10 * 4
    assert plain.views_present == (0, 1, 2, 3)
    # Every exit's answer with the views present equals Chainer's forward with the others masked out.
    thresholds = loaded.spec.thresholds
    subsets = view_subsets(4)
    assert [len(s) for s in subsets] == [1] * 4 + [2] * 6 + [3] * 4 + [4]
    rows = view_rows([aggregator.outputs(runs, scenes.labels, present) for present in subsets], thresholds)
    counts = by_device_count(rows)
    assert [(row.devices, row.sets) for row in counts] == [(1, 4), (2, 6), (3, 4), (4, 1)]
    assert counts[-1].overall == metrics_at(plain, thresholds).overall_accuracy
    assert counts[0].final_alone == pytest.approx(np.mean([r.metrics.server_classifier_accuracy for r in rows[:4]]))
    for row in rows:
        m = len(row.present)
        assert row.score_bytes == m * 40
        assert row.split_bytes == pytest.approx(m * split_bytes * (1 - row.metrics.local_exit_rate))


def test_subsets_of_many_views_are_sampled() -> None:
    subsets = view_subsets(8, per_size=5)
    sizes = [len(s) for s in subsets]
    assert sizes.count(1) == 8 and sizes.count(7) == 8 and sizes.count(8) == 1 and sizes.count(4) == 5
    assert subsets == view_subsets(8, per_size=5), "seeded"
    assert len(set(subsets)) == len(subsets)


# --- the shipped model -----------------------------------------------------------------------------------

def test_shipped_model_eval_shows_the_view_tables(fmnist_test: datasets.Dataset) -> None:
    result = CliRunner().invoke(cli, ["eval", str(SHIPPED), "--count", "2000"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("fmnist_views_16 (") and "fashion-mnist test, 2000 samples" in lines[0]
    assert "4 views 20x20 at (0,0) (0,8) (8,0) (8,8); separate weights" in result.output
    assert "crops of single-view images" in result.output
    start = lines.index(next(line for line in lines if line.startswith("accuracy vs devices present")))
    by_count = [line.split() for line in lines[start + 3:start + 7]]
    assert [int(row[0]) for row in by_count] == [1, 2, 3, 4]
    overall = [float(row[4].rstrip("%")) for row in by_count]
    assert overall == sorted(overall), "more devices, better answers"
    plain_overall = float(lines[3].split()[3].rstrip("%"))
    assert overall[-1] == plain_overall
    singles = [line.split() for line in lines if line.strip().startswith("only ")]
    missing = [line.split() for line in lines if line.strip().startswith("all but ")]
    assert len(singles) == len(missing) == 4
    assert overall[-1] > max(float(row[4].rstrip("%")) for row in singles) + 2.0


def test_shipped_model_eval_json(fmnist_test: datasets.Dataset) -> None:
    result = CliRunner().invoke(cli, ["eval", str(SHIPPED), "--count", "500", "--json", "-t", "0.3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    views = data["views"]
    assert views["count"] == 4 and views["thresholds"] == [0.3]
    assert [row["devices"] for row in views["by_devices"]] == [1, 2, 3, 4]
    assert len(views["sets"]) == 15 and views["sets"][-1]["present"] == [0, 1, 2, 3]
    assert views["sets"][-1]["overall_accuracy"] == data["results"][0]["overall_accuracy"]
    assert views["sets"][0]["score_bytes"] == 40 and data["split_bytes"] == 400


def test_compile_view_writes_each_cameras_program(tmp_path: Path) -> None:
    """`ddnngen compile --view K` writes camera K's device part: the same generated model and weights as
    compiling the aggregator's program for view K; without --view (separate weights) or with a view the model
    does not have, one line naming the problem."""
    from ddnn_gen.codegen.c_target import compile_c

    aggregator = ViewAggregator(load_model(SHIPPED))
    name = aggregator.loaded.spec.name
    weights = set()
    for view, program in enumerate(aggregator.programs):
        result = CliRunner().invoke(cli, ["compile", str(SHIPPED), "--view", str(view), "--no-measure-code",
                                          "-o", str(tmp_path / f"cli{view}")])
        assert result.exit_code == 0, result.output
        compile_c(program, tmp_path / f"py{view}",
                  reproduce=f"ddnngen compile {SHIPPED} --target c -o OUT --view {view}")
        for generated in (f"{name}_weights.h", f"{name}_model.h", f"{name}_model.c"):
            cli_bytes = (tmp_path / f"cli{view}" / generated).read_bytes()
            assert cli_bytes == (tmp_path / f"py{view}" / generated).read_bytes(), generated
        weights.add((tmp_path / f"cli{view}" / f"{name}_weights.h").read_bytes())
        assert f"--view {view}" in (tmp_path / f"cli{view}" / "metadata.json").read_text()
    assert len(weights) == aggregator.count  # separate weights: four different cameras
    for args, message in ((["-o", str(tmp_path / "none")], "--view K"),
                          (["--view", "4", "-o", str(tmp_path / "four")], "view 4 is not one of its views 0..3")):
        result = CliRunner().invoke(cli, ["compile", str(SHIPPED), *args])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
