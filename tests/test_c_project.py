"""What a generated C project is made of: two models linked into one program (every symbol carries the model's
name), metadata.json, and the runtime files each target ships."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool

from ddnn_gen import __version__
from ddnn_gen.codegen import c_target, opencl_target
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.codegen.resources import c_runtime_dir
from ddnn_gen.codegen.toolchain import WARNING_CFLAGS
from ddnn_gen.device.samples import write_samples
from ddnn_gen.errors import CompileError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire import codec
from ddnn_server import pahoc_transport

# Calls both models sample by sample, interleaved, and prints each model's answer only after the other model
# has run: a model whose result pointed into shared (or the other model's) buffers would print wrong bits.
TWO_MODELS_MAIN = r"""
#include <stdio.h>
#include <string.h>

#include "ddnn_samples.h"
#include "fmnist_32_model.h"
#include "mnist_16_model.h"

static void print(const ddnn_model *model, unsigned long index, const ddnn_result *r)
{
    int w;
    printf("%s,%lu,%ld,%.17g,%d,", model->name, index, (long)r->class_id, r->entropy, r->exit_local);
    for (w = 0; w < model->split_words; ++w)
        printf("%016llx", (unsigned long long)r->split[w]);
    printf("\n");
}

int main(int argc, char **argv)
{
    static uint8_t image[MNIST_16_INPUT_BYTES > FMNIST_32_INPUT_BYTES ? MNIST_16_INPUT_BYTES : FMNIST_32_INPUT_BYTES];
    ddnn_samples samples;
    ddnn_result a, b;
    int32_t label;
    unsigned long index = 0;
    char err[256];
    if (argc != 2 || mnist_16_model.infer != mnist_16_infer || fmnist_32_model.infer != fmnist_32_infer
        || strcmp(mnist_16_model.name, MNIST_16_MODEL_NAME) != 0 || fmnist_32_model.n_classes != FMNIST_32_N_CLASSES)
        return 3;
    if (ddnn_samples_open(&samples, argv[1], 28, 28, 1, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    while (ddnn_samples_next(&samples, &label, image) == 1) {
        mnist_16_infer(image, MNIST_16_DEFAULT_THRESHOLD, &a);
        fmnist_32_model.infer(image, fmnist_32_model.default_threshold, &b);
        print(&mnist_16_model, index, &a);
        print(&fmnist_32_model, index, &b);
        ++index;
    }
    ddnn_samples_close(&samples);
    return 0;
}
"""


@pytest.fixture(scope="module")
def programs(mnist_model_path: Path, fmnist_model_path: Path) -> dict[str, DeviceProgram]:
    return {"mnist_16": fold(load_model(mnist_model_path)), "fmnist_32": fold(load_model(fmnist_model_path))}


def test_two_models_link_into_one_program(programs: dict[str, DeviceProgram], fmnist_test, tmp_path: Path) -> None:
    """mnist_16 and fmnist_32 both take 28x28x1 images, so both run on the same real Fashion-MNIST samples."""
    compiler = require_tool("cc")
    sources = []
    for name, program in programs.items():
        compile_c(program, tmp_path / name)
        sources.append(tmp_path / name / f"{name}_model.c")
    runtime = tmp_path / "mnist_16"  # the shared runtime files are the same in both projects
    sources += [runtime / file for file in (*c_target.INFERENCE_SOURCES, "ddnn_samples.c")]
    (tmp_path / "main.c").write_text(TWO_MODELS_MAIN)
    binary = tmp_path / "two_models"
    subprocess.run([compiler, "-std=c99", "-O2", "-ffp-contract=off", *WARNING_CFLAGS, "-I", str(tmp_path / "mnist_16"),
                    "-I", str(tmp_path / "fmnist_32"), "-o", str(binary), str(tmp_path / "main.c"),
                    *map(str, sources), "-lm"], check=True, capture_output=True, text=True)
    data = fmnist_test.subset(300, offset=500)
    samples = tmp_path / "samples.bin"
    write_samples(samples, data.images, data.labels)
    output = subprocess.run([str(binary), str(samples)], check=True, capture_output=True, text=True).stdout
    rows = [line.split(",") for line in output.splitlines()]
    assert len(rows) == 2 * len(data)
    for name, program in programs.items():
        mine = [row for row in rows if row[0] == name]
        ref = reference.run_device(program, data.images)
        assert [int(row[1]) for row in mine] == list(range(len(data)))
        assert np.array_equal([int(row[2]) for row in mine], ref.local_class), name
        assert np.array_equal([float(row[3]) for row in mine], ref.entropy), name
        assert np.array_equal([bool(int(row[4])) for row in mine], ref.local_exit), name
        want_split = ["".join(f"{int(word):016x}" for word in sample.ravel()) for sample in ref.split_words]
        assert [row[5] for row in mine] == want_split, name
    # Nothing generated escapes its model's name: every external symbol of a model object is prefixed.
    nm = require_tool("nm")
    for name in programs:
        obj = tmp_path / f"{name}.o"
        subprocess.run([compiler, "-std=c99", "-c", "-I", str(tmp_path / name), "-o", str(obj),
                        str(tmp_path / name / f"{name}_model.c")], check=True)
        defined = [line.split()[-1] for line in subprocess.run([nm, "-g", "--defined-only", str(obj)], check=True,
                                                               capture_output=True, text=True).stdout.splitlines()]
        assert defined and all(symbol.startswith(f"{name}_") for symbol in defined), defined


def test_metadata_json(programs: dict[str, DeviceProgram], tmp_path: Path) -> None:
    program = programs["fmnist_32"]
    report = compile_c(program, tmp_path / "a", measure_code=True)
    text = (tmp_path / "a" / "metadata.json").read_text()
    meta = json.loads(text)
    assert meta["format"] == c_target.METADATA_FORMAT and meta["version"] == c_target.METADATA_VERSION
    assert meta["generator"] == {"name": "ddnngen", "version": __version__}
    assert meta["target"] == "c"
    assert meta["model"]["name"] == "fmnist_32" and meta["model"]["content_hash"] == program.content_hash
    assert meta["model"]["classes"] == list(program.spec.classes)
    assert (meta["input"]["height"], meta["input"]["width"], meta["input"]["channels"]) == program.input_hwc
    assert meta["input"]["bytes"] == 784
    split = meta["split"]
    assert (split["height"], split["width"], split["channels"]) == program.split_hwc
    assert split["words"] == program.split_words and split["layer"] == len(program.layers) == 2
    assert meta["threshold"] == program.threshold
    assert meta["memory"]["ram_bytes"] == report.ram_bytes and meta["memory"]["flash_weight_bytes"] == 9456
    assert meta["memory"]["code_bytes"] == report.code_bytes and report.code_bytes is not None
    assert meta["memory"]["request_bytes"] == codec.REQUEST_HEADER_BYTES + 784  # raw input > the 392-byte split
    assert c_target.REQUEST_HEADER_BYTES == codec.REQUEST_HEADER_BYTES
    assert f"#define DDNN_REQUEST_HEADER_BYTES {codec.REQUEST_HEADER_BYTES}\n" in (
        c_runtime_dir() / "ddnn_protocol.h").read_text()
    assert meta["reproduce"].startswith("ddnngen compile")
    assert meta["symbols"]["infer"] == "fmnist_32_infer" and meta["symbols"]["macro_prefix"] == "FMNIST_32_"
    shipped = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert sorted(meta["files"]) == sorted(set(shipped) - {"metadata.json"})
    header = (tmp_path / "a" / "fmnist_32_model.h").read_text()
    assert f"#define FMNIST_32_ARENA_BYTES {report.ram_bytes}\n" in header
    # No timestamp: the same model and command give the same bytes.
    compile_c(program, tmp_path / "b", measure_code=True)
    assert (tmp_path / "b" / "metadata.json").read_text() == text
    assert all((tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes() for name in shipped)


def test_opencl_metadata(programs: dict[str, DeviceProgram], tmp_path: Path) -> None:
    report = opencl_target.compile_opencl(programs["fmnist_32"], tmp_path, opencl_layers="conv2")
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["target"] == "opencl" and meta["memory"]["ram_bytes"] == report.ram_bytes
    assert meta["opencl"]["placement"] == {"conv1": "c", "conv2": "opencl", "local": "c"}
    assert meta["opencl"]["max_batch"] == opencl_target.DEFAULT_MAX_BATCH
    assert sorted(meta["files"]) == sorted(path.name for path in tmp_path.iterdir() if path.name != "metadata.json")


def test_each_target_ships_its_runtime_files(programs: dict[str, DeviceProgram], tmp_path: Path) -> None:
    runtime = {path.name for path in c_runtime_dir().iterdir() if path.suffix in (".c", ".h")}
    c_files, ocl_files = set(c_target.RUNTIME_FILES), set(opencl_target.RUNTIME_FILES)
    server_files = set(pahoc_transport.RUNTIME_FILES)  # the server's Paho C shim: in no device project
    assert c_files | ocl_files | server_files == runtime, "every runtime file belongs to a list"
    assert not c_files & ocl_files and not server_files & (c_files | ocl_files), "and to one list only"
    program = programs["fmnist_32"]
    compile_c(program, tmp_path / "c")
    generated = {f"fmnist_32_{suffix}" for suffix in ("model.h", "model.c", "weights.h")}
    assert {p.name for p in (tmp_path / "c").iterdir()} == c_files | generated | {"Makefile", "README.md",
                                                                                  "metadata.json"}
    opencl_target.compile_opencl(program, tmp_path / "ocl")
    ocl_generated = {f"fmnist_32_{suffix}" for suffix in ("ocl_kernels.cl", "ocl_kernels.h", "ocl_model.h",
                                                          "ocl_model.c")}
    assert {p.name for p in (tmp_path / "ocl").iterdir()} == ({p.name for p in (tmp_path / "c").iterdir()}
                                                              | ocl_files | ocl_generated)


def test_model_names_the_runtime_owns_are_refused(programs: dict[str, DeviceProgram], tmp_path: Path) -> None:
    import dataclasses

    program = programs["mnist_16"]
    for name in ("ddnn", "ddnn_cam", "DDNNx"):
        renamed = dataclasses.replace(program, spec=dataclasses.replace(program.spec, name=name))
        with pytest.raises(CompileError, match="belong to the C runtime"):
            compile_c(renamed, tmp_path / name)
    layers = list(program.layers)
    layers[1] = dataclasses.replace(layers[1], name="exit")
    with pytest.raises(CompileError, match="named 'exit'"):
        compile_c(dataclasses.replace(program, layers=tuple(layers)), tmp_path / "exit")
