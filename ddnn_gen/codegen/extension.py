"""Building C into Python extensions through cffi (API mode), cached: the machinery the device binding
(``ddnn_gen.device.c_binding``: the generated C of a model) and the server's Paho C transport
(``ddnn_server.pahoc_transport``: a hand-written shim over libpaho-mqtt3as) share.

Extensions are built once and cached under ``$DDNN_CFFI_CACHE``, else ``$XDG_CACHE_HOME/ddnngen/cffi``,
else ``~/.cache/ddnngen/cffi``, keyed by a digest of everything the build reads (generator version, cdef,
sources, flags, libraries, Python ABI). The build runs in a child process, so compiler output never mixes with
the caller's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from ddnn_gen import __version__
from ddnn_gen.codegen.toolchain import BuildError

log = logging.getLogger(__name__)

#: Flags of the extension's C code: the Makefile's DDNN_CFLAGS (bit-exact exit) and its default
#: optimisation for a native build, so the binding runs the code the runner runs. They come after Python's
#: own CFLAGS, whose -fwrapv (signed overflow wraps) cost mnist_16 ~15% in bench/bench_binding.py: the
#: runtime never relies on signed wrap-around (UBSan-clean), so it is switched back off.
CFLAGS = ("-std=c99", "-D_POSIX_C_SOURCE=200112L", "-ffp-contract=off", "-O3", "-march=native", "-fno-wrapv")

# Run by a child interpreter: build one extension (arguments as JSON on stdin).
_BUILD_SCRIPT = """
import json, sys, cffi
args = json.load(sys.stdin)
ffi = cffi.FFI()
ffi.cdef(args["cdef"])
ffi.set_source(args["module"], args["source"], sources=args["sources"], include_dirs=args["include_dirs"],
               extra_compile_args=args["cflags"], libraries=["m", *args["libraries"]])
print(ffi.compile(tmpdir=args["tmpdir"]))
"""


def cache_root() -> Path:
    """Where built extensions are kept (see the module docstring)."""
    if os.environ.get("DDNN_CFFI_CACHE"):
        return Path(os.environ["DDNN_CFFI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ddnngen" / "cffi"


def _digest(parts: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"{path}: not a loadable extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Extensions loaded in this process, by file: one module and one lock per extension, however many CModel
# objects wrap it (they would share its static buffers).
_loaded: dict[Path, tuple[ModuleType, threading.Lock]] = {}
_loaded_lock = threading.Lock()


def build_extension(cache_dir: str | Path | None, label: str, cdef: str, source: str, sources: Sequence[Path],
                    include_dirs: Sequence[Path], cflags: Sequence[str], key_files: Sequence[Path],
                    libraries: Sequence[str] = ()) -> tuple[ModuleType, threading.Lock]:
    """The extension for exactly these inputs and its lock, from this process, the cache or built first. The
    key digests everything the build reads (``key_files`` are the C sources and headers, ``libraries`` are
    linked besides libm); a finished build is renamed into place, so concurrent builders never see half a
    file."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = _digest([__version__.encode(), cdef.encode(), source.encode(), " ".join(cflags).encode(), suffix.encode(),
                   *([" ".join(libraries).encode()] if libraries else []),  # keeps older keys valid
                   *(path.name.encode() + b"\0" + path.read_bytes() for path in sorted(key_files))])[:16]
    key_dir = (Path(cache_dir) if cache_dir is not None else cache_root()) / f"{label}-{key}"
    module = f"_ddnn_{label.replace('-', '_').replace('.', '_')}_{key}"
    target = (key_dir / (module + suffix)).resolve()
    with _loaded_lock:
        if target not in _loaded:
            _build_if_missing(target, module, cdef, source, sources, include_dirs, cflags, libraries)
            _loaded[target] = (_load_module(module, target), threading.Lock())
        return _loaded[target]


def _build_if_missing(target: Path, module: str, cdef: str, source: str, sources: Sequence[Path],
                      include_dirs: Sequence[Path], cflags: Sequence[str], libraries: Sequence[str]) -> None:
    key_dir = target.parent
    if not target.exists():
        key_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="build_", dir=key_dir) as tmp:
            args = {"cdef": cdef, "module": module, "source": source, "sources": [str(p) for p in sources],
                    "include_dirs": [str(p) for p in include_dirs], "cflags": list(cflags), "tmpdir": tmp,
                    "libraries": list(libraries)}
            result = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT], input=json.dumps(args),
                                    capture_output=True, text=True)
            built = Path(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 and result.stdout else None
            if built is None or not built.is_file():
                raise BuildError(f"building the cffi extension {module} failed:\n{result.stdout}{result.stderr}")
            os.replace(built, target)
        log.info("built %s", target)
