"""The registry of compile targets (`ddnngen compile --target`).

A provider module registers its targets when imported::

    from ddnn_gen.codegen import targets
    targets.register_target("opencl", compile_opencl_project, "OpenCL kernels + host program",
                            options=[click.Option(["--opencl-layers"], default=None, help="...")])

and is listed in :data:`PROVIDER_MODULES`; a target's ``options`` become options of ``ddnngen compile`` and
are passed (by parameter name) only to that target's function. The CLI choices are read lazily
(:class:`RegistryChoice`, also used for ``run-device --impl``), so import order does not matter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

PROVIDER_MODULES = ("ddnn_gen.codegen.c_target", "ddnn_gen.codegen.opencl_target")


@dataclass
class CompileReport:
    """What a compile produced: where, and the memory it needs on the device."""

    target: str
    out_dir: Path
    files: list[str]
    ram_bytes: int  # static activation buffers + scratch of the inference path
    flash_weight_bytes: int  # const weights, thresholds and exit parameters
    code_bytes: int | None = None  # text size of a host build, when measured
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        code = (f"code + const data {self.code_bytes} bytes (text of a host build; device builds differ)"
                if self.code_bytes is not None else "code size not measured")
        return (f"{self.target}: wrote {len(self.files)} files to {self.out_dir}; RAM {self.ram_bytes} bytes "
                f"(activation buffers + scratch); flash {self.flash_weight_bytes} bytes of weights, {code}")


# compile(program_or_model_path, out_dir, *, threshold=None, **target_options) -> CompileReport
CompileFn = Callable[..., CompileReport]


@dataclass(frozen=True)
class Entry:
    name: str
    function: Callable[..., Any]
    help: str
    options: tuple[click.Option, ...] = ()


_TARGETS: dict[str, Entry] = {}
_loaded = False


def register_target(name: str, function: CompileFn, help: str = "", options: Sequence[click.Option] = ()) -> None:
    _TARGETS[name] = Entry(name, function, help, tuple(options))


def _load_providers() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module_name in PROVIDER_MODULES:
        importlib.import_module(module_name)


def compile_targets() -> dict[str, Entry]:
    _load_providers()
    return dict(_TARGETS)


class RegistryChoice(click.Choice):
    """A click.Choice whose choices are the registry's names at the time the CLI parses."""

    def __init__(self, source: Callable[[], dict[str, Entry]]) -> None:
        self._source = source
        super().__init__([], case_sensitive=True)

    @property  # type: ignore[override]
    def choices(self) -> list[str]:
        return sorted(self._source())

    @choices.setter
    def choices(self, _value: object) -> None:  # click.Choice.__init__ assigns it; the registry decides
        pass
