"""The layout follows the data path, and no layer imports one above it (spec -> fold -> codegen -> device ->
wire -> server; bench and commands on top)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Each package and what it may import (besides itself, ddnn_gen.errors and ddnn_gen.__version__).
ALLOWED = {
    "ddnn_gen.model": set(),
    "ddnn_gen.fold": {"ddnn_gen.model"},
    "ddnn_gen.codegen": {"ddnn_gen.model", "ddnn_gen.fold"},
    "ddnn_gen.wire": {"ddnn_gen.model"},
    "ddnn_gen.device": {"ddnn_gen.model", "ddnn_gen.fold", "ddnn_gen.codegen", "ddnn_gen.wire"},
    # The server's Paho C transport builds its shim from c_runtime/ with codegen's cffi machinery.
    "ddnn_server": {"ddnn_gen.model", "ddnn_gen.fold", "ddnn_gen.codegen", "ddnn_gen.wire"},
    "ddnn_gen.bench": {"ddnn_gen.model", "ddnn_gen.fold", "ddnn_gen.codegen", "ddnn_gen.wire", "ddnn_gen.device",
                       "ddnn_gen.plan", "ddnn_gen.ops", "ddnn_server"},
    "ddnn_gen.ops": {"ddnn_gen.model", "ddnn_gen.fold", "ddnn_gen.wire", "ddnn_gen.device"},
    "ddnn_gen.plan": {"ddnn_gen.model", "ddnn_gen.fold", "ddnn_gen.codegen", "ddnn_gen.wire", "ddnn_gen.device"},
    "ddnn_gen.commands": {"ddnn_gen.model", "ddnn_gen.fold", "ddnn_gen.codegen", "ddnn_gen.wire",
                          "ddnn_gen.device", "ddnn_gen.bench", "ddnn_gen.plan", "ddnn_gen.ops"},
    "ddnn_gen.cli": {"ddnn_gen.commands"},
}
ALWAYS = {"ddnn_gen", "ddnn_gen.errors"}


def _package_of(module: str) -> str | None:
    for package in ALLOWED:
        if module == package or module.startswith(package + "."):
            return package
    if module in ALWAYS:
        return module
    return None


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / "ddnn_gen").rglob("*.py")):
        found[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
    for path in sorted((REPO / "server").rglob("*.py")):
        found["ddnn_server." + path.relative_to(REPO / "server").with_suffix("").as_posix().replace("/", ".")] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in ("ddnn_gen", "ddnn_server")}


def test_every_module_belongs_to_a_layer() -> None:
    homeless = [name for name in _modules() if _package_of(name) is None and name not in ("ddnn_gen.__main__",)]
    assert not homeless, f"modules outside the layers: {homeless}"


def test_no_layer_imports_one_above_it() -> None:
    violations = []
    for name, path in _modules().items():
        own = _package_of(name)
        if own is None or own in ALWAYS:
            continue
        for imported in _imports(path):
            target = _package_of(imported)
            if target is None:
                # "from ddnn_gen import X" names a sub-package or module: judge X.
                continue
            if target in ALWAYS or target == own or target in ALLOWED[own]:
                continue
            violations.append(f"{name} imports {imported}")
    assert not violations, "\n".join(violations)


def test_the_layout_reads_as_the_data_path() -> None:
    packages = {path.name for path in (REPO / "ddnn_gen").iterdir() if (path / "__init__.py").exists()}
    assert {"model", "fold", "codegen", "device", "wire", "plan", "ops", "bench", "commands"} <= packages
    for package in packages:
        doc = ast.get_docstring(ast.parse((REPO / "ddnn_gen" / package / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, f"ddnn_gen/{package} needs a one-line docstring of what it owns"
