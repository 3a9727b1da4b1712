"""Model files are shared artefacts: a spec embedded in one must not be able to put code into the generated C
or OpenCL. Hostile names (model, tier, layer, exit) fail to load with one clear line and nothing is written;
hostile class names are data, escaped into string literals that compile and read back unchanged."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_tool

from ddnn_gen.cli import cli
from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.errors import DdnnError
from ddnn_gen.model.modelfile import load_model, save_model
from ddnn_gen.model.spec import parse_spec

PAYLOAD = "x[1]; int injected = 1; static int y"


def _with_spec(source: Path, target: Path, edit: object) -> Path:
    """A copy of the model file ``source`` whose embedded spec went through ``edit`` (parameters untouched)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "__spec__.npy":
                spec = json.loads(str(np.load(io.BytesIO(data))))
                edit(spec)  # type: ignore[operator]
                buffer = io.BytesIO()
                np.save(buffer, np.array(json.dumps(spec)))
                data = buffer.getvalue()
            copy.writestr(item, data)
    return target


HOSTILE = {
    "model name": lambda spec: spec.update(name=PAYLOAD),
    "device tier name": lambda spec: spec["tiers"][0].update(name=PAYLOAD),
    "device layer name": lambda spec: spec["tiers"][0]["layers"][0].update(name=PAYLOAD),
    "local exit name": lambda spec: spec["tiers"][0]["exit"].update(name=PAYLOAD),
    "server exit name": lambda spec: spec["tiers"][-1]["exit"].update(name="final */ #include </etc/passwd> /*"),
    "layer name with a newline": lambda spec: spec["tiers"][0]["layers"][1].update(name="conv2\n#define x"),
}


@pytest.mark.parametrize("where", sorted(HOSTILE))
def test_hostile_names_fail_to_load_and_reach_no_generated_file(where: str, fmnist_model_path: Path,
                                                                tmp_path: Path) -> None:
    hostile = _with_spec(fmnist_model_path, tmp_path / "hostile.npz", HOSTILE[where])
    with pytest.raises(DdnnError, match="must be an ASCII identifier"):
        load_model(hostile)
    out = tmp_path / "project"
    with pytest.raises(DdnnError, match="must be an ASCII identifier"):
        compile_c(hostile, out)
    assert not out.exists() or not any(out.iterdir())
    for target in ("c", "opencl"):
        result = CliRunner().invoke(cli, ["compile", str(hostile), "--target", target, "-o", str(tmp_path / target)])
        assert result.exit_code == 1, result.output
        assert "must be an ASCII identifier" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        written = [path for path in (tmp_path / target).rglob("*") if path.is_file()] \
            if (tmp_path / target).exists() else []
        assert all("injected" not in path.read_text(errors="replace") for path in written)


def test_hostile_class_names_are_escaped_data(fmnist_model_path: Path, tmp_path: Path) -> None:
    require_tool("gcc")
    names = ['"; int injected = 1; const char *y = "', "*/ int injected; /*", "back\\slash??=", "T-shirt/top",
             "caf\u00e9", "new\nline", "Sandal", "Shirt", "Sneaker", "Bag"]
    # Whoever edits a file can recompute its content hash (it names a model, it does not sign it).
    loaded = load_model(fmnist_model_path)
    raw = loaded.spec.to_dict()
    raw["classes"] = names
    hostile = tmp_path / "classes.npz"
    save_model(hostile, loaded.model, parse_spec(raw))
    assert load_model(hostile).spec.classes == tuple(names)
    out = tmp_path / "project"
    compile_c(hostile, out)
    toolchain.build_project(out)
    # A program of its own prints the table the generated C holds: the bytes must be the names, unchanged.
    model_c = next(out.glob("*_model.c"))
    prefix = model_c.name[:-len("_model.c")]
    probe = out / "probe.c"
    probe.write_text(f'#include <stdio.h>\n#include "{prefix}_model.h"\n'
                     f'int main(void) {{ for (int i = 0; i < {prefix.upper()}_N_CLASSES; ++i) '
                     f'printf("%s\\x1f", {prefix}_class_names[i]); return 0; }}\n')
    binary = out / "probe"
    build = subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(out), "-o", str(binary),
                            str(probe), str(model_c), *[str(p) for p in out.glob("ddnn_*.c")
                                                        if p.name in ("ddnn_blinear.c", "ddnn_exit.c",
                                                                      "ddnn_model_api.c")], "-lm"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    printed = subprocess.run([str(binary)], capture_output=True, timeout=30).stdout
    assert printed.decode("utf-8").split("\x1f")[:-1] == names
    assert "int injected" not in "".join(line for line in model_c.read_text().splitlines()
                                         if not line.lstrip().startswith('"'))
