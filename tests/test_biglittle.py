"""Big-Little (a little binarized net on the device for priority classes + "other", a big float net on the server
reading the raw input): spec validation, training on remapped labels, the routing rule in the Python evaluation,
F1, the server's raw-only rule, and the generated C little net bit-exact with the Python reference on the whole
MNIST test set."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import chainer
import chainer.functions as F
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import MODELS, require_tool

from ddnn_gen.cli import cli
from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.codegen.opencl_target import compile_opencl
from ddnn_gen.device import c_binding
from ddnn_gen.device.samples import write_samples
from ddnn_gen.device.simulated import simulate
from ddnn_gen.errors import CompileError, DdnnError, SpecError
from ddnn_gen.fold import exits, reference
from ddnn_gen.fold.program import fold
from ddnn_gen.model import evaluate, zoo
from ddnn_gen.model.datasets import Dataset
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.network import DDNN, predict_exits, softmax_cross_entropy_joint
from ddnn_gen.model.spec import OTHER_CLASS, parse_spec
from ddnn_gen.model.train import TrainConfig, train
from ddnn_gen.wire import codec
from ddnn_gen.wire.codec import Packing, ProtocolError, RequestHeader, Status
from ddnn_server.store import serve

BIGLITTLE_MODELS = {"biglittle": MODELS / "mnist_bl8_8.npz", "biglittle-3-8": MODELS / "mnist_bl3_8_8.npz"}


@pytest.fixture(scope="module", params=sorted(BIGLITTLE_MODELS))
def shipped(request: pytest.FixtureRequest) -> Path:
    return BIGLITTLE_MODELS[request.param]


def _raw(priority: object) -> dict[str, object]:
    raw = copy.deepcopy(zoo.build("biglittle"))
    raw["priority_classes"] = priority
    return raw


def test_zoo_families_parse_with_k_plus_one_little_outputs() -> None:
    for name, priority in (("biglittle", (8,)), ("biglittle-3-8", (3, 8))):
        spec = parse_spec(zoo.build(name))
        assert spec.priority_classes == priority and spec.big_little
        assert spec.exit_outputs(0) == len(priority) + 1 and spec.exit_outputs(1) == 10
        assert spec.exit_class_names(0) == (*(str(c) for c in priority), "other")
        assert spec.tier_input_shape(1) == spec.input.shape  # the big net reads the raw image
        model = DDNN(spec)
        result = model(np.zeros((2, 1, 28, 28), np.float32))
        assert [logits.shape for logits in result.exit_logits] == [(2, len(priority) + 1), (2, 10)]


@pytest.mark.parametrize(("priority", "message"), [
    ([], "K >= 1"), ([10], "in 0..9"), ([-1], "in 0..9"), ([8, 8], "distinct"), ([True], "K >= 1"),
    ("8", "K >= 1"), ([1.0], "K >= 1"), (list(range(9)), "fewer than the 10 classes")])
def test_priority_classes_are_validated(priority: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(_raw(priority))


def test_big_little_needs_two_tiers_a_conv_big_net_and_version_2() -> None:
    three = copy.deepcopy(zoo.build("fashion-mnist-3tier"))
    three["priority_classes"] = [8]
    with pytest.raises(SpecError, match="exactly a binary device tier"):
        parse_spec(three)
    views = copy.deepcopy(zoo.build("fashion-mnist-views"))
    views["priority_classes"] = [8]
    with pytest.raises(SpecError, match="no views"):
        parse_spec(views)
    linear_first = _raw([8])
    linear_first["tiers"][1]["layers"] = [{"name": "bfc1", "type": "linear", "out_channels": 64}]  # type: ignore
    with pytest.raises(SpecError, match="first layer must be a 'conv'"):
        parse_spec(linear_first)
    old = _raw([8])
    old["version"] = 1
    with pytest.raises(SpecError):
        parse_spec(old)


def test_existing_specs_and_shipped_models_are_unchanged() -> None:
    """No existing spec grows a key, so content hashes stay: every shipped model still loads and verifies its
    stored hash (load_model recomputes it), and every other zoo spec has no priority classes."""
    for name in zoo.ZOO:
        spec = parse_spec(zoo.build(name))
        assert spec.big_little == name.startswith("biglittle")
        if not spec.big_little:
            assert "priority_classes" not in spec.to_dict()
    for path in sorted(MODELS.glob("*.npz")):
        loaded = load_model(path)
        assert loaded.spec.big_little == path.name.startswith("mnist_bl")


def test_labels_remap_to_the_priority_outputs_then_other() -> None:
    spec = parse_spec(zoo.build("biglittle-3-8"))
    labels = np.arange(10)
    assert spec.exit_labels(0, labels).tolist() == [2, 2, 2, 0, 2, 2, 2, 2, 1, 2]
    assert spec.exit_labels(1, labels).tolist() == labels.tolist()
    assert spec.little_to_class(np.array([0, 1, 2])).tolist() == [3, 8, OTHER_CLASS]


def test_the_little_exit_loss_uses_the_remapped_labels() -> None:
    spec = parse_spec(zoo.build("biglittle-3-8", 4))
    model = DDNN(spec)
    x = np.random.default_rng(0).random((6, 1, 28, 28)).astype(np.float32)
    t = np.array([3, 8, 0, 9, 3, 5], dtype=np.int32)
    with chainer.using_config("train", False):
        total, logits = softmax_cross_entropy_joint(model, x, t, (1.0, 1.0))
        want = (F.softmax_cross_entropy(logits[0], np.array([0, 1, 2, 2, 0, 2], np.int32))
                + F.softmax_cross_entropy(logits[1], t))
    assert float(total.array) == pytest.approx(float(want.array))


def test_training_learns_both_nets(mnist_train: Dataset, mnist_test: Dataset) -> None:
    """A short run (2 epochs on 1500 images): the little net separates '8' from the rest better than a constant
    answer (balanced accuracy 0.5), the big net learns the 10 classes."""
    spec = parse_spec(zoo.build("biglittle", 4))
    result = train(spec, mnist_train.subset(1500), TrainConfig(epochs=2, batch_size=50, progress=False, seed=0))
    assert set(result.history[-1]) >= {"train_acc_little", "train_acc_big"}
    test = mnist_test.subset(500)
    little, big = predict_exits(result.model, test.images)
    assert little.shape == (500, 2) and big.shape == (500, 10)
    targets = spec.exit_labels(0, test.labels)
    said = little.argmax(axis=1)
    balanced = np.mean([(said[targets == k] == k).mean() for k in (0, 1)])
    assert balanced > 0.6
    assert (big.argmax(axis=1) == test.labels).mean() > 0.5


def test_f1_by_hand() -> None:
    predicted = np.array([8, 8, 1, 8, 3])
    labels = np.array([8, 1, 8, 8, 3])
    # class 8: TP 2 (indices 0, 3), FP 1 (index 1), FN 1 (index 2) -> 2*2 / (2*2 + 1 + 1)
    assert evaluate.f1_score(predicted, labels, 8) == pytest.approx(4 / 6)
    assert evaluate.f1_score(predicted, labels, 3) == 1.0
    assert np.isnan(evaluate.f1_score(predicted, labels, 5))


def test_evaluation_routes_as_the_device_does(shipped: Path, mnist_test: Dataset) -> None:
    loaded = load_model(shipped)
    spec = loaded.spec
    data = mnist_test.subset(2000)
    outputs = exits.compute_outputs(loaded, data)
    program = fold(loaded)
    device = reference.run_device(program, data.images)
    little_index = device.logits.argmax(axis=1)
    threshold = spec.threshold
    answered = evaluate.answering_exit(outputs, (threshold,))
    local = answered == 0
    expected_local = (little_index < len(spec.priority_classes)) & (device.entropy <= threshold)
    assert np.array_equal(local, expected_local) and np.array_equal(local, device.local_exit)
    assert 0 < local.sum() < len(local)
    assert set(outputs.local_class[local].tolist()) <= set(spec.priority_classes)  # never "other" locally
    # The big net's answers are Chainer's final exit on the raw images (what ddnn-server runs for packing 3).
    with chainer.using_config("train", False):
        assert np.array_equal(outputs.final_class, predict_exits(loaded.model, data.images)[-1].argmax(axis=1))
    report = evaluate.priority_report(outputs, threshold, spec.priority_classes, codec.REQUEST_HEADER_BYTES)
    for row in report.rows:
        mine = data.labels == row.cls
        assert row.samples == int(mine.sum())
        assert row.local_share == pytest.approx(float(local[mine].mean()))
        assert row.f1_big == pytest.approx(evaluate.f1_score(outputs.final_class, data.labels, row.cls))
    metrics = evaluate.metrics_at(outputs, threshold)
    assert report.request_bytes == pytest.approx((1 - metrics.local_exit_rate) * (784 + codec.REQUEST_HEADER_BYTES))


def test_server_takes_only_raw_input_for_a_big_little_model(shipped: Path) -> None:
    loaded = load_model(shipped)
    served = serve(loaded)
    assert served.entry_tier == 0 and served.program is None
    raw = RequestHeader(loaded.hash_bytes, 0, 1, 28, 28, 1, 0, Packing.RAW_U8)
    served.check(raw)
    logits = served.logits([np.zeros((28, 28, 1), np.uint8)], Packing.RAW_U8)
    assert logits.shape == (1, 10)
    program = fold(loaded)
    bits = RequestHeader(loaded.hash_bytes, program.split_layer, *program.spec.split_shape, 2, 0, Packing.BITS_U64)
    with pytest.raises(ProtocolError) as error:
        served.check(bits)
    assert error.value.status == Status.SHAPE_MISMATCH and "Big-Little" in str(error.value)


def test_opencl_target_refuses_big_little(shipped: Path, tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="Big-Little"):
        compile_opencl(shipped, tmp_path / "ocl")


def test_c_little_net_bit_exact_on_the_whole_mnist_test_set(shipped: Path, mnist_test: Dataset,
                                                            tmp_path: Path) -> None:
    """The generated C (through the cffi binding, and the offline runner's CSV) equals the bitwise reference on
    all 10000 test images: logits, entropy, the routing decision and the class it names; also at a threshold on
    a sample's entropy exactly."""
    require_tool("cc")
    assert len(mnist_test) == 10000
    program = fold(load_model(shipped))
    model = c_binding.load(program)
    got = model.run(mnist_test.images)
    ref = reference.run_device(program, mnist_test.images)
    for name in ("local_class", "local_exit", "entropy", "logits"):
        assert np.array_equal(getattr(got, name), getattr(ref, name)), name
    assert 0 < got.local_exit.sum() < len(mnist_test)
    assert OTHER_CLASS in got.local_class  # the little net says "other" on some images
    tie = float(np.sort(ref.entropy[ref.logits.argmax(axis=1) < len(program.spec.priority_classes)])[50])
    for threshold in (0.0, tie, 1.0):
        assert np.array_equal(model.run(mnist_test.images[:3000], threshold).local_exit,
                              reference.run_device(program, mnist_test.images[:3000], threshold).local_exit)
    compile_c(program, tmp_path / "project")
    binary = toolchain.build_project(tmp_path / "project", opt="-O2")
    samples = tmp_path / "samples.ddns"
    write_samples(samples, mnist_test.images, mnist_test.labels)
    runner = toolchain.run_runner(binary, samples)
    assert np.array_equal(runner.local_class, ref.local_class)
    assert np.array_equal(runner.local_exit, ref.local_exit)
    assert np.array_equal(runner.entropy, ref.entropy)


def test_eval_command_reports_the_routing(mnist_test: Dataset) -> None:
    """`ddnngen eval --json` on a Big-Little model carries the priority report the library computes, and
    --match-f1 picks, for the mnist_16 early exit, a threshold whose routed F1 reaches the target."""
    path = BIGLITTLE_MODELS["biglittle"]
    result = CliRunner().invoke(cli, ["eval", str(path), "--count", "500", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["priority"][0]
    loaded = load_model(path)
    outputs = exits.compute_outputs(loaded, mnist_test.subset(500))
    want = evaluate.priority_report(outputs, loaded.spec.thresholds, (8,), codec.REQUEST_HEADER_BYTES)
    assert report["priority_local_share"] == pytest.approx(want.priority_local_share)
    assert report["classes"][0]["f1_routed"] == pytest.approx(want.rows[0].f1_routed)
    target = want.rows[0].f1_routed
    result = CliRunner().invoke(cli, ["eval", str(MODELS / "mnist_16.npz"), "--count", "500", "--json",
                                      "--priority-classes", "8", "--match-f1", repr(target)])
    assert result.exit_code == 0, result.output
    matched = json.loads(result.output)["priority"][0]
    assert matched["classes"][0]["f1_routed"] >= target
    bad = CliRunner().invoke(cli, ["eval", str(MODELS / "mnist_16.npz"), "--priority-classes", "10"])
    assert bad.exit_code != 0 and "distinct class indices in 0..9" in bad.output


def test_simulated_devices_refuse_big_little(shipped: Path) -> None:
    """They would send the little net's split, which no server takes for such a model: a clear error instead."""
    program = fold(load_model(shipped))
    with pytest.raises(DdnnError, match="Big-Little"):
        simulate(lambda device_id: None, program, b"\0" * 16, lambda index, threshold: None,  # type: ignore
                 1, 1, 1)
