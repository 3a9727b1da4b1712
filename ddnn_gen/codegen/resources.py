"""Locate the Jinja templates and the hand-written C runtime, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # ddnn_gen/


def _find(installed: str, checkout: str) -> Path:
    # Installed wheel: ddnn_gen/templates, ddnn_gen/c_runtime. Checkout: ../templates, ../c_runtime.
    for candidate in (_PACKAGE_DIR / installed, _PACKAGE_DIR.parent / checkout):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"ddnngen data folder {installed!r} not found next to {_PACKAGE_DIR}")


def templates_dir() -> Path:
    return _find("templates", "templates")


def c_runtime_dir() -> Path:
    return _find("c_runtime", "c_runtime")
