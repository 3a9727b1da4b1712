"""The Python OpenCL device path: the generated kernels (compile_opencl.render_kernels) run
through pyopencl, with the same launch plan as the generated C host program.

Context, queue, program and every buffer are created once (sized for ``max_batch`` samples)
and reused for every batch; :meth:`OpenCLDevice.close` releases them. Layers placed on the
host (``opencl_layers``) run with the NumPy reference, the Python twin of the C runtime.
The exit's logits and entropy are computed on the host in double, as the C target does.

Platform and device come from arguments or the DDNN_OCL_PLATFORM / DDNN_OCL_DEVICE
environment variables: an index (0, 1, ...) or a case-insensitive part of the name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddnn_gen.codegen.c_target import device_weights
from ddnn_gen.codegen.opencl_target import kernel_plans, parse_opencl_layers, render_kernels
from ddnn_gen.errors import OpenCLError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, FoldedLayer, pack_bits, words_for

LOG = logging.getLogger(__name__)

INSTALL_HINT = ("install an OpenCL driver: on Debian/Ubuntu `apt-get install pocl-opencl-icd ocl-icd-libopencl1` "
                "(PoCL runs the kernels on the CPU) or your GPU vendor's OpenCL ICD; drivers are registered in "
                "/etc/OpenCL/vendors (the OCL_ICD_VENDORS environment variable overrides that folder)")


def _import_pyopencl() -> Any:
    try:
        import pyopencl
    except ImportError as error:
        raise OpenCLError(f"pyopencl is not installed ({error}); pip install 'ddnngen[opencl]'") from error
    return pyopencl


def _pick(items: Sequence[Any], selector: str | None, what: str, env: str) -> Any:
    """An item by index or by a case-insensitive part of its name; the first one by default."""
    if selector is None or selector == "":
        return items[0]
    names = [item.name.strip() for item in items]
    if selector.isdigit():
        index = int(selector)
        if index < len(items):
            return items[index]
    else:
        for item, name in zip(items, names):
            if selector.lower() in name.lower():
                return item
    listing = "; ".join(f"{i}: {name}" for i, name in enumerate(names))
    raise OpenCLError(f"no OpenCL {what} matches {selector!r} (from --{what} or {env}); available: {listing}")


def select_device(platform: str | None = None, device: str | None = None) -> Any:
    """The OpenCL device chosen by arguments, else DDNN_OCL_PLATFORM / DDNN_OCL_DEVICE, else the first."""
    cl = _import_pyopencl()
    platform = platform if platform is not None else os.environ.get("DDNN_OCL_PLATFORM")
    device = device if device is not None else os.environ.get("DDNN_OCL_DEVICE")
    try:
        platforms = cl.get_platforms()
    except cl.Error as error:  # the ICD loader says PLATFORM_NOT_FOUND_KHR when no driver is registered
        raise OpenCLError(f"no OpenCL platform found ({error}); {INSTALL_HINT}") from error
    if not platforms:
        raise OpenCLError(f"no OpenCL platform found; {INSTALL_HINT}")
    chosen_platform = _pick(platforms, platform, "platform", "DDNN_OCL_PLATFORM")
    try:
        devices = chosen_platform.get_devices()
    except cl.Error as error:
        raise OpenCLError(f"OpenCL platform {chosen_platform.name!r} has no devices ({error}); "
                          f"{INSTALL_HINT}") from error
    return _pick(devices, device, "device", "DDNN_OCL_DEVICE")


class OpenCLDevice:
    """The device tier of one DeviceProgram on one OpenCL device."""

    def __init__(self, program: DeviceProgram, opencl_layers: str | Sequence[bool] | None = "all",
                 platform: str | None = None, device: str | None = None, max_batch: int = 256,
                 source: str | None = None) -> None:
        cl = self._cl = _import_pyopencl()
        if max_batch < 1:
            raise OpenCLError(f"max_batch must be >= 1, got {max_batch}")
        self.program = program
        self.max_batch = max_batch
        self.on_opencl: tuple[bool, ...] = (parse_opencl_layers(opencl_layers, program)
                                            if opencl_layers is None or isinstance(opencl_layers, str)
                                            else tuple(bool(flag) for flag in opencl_layers))
        if len(self.on_opencl) != len(program.layers) + 1:
            raise OpenCLError(f"opencl_layers has {len(self.on_opencl)} flags; expected one per layer and one for "
                              f"the exit ({len(program.layers) + 1})")
        if self.on_opencl[-1] and not self.on_opencl[-2]:
            raise OpenCLError("the exit can run on OpenCL only together with the last layer")
        self.device = select_device(platform, device)
        self.plans = kernel_plans(program)
        self.source = render_kernels(program) if source is None else source
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)
        try:
            self.cl_program = cl.Program(self.context, self.source).build(options=["-cl-std=CL1.2"])
        except cl.Error as error:
            raise OpenCLError(f"the OpenCL kernels failed to build on {self.device.name.strip()!r}:\n"
                              f"{error}") from error
        self._buffers: list[Any] = []
        self._create_buffers()

    # -- set-up ---------------------------------------------------------------------------------

    def _buffer(self, array_or_bytes: np.ndarray | int, writable: bool = False) -> Any:
        cl = self._cl
        flags = cl.mem_flags.READ_WRITE if writable else cl.mem_flags.READ_ONLY
        if isinstance(array_or_bytes, np.ndarray):
            buffer = cl.Buffer(self.context, flags | cl.mem_flags.COPY_HOST_PTR,
                               hostbuf=np.ascontiguousarray(array_or_bytes))
        else:
            buffer = cl.Buffer(self.context, flags, size=max(1, array_or_bytes))
        self._buffers.append(buffer)
        return buffer

    def _create_buffers(self) -> None:
        """Weights once, activations for ``max_batch`` samples once; reused by every batch."""
        program = self.program
        height, width, channels = program.input_hwc
        self.input_bytes = height * width * channels
        self.input_buffer = self._buffer(self.max_batch * self.input_bytes, writable=True)
        self.layer_words = [int(np.prod(layer.out_hwc[:2])) * words_for(layer.out_hwc[2]) for layer in program.layers]
        self.act_buffers = [self._buffer(self.max_batch * words * 8, writable=True) for words in self.layer_words]
        self.sums_buffer = self._buffer(self.max_batch * program.n_classes * 4, writable=True)
        self.kernels = []
        self.pool_kernels: list[Any] = []
        for index, (plan, layer, buffer) in enumerate(zip(self.plans, program.layers, self.act_buffers)):
            # The C target's weight arrays (compile_c.device_weights), which the kernels index.
            weights = device_weights(layer)
            source = self.input_buffer if index == 0 else self.act_buffers[index - 1]
            threshold = self._buffer(layer.threshold.astype(np.int32))
            flip = self._buffer(layer.flip.astype(np.uint8))
            kernel = self._cl.Kernel(self.cl_program, plan.name)
            pool_kernel = None
            if plan.split_pool:
                sums = self._buffer(self.max_batch * plan.sums * 4, writable=True)
                kernel.set_args(source, self._buffer(weights), sums)
                pool_kernel = self._cl.Kernel(self.cl_program, plan.pool_name)
                pool_kernel.set_args(sums, threshold, flip, buffer)
            else:
                kernel.set_args(source, self._buffer(weights), threshold, flip, buffer)
            self.kernels.append(kernel)
            self.pool_kernels.append(pool_kernel)
        self.exit_kernel = self._cl.Kernel(self.cl_program, self.plans[-1].name)
        self.exit_kernel.set_args(self.act_buffers[-1], self._buffer(program.exit.packed_weights), self.sums_buffer)

    def close(self) -> None:
        for buffer in self._buffers:
            buffer.release()
        self._buffers.clear()

    def __enter__(self) -> OpenCLDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- execution ------------------------------------------------------------------------------

    def _enqueue(self, kernel: Any, plan_index: int, n: int) -> None:
        plan = self.plans[plan_index]
        self._cl.enqueue_nd_range_kernel(self.queue, kernel, plan.global_size(n), plan.local_size())

    def _upload(self, buffer: Any, array: np.ndarray) -> None:
        self._cl.enqueue_copy(self.queue, buffer, np.ascontiguousarray(array))

    def _download(self, buffer: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self._cl.enqueue_copy(self.queue, out, buffer)
        return out

    def _host_layer(self, layer: FoldedLayer, activation: np.ndarray) -> np.ndarray:
        return pack_bits(reference.threshold_bits(layer, reference.layer_preactivation(layer, activation)))

    def _batch(self, images_hwc: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Packed outputs of every layer and the exit sums for at most max_batch samples."""
        n = len(images_hwc)
        outputs: list[np.ndarray] = []
        host_activation: np.ndarray | None = images_hwc
        on_device = False  # whether the current activation lives in the device buffer it is read from
        for index, layer in enumerate(self.program.layers):
            shape = (n,) + layer.out_hwc[:2] + (words_for(layer.out_hwc[2]),)
            if self.on_opencl[index]:
                if not on_device:
                    assert host_activation is not None
                    source = self.input_buffer if index == 0 else self.act_buffers[index - 1]
                    self._upload(source, host_activation)
                self._enqueue(self.kernels[index], index, n)
                if self.pool_kernels[index] is not None:
                    self._cl.enqueue_nd_range_kernel(self.queue, self.pool_kernels[index],
                                                     (self.plans[index].pool_items, n), None)
                host_activation = self._download(self.act_buffers[index], shape, np.uint64)
                on_device = True
            else:
                assert host_activation is not None
                host_activation = self._host_layer(layer, host_activation)
                on_device = False
            outputs.append(host_activation)
        if self.on_opencl[-1]:
            sums = self._download_sums(n)
        else:
            sums = reference.exit_sums(self.program.exit, outputs[-1])
        return outputs, sums

    def _download_sums(self, n: int) -> np.ndarray:
        self._enqueue(self.exit_kernel, len(self.plans) - 1, n)
        return self._download(self.sums_buffer, (n, self.program.n_classes), np.int32)

    def activations(self, images_u8: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Packed output words of every layer (N, H, W, words) and the exit sums (N, K)."""
        images_hwc = reference.images_to_hwc(images_u8)
        if images_hwc.shape[1:] != self.program.input_hwc:
            raise OpenCLError(f"images have shape {images_hwc.shape[1:]} (HWC), the model needs "
                              f"{self.program.input_hwc}")
        per_layer: list[list[np.ndarray]] = [[] for _ in self.program.layers]
        sums = []
        for start in range(0, len(images_hwc), self.max_batch):
            outputs, batch_sums = self._batch(images_hwc[start:start + self.max_batch])
            for store, output in zip(per_layer, outputs):
                store.append(output)
            sums.append(batch_sums)
        if not sums:
            empty = [np.zeros((0,) + layer.out_hwc[:2] + (words_for(layer.out_hwc[2]),), np.uint64)
                     for layer in self.program.layers]
            return empty, np.zeros((0, self.program.n_classes), np.int32)
        return [np.concatenate(store) for store in per_layer], np.concatenate(sums)

    def run(self, images_u8: np.ndarray, threshold: float | None = None) -> reference.DeviceResult:
        """The whole device tier: same DeviceResult as reference.run_device."""
        threshold = self.program.threshold if threshold is None else threshold
        outputs, sums = self.activations(images_u8)
        logits = reference.exit_logits(self.program.exit, sums)
        entropy = reference.normalized_entropy(logits)
        return reference.DeviceResult(logits=logits, local_class=logits.argmax(axis=1).astype(np.int32),
                                      entropy=entropy, local_exit=reference.exit_decision(entropy, threshold),
                                      split_words=outputs[-1], exit_sums=sums)


def run_device(program: DeviceProgram, images_u8: np.ndarray, threshold: float | None = None,
               opencl_layers: str | Sequence[bool] | None = "all", max_batch: int = 256) -> reference.DeviceResult:
    """One-shot convenience twin of reference.run_device on OpenCL."""
    with OpenCLDevice(program, opencl_layers=opencl_layers, max_batch=max_batch) as device:
        return device.run(images_u8, threshold)
