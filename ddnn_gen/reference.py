"""Bitwise NumPy reference of the device tier: what the generated C and OpenCL code must
reproduce bit for bit.

Binary layers work on packed 64-bit words with XOR + popcount (``n - 2 * popcount(a ^ w)``
is the +-1 dot product). Convolutions gather the packed words under each kernel window
(im2col on words, not on bits) and popcount them; FConv multiplies the raw uint8 input
by +-1 weights in int32. Pooling takes the max of integer pre-activations before the
folded BN threshold, exactly like the C runtime.

The exit: integer dot products S, logits ``a * S + b`` in double, normalized entropy via
log-sum-exp in double divided by log(K) (terms with exp(z - max) == 0 are skipped); a
sample exits locally iff its entropy is finite and ``<= threshold``. argmax ties go to the lowest class index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ddnn_gen.fold import DeviceProgram, FoldedExit, FoldedLayer, pack_bits, unpack_bits, words_for

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(words: np.ndarray) -> np.ndarray:
    """Population count of each uint64 along a new last-axis sum-free view (same shape, int32)."""
    as_bytes = np.ascontiguousarray(words, dtype="<u8").view(np.uint8)
    counts = _POPCOUNT8[as_bytes].reshape(words.shape + (8,))
    return counts.sum(axis=-1, dtype=np.int32)


@dataclass
class DeviceResult:
    """Per-sample outputs of the device tier."""

    logits: np.ndarray  # float64 (N, K)
    local_class: np.ndarray  # int32 (N,)
    entropy: np.ndarray  # float64 (N,)
    local_exit: np.ndarray  # bool (N,)
    split_words: np.ndarray  # uint64 (N, H, W, words): the payload sent to the server
    exit_sums: np.ndarray  # int32 (N, K): integer dot products of the exit layer


def _pad_hw(array: np.ndarray, pad: int, value: int) -> np.ndarray:
    if pad == 0:
        return array
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (array.ndim - 3)
    return np.pad(array, widths, constant_values=value)


def _windows(array: np.ndarray, ksize: int, stride: int, out_h: int, out_w: int) -> np.ndarray:
    """(N, H, W, ...) -> (N, out_h, out_w, ksize, ksize, ...) strided view of each kernel window."""
    view = np.lib.stride_tricks.sliding_window_view(array, (ksize, ksize), axis=(1, 2))
    # sliding_window_view puts the window axes last; move them after out_h, out_w.
    view = view[:, :(out_h - 1) * stride + 1:stride, :(out_w - 1) * stride + 1:stride]
    return np.moveaxis(view, (-2, -1), (3, 4))


def _valid_taps(layer: FoldedLayer, out_h: int, out_w: int) -> np.ndarray:
    """Number of in-bounds kernel taps at each output position (zero padding is skipped)."""
    height, width, _ = layer.in_hwc
    inside = _pad_hw(np.ones((1, height, width), dtype=np.int32), layer.pad, 0)
    return _windows(inside, layer.ksize, layer.stride, out_h, out_w).sum(axis=(3, 4))[0]


def fconv_sums(layer: FoldedLayer, images_hwc: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> int32 pre-pool sums (N, OH, OW, OC)."""
    out_h, out_w = layer.conv_hw
    # float32 GEMM is exact: |sum| <= 255 * taps < 2^24 (fold checks the range).
    padded = _pad_hw(images_hwc.astype(np.float32), layer.pad, 0)
    cols = _windows(padded, layer.ksize, layer.stride, out_h, out_w)  # (N, OH, OW, KH, KW, C)
    cols = cols.reshape(cols.shape[:3] + (-1,))
    weights = layer.weights.reshape(layer.weights.shape[0], -1).astype(np.float32)
    return np.rint(cols @ weights.T).astype(np.int32)


def bconv_sums(layer: FoldedLayer, packed: np.ndarray) -> np.ndarray:
    """Packed bits (N, H, W, words) -> int32 pre-pool sums (N, OH, OW, OC).

    Unpacks to +-1 (0 in the padding) and runs one matrix product: the same integer as
    ``n_valid - 2 * popcount(a ^ w)`` (tested against :func:`bconv_sums_popcount`), but a
    BLAS GEMM instead of a byte-table popcount, so the full test sets take seconds. float32
    is exact here: every partial sum is an integer below 2^24.
    """
    out_h, out_w = layer.conv_hw
    in_channels = layer.in_hwc[2]
    values = np.where(unpack_bits(packed, in_channels), np.float32(1), np.float32(-1))
    padded = _pad_hw(values, layer.pad, 0)
    cols = _windows(padded, layer.ksize, layer.stride, out_h, out_w)  # (N, OH, OW, KH, KW, C)
    cols = cols.reshape(cols.shape[:3] + (-1,))
    weights = layer.weights.reshape(layer.weights.shape[0], -1).astype(np.float32)
    return np.rint(cols @ weights.T).astype(np.int32)


def bconv_sums_popcount(layer: FoldedLayer, packed: np.ndarray) -> np.ndarray:
    """Literal XOR + popcount over packed words, as the C runtime computes it (slow; for tests)."""
    out_h, out_w = layer.conv_hw
    in_channels = layer.in_hwc[2]
    padded = _pad_hw(packed, layer.pad, 0)
    inside = _pad_hw(np.ones(packed.shape[:3] + (1,), dtype=bool), layer.pad, False)
    cols = _windows(padded, layer.ksize, layer.stride, out_h, out_w)  # (N, OH, OW, KH, KW, words)
    mask = _windows(inside, layer.ksize, layer.stride, out_h, out_w)  # (N, OH, OW, KH, KW, 1)
    weights = layer.packed_weights  # (OC, KH, KW, words)
    n_valid = _valid_taps(layer, out_h, out_w) * in_channels  # (OH, OW)
    sums = np.empty(packed.shape[:1] + (out_h, out_w, len(weights)), dtype=np.int32)
    for out_channel, weight in enumerate(weights):
        mismatches = popcount64(cols ^ weight) * mask  # padded taps count nothing
        sums[..., out_channel] = n_valid - 2 * mismatches.sum(axis=(3, 4, 5))
    return sums


def linear_sums(weights_packed: np.ndarray, n_valid: int, packed: np.ndarray) -> np.ndarray:
    """Packed input (N, H, W, words), weights (OUT, H, W, words) -> int32 (N, OUT)."""
    flat = packed.reshape(len(packed), 1, -1)
    mismatches = popcount64(flat ^ weights_packed.reshape(1, len(weights_packed), -1)).sum(axis=-1)
    return (n_valid - 2 * mismatches).astype(np.int32)


def max_pool_int(sums: np.ndarray, layer: FoldedLayer) -> np.ndarray:
    """Max-pool integer pre-activations (N, H, W, C); padded cells never win."""
    pool = layer.pool
    if pool is None:
        return sums
    height, width = sums.shape[1:3]
    out_h, out_w = pool.out_size(height), pool.out_size(width)
    lowest = np.iinfo(np.int32).min
    padded = _pad_hw(sums, pool.pad, lowest)
    return _windows(padded, pool.ksize, pool.stride, out_h, out_w).max(axis=(3, 4))


def threshold_bits(layer: FoldedLayer, preact: np.ndarray) -> np.ndarray:
    return (preact >= layer.threshold) != layer.flip


def layer_preactivation(layer: FoldedLayer, activation: np.ndarray) -> np.ndarray:
    """Integer pre-activation (after pooling) of one device layer.

    ``activation`` is the uint8 image (N, H, W, C) for fconv, packed words otherwise.
    """
    if layer.kind == "fconv":
        return max_pool_int(fconv_sums(layer, activation), layer)
    if layer.kind == "bconv":
        return max_pool_int(bconv_sums(layer, activation), layer)
    n_valid = int(np.prod(layer.in_hwc))
    return linear_sums(layer.packed_weights, n_valid, activation).reshape(len(activation), 1, 1, -1)


def exit_sums(exit_: FoldedExit, packed: np.ndarray) -> np.ndarray:
    return linear_sums(exit_.packed_weights, int(np.prod(exit_.in_hwc)), packed)


def exit_logits(exit_: FoldedExit, sums: np.ndarray) -> np.ndarray:
    return exit_.scale[None, :] * sums.astype(np.float64) + exit_.offset[None, :]


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of softmax(logits) / log(K), per row, in double; NaN when any logit is not finite.

    Uses math.exp / math.log (the C library's, as the C target does) rather than NumPy's SIMD
    versions, which may round differently in the last bit.
    """
    logits = np.asarray(logits, dtype=np.float64)
    n_classes = logits.shape[1]
    out = np.empty(len(logits), dtype=np.float64)
    log_k = math.log(n_classes)
    for row_index, row in enumerate(logits.tolist()):
        if not all(math.isfinite(z) for z in row):
            out[row_index] = math.nan
            continue
        peak = max(row)
        exps = [math.exp(z - peak) for z in row]
        total = 0.0
        for value in exps:
            total += value
        log_total = math.log(total)
        entropy = 0.0
        for z, value in zip(row, exps):
            if value > 0.0:  # p log p -> 0; skipping also avoids 0 * -inf = NaN on overflowed gaps
                entropy -= (value / total) * ((z - peak) - log_total)
        out[row_index] = entropy / log_k
    return out


def exit_decision(entropy: np.ndarray, threshold: float) -> np.ndarray:
    """Exit locally iff the normalized entropy is finite and <= threshold (NaN is not confident)."""
    entropy = np.asarray(entropy, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(entropy) & (entropy <= threshold)


def images_to_hwc(images_u8: np.ndarray) -> np.ndarray:
    """Dataset layout (N, C, H, W) uint8 -> device layout (N, H, W, C)."""
    return np.ascontiguousarray(np.asarray(images_u8, dtype=np.uint8).transpose(0, 2, 3, 1))


def device_activations(program: DeviceProgram, images_u8: np.ndarray) -> list[np.ndarray]:
    """Packed output words of every device layer, (N, H, W, words) each."""
    activation: np.ndarray = images_to_hwc(images_u8)
    outputs = []
    for layer in program.layers:
        activation = pack_bits(threshold_bits(layer, layer_preactivation(layer, activation)))
        outputs.append(activation)
    return outputs


def run_device(program: DeviceProgram, images_u8: np.ndarray, threshold: float | None = None,
               batch_size: int = 256) -> DeviceResult:
    """The whole device tier on a batch of uint8 images (N, C, H, W)."""
    threshold = program.threshold if threshold is None else threshold
    splits, sums = [], []
    for start in range(0, len(images_u8), batch_size):
        split = device_activations(program, images_u8[start:start + batch_size])[-1]
        splits.append(split)
        sums.append(exit_sums(program.exit, split))
    split_words = np.concatenate(splits) if splits else np.zeros((0,) + program.split_hwc[:2] + (
        words_for(program.split_hwc[2]),), dtype=np.uint64)
    all_sums = np.concatenate(sums) if sums else np.zeros((0, program.n_classes), dtype=np.int32)
    logits = exit_logits(program.exit, all_sums)
    entropy = normalized_entropy(logits)
    return DeviceResult(logits=logits, local_class=logits.argmax(axis=1).astype(np.int32), entropy=entropy,
                        local_exit=exit_decision(entropy, threshold), split_words=split_words, exit_sums=all_sums)


def split_to_server_input(program: DeviceProgram, split_words: np.ndarray) -> np.ndarray:
    """Packed split activations (N, H, W, words) -> the server tier's +-1 float32 input (N, C, H, W)."""
    height, width, channels = program.split_hwc
    bits = unpack_bits(split_words.reshape(len(split_words), height, width, -1), channels)
    values = np.where(bits, np.float32(1), np.float32(-1))
    if len(program.spec.split_shape) == 1:
        return values.reshape(len(split_words), channels)
    return np.ascontiguousarray(values.transpose(0, 3, 1, 2))
