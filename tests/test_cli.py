"""Bad command lines get one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddnn_gen.cli import cli


@pytest.mark.parametrize("args, message", [
    (["eval", "/nonexistent/model.npz"], "does not exist"),
    (["eval", "{model}", "--threshold", "1.5"], "not in [0, 1]"),
    (["eval", "{model}", "--threshold", "abc"], "not a valid float"),
    (["eval", "{model}", "--split", "validation"], "validation"),
    (["eval", "{junk}"], "not a readable .npz"),
    (["train", "--zoo", "mnist"], "Missing option '-o'"),
    (["train", "--zoo", "imagenet", "-o", "x.npz"], "imagenet"),
    (["train", "-o", "x.npz"], "exactly one of --zoo and --arch"),
    (["train", "--zoo", "mnist", "-o", "x.npz", "--loss-weights", "1,a"], "comma-separated"),
    (["calibrate", "{model}"], "exactly one of"),
    (["zoo", "resnet"], "unknown zoo model"),
    (["frobnicate"], "No such command"),
])
def test_bad_arguments(tmp_path: Path, fmnist_model_path: Path, args: list[str], message: str) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_text("junk")
    args = [arg.format(model=fmnist_model_path, junk=junk) for arg in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_console_script_runs() -> None:
    completed = subprocess.run([sys.executable, "-m", "ddnn_gen", "--help"], capture_output=True, text=True,
                               check=True)
    assert "eval" in completed.stdout and "train" in completed.stdout
