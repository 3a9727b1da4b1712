"""The generated C in this process through cffi (API mode): ``<name>_infer`` on NumPy buffers.

:class:`CModel` compiles a model's C project (``codegen.c_target``) into a Python extension with the
project's own sources and flags (``-std=c99 -ffp-contract=off``, as its Makefile), so it computes the
runner's bits exactly; :class:`CRuntime` binds the model-independent runtime functions (threshold text,
device-id rule, request and reply bytes) that the test vectors run against Python's twins.

Extensions are built and cached by ``ddnn_gen.codegen.extension``, keyed by model content hash, generator
version and a digest of the generated sources, flags and Python ABI (the sources also depend on the threshold,
which the content hash leaves out).

The generated code is not reentrant (its activations are static buffers): every call into one loaded
model holds that model's lock, and cffi releases the GIL meanwhile, so other threads keep running.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ddnn_gen import __version__
from ddnn_gen.codegen import c_target
from ddnn_gen.codegen.extension import CFLAGS, build_extension, cache_root
from ddnn_gen.codegen.resources import c_runtime_dir
from ddnn_gen.codegen.toolchain import BuildError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram

log = logging.getLogger(__name__)

_RESULT_CDEF = """
typedef struct {
    int32_t class_id;
    double entropy;
    int exit_local;
    const double *logits;
    const uint64_t *split;
    const int32_t *sums;
} ddnn_result;
typedef struct {
    const char *name;
    int input_h, input_w, input_c;
    size_t input_bytes;
    int split_h, split_w, split_c;
    int split_words;
    int split_layer;
    int n_classes;
    double default_threshold;
    int n_answer_classes;
    int offload_raw;
    ...;
} ddnn_model;
void ddnn_infer_batch(const ddnn_model *model, const uint8_t *inputs, size_t n, double threshold, int32_t *class_id,
                      double *entropy, uint8_t *exit_local, uint64_t *split_words, double *logits);
"""

_RUNTIME_CDEF = """
int ddnn_threshold_parse(const char *text, size_t len, double *value);
int ddnn_device_id_valid(const char *id);
typedef struct {
    uint8_t model_hash[16];
    uint16_t split_layer;
    uint16_t channels, height, width;
    uint64_t request_id;
    uint64_t device_time_us;
    uint64_t event_id;
    uint8_t view_index;
    uint8_t view_count;
} ddnn_request_header;
typedef struct {
    uint64_t request_id;
    int status;
    int32_t class_id;
    uint32_t server_us, queue_us, upstream_us, upstream_server_us;
    uint8_t answered_by, flags;
    uint16_t n_top;
    uint16_t top_class[16];
    float top_prob[16];
    char message[256];
    ...;
} ddnn_reply;
size_t ddnn_request_size(size_t n_words);
size_t ddnn_request_encode(const ddnn_request_header *header, const uint64_t *words, size_t n_words, uint8_t *out,
                           size_t out_len);
size_t ddnn_request_encode_raw(const ddnn_request_header *header, const uint8_t *pixels, size_t n_bytes,
                               uint8_t *out, size_t out_len);
size_t ddnn_request_dense_size(uint16_t channels, uint16_t height, uint16_t width);
size_t ddnn_request_encode_dense(const ddnn_request_header *header, const uint64_t *words, size_t n_words,
                                 uint8_t *out, size_t out_len);
int ddnn_reply_decode(const uint8_t *data, size_t len, ddnn_reply *reply);
size_t ddnn_request_sums_size(size_t n_classes);
size_t ddnn_request_encode_sums(const ddnn_request_header *header, const int32_t *sums, size_t n_classes, uint8_t *out,
                                size_t out_len);
size_t ddnn_request_encode_no_features(const ddnn_request_header *header, uint8_t *out, size_t out_len);
typedef struct {
    uint8_t model_hash[16];
    uint64_t event_id;
    uint64_t request_id;
} ddnn_feature_request;
size_t ddnn_feature_request_encode(const ddnn_feature_request *request, uint8_t *out, size_t out_len);
int ddnn_feature_request_decode(const uint8_t *data, size_t len, ddnn_feature_request *request);
size_t ddnn_features_capacity_for(size_t request_bytes);
int ddnn_features_init(size_t capacity, size_t request_bytes);
void ddnn_features_keep(uint64_t event_id, uint64_t request_id, const uint8_t *request, size_t len);
size_t ddnn_features_held(void);
long ddnn_binding_features_take(uint64_t event_id, uint64_t request_id, uint8_t *out, size_t out_len);
"""
# ddnn_features_answer hands the held split to a C callback; the binding's copies it out (-1: not held).
_RUNTIME_SOURCE = """#include <string.h>
#include "ddnn_exit.h"
#include "ddnn_features.h"
#include "ddnn_protocol.h"
typedef struct { uint8_t *out; size_t out_len; long len; } ddnn_binding_copy;
static int ddnn_binding_copy_out(const uint8_t *request, size_t len, void *context)
{
    ddnn_binding_copy *copy = (ddnn_binding_copy *)context;
    copy->len = len <= copy->out_len ? (long)len : -2;
    if (copy->len >= 0)
        memcpy(copy->out, request, len);
    return 0;
}
static long ddnn_binding_features_take(uint64_t event_id, uint64_t request_id, uint8_t *out, size_t out_len)
{
    ddnn_binding_copy copy = {out, out_len, -1};
    int sent = 0;
    return ddnn_features_answer(event_id, request_id, ddnn_binding_copy_out, &copy, &sent) ? copy.len : -1;
}
"""
#: c_runtime/ files the runtime module is built from.
RUNTIME_SOURCES = ("ddnn_exit.c", "ddnn_blinear.c", "ddnn_protocol.c", "ddnn_features.c")

@dataclass
class CResult:
    """Per-sample outputs of the generated C, in the reference's shapes."""

    logits: np.ndarray  # float64 (N, K)
    local_class: np.ndarray  # int32 (N,)
    entropy: np.ndarray  # float64 (N,)
    local_exit: np.ndarray  # bool (N,)
    split_words: np.ndarray  # uint64 (N, H, W, words)


class LocalAnswer(NamedTuple):
    """One sample's device answer: the local exit's class, entropy and decision, and its split (a tuple: built
    once per sample on the per-sample path, where a frozen dataclass costs a microsecond)."""

    local_class: int
    entropy: float
    local_exit: bool
    split_words: np.ndarray  # uint64 (H, W, words)


class CModel:
    """One model's generated C, built as an extension and loaded into this process."""

    def __init__(self, program: DeviceProgram, cflags: Sequence[str] = CFLAGS,
                 cache_dir: str | Path | None = None) -> None:
        self.program = program
        self.name = program.spec.name
        with tempfile.TemporaryDirectory(prefix="ddnn_cffi_src_") as tmp:
            project = Path(tmp)
            c_target.compile_c(program, project, reproduce="ddnngen (cffi binding)")
            sources = [project / name for name in self._sources()]
            cdef = (_RESULT_CDEF + "const ddnn_model *ddnn_binding_model(void);\n"
                    f"void {self.name}_infer(const uint8_t *input_hwc, double threshold, ddnn_result *result);\n")
            # cffi copies a const global; the descriptor's address comes from a function instead.
            source = (f'#include "{self.name}_model.h"\n'
                      f"static const ddnn_model *ddnn_binding_model(void) {{ return &{self.name}_model; }}\n")
            label = f"{self.name}-{program.content_hash[:16]}-{__version__}"
            self.module, self._lock = build_extension(cache_dir, label, cdef, source, sources, [project], cflags,
                                                       sorted(project.glob("*.[ch]")))
        self.ffi: Any = self.module.ffi
        self.lib: Any = self.module.lib
        self._descriptor_ptr = self.lib.ddnn_binding_model()
        self.descriptor = self._descriptor_ptr[0]
        self._infer = getattr(self.lib, f"{self.name}_infer")
        self._result = self.ffi.new("ddnn_result *")  # reused under the lock by infer()
        split_h, split_w, _ = program.split_hwc
        self._split_shape = (split_h, split_w, program.split_words // (split_h * split_w))
        self._split_bytes = 8 * program.split_words
        self._check_descriptor()

    def _sources(self) -> list[str]:
        return [f"{self.name}_model.c", *c_target.INFERENCE_SOURCES]

    def _check_descriptor(self) -> None:
        """The loaded code is the program's (shapes and classes), not a stale cache entry."""
        d, p = self.descriptor, self.program
        got = (d.input_h, d.input_w, d.input_c, d.split_h, d.split_w, d.split_c, d.split_words, d.split_layer,
               d.n_classes, d.n_answer_classes, d.offload_raw)
        want = (*p.input_hwc, *p.split_hwc, p.split_words, p.split_layer, p.n_classes, p.spec.n_classes,
                int(p.spec.big_little))
        if got != want:
            raise BuildError(f"the cffi extension of {self.name} has shapes {got}, the model {want}; clear "
                             f"{cache_root()}")

    def _images_hwc(self, images_u8: np.ndarray) -> np.ndarray:
        images = np.asarray(images_u8)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        hwc = reference.images_to_hwc(images)
        if hwc.shape[1:] != self.program.input_hwc:
            raise ValueError(f"images are {hwc.shape[1:]} (HWC), {self.name} expects {self.program.input_hwc}")
        return hwc

    def _threshold(self, threshold: float | None) -> float:
        return self.program.threshold if threshold is None else float(threshold)

    def run(self, images_u8: np.ndarray, threshold: float | None = None) -> CResult:
        """The device part on images (N, C, H, W) uint8, one ``ddnn_infer_batch`` call."""
        hwc = self._images_hwc(images_u8)
        result = self.empty_result(len(hwc))
        self.infer_into(hwc, self._threshold(threshold), result)
        result.local_exit = result.local_exit.astype(bool)
        return result

    def empty_result(self, n: int) -> CResult:
        """Output arrays for ``n`` samples, as :meth:`infer_into` fills them (exit decisions as uint8)."""
        return CResult(np.empty((n, self.program.n_classes), np.float64), np.empty(n, np.int32),
                       np.empty(n, np.float64), np.empty(n, np.uint8), np.empty((n, *self._split_shape), np.uint64))

    def infer_into(self, images_hwc: np.ndarray, threshold: float, out: CResult) -> None:
        """``ddnn_infer_batch`` on contiguous (N, H, W, C) uint8 images into ``out``'s arrays (exit as uint8)."""
        ffi = self.ffi
        images_hwc = np.ascontiguousarray(images_hwc, dtype=np.uint8)
        for array, dtype in ((out.logits, np.float64), (out.local_class, np.int32), (out.entropy, np.float64),
                             (out.local_exit, np.uint8), (out.split_words, np.uint64)):
            if array.dtype != dtype or not array.flags.c_contiguous or len(array) != len(images_hwc):
                raise ValueError(f"output array {array.dtype} {array.shape} does not fit {len(images_hwc)} samples")
        with self._lock:
            self.lib.ddnn_infer_batch(
                self._descriptor_ptr, ffi.from_buffer("uint8_t[]", images_hwc), len(images_hwc), threshold,
                ffi.from_buffer("int32_t[]", out.local_class, require_writable=True),
                ffi.from_buffer("double[]", out.entropy, require_writable=True),
                ffi.from_buffer("uint8_t[]", out.local_exit, require_writable=True),
                ffi.from_buffer("uint64_t[]", out.split_words, require_writable=True),
                ffi.from_buffer("double[]", out.logits, require_writable=True))

    def infer(self, image_hwc: np.ndarray, threshold: float | None = None) -> LocalAnswer:
        """One sample (H, W, C) uint8 through ``<name>_infer`` (the per-sample entry point a device calls)."""
        image = np.ascontiguousarray(image_hwc, dtype=np.uint8)
        if image.shape != self.program.input_hwc:
            raise ValueError(f"image is {image.shape} (HWC), {self.name} expects {self.program.input_hwc}")
        threshold = self._threshold(threshold)
        result = self._result
        with self._lock:
            self._infer(self.ffi.from_buffer("uint8_t[]", image), threshold, result)
            # The split lives in the model's static buffer: copy it out before the next call reuses it.
            split = np.frombuffer(self.ffi.buffer(result.split, self._split_bytes), dtype=np.uint64).copy()
            answer = LocalAnswer(int(result.class_id), float(result.entropy), bool(result.exit_local),
                                 split.reshape(self._split_shape))
        return answer

    def exit_sums(self, image_hwc: np.ndarray) -> np.ndarray:
        """One sample's local-exit integer sums as ``<name>_infer`` leaves them in ``result.sums`` (int32, one per
        class): what a scores-first C camera sends."""
        image = np.ascontiguousarray(image_hwc, dtype=np.uint8)
        if image.shape != self.program.input_hwc:
            raise ValueError(f"image is {image.shape} (HWC), {self.name} expects {self.program.input_hwc}")
        result = self._result
        with self._lock:
            self._infer(self.ffi.from_buffer("uint8_t[]", image), self._threshold(None), result)
            return np.frombuffer(self.ffi.buffer(result.sums, 4 * self.program.n_classes), dtype=np.int32).copy()

    def answers(self, images_u8: np.ndarray) -> Callable[[int, float], LocalAnswer]:
        """(sample index, threshold) -> that image's answer through :meth:`infer` (a simulated device's part)."""
        hwc = self._images_hwc(images_u8)
        return lambda index, threshold: self.infer(hwc[index], threshold)


def load(program: DeviceProgram, cflags: Sequence[str] = CFLAGS) -> CModel:
    """The binding of ``program``: its extension built or taken from the cache, loaded once per process (a
    second CModel of the same sources shares the module and its lock)."""
    return CModel(program, cflags)


class CRuntime:
    """The model-independent runtime functions of c_runtime/, for checking them against Python's twins."""

    def __init__(self, cflags: Sequence[str] = CFLAGS, cache_dir: str | Path | None = None) -> None:
        runtime = c_runtime_dir()
        sources = [runtime / name for name in RUNTIME_SOURCES]
        self.module, _ = build_extension(cache_dir, f"runtime-{__version__}", _RUNTIME_CDEF, _RUNTIME_SOURCE, sources,
                                         [runtime], cflags, [*sources, *runtime.glob("*.h")])
        self.ffi: Any = self.module.ffi
        self.lib: Any = self.module.lib

    def threshold_parse(self, text: bytes) -> float | None:
        """``ddnn_threshold_parse`` on exactly these bytes (NULs included): the value, or None when rejected."""
        value = self.ffi.new("double *", -1.0)
        buffer = self.ffi.new("char[]", max(1, len(text)))
        self.ffi.memmove(buffer, text, len(text))
        return float(value[0]) if self.lib.ddnn_threshold_parse(buffer, len(text), value) else None

    def device_id_valid(self, device_id: bytes) -> bool:
        return bool(self.lib.ddnn_device_id_valid(self.ffi.new("char[]", device_id)))

    def _header(self, model_hash: bytes, split_layer: int, channels: int, height: int, width: int, request_id: int,
                device_time_us: int, views: tuple[int, int, int]) -> Any:
        header = self.ffi.new("ddnn_request_header *")
        header.model_hash = model_hash[:16]
        header.split_layer, header.channels, header.height, header.width = split_layer, channels, height, width
        header.request_id, header.device_time_us = request_id, device_time_us
        header.event_id, header.view_index, header.view_count = views
        return header

    def request_encode(self, model_hash: bytes, split_layer: int, channels: int, height: int, width: int,
                       request_id: int, device_time_us: int, words: np.ndarray,
                       views: tuple[int, int, int] = (0, 0, 0), dense: bool = False) -> bytes | None:
        """``ddnn_request_encode`` (packing 1), or ``ddnn_request_encode_dense`` (packing 4) when ``dense``:
        the request bytes, or None when C refuses (0 bytes written); ``views`` is (event id, view index,
        view count)."""
        header = self._header(model_hash, split_layer, channels, height, width, request_id, device_time_us, views)
        words = np.ascontiguousarray(words, dtype=np.uint64).ravel()
        if dense:
            encode, room = self.lib.ddnn_request_encode_dense, self.lib.ddnn_request_dense_size(channels, height,
                                                                                                width)
        else:
            encode, room = self.lib.ddnn_request_encode, self.lib.ddnn_request_size(len(words))
        out = self.ffi.new("uint8_t[]", int(room))
        size = encode(header, self.ffi.from_buffer("uint64_t[]", words), len(words), out, len(out))
        return bytes(self.ffi.buffer(out, size)) if size else None

    def request_encode_raw(self, model_hash: bytes, channels: int, height: int, width: int, request_id: int,
                           device_time_us: int, pixels: np.ndarray,
                           views: tuple[int, int, int] = (0, 0, 0)) -> bytes | None:
        """``ddnn_request_encode_raw`` (server-only request): the bytes, or None when C refuses."""
        header = self._header(model_hash, 0, channels, height, width, request_id, device_time_us, views)
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8).ravel()
        out = self.ffi.new("uint8_t[]", int(self.lib.ddnn_request_size(0)) + len(pixels))
        size = self.lib.ddnn_request_encode_raw(header, self.ffi.from_buffer("uint8_t[]", pixels), len(pixels), out,
                                                len(out))
        return bytes(self.ffi.buffer(out, size)) if size else None

    def request_encode_sums(self, model_hash: bytes, split_layer: int, request_id: int, device_time_us: int,
                            sums: np.ndarray, views: tuple[int, int, int]) -> bytes | None:
        """``ddnn_request_encode_sums`` (scores first, packing 5): the bytes, or None when C refuses."""
        sums = np.ascontiguousarray(sums, dtype=np.int32).ravel()
        header = self._header(model_hash, split_layer, 0, 0, 0, request_id, device_time_us, views)
        out = self.ffi.new("uint8_t[]", int(self.lib.ddnn_request_sums_size(len(sums))))
        size = self.lib.ddnn_request_encode_sums(header, self.ffi.from_buffer("int32_t[]", sums), len(sums), out,
                                                 len(out))
        return bytes(self.ffi.buffer(out, size)) if size else None

    def request_encode_no_features(self, model_hash: bytes, split_layer: int, request_id: int, device_time_us: int,
                                   views: tuple[int, int, int]) -> bytes | None:
        """``ddnn_request_encode_no_features`` (packing 6): the bytes, or None when C refuses."""
        header = self._header(model_hash, split_layer, 0, 0, 0, request_id, device_time_us, views)
        out = self.ffi.new("uint8_t[]", int(self.lib.ddnn_request_size(0)))
        size = self.lib.ddnn_request_encode_no_features(header, out, len(out))
        return bytes(self.ffi.buffer(out, size)) if size else None

    def feature_request_encode(self, model_hash: bytes, event_id: int, request_id: int) -> bytes | None:
        """``ddnn_feature_request_encode``: the 40 bytes, or None when C refuses."""
        request = self.ffi.new("ddnn_feature_request *")
        request.model_hash, request.event_id, request.request_id = model_hash[:16], event_id, request_id
        out = self.ffi.new("uint8_t[]", 40)
        size = self.lib.ddnn_feature_request_encode(request, out, len(out))
        return bytes(self.ffi.buffer(out, size)) if size else None

    def feature_request_decode(self, data: bytes) -> tuple[int, tuple[bytes, int, int] | None]:
        """``ddnn_feature_request_decode``: (refusal code, 0 = accepted; (model hash, event id, request id))."""
        request = self.ffi.new("ddnn_feature_request *")
        buffer = self.ffi.new("uint8_t[]", max(1, len(data)))
        self.ffi.memmove(buffer, data, len(data))
        code = int(self.lib.ddnn_feature_request_decode(buffer, len(data), request))
        if code != 0:
            return code, None
        return 0, (bytes(request.model_hash), int(request.event_id), int(request.request_id))

    def features_init(self, capacity: int, request_bytes: int) -> bool:
        """``ddnn_features_init`` (the process's one split buffer): False when ``capacity`` does not fit."""
        return self.lib.ddnn_features_init(capacity, request_bytes) == 0

    def features_keep(self, event_id: int, request_id: int, request: bytes) -> None:
        self.lib.ddnn_features_keep(event_id, request_id, self.ffi.from_buffer("uint8_t[]", request), len(request))

    def features_take(self, event_id: int, request_id: int) -> bytes | None:
        """``ddnn_features_answer`` for (event, request id): the split held (then forgotten), or None."""
        out = self.ffi.new("uint8_t[]", 1 << 16)
        size = int(self.lib.ddnn_binding_features_take(event_id, request_id, out, len(out)))
        return bytes(self.ffi.buffer(out, size)) if size >= 0 else None

    def reply_decode(self, data: bytes) -> dict[str, Any] | None:
        """``ddnn_reply_decode``: the fields as C holds them, or None when C rejects the bytes."""
        reply = self.ffi.new("ddnn_reply *")
        buffer = self.ffi.new("uint8_t[]", max(1, len(data)))
        self.ffi.memmove(buffer, data, len(data))
        if self.lib.ddnn_reply_decode(buffer, len(data), reply) != 0:
            return None
        return {"request_id": int(reply.request_id), "status": int(reply.status), "class_id": int(reply.class_id),
                "server_us": int(reply.server_us), "queue_us": int(reply.queue_us),
                "upstream_us": int(reply.upstream_us), "upstream_server_us": int(reply.upstream_server_us),
                "answered_by": int(reply.answered_by), "flags": int(reply.flags),
                "top_k": [(int(reply.top_class[i]), float(reply.top_prob[i])) for i in range(reply.n_top)],
                "message": self.ffi.string(reply.message).decode("utf-8", "replace")}
