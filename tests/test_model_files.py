"""Spec and model-file validation: every bad input gets a clear error naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ddnn_gen.errors import ModelFileError, SpecError
from ddnn_gen.model import zoo
from ddnn_gen.model.modelfile import load_model, save_model
from ddnn_gen.model.network import DDNN
from ddnn_gen.model.spec import load_spec_file, parse_spec


def test_zoo_specs_parse_and_have_expected_split_shapes() -> None:
    assert parse_spec(zoo.build("mnist")).split_shape == (32, 7, 7)
    deep = parse_spec(zoo.build("cifar10_deep", 64))
    assert [layer.type for layer in deep.device.layers] == ["fconv"]
    assert [layer.type for layer in deep.server.layers][:4] == ["conv"] * 4
    shallow = parse_spec(zoo.build("cifar10_shallow", 32))
    assert [layer.type for layer in shallow.device.layers] == ["fconv", "bconv"]


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw.pop("tiers"), "tiers"),
    (lambda raw: raw.update(version=99), "version"),
    (lambda raw: raw["tiers"][0]["layers"][0].update(type="conv"), "unsupported layer type"),
    (lambda raw: raw["tiers"][0]["layers"][0].update(out_channels=0), "out_channels"),
    (lambda raw: raw["tiers"][0]["layers"][0].update(ksize="3"), "ksize"),
    (lambda raw: raw["tiers"][0]["layers"][1].update(ksize=40), "empty output"),
    (lambda raw: raw.update(classes=["one"]), "classes"),
    (lambda raw: raw.update(threshold=1.5), "threshold"),
])
def test_bad_specs_are_rejected_with_reason(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = zoo.build("mnist")
    mutate(raw)
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_spec_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="bad.json"):
        load_spec_file(str(bad))
    with pytest.raises(SpecError, match="missing.json"):
        load_spec_file(str(tmp_path / "missing.json"))


def _small_model(tmp_path: Path) -> Path:
    spec = parse_spec(zoo.build("mnist", 4))
    path = tmp_path / "small.npz"
    save_model(path, DDNN(spec), spec)
    return path


def test_round_trip_and_threshold_does_not_change_identity(tmp_path: Path) -> None:
    path = _small_model(tmp_path)
    loaded = load_model(path)
    save_model(tmp_path / "t.npz", loaded.model, loaded.spec.with_threshold(0.123))
    again = load_model(tmp_path / "t.npz")
    assert again.spec.threshold == pytest.approx(0.123)
    assert again.content_hash == loaded.content_hash  # the operating point is not the model


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(ModelFileError, match="not a readable .npz"):
        load_model(path)


def _rewrite(path: Path, out: Path, **changes: np.ndarray) -> Path:
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        arrays.pop(key)
    np.savez(out, **arrays)
    return out


def test_missing_spec_suggests_arch(tmp_path: Path) -> None:
    path = _small_model(tmp_path)
    bare = _rewrite(path, tmp_path / "bare.npz", __spec__=None, __hash__=None, __format__=None, __version__=None)
    with pytest.raises(ModelFileError, match="--arch"):
        load_model(bare)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(zoo.build("mnist", 4)))
    assert load_model(bare, arch=str(spec_path)).spec.name == "mnist_4"


def test_version_mismatch(tmp_path: Path) -> None:
    path = _rewrite(_small_model(tmp_path), tmp_path / "v9.npz", __version__=np.array(9))
    with pytest.raises(ModelFileError, match="version 9"):
        load_model(path)


def test_edited_weights_fail_the_hash(tmp_path: Path) -> None:
    path = _small_model(tmp_path)
    with np.load(path) as npz:
        key = next(k for k in npz.files if k.endswith("conv/W"))
        weight = npz[key] + 1
    edited = _rewrite(path, tmp_path / "edited.npz", **{key: weight})
    with pytest.raises(ModelFileError, match="hash mismatch"):
        load_model(edited)


def test_wrong_shapes_name_the_parameter(tmp_path: Path) -> None:
    path = _small_model(tmp_path)
    with np.load(path) as npz:
        key = next(k for k in npz.files if k.endswith("conv/W"))
    wrong = _rewrite(path, tmp_path / "wrong.npz", **{key: np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ModelFileError, match="shape"):
        load_model(wrong)
