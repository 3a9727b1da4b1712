"""Big-Little (a little binarized net on the device for priority classes + "other", a big float net on the server
reading the raw input): spec validation, training on remapped labels, the routing rule in the Python evaluation,
F1, the server's raw-only rule, and the generated C little net bit-exact with the Python reference on the whole
MNIST test set."""

from __future__ import annotations

import copy

import chainer
import chainer.functions as F
import numpy as np
import pytest

from ddnn_gen.errors import SpecError
from ddnn_gen.model import evaluate, zoo
from ddnn_gen.model.datasets import Dataset
from ddnn_gen.model.network import DDNN, predict_exits, softmax_cross_entropy_joint
from ddnn_gen.model.spec import OTHER_CLASS, parse_spec
from ddnn_gen.model.train import TrainConfig, train


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
