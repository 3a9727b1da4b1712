"""OpenCL target: render the device tier's kernels (templates/opencl/) and the launch plan that
both hosts use (the generated C host program and the pyopencl path in device_opencl.py).

Every layer gets one kernel with its shapes as compile-time constants; the local exit gets a
kernel that computes only the integer sums (the double-precision logits and entropy stay on
the host so the device needs no cl_khr_fp64). Which layers run on OpenCL and which on the C
runtime is chosen at compile time (``--opencl-layers``); see docs/opencl_target.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from ddnn_gen import __version__
from ddnn_gen.errors import CompileError
from ddnn_gen.fold import WORD_BITS, DeviceProgram, FoldedLayer, words_for
from ddnn_gen.resources import templates_dir

#: Work-items per work-group of the BLinear kernel: one per bit of the output word.
BLINEAR_GROUP = WORD_BITS

#: Default placement (see docs/opencl_target.md for the measurement behind it).
DEFAULT_OPENCL_LAYERS = "all"


@dataclass(frozen=True)
class KernelPlan:
    """How to launch one kernel for a batch of ``n`` samples: global (items, n), local (local0, 1)
    or runtime-chosen when ``local0`` is 0. ``layer`` is the device layer index, -1 for the exit."""

    name: str
    layer: int
    kind: str
    items: int
    local0: int
    template: str
    title: str
    consts: tuple[tuple[str, int], ...]
    pool: bool

    def global_size(self, n: int) -> tuple[int, int]:
        return (self.items, n)

    def local_size(self) -> tuple[int, int] | None:
        return (self.local0, 1) if self.local0 else None


def _layer_plan(index: int, layer: FoldedLayer) -> KernelPlan:
    in_h, in_w, in_c = layer.in_hwc
    out_h, out_w, out_c = layer.out_hwc
    in_words = words_for(in_c)
    out_words = words_for(out_c)
    name = f"ddnn_l{index}_{layer.kind}"
    title = f"layer {index} {layer.name!r}: {layer.kind} {in_h}x{in_w}x{in_c} -> {out_h}x{out_w}x{out_c}"
    if layer.kind == "blinear":
        in_total = in_h * in_w * in_words
        consts = (("IN_WORDS", in_total), ("N_VALID", in_h * in_w * in_c), ("OUT_C", out_c),
                  ("OUT_WORDS", out_words), ("GROUP", BLINEAR_GROUP))
        return KernelPlan(name, index, layer.kind, out_words * BLINEAR_GROUP, BLINEAR_GROUP, "blinear.cl.j2",
                          title, consts, False)
    conv_h, conv_w = layer.conv_hw
    consts_list = [("IN_H", in_h), ("IN_W", in_w), ("IN_C", in_c), ("IN_WORDS", in_words),
                   ("IN_SIZE", in_h * in_w * (in_c if layer.kind == "fconv" else in_words)),
                   ("KSIZE", layer.ksize), ("STRIDE", layer.stride), ("PAD", layer.pad),
                   ("CONV_H", conv_h), ("CONV_W", conv_w),
                   ("OUT_H", out_h), ("OUT_W", out_w), ("OUT_C", out_c), ("OUT_WORDS", out_words),
                   ("OUT_SIZE", out_h * out_w * out_words)]
    if layer.pool is not None:
        consts_list += [("POOL_K", layer.pool.ksize), ("POOL_S", layer.pool.stride), ("POOL_P", layer.pool.pad)]
        title += f", pool {layer.pool.ksize}/{layer.pool.stride}/{layer.pool.pad}"
    title = title.replace(" ->", f" (k{layer.ksize} s{layer.stride} p{layer.pad}) ->", 1)
    if layer.kind not in ("fconv", "bconv"):
        raise CompileError(f"layer {layer.name!r}: kind {layer.kind!r} has no OpenCL kernel")
    return KernelPlan(name, index, layer.kind, out_h * out_w * out_words, 0, f"{layer.kind}.cl.j2", title,
                      tuple(consts_list), layer.pool is not None)


def exit_plan(program: DeviceProgram) -> KernelPlan:
    height, width, channels = program.exit.in_hwc
    consts = (("IN_WORDS", height * width * words_for(channels)), ("N_VALID", height * width * channels),
              ("N_CLASSES", program.n_classes))
    return KernelPlan("ddnn_exit_sums", -1, "exit", program.n_classes, 0, "exit.cl.j2",
                      f"local exit: {height}x{width}x{channels} -> {program.n_classes} integer sums", consts, False)


def kernel_plans(program: DeviceProgram) -> list[KernelPlan]:
    """One plan per device layer (in order), then the exit's."""
    return [_layer_plan(index, layer) for index, layer in enumerate(program.layers)] + [exit_plan(program)]


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir() / "opencl")),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, autoescape=False)


def render_kernels(program: DeviceProgram) -> str:
    """The OpenCL C source of every kernel of ``program`` (all layers and the exit)."""
    template = _environment().get_template("kernels.cl.j2")
    return template.render(model_name=program.spec.name, version=__version__, content_hash=program.content_hash,
                           kernels=[{"fn": plan.name, "template": plan.template, "title": plan.title,
                                     "consts": plan.consts, "pool": plan.pool} for plan in kernel_plans(program)])


def parse_opencl_layers(value: str | None, program: DeviceProgram) -> tuple[bool, ...]:
    """``all`` | ``none`` | comma-separated layer names -> per-layer flag "runs on OpenCL".

    The exit's integer sums follow the last layer's placement (they read its output).
    """
    value = DEFAULT_OPENCL_LAYERS if value is None else value.strip()
    names = [layer.name for layer in program.layers]
    if value == "all":
        return tuple(True for _ in names)
    if value == "none":
        return tuple(False for _ in names)
    chosen = [part.strip() for part in value.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(names))
    if not chosen or unknown:
        raise CompileError(f"--opencl-layers {value!r}: expected all, none or a comma-separated list of device "
                           f"layers ({', '.join(names)}); unknown: {', '.join(unknown) or '(empty list)'}")
    return tuple(name in chosen for name in names)
