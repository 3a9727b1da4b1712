"""`ddnngen compile --target c`: render the device part as a self-contained C99 project.

The templates of :data:`TEMPLATES` are rendered into the output folder under names that carry the
model's name (``<name>_model.h`` ...), with the context built by :func:`render_context`; the
hand-written runtime files of :data:`RUNTIME_FILES` are copied next to them, and ``metadata.json``
describes the project. Numbers are fixed here, in Python; the templates hold only loops and C
spelling. Every generated symbol carries the model's name, so several models link into one program.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import jinja2
import numpy as np

from ddnn_gen import __version__
from ddnn_gen.codegen import targets
from ddnn_gen.codegen.resources import c_runtime_dir, templates_dir
from ddnn_gen.errors import CompileError
from ddnn_gen.fold.program import DeviceProgram, FoldedLayer, fold, words_for
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.spec import OTHER_CLASS

log = logging.getLogger(__name__)

# The hand-written runtime (c_runtime/) a C project ships, by what needs it. The convolution kernels are
# header-only (ddnn_fconv.h, ddnn_bconv.h, ddnn_pool.h): <name>_model.c instantiates them per layer with
# constant shapes.
#: What a program that calls <name>_infer links besides <name>_model.c (a firmware needs only these).
INFERENCE_SOURCES = ("ddnn_blinear.c", "ddnn_exit.c", "ddnn_model_api.c")
INFERENCE_HEADERS = ("ddnn_types.h", "ddnn_popcount.h", "ddnn_pool.h", "ddnn_fconv.h", "ddnn_bconv.h",
                     "ddnn_blinear.h", "ddnn_exit.h", "ddnn_timer.h", "ddnn_model_api.h")
#: The sample-file runners' shared code (the runner programs themselves: RUNNER_PROGRAMS).
RUNNER_SOURCES = ("ddnn_runner_common.c", "ddnn_samples.c")
RUNNER_HEADERS = ("ddnn_runner_common.h", "ddnn_samples.h")
#: The networked runner's MQTT client and wire format, the connect() that sets TCP_NODELAY on its socket, and a
#: scores-first camera's buffer of its last splits.
NET_SOURCES = ("ddnn_mqtt.c", "ddnn_protocol.c", "ddnn_nodelay.c", "ddnn_features.c")
NET_HEADERS = ("ddnn_mqtt.h", "ddnn_protocol.h", "ddnn_features.h")
RUNNER_PROGRAMS = ("ddnn_runner.c", "ddnn_runner_net.c")
#: Every c_runtime/ file the C target copies; other targets add theirs (opencl_target.RUNTIME_FILES).
RUNTIME_FILES = (INFERENCE_HEADERS + INFERENCE_SOURCES + RUNNER_HEADERS + RUNNER_SOURCES + NET_HEADERS
                 + NET_SOURCES + RUNNER_PROGRAMS)
#: Template (templates/c/) -> output file; {name} is the model's name.
TEMPLATES = {"model.h.j2": "{name}_model.h", "weights.h.j2": "{name}_weights.h", "model.c.j2": "{name}_model.c",
             "Makefile.j2": "Makefile", "README.md.j2": "README.md"}
METADATA_FORMAT = "ddnngen-device-project"
METADATA_VERSION = 1
# Names the runtime owns: a model called "ddnn" would define ddnn_model, the descriptor type.
RESERVED_PREFIXES = ("ddnn",)
MAX_KSIZE = 11  # DDNN_MAX_KSIZE in c_runtime/ddnn_types.h
# DDNN_REQUEST_HEADER_BYTES in c_runtime/ddnn_protocol.h (wire.codec.REQUEST_HEADER_BYTES; codegen sits below
# wire, so the number is repeated here and a test holds the three equal).
REQUEST_HEADER_BYTES = 64
# Integer sums must stay exact in int32 (C) and in the float32 GEMM of the NumPy reference.
MAX_EXACT_SUM = 2 ** 24
WORDS_PER_LINE = 4
INTS_PER_LINE = 16


@dataclass(frozen=True)
class MemoryPlan:
    """Static RAM of the inference path: two ping-pong activation buffers and the conv scratch."""

    even_words: int  # outputs of layers 0, 2, 4, ...
    odd_words: int  # outputs of layers 1, 3, ...
    scratch_int32: int
    fconv_weights16: int = 0  # int16 weight copy of an FConv on the narrow path
    logits: int = 0  # the exit's logits (double), which the result points to
    sums: int = 0  # the exit's integer sums (int32), which the result points to too (scores first sends them)

    @property
    def ram_bytes(self) -> int:
        return (8 * (self.even_words + self.odd_words) + 4 * self.scratch_int32 + 2 * self.fconv_weights16
                + 8 * self.logits + 4 * self.sums)


def _out_words(layer: FoldedLayer) -> int:
    height, width, channels = layer.out_hwc
    return height * width * words_for(channels)


def fconv_weights16(layer: FoldedLayer) -> int:
    """int16 weights an FConv keeps in RAM: its sums fit int16 (DDNN_FCONV_NARROW in ddnn_fconv.h)."""
    if layer.kind != "fconv" or 255 * layer.ksize * layer.ksize * layer.in_hwc[2] > 32767:
        return 0
    return int(layer.weights.size)


def memory_plan(program: DeviceProgram) -> MemoryPlan:
    even = max((_out_words(layer) for layer in program.layers[0::2]), default=0)
    odd = max((_out_words(layer) for layer in program.layers[1::2]), default=0)
    scratch = 0
    for layer in program.layers:
        if layer.is_conv:
            pool_k = layer.pool.ksize if layer.pool is not None else 1
            scratch = max(scratch, (pool_k + 1) * layer.conv_hw[1] * layer.out_hwc[2])
    # A zero-length array is not C99: keep at least one element.
    weights16 = sum(fconv_weights16(layer) for layer in program.layers)
    return MemoryPlan(max(even, 1), max(odd, 1), max(scratch, 1), weights16, program.n_classes, program.n_classes)


def request_bytes(program: DeviceProgram) -> int:
    """The larger of the model's two requests: its dense split, or its raw input image (server-only)."""
    return REQUEST_HEADER_BYTES + max(program.split_bytes, int(np.prod(program.input_hwc)))


def check_program(program: DeviceProgram) -> None:
    """Reject what the C runtime cannot compute exactly, naming the layer."""
    if not program.layers:
        raise CompileError("the device part has no layers; nothing to compile")
    for index, layer in enumerate(program.layers):
        where = f"layer {layer.name!r} ({layer.kind})"
        if layer.kind not in ("fconv", "bconv", "blinear"):
            raise CompileError(f"{where}: the C target supports fconv, bconv and blinear device layers only")
        if (layer.kind == "fconv") != (index == 0):
            raise CompileError(f"{where}: fconv must be the first device layer and only the first "
                               "(it reads the raw 8-bit input)")
        in_h, in_w, in_c = layer.in_hwc
        if layer.is_conv:
            if layer.ksize > MAX_KSIZE:
                raise CompileError(f"{where}: kernel {layer.ksize}x{layer.ksize} is larger than the C runtime's "
                                   f"{MAX_KSIZE}x{MAX_KSIZE} limit")
            taps = layer.ksize * layer.ksize * in_c
            bound = taps * 255 if layer.kind == "fconv" else taps
        else:
            bound = in_h * in_w * in_c
        if bound >= MAX_EXACT_SUM:
            raise CompileError(f"{where}: its integer sums can reach {bound}, beyond 2^24, where the int32 C "
                               "kernels and the float32 reference stop being provably exact; use fewer "
                               "channels or a smaller kernel")
    n_exit = int(np.prod(program.exit.in_hwc))
    if n_exit >= MAX_EXACT_SUM:
        raise CompileError(f"local exit: {n_exit} inputs exceed 2^24; the exit sums would not be exact")
    names = [layer.name.upper() for layer in program.layers]
    if len(set(names)) != len(names):
        raise CompileError(f"layer names {', '.join(layer.name for layer in program.layers)} clash once "
                           "upper-cased for C macros; rename them")
    if "EXIT" in names:
        raise CompileError("a device layer named 'exit' would clash with the exit's C macros (<MODEL>_EXIT_...); "
                           "rename it")
    model = program.spec.name
    if model.lower().startswith(RESERVED_PREFIXES):
        raise CompileError(f"model name {model!r}: names starting with {' or '.join(RESERVED_PREFIXES)} belong to the "
                           "C runtime (ddnn_model, ddnn_infer_batch, ...); rename the model in its spec")


def _hex_words(words: np.ndarray) -> list[str]:
    return [f"0x{int(word):016x}ull" for word in np.asarray(words, dtype=np.uint64).ravel()]


def _lines(items: list[str], per_line: int) -> list[str]:
    return [", ".join(items[start:start + per_line]) for start in range(0, len(items), per_line)]


def c_double(value: float) -> str:
    """Round-trip exact double literal (%.17g); the C compiler's strtod reads it back exactly."""
    value = float(value)
    if not np.isfinite(value):
        return "NAN" if np.isnan(value) else ("INFINITY" if value > 0 else "-INFINITY")
    text = f"{value:.17g}"
    return text if any(ch in text for ch in ".en") else text + ".0"


def c_string(text: str) -> str:
    """A C string literal; anything outside printable ASCII becomes an octal escape."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '\\"':
            out.append("\\" + char)
        elif 32 <= byte < 127 and char != "?":  # '?' would risk trigraphs
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _shape_comment(layer: FoldedLayer) -> str:
    in_h, in_w, in_c = layer.in_hwc
    out_h, out_w, out_c = layer.out_hwc
    text = f"{layer.kind} {in_h}x{in_w}x{in_c} -> {out_h}x{out_w}x{out_c}"
    if layer.is_conv:
        text += f", {layer.ksize}x{layer.ksize} stride {layer.stride} pad {layer.pad}"
        if layer.pool is not None:
            text += f", max-pool {layer.pool.ksize}/{layer.pool.stride}/{layer.pool.pad}"
    return text


def device_weights(layer: FoldedLayer) -> np.ndarray:
    """A layer's weights in the layout of its C kernel (and of the OpenCL kernels, which upload the same array).

    FConv: int8 +-1 (KH, KW, IC, OC); BConv: packed words (KH, KW, in_words, OC); BLinear: packed
    (OUT, H, W, in_words). The convolutions put output channels innermost so one input value meets
    the contiguous weights of consecutive output channels (see c_runtime/ddnn_fconv.h, ddnn_bconv.h).
    """
    if layer.kind == "fconv":
        return np.ascontiguousarray(layer.weights.transpose(1, 2, 3, 0), dtype=np.int8)
    if layer.kind == "bconv":
        return np.ascontiguousarray(layer.packed_weights.transpose(1, 2, 3, 0), dtype=np.uint64)
    return np.ascontiguousarray(layer.packed_weights, dtype=np.uint64)


def _layer_context(index: int, layer: FoldedLayer, macro_prefix: str) -> dict[str, Any]:
    in_h, in_w, in_c = layer.in_hwc
    out_h, out_w, out_c = layer.out_hwc
    weights = device_weights(layer)
    if layer.kind == "fconv":
        weight_lines, weight_type = _lines([str(int(v)) for v in weights.ravel()], INTS_PER_LINE * 2), "int8_t"
    else:
        weight_lines, weight_type = _lines(_hex_words(weights), WORDS_PER_LINE), "ddnn_word"
    pool = layer.pool
    conv_h, conv_w = layer.conv_hw if layer.is_conv else (1, 1)
    return {
        "index": index,
        "name": layer.name,
        "macro": f"{macro_prefix}_{layer.name.upper()}",
        "kind": layer.kind,
        "is_conv": layer.is_conv,
        "comment": _shape_comment(layer),
        "in_h": in_h, "in_w": in_w, "in_c": in_c, "in_words": words_for(in_c),
        "out_h": out_h, "out_w": out_w, "out_c": out_c, "out_words": words_for(out_c),
        "ksize": layer.ksize, "stride": layer.stride, "pad": layer.pad,
        "conv_h": conv_h, "conv_w": conv_w,
        "pool_k": pool.ksize if pool else 1, "pool_s": pool.stride if pool else 1, "pool_p": pool.pad if pool else 0,
        "in_total_words": in_h * in_w * words_for(in_c), "n_valid": in_h * in_w * in_c,
        "weight_type": weight_type,
        "weight_count": int(weights.size),
        "weights16": fconv_weights16(layer),
        "weight_lines": weight_lines,
        "threshold_lines": _lines([str(int(v)) for v in layer.threshold], INTS_PER_LINE),
        "flip_lines": _lines([str(int(v)) for v in layer.flip], INTS_PER_LINE * 2),
        "input": "input_hwc" if index == 0 else ("act_even" if (index - 1) % 2 == 0 else "act_odd"),
        "output": "act_even" if index % 2 == 0 else "act_odd",
    }


def render_context(program: DeviceProgram, reproduce: str = "") -> dict[str, Any]:
    """Everything the C templates see (also documented in docs/c_target.md for other templates)."""
    check_program(program)
    plan = memory_plan(program)
    prefix = program.spec.name
    layers = [_layer_context(index, layer, prefix.upper()) for index, layer in enumerate(program.layers)]
    exit_ = program.exit
    exit_h, exit_w, exit_c = exit_.in_hwc
    split_h, split_w, split_c = program.split_hwc
    input_h, input_w, input_c = program.input_hwc
    return {
        "version": __version__,
        "model_name": program.spec.name,
        # Prefix of every generated symbol (p) and macro (P).
        "p": prefix,
        "P": prefix.upper(),
        "content_hash": program.content_hash,
        "hash_bytes": [f"0x{byte:02x}" for byte in bytes.fromhex(program.content_hash)],
        "reproduce": reproduce,
        "input_h": input_h, "input_w": input_w, "input_c": input_c,
        "split_h": split_h, "split_w": split_w, "split_c": split_c, "split_words": program.split_words,
        "split_layer": program.split_layer,
        "n_classes": program.n_classes,
        "n_answer_classes": program.spec.n_classes,
        "class_names": [c_string(name) for name in program.spec.exit_class_names(program.tier)],
        # Big-Little: the class each exit output names (-1 for "other"); empty for an ordinary device part.
        "exit_classes": ([*program.spec.priority_classes, OTHER_CLASS] if program.spec.big_little else []),
        "threshold": c_double(program.threshold),
        "layers": layers,
        "split_buffer": layers[-1]["output"],
        "exit": {
            "name": program.spec.device.exit_name,
            "in_words": exit_h * exit_w * words_for(exit_c),
            "n_valid": exit_h * exit_w * exit_c,
            "weight_count": int(exit_.packed_weights.size),
            "weight_lines": _lines(_hex_words(exit_.packed_weights), WORDS_PER_LINE),
            "scale": [c_double(v) for v in exit_.scale],
            "offset": [c_double(v) for v in exit_.offset],
        },
        "even_words": plan.even_words, "odd_words": plan.odd_words, "scratch_int32": plan.scratch_int32,
        "ram_bytes": plan.ram_bytes,
        "weight_bytes": program.weight_bytes,
        "request_bytes": request_bytes(program),
        "core_sources": [f"{prefix}_model.c", *INFERENCE_SOURCES],
        "runner_sources": list(RUNNER_SOURCES),
        "net_sources": list(NET_SOURCES),
    }


def project_files(model_name: str) -> dict[str, str]:
    """Template -> generated file name for a model (glad's get_templates)."""
    return {template: output.format(name=model_name) for template, output in TEMPLATES.items()}


def io_buffer_bytes(program: DeviceProgram) -> int:
    """The descriptor's I/O buffers (input, request, stage counters) in <name>_model.c, not in ram_bytes:
    callers that size their own (a firmware's frame buffer) can ignore them."""
    return int(np.prod(program.input_hwc)) + request_bytes(program) + 8 * (len(program.layers) + 1)


def metadata(program: DeviceProgram, target: str, files: list[str], ram_bytes: int, flash_weight_bytes: int,
             code_bytes: int | None, reproduce: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project's metadata.json: what it is, what it needs, how to make it again (no timestamp, so the
    same model and command give the same bytes)."""
    name = program.spec.name
    input_h, input_w, input_c = program.input_hwc
    split_h, split_w, split_c = program.split_hwc
    return {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "generator": {"name": "ddnngen", "version": __version__},
        "reproduce": reproduce,
        "target": target,
        "model": {"name": name, "content_hash": program.content_hash, "dataset": program.spec.dataset,
                  "classes": list(program.spec.classes)},
        "input": {"height": input_h, "width": input_w, "channels": input_c, "dtype": "uint8", "layout": "HWC",
                  "bytes": input_h * input_w * input_c},
        "split": {"layer": program.split_layer, "height": split_h, "width": split_w, "channels": split_c,
                  "words": program.split_words, "bytes": 8 * program.split_words, "packing": "bits_u64",
                  "wire_bytes": program.split_bytes, "wire_packing": "bits_dense"},
        **({"big_little": {"priority_classes": list(program.spec.priority_classes),
                           "exit_classes": list(program.spec.exit_class_names(program.tier)),
                           "offload": "raw_u8"}} if program.spec.big_little else {}),
        "threshold": program.threshold,
        "memory": {"ram_bytes": ram_bytes, "flash_weight_bytes": flash_weight_bytes, "code_bytes": code_bytes,
                   "io_buffer_bytes": io_buffer_bytes(program), "request_bytes": request_bytes(program)},
        "symbols": {"header": f"{name}_model.h", "infer": f"{name}_infer", "infer_timed": f"{name}_infer_timed",
                    "descriptor": f"{name}_model", "macro_prefix": name.upper() + "_"},
        "files": sorted(files),
        **(extra or {}),
    }


def write_metadata(out: Path, meta: dict[str, Any]) -> None:
    (out / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir() / "c")),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, autoescape=False)


def load_program(program_or_model_path: DeviceProgram | str | Path, threshold: float | None = None,
                 arch: str | None = None) -> DeviceProgram:
    if isinstance(program_or_model_path, DeviceProgram):
        program = program_or_model_path
        if threshold is not None:
            program = dataclasses.replace(program, threshold=float(threshold))
        return program
    return fold(load_model(program_or_model_path, arch=arch), threshold)


def measure_code_bytes(out_dir: Path, model_name: str) -> int | None:
    """Text size of the inference code (model + its runtime objects, not the runner) in a host build."""
    size_tool, compiler = shutil.which("size"), shutil.which("cc") or shutil.which("gcc")
    if size_tool is None or compiler is None:
        return None
    sources = [f"{model_name}_model.c", "ddnn_blinear.c", "ddnn_exit.c"]
    with tempfile.TemporaryDirectory(prefix="ddnn_size_") as tmp:
        objects = []
        for source in sources:
            obj = str(Path(tmp) / (source + ".o"))
            subprocess.run([compiler, "-std=c99", "-O2", "-ffp-contract=off", "-c", source, "-o", obj],
                           cwd=out_dir, check=True, capture_output=True)
            objects.append(obj)
        result = subprocess.run([size_tool, "-t", *objects], check=True, capture_output=True, text=True)
    # The last line is the total: text data bss dec hex filename. text includes .rodata (the weights).
    text = int(result.stdout.strip().splitlines()[-1].split()[0])
    return text


def compile_c(program_or_model_path: DeviceProgram | str | Path, out_dir: str | Path, *,
              threshold: float | None = None, arch: str | None = None, measure_code: bool = False,
              reproduce: str | None = None) -> targets.CompileReport:
    """Write the C project for the device part into ``out_dir``; returns sizes."""
    program = load_program(program_or_model_path, threshold, arch)
    if reproduce is None:
        source = program_or_model_path if not isinstance(program_or_model_path, DeviceProgram) else "MODEL.npz"
        reproduce = f"ddnngen compile {source} --target c -o OUT"
    context = render_context(program, reproduce)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompileError(f"{out}: cannot create the output folder ({exc.strerror})") from exc
    env = _environment()
    files = render_templates(env, project_files(program.spec.name), context, out)
    files += copy_runtime(RUNTIME_FILES, out)
    code_bytes = measure_code_bytes(out, program.spec.name) if measure_code else None
    report = targets.CompileReport("c", out, files, context["ram_bytes"], context["weight_bytes"], code_bytes,
                                   {"even_words": context["even_words"], "odd_words": context["odd_words"],
                                    "scratch_int32": context["scratch_int32"],
                                    "input_bytes": context["input_h"] * context["input_w"] * context["input_c"]})
    write_metadata(out, metadata(program, "c", files, report.ram_bytes, report.flash_weight_bytes, code_bytes,
                                 reproduce))
    report.files.append("metadata.json")
    log.info("%s", report.summary())
    return report


def render_templates(env: jinja2.Environment, outputs: dict[str, str], context: dict[str, Any],
                     out: Path) -> list[str]:
    """Renders each template into ``out`` under its output name; returns the names written."""
    for template, name in outputs.items():
        (out / name).write_text(env.get_template(template).render(**context), encoding="utf-8")
    return list(outputs.values())


def copy_runtime(names: tuple[str, ...], out: Path) -> list[str]:
    """Copies the named c_runtime/ files into ``out``; returns their names."""
    runtime = c_runtime_dir()
    for name in names:
        shutil.copyfile(runtime / name, out / name)
    return list(names)


targets.register_target(
    "c", compile_c, "portable C99 project (weights header, model, runner, Makefile)",
    options=[click.Option(["--measure-code/--no-measure-code"], default=True, show_default=True,
                          help="C target: build the model code for this host and report its size with `size`.")])
