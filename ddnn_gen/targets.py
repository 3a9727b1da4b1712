"""Registries of compile targets (`ddnngen compile --target`) and device implementations
(`ddnngen run-device --impl`).

A provider module registers its entries when imported::

    from ddnn_gen import targets
    targets.register_target("opencl", compile_opencl_project, "OpenCL kernels + host program",
                            options=[click.Option(["--opencl-layers"], default=None, help="...")])
    targets.register_impl("opencl", run_device_opencl, "generated OpenCL kernels (PyOpenCL)")

and is listed in :data:`PROVIDER_MODULES`; a target's ``options`` become options of
``ddnngen compile`` and are passed (by parameter name) only to that target's function.
Modules that are not there yet are skipped, so a target appears in the CLI as soon as its
module exists. The CLI choices are read lazily
(:class:`RegistryChoice`), so import order does not matter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

PROVIDER_MODULES = ("ddnn_gen.compile_c", "ddnn_gen.compile_opencl", "ddnn_gen.device_opencl")


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
# run(program, images_u8_NCHW, threshold) -> ddnn_gen.reference.DeviceResult
DeviceFn = Callable[..., Any]


@dataclass(frozen=True)
class Entry:
    name: str
    function: Callable[..., Any]
    help: str
    options: tuple[click.Option, ...] = ()


_TARGETS: dict[str, Entry] = {}
_IMPLS: dict[str, Entry] = {}
_loaded = False


def register_target(name: str, function: CompileFn, help: str = "", options: Sequence[click.Option] = ()) -> None:
    _TARGETS[name] = Entry(name, function, help, tuple(options))


def register_impl(name: str, function: DeviceFn, help: str = "", options: Sequence[click.Option] = ()) -> None:
    """``function(program, images_u8_NCHW, threshold, **options)`` returns an object with
    ``local_class``, ``entropy``, ``local_exit`` and ``split_words`` per sample (a
    :class:`ddnn_gen.reference.DeviceResult` has them)."""
    _IMPLS[name] = Entry(name, function, help, tuple(options))


def _load_providers() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module_name in PROVIDER_MODULES:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise


def _numpy_impl(program: Any, images_u8: np.ndarray, threshold: float | None = None) -> Any:
    from ddnn_gen import reference

    return reference.run_device(program, images_u8, threshold)


register_impl("numpy", _numpy_impl, "the bitwise NumPy reference (the definition of correct)")


def compile_targets() -> dict[str, Entry]:
    _load_providers()
    return dict(_TARGETS)


def device_impls() -> dict[str, Entry]:
    _load_providers()
    return dict(_IMPLS)


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
