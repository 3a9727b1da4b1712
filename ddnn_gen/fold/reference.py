"""Bitwise NumPy reference of the device tier: what the generated C and OpenCL code must
reproduce bit for bit.

Binary layers work on packed 64-bit words with XOR + popcount (``n - 2 * popcount(a ^ w)``
is the +-1 dot product). Convolutions gather the packed words under each kernel window
(im2col on words, not on bits) and popcount them; FConv multiplies the raw uint8 input
by +-1 weights in int32. Pooling takes the max of integer pre-activations before the
folded BN threshold, exactly like the C runtime.

The exit: integer dot products S, logits ``a * S + b`` in double, normalized entropy via
log-sum-exp in double divided by log(K) (terms with exp(z - max) == 0 are skipped), with an exp and a
log built from IEEE arithmetic alone so every target computes the same bits; a
sample exits locally iff its entropy is finite and ``<= threshold``. argmax ties go to the lowest class index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddnn_gen.fold.program import DeviceProgram, FoldedExit, FoldedLayer, pack_bits, unpack_bits, words_for
from ddnn_gen.model.spec import big_little_decision, exit_decision

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
    local_class: np.ndarray  # int32 (N,); a Big-Little little net: the class it names, OTHER_CLASS for "other"
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


# fdlibm's constants (e_exp.c, e_log.c), the same literals as c_runtime/ddnn_exit.c.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00
_EXP_P = (1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05,
          -1.65339022054652515390e-06, 4.13813679705723846039e-08)
_LOG_LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01,
           2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01,
           1.479819860511658591e-01)
_SQRT2 = 1.41421356237309504880
_EXP_MAX = 709.782712893383973096
_EXP_MIN = -745.133219101941108420


def _pow2(k: np.ndarray) -> np.ndarray:
    """2^k for -1022 <= k <= 1023, exactly (other k give garbage that callers mask out)."""
    return ((k.astype(np.int64) + 1023) << 52).view(np.float64)


def exp_ieee(x: np.ndarray) -> np.ndarray:
    """exp with IEEE double +, -, *, / only, operation for operation as ``ddnn_exp`` in c_runtime/ddnn_exit.c,
    so the bits are the same as on every device (the C library's and NumPy's exp differ in the last bits
    between platforms). NumPy's elementwise arithmetic is correctly rounded and never fused."""
    x = np.asarray(x, dtype=np.float64)
    special = ~((x >= _EXP_MIN) & (x <= _EXP_MAX))  # NaN, overflow, underflow
    safe = np.where(special, 0.0, x)
    p1, p2, p3, p4, p5 = _EXP_P
    kd = np.trunc(safe * _INV_LN2 + np.where(safe < 0.0, -0.5, 0.5))  # C's (int) conversion truncates
    hi = safe - kd * _LN2_HI
    lo = kd * _LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    k = kd.astype(np.int64)
    with np.errstate(over="ignore"):
        scaled = np.where(k > 1023, y * _pow2(k - 1) * 2.0,
                          np.where(k < -1021, y * _pow2(k + 1000) * _pow2(np.array(-1000)), y * _pow2(k)))
    return np.where(special, np.where(x > _EXP_MAX, np.inf, np.where(x < _EXP_MIN, 0.0, x)), scaled)


def log_ieee(x: np.ndarray) -> np.ndarray:
    """log with IEEE double +, -, *, / and exact bit manipulation only, as ``ddnn_log`` in ddnn_exit.c."""
    x = np.asarray(x, dtype=np.float64)
    special = ~((x > 0.0) & (x < np.inf))  # NaN, <= 0, inf
    safe = np.where(special, 1.0, x)
    subnormal = safe < 2.2250738585072014e-308
    safe = np.where(subnormal, np.where(subnormal, safe, 1.0) * 18014398509481984.0, safe)  # 2^54, exactly
    bits = safe.view(np.int64)
    k = (bits >> 52) - 1023 - np.where(subnormal, 54, 0)
    m = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(np.float64)
    big = m > _SQRT2
    m = np.where(big, m * 0.5, m)
    k = k + big
    lg1, lg2, lg3, lg4, lg5, lg6, lg7 = _LOG_LG
    f = m - 1.0
    dk = k.astype(np.float64)
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (lg2 + w * (lg4 + w * lg6))
    t2 = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    value = dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)
    with np.errstate(invalid="ignore"):
        fixed = np.where(x == 0.0, -np.inf, np.where(x == np.inf, np.inf, np.nan))
    return np.where(special, fixed, value)


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of softmax(logits) / log(K), per row, in double; NaN when any logit is not finite.

    Operation for operation ``ddnn_normalized_entropy`` (c_runtime/ddnn_exit.c): the same peak, the same
    order of sums, :func:`exp_ieee` / :func:`log_ieee`, so the result is bit-identical on every target.
    Vectorised over rows, sequential over classes.
    """
    logits = np.asarray(logits, dtype=np.float64)
    n_classes = logits.shape[1]
    finite = np.isfinite(logits).all(axis=1)
    z = np.where(finite[:, None], logits, 0.0)
    peak = z[:, 0].copy()
    for k in range(1, n_classes):
        peak = np.where(z[:, k] > peak, z[:, k], peak)
    total = np.zeros(len(z))
    entropy = np.zeros(len(z))
    # A gap may overflow to -inf (logits 1e308 apart): its exp is 0, as in C.
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(n_classes):
            total = total + exp_ieee(z[:, k] - peak)
        log_total = log_ieee(total)
        for k in range(n_classes):
            gap = z[:, k] - peak
            e = exp_ieee(gap)
            # p log p -> 0 where exp underflowed; skipping also avoids 0 * -inf on an overflowed gap.
            entropy = np.where(e > 0.0, entropy - (e / total) * (gap - log_total), entropy)
    out = entropy / log_ieee(np.array(float(n_classes)))
    return np.where(finite, out, np.nan)


def images_to_hwc(images_u8: np.ndarray) -> np.ndarray:
    """Dataset layout (N, C, H, W) uint8 -> device layout (N, H, W, C)."""
    return np.ascontiguousarray(np.asarray(images_u8, dtype=np.uint8).transpose(0, 2, 3, 1))


def tier_input(program: DeviceProgram, inputs: np.ndarray) -> np.ndarray:
    """What the first layer reads: uint8 images (N, C, H, W) -> HWC for the device tier; a binary edge tier
    reads the previous tier's packed split (N, H, W, words) or (N, words) as it is."""
    if program.tier == 0:
        return images_to_hwc(inputs)
    height, width, channels = program.input_hwc
    return np.ascontiguousarray(inputs, dtype=np.uint64).reshape(len(inputs), height, width, words_for(channels))


def device_activations(program: DeviceProgram, images_u8: np.ndarray) -> list[np.ndarray]:
    """Packed output words of every layer of the tier, (N, H, W, words) each."""
    activation: np.ndarray = tier_input(program, images_u8)
    outputs = []
    for layer in program.layers:
        activation = pack_bits(threshold_bits(layer, layer_preactivation(layer, activation)))
        outputs.append(activation)
    return outputs


def run_device(program: DeviceProgram, images_u8: np.ndarray, threshold: float | None = None,
               batch_size: int = 256) -> DeviceResult:
    """The whole tier on a batch of its inputs: uint8 images (N, C, H, W) for the device tier, the previous
    tier's packed split for a binary edge tier."""
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
    local_class = logits.argmax(axis=1).astype(np.int32)
    local_exit = exit_decision(entropy, threshold)
    spec = program.spec
    if spec.big_little and program.tier == 0:
        # The little net answers only for a priority class (the generated C's run() does the same); its class is
        # the one that output names, OTHER_CLASS for "other".
        local_exit = big_little_decision(local_class, entropy, threshold, len(spec.priority_classes))
        local_class = spec.little_to_class(local_class)
    return DeviceResult(logits=logits, local_class=local_class, entropy=entropy, local_exit=local_exit,
                        split_words=split_words, exit_sums=all_sums)


def split_to_server_input(program: DeviceProgram, split_words: np.ndarray) -> np.ndarray:
    """Packed split activations (N, H, W, words) -> the next tier's +-1 float32 input (N, C, H, W) or (N, F)."""
    height, width, channels = program.split_hwc
    bits = unpack_bits(split_words.reshape(len(split_words), height, width, -1), channels)
    values = np.where(bits, np.float32(1), np.float32(-1))
    if len(program.spec.tier_output_shape(program.tier)) == 1:
        return values.reshape(len(split_words), channels)
    return np.ascontiguousarray(values.transpose(0, 3, 1, 2))
