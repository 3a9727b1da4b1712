"""`pip install .` (not only editable) must ship the templates, the C runtime and the server."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_contains_templates_runtime_and_server(tmp_path: Path) -> None:
    # The set-up exports PIP_BUILD_CONSTRAINT (for Chainer's isolated sdist build); pip refuses it together
    # with --no-build-isolation, and this build uses the venv's own setuptools anyway.
    env = {key: value for key, value in os.environ.items() if key != "PIP_BUILD_CONSTRAINT"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, cwd=tmp_path, env=env)
    wheel = next((tmp_path / "dist").glob("ddnngen-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for source in sorted((REPO / "templates").rglob("*.j2")):
        assert f"ddnn_gen/templates/{source.relative_to(REPO / 'templates')}" in names
    for source in sorted((REPO / "c_runtime").glob("*.[ch]")):
        assert f"ddnn_gen/c_runtime/{source.name}" in names
    assert "ddnn_server/__init__.py" in names
    # Every sub-package of the checkout ships: a missing one only shows outside an editable install.
    for init in sorted((REPO / "ddnn_gen").rglob("__init__.py")):
        assert f"ddnn_gen/{init.relative_to(REPO / 'ddnn_gen')}" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "ddnngen = ddnn_gen.cli:main" in text and "ddnn-server = ddnn_server.cli:main" in text

    # Installed (not editable) copy finds its data without the checkout.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    probe = ("import ddnn_gen.cli, ddnn_server.cli, ddnn_gen.codegen.resources as r; "
             "print(r.templates_dir()); print(r.c_runtime_dir())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert all(path.startswith(str(site)) for path in out), out
