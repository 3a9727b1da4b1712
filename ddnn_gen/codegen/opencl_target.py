"""OpenCL target: render the device tier's kernels (templates/opencl/) and the launch plan that
both hosts use (the generated C host program and the pyopencl path in device_opencl.py).

Every layer gets one kernel with its shapes as compile-time constants; the local exit gets a
kernel that computes only the integer sums (the double-precision logits and entropy stay on
the host so the device needs no cl_khr_fp64). Which layers run on OpenCL and which on the C
runtime is chosen at compile time (``--opencl-layers``); see docs/opencl_target.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import jinja2
import numpy as np

from ddnn_gen import __version__
from ddnn_gen.codegen import targets
from ddnn_gen.codegen.resources import templates_dir
from ddnn_gen.errors import CompileError
from ddnn_gen.fold.program import WORD_BITS, DeviceProgram, FoldedLayer, stage_work, words_for

LOG = logging.getLogger(__name__)

#: Work-items per work-group of the BLinear kernel: one per bit of the output word.
BLINEAR_GROUP = WORD_BITS

#: Default placement: the measured rule of :func:`auto_placement` (docs/opencl_target.md).
DEFAULT_OPENCL_LAYERS = "auto"


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
    #: Overlapping pool windows: ``name`` writes int32 conv sums (``sums`` per sample), then
    #: ``pool_name`` pools/thresholds/packs over ``pool_items`` work-items per sample.
    split_pool: bool = False
    pool_name: str = ""
    pool_items: int = 0
    sums: int = 0

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
    if layer.pool is not None and layer.pool.stride < layer.pool.ksize:
        sums = conv_h * conv_w * out_c
        return KernelPlan(name, index, layer.kind, sums, 0, f"{layer.kind}.cl.j2", title, tuple(consts_list), True,
                          True, f"ddnn_l{index}_pool", out_h * out_w * out_words, sums)
    # Fused: a work-group per (output pixel, output word), a work-item per channel of the word.
    group = min(WORD_BITS, out_c)
    consts_list.append(("GROUP", group))
    return KernelPlan(name, index, layer.kind, out_h * out_w * out_words * group, group, f"{layer.kind}.cl.j2",
                      title, tuple(consts_list), layer.pool is not None)


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
                                     "consts": plan.consts, "pool": plan.pool, "split_pool": plan.split_pool,
                                     "pool_fn": plan.pool_name} for plan in kernel_plans(program)])


# Measured on this project's build machine (bench/bench_opencl.py, fmnist_16 at batch 1, PoCL 3.1
# CPU device and the C runner at -O3 -march=native; see docs/opencl_target.md): the C runtime's
# cost per unit of work, and what one stage costs on OpenCL beyond its work (launch, queue drain,
# transfers), taken from the exit, whose work is negligible.
C_NS_PER_MAC = 0.065  # FConv multiply-accumulate (conv1: 112 896 MACs in 7.3 us)
C_NS_PER_POPCOUNT_WORD = 0.10  # BConv/BLinear/exit 64-bit XOR+popcount (conv2: 56 448 words in 5.8 us)
OPENCL_STAGE_OVERHEAD_US = 20.0  # the exit kernel: 11-21 us on a quiet machine (100-250 us under load)


def estimated_c_us(program: DeviceProgram) -> list[float]:
    """Per-sample C-runtime time of every stage (layers, exit) from the measured rates."""
    return [(macs * C_NS_PER_MAC + words * C_NS_PER_POPCOUNT_WORD) / 1e3 for macs, words in stage_work(program)]


def auto_placement(program: DeviceProgram) -> tuple[bool, ...]:
    """A stage goes to OpenCL only if the C runtime needs longer for it than one OpenCL stage costs
    beyond its work: below that, offloading loses even on an infinitely fast device (the paper's
    "offloading a small layer can cost more than it saves"). The exit follows the rule too; it
    can only be on OpenCL when the last layer is (it reads that layer's output on the device)."""
    flags = [cost >= OPENCL_STAGE_OVERHEAD_US for cost in estimated_c_us(program)]
    flags[-1] = flags[-1] and flags[-2]
    return tuple(flags)


def stage_names(program: DeviceProgram) -> list[str]:
    return [layer.name for layer in program.layers] + [program.spec.device.exit_name]


def parse_opencl_layers(value: str | None, program: DeviceProgram) -> tuple[bool, ...]:
    """``auto`` | ``all`` | ``none`` | comma-separated stage names -> "runs on OpenCL" for every
    device layer and then the exit (its integer sums; logits and entropy are always C)."""
    value = DEFAULT_OPENCL_LAYERS if value is None else value.strip()
    names = stage_names(program)
    if value == "auto":
        return auto_placement(program)
    if value == "all":
        return tuple(True for _ in names)
    if value == "none":
        return tuple(False for _ in names)
    chosen = [part.strip() for part in value.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(names))
    if not chosen or unknown:
        raise CompileError(f"--opencl-layers {value!r}: expected auto, all, none or a comma-separated list of "
                           f"device layers and the exit ({', '.join(names)}); unknown: "
                           f"{', '.join(unknown) or '(empty list)'}")
    flags = tuple(name in chosen for name in names)
    if flags[-1] and not flags[-2]:
        raise CompileError(f"--opencl-layers {value!r}: the exit {names[-1]!r} can run on OpenCL only together with "
                           f"the last layer {names[-2]!r} (its sums read that layer's output on the device)")
    return flags


# ---- the generated project: the C target plus the OpenCL host program ----------------------

#: Hand-written host runtime sources the OpenCL runner links besides the C project's.
RUNTIME_SOURCES = ("ocl_runtime.c",)
#: The c_runtime/ files this target adds to the C project's (c_target.RUNTIME_FILES).
RUNTIME_FILES = ("ocl_runtime.h", "ocl_runtime.c", "ddnn_ocl_api.h", "ddnn_runner_ocl.c")
#: Host template (templates/opencl/) -> output file; {name} is the model's name.
HOST_TEMPLATES = {"host/ocl_kernels.h.j2": "{name}_ocl_kernels.h", "host/ocl_model.h.j2": "{name}_ocl_model.h",
                  "host/ocl_model.c.j2": "{name}_ocl_model.c"}
#: Batch size the generated host buffers are sized for unless --opencl-max-batch says otherwise.
DEFAULT_MAX_BATCH = 64


def _ocl_context(program: DeviceProgram, on_opencl: tuple[bool, ...], placement_arg: str,
                 max_batch: int, source: str) -> dict[str, Any]:
    from ddnn_gen.codegen.c_target import c_string

    plans = kernel_plans(program)
    last = len(program.layers) - 1
    exit_on_cl = on_opencl[-1]
    on_opencl = on_opencl[:-1]
    layers = []
    for index, (plan, layer) in enumerate(zip(plans, program.layers)):
        on_cl = on_opencl[index]
        next_on_cl = index < last and on_opencl[index + 1]
        layers.append({
            "on_cl": on_cl, "kernel": plan.name, "work_items": plan.items, "local0": plan.local0,
            "split_pool": plan.split_pool, "pool_kernel": plan.pool_name, "pool_items": plan.pool_items,
            "sums": plan.sums,
            "words": int(np.prod(layer.out_hwc[:2])) * words_for(layer.out_hwc[2]),
            "host_buffer": (not on_cl) or index == last or not next_on_cl,
            "device_buffer": on_cl or next_on_cl,
            "read_back": on_cl and (not next_on_cl if index < last else not exit_on_cl),
        })
    return {
        "layers": layers,
        "exit_on_cl": exit_on_cl,
        "exit_kernel": plans[-1].name,
        "any_on_cl": any(on_opencl) or exit_on_cl,
        "any_group": any(layer["on_cl"] and layer["local0"] for layer in layers),
        "needs_upload": any(on_opencl[i] and (i == 0 or not on_opencl[i - 1]) for i in range(len(on_opencl))),
        "max_batch": max_batch,
        "placement_arg": placement_arg,
        "kernel_lines": [c_string(line + "\n") for line in source.splitlines()],
        "runtime_sources": list(RUNTIME_SOURCES),
    }


def compile_opencl(program_or_model_path: DeviceProgram | str | Path, out_dir: str | Path, *,
                   threshold: float | None = None, arch: str | None = None, opencl_layers: str | None = None,
                   opencl_max_batch: int | None = None, reproduce: str | None = None,
                   measure_code: bool = False) -> targets.CompileReport:
    """The C project (compile_c) plus the OpenCL kernels, host program and runner ``ddnn_device_ocl``."""
    from ddnn_gen.codegen.c_target import (
        compile_c,
        copy_runtime,
        load_program,
        metadata,
        render_context,
        render_templates,
        write_metadata,
    )

    program = load_program(program_or_model_path, threshold, arch)
    if program.spec.big_little:
        # The OpenCL host's exit decision is the plain entropy rule; Big-Little's priority rule is only in the C
        # target so far: refuse rather than generate a device that would answer "other" locally.
        raise CompileError(f"{program.spec.name} is a Big-Little model: compile it with --target c (the OpenCL "
                           "target does not implement its priority-class routing)")
    placement_arg = DEFAULT_OPENCL_LAYERS if opencl_layers is None else opencl_layers
    on_opencl = parse_opencl_layers(placement_arg, program)
    if placement_arg.strip() == "auto":
        where = ", ".join(f"{name}: {'OpenCL' if flag else 'C'} (C estimate {cost:.1f} us)"
                          for name, flag, cost in zip(stage_names(program), on_opencl, estimated_c_us(program)))
        log_fn = LOG.warning if not any(on_opencl) else LOG.info
        log_fn("--opencl-layers auto: %s; a stage goes to OpenCL when its C time is at least %.0f us, the measured "
               "cost of one OpenCL stage (docs/opencl_target.md)%s", where, OPENCL_STAGE_OVERHEAD_US,
               "" if any(on_opencl) else "; every stage stays on the C runtime, pass --opencl-layers all to force")
    max_batch = DEFAULT_MAX_BATCH if opencl_max_batch is None else int(opencl_max_batch)
    if not 1 <= max_batch <= 65536:
        raise CompileError(f"--opencl-max-batch {max_batch}: expected 1..65536")
    if reproduce is None:
        source_name = program_or_model_path if not isinstance(program_or_model_path, DeviceProgram) else "MODEL.npz"
        reproduce = f"ddnngen compile {source_name} --target opencl -o OUT --opencl-layers {placement_arg}"
    c_report = compile_c(program, out_dir, reproduce=reproduce, measure_code=measure_code)
    out = Path(out_dir)
    source = render_kernels(program)
    context = render_context(program, reproduce)
    context["ocl"] = _ocl_context(program, on_opencl, placement_arg, max_batch, source)
    name = program.spec.name
    files = [file for file in c_report.files if file != "metadata.json"]
    (out / f"{name}_ocl_kernels.cl").write_text(source, encoding="utf-8")
    files.append(f"{name}_ocl_kernels.cl")
    env = _environment()
    files += render_templates(env, {template: output.format(name=name) for template, output in HOST_TEMPLATES.items()},
                              context, out)
    files += copy_runtime(RUNTIME_FILES, out)
    makefile = out / "Makefile"
    makefile.write_text(makefile.read_text(encoding="utf-8") + env.get_template("host/Makefile.opencl.j2").render(
        **context), encoding="utf-8")
    host_words = sum(layer["words"] for layer in context["ocl"]["layers"] if layer["host_buffer"])
    # Per sample of a batch: the host copies of layer outputs, the exit's sums and logits.
    host_bytes = max_batch * (8 * host_words + 4 * program.n_classes + 8 * program.n_classes)
    report = targets.CompileReport("opencl", out, files, c_report.ram_bytes + host_bytes,
                                   c_report.flash_weight_bytes, c_report.code_bytes,
                                   dict(c_report.details, opencl_layers=placement_arg,
                                        on_opencl=list(on_opencl), max_batch=max_batch,
                                        ocl_host_buffer_bytes=host_bytes))
    placement = dict(zip(stage_names(program), ("opencl" if flag else "c" for flag in on_opencl)))
    write_metadata(out, metadata(program, "opencl", files, report.ram_bytes, report.flash_weight_bytes,
                                 report.code_bytes, reproduce,
                                 {"opencl": {"placement_arg": placement_arg, "placement": placement,
                                             "max_batch": max_batch, "host_buffer_bytes": host_bytes}}))
    report.files.append("metadata.json")
    LOG.info("%s", report.summary())
    return report


targets.register_target(
    "opencl", compile_opencl, "OpenCL C 1.2 kernels + C host program (the C project plus ddnn_device_ocl)",
    options=[click.Option(["--opencl-layers"], default=None,
                          help=f"Stages that run on OpenCL: auto, all, none or names of layers and the exit "
                               f"(others run on the C runtime; default {DEFAULT_OPENCL_LAYERS}: offload a stage "
                               f"only where its C time exceeds an OpenCL stage's measured overhead; see "
                               f"docs/opencl_target.md)."),
             click.Option(["--opencl-max-batch"], type=click.IntRange(1, 65536), default=None,
                          help=f"Largest batch the OpenCL runner takes (static host buffers; "
                               f"default {DEFAULT_MAX_BATCH}).")])
