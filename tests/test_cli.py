"""Bad command lines get one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddnn_gen.cli import cli
from ddnn_gen.model import zoo


def _spec_file(tmp_path: Path, name: str, edit: object) -> Path:
    raw = zoo.build("fashion-mnist")
    edit(raw)  # type: ignore[operator]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def _files(tmp_path: Path) -> dict[str, Path]:
    junk = tmp_path / "junk.npz"
    junk.write_text("junk")
    orphan = tmp_path / "orphan.npz"  # a model file without the .opt.npz a --resume needs
    orphan.write_bytes((Path(__file__).parent.parent / "models" / "fmnist_32.npz").read_bytes())
    return {
        "junk": junk, "orphan": orphan,
        "rgb": _spec_file(tmp_path, "rgb", lambda raw: raw["input"].update(channels=3)),
        "five": _spec_file(tmp_path, "five", lambda raw: raw.update(classes=raw["classes"][:5])),
        "kernel": _spec_file(tmp_path, "kernel", lambda raw: raw["tiers"][0]["layers"][0].update(kernel=3)),
        "scale": _spec_file(tmp_path, "scale", lambda raw: raw["input"].update(scale=0.005)),
        "inject": _spec_file(tmp_path, "inject", lambda raw: raw["tiers"][0]["exit"].update(
            name="x[1]; int injected = 1; static int y")),
        "empty": tmp_path / "empty-data",
    }


@pytest.mark.parametrize("args, message", [
    (["eval", "/nonexistent/model.npz"], "does not exist"),
    (["eval", "{model}", "--threshold", "1.5"], "not in [0, 1]"),
    (["eval", "{model}", "--threshold", "abc"], "not a valid float"),
    (["eval", "{model}", "--threshold", "0x1p-2"], "not a valid float"),
    (["eval", "{model}", "--split", "validation"], "validation"),
    (["eval", "{junk}"], "not a readable .npz"),
    (["train", "--zoo", "mnist"], "Missing option '-o'"),
    (["train", "--zoo", "imagenet", "-o", "x.npz"], "imagenet"),
    (["train", "-o", "x.npz"], "exactly one of --zoo and --arch"),
    (["train", "--zoo", "mnist", "-o", "x.npz", "--loss-weights", "1,a"], "comma-separated"),
    (["train", "--arch", "{rgb}", "-o", "{tmp}/m.npz"], "takes 3x28x28"),
    (["train", "--arch", "{five}", "-o", "{tmp}/m.npz"], "only 5 classes"),
    (["train", "--arch", "{kernel}", "-o", "{tmp}/m.npz"], "unknown key 'kernel'"),
    (["train", "--arch", "{scale}", "-o", "{tmp}/m.npz"], "power of two"),
    (["train", "--arch", "{inject}", "-o", "{tmp}/m.npz"], "must be an ASCII identifier"),
    (["train", "--zoo", "fashion-mnist", "-o", "/nonexistent/dir/m.npz"], "folder /nonexistent/dir does not exist"),
    (["train", "--zoo", "fashion-mnist", "-o", "{tmp}/absent.npz", "--resume"], "does not exist"),
    (["train", "--zoo", "fashion-mnist", "-o", "{orphan}", "--resume"], "no optimizer checkpoint"),
    (["export-samples", "--dataset", "fashion-mnist", "--count", "2", "-o", "/nonexistent/dir/s.ddns"],
     "cannot write the sample file"),
    (["compile", "{model}", "-o", "/proc/foo"], "cannot create the output folder"),
    (["compile", "{model}", "-o", "{tmp}/c", "--threshold", "inf"], "not a valid float"),
    (["run-device", "{model}", "--threshold", "-0.1"], "not a valid float"),
    (["device-sim", "{cifar}", "--data-dir", "{empty}", "--count", "5"], "cifar10 test split not found"),
    (["device-sim", "{cifar}", "--dataset", "fashion-mnist", "--count", "5"], "takes 3x32x32"),
    (["device-sim", "{model}", "--broker", "127.0.0.1:1", "--count", "5", "--devices", "1"], "no broker"),
    (["threshold", "set", "{model}", "1.5"], "not in [0, 1]"),
    (["threshold", "set", "{model}", "-0.2"], "not a valid float"),
    (["threshold", "set", "{model}", "0.3", "--device", "a/b"], "device id 'a/b' is invalid"),
    (["threshold", "clear", "{model}", "--device", "cam#"], "device id 'cam#' is invalid"),
    (["bench", "{model}", "--threshold", "2"], "not in [0, 1]"),
    (["demo", "--threshold", "1.01"], "not in [0, 1]"),
    (["calibrate", "{model}"], "exactly one of"),
    (["zoo", "resnet"], "unknown zoo model"),
    (["frobnicate"], "No such command"),
])
def test_bad_arguments(tmp_path: Path, fmnist_model_path: Path, cifar_model_path: Path, monkeypatch: pytest.MonkeyPatch,
                       args: list[str], message: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no user-cache data set sneaks in
    monkeypatch.delenv("DDNN_DATA_DIR", raising=False)
    files = _files(tmp_path)
    args = [arg.format(model=fmnist_model_path, cifar=cifar_model_path, tmp=tmp_path, **files) for arg in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error:"), result.output


def test_help_options() -> None:
    for flag in ("-h", "--help"):
        result = CliRunner().invoke(cli, [flag])
        assert result.exit_code == 0 and "compile" in result.output
    result = CliRunner().invoke(cli, ["threshold", "set", "-h"])
    assert result.exit_code == 0 and "VALUE" in result.output


def test_console_script_runs() -> None:
    completed = subprocess.run([sys.executable, "-m", "ddnn_gen", "--help"], capture_output=True, text=True,
                               check=True)
    assert "eval" in completed.stdout and "train" in completed.stdout
