"""c_runtime/ddnn_features.c, the C camera's static ring of splits, with its two threads: tests/features_check.c
keeps splits on one thread while the answering thread's consumer is still sending one, built under
ASan/UBSan and, separately, ThreadSanitizer. The send must not hold the buffer (the device thread would wait on
the network) and must not see its bytes change."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.resources import c_runtime_dir

CHECK = Path(__file__).with_name("features_check.c")
SANITIZERS = {"address": toolchain.SANITIZE_CFLAGS,
              "thread": ("-fsanitize=thread", "-fno-omit-frame-pointer", "-g")}


@pytest.mark.parametrize("sanitizer", sorted(SANITIZERS))
def test_keeping_goes_on_while_a_split_is_sent(tmp_path: Path, sanitizer: str) -> None:
    require_tool("gcc")
    runtime = c_runtime_dir()
    binary = tmp_path / "features_check"
    built = subprocess.run(["gcc", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-O1", *toolchain.WARNING_CFLAGS,
                            *SANITIZERS[sanitizer], "-I", str(runtime), "-o", str(binary), str(CHECK),
                            str(runtime / "ddnn_features.c"), "-lpthread"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "OK\n", run.stdout + run.stderr
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr
