"""Fold a trained model's device tier into integer form: the single source of truth that the
NumPy reference, the C compiler and the OpenCL compiler all consume.

Layout conventions (shared with ``c_runtime/`` and the kernels):

* Activations are channel-last (H, W, C); a linear layer's F features are (1, 1, F).
* Bit 1 means +1, bit 0 means -1. Channels are packed into 64-bit words: bit ``i`` of word
  ``w`` holds channel ``64 * w + i``; unused high bits are zero in activations *and* weights,
  so a binary dot product over ``n`` valid values is ``n - 2 * popcount(a ^ w)``.
* Convolution zero padding contributes nothing: out-of-bounds taps are skipped (as Chainer's
  zero-padded +-1 convolution does). Max-pool padding never wins (Chainer pads with -inf).

BN + sign folding. A device layer outputs ``bit = BN(S) >= 0`` where ``S`` is an integer
(the +-1-weighted sum, for FConv in units of the input scale). Instead of re-deriving the
threshold with real-number algebra (which can disagree with Chainer's float32 arithmetic by
one at exact ties), we evaluate Chainer's own test-mode BN formula in float32 for every
integer ``S`` the layer can produce and record where the sign changes. BN is monotone in
``S``, so the result is one integer threshold per channel plus a flip flag for gamma < 0:
``bit = (S >= threshold) != flip``. This is exact by construction, including ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddnn_gen.errors import CompileError
from ddnn_gen.model.modelfile import LoadedModel
from ddnn_gen.model.spec import Layer, ModelSpec, Pool

WORD_BITS = 64


def words_for(channels: int) -> int:
    return (channels + WORD_BITS - 1) // WORD_BITS


def hwc(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) or (F,) -> (H, W, C) as the device holds it."""
    if len(shape) == 1:
        return (1, 1, shape[0])
    channels, height, width = shape
    return (height, width, channels)


@dataclass(frozen=True)
class FoldedLayer:
    """One device layer (fconv, bconv or blinear) in integer form.

    ``weights`` are +-1 int8 in device order: conv (OC, KH, KW, IC); linear (OUT, H, W, C)
    over the input's (H, W, C) layout. ``threshold``/``flip`` give the output bit.
    """

    name: str
    kind: str
    in_hwc: tuple[int, int, int]
    out_hwc: tuple[int, int, int]
    ksize: int
    stride: int
    pad: int
    pool: Pool | None
    weights: np.ndarray
    threshold: np.ndarray  # int32 (OC,)
    flip: np.ndarray  # bool (OC,)

    @property
    def is_conv(self) -> bool:
        return self.kind in ("fconv", "bconv")

    @property
    def conv_hw(self) -> tuple[int, int]:
        """Convolution output size before pooling."""
        height, width, _ = self.in_hwc
        return ((height + 2 * self.pad - self.ksize) // self.stride + 1,
                (width + 2 * self.pad - self.ksize) // self.stride + 1)

    @property
    def packed_weights(self) -> np.ndarray:
        """uint64 words: conv (OC, KH, KW, in_words), linear (OUT, H, W, in_words)."""
        return pack_bits(self.weights > 0)

    @property
    def weight_bytes(self) -> int:
        """Flash bytes of weights + thresholds as the C target stores them."""
        weight = self.weights.size if self.kind == "fconv" else self.packed_weights.size * 8
        return int(weight + self.threshold.size * 4 + self.flip.size)


@dataclass(frozen=True)
class FoldedExit:
    """Local exit: logits = scale * S + offset in double, S the integer binary dot product."""

    weights: np.ndarray  # int8 +-1 (K, H, W, C)
    scale: np.ndarray  # float64 (K,)
    offset: np.ndarray  # float64 (K,)
    in_hwc: tuple[int, int, int]

    @property
    def packed_weights(self) -> np.ndarray:
        return pack_bits(self.weights > 0)

    @property
    def weight_bytes(self) -> int:
        return int(self.packed_weights.size * 8 + self.scale.size * 16)


@dataclass(frozen=True)
class DeviceProgram:
    """One binary tier in integer form: the device tier (``tier`` 0, reading uint8 pixels) or a binary edge
    tier (reading the previous tier's packed split), with its early exit.

    In a multi-view model each view's device part is one such program (``view`` k, reading that view's crop);
    its exit is the view's own local exit, whose scores the local aggregator combines: ``threshold`` is then
    the aggregated local exit's, and the device does not answer on its own."""

    spec: ModelSpec
    content_hash: str
    layers: tuple[FoldedLayer, ...]
    exit: FoldedExit
    threshold: float
    tier: int = 0
    view: int = 0

    @property
    def input_hwc(self) -> tuple[int, int, int]:
        """What the tier reads (H, W, C): the image, one view of it, or the previous tier's (aggregated) split."""
        return hwc(self.spec.tier_input_shape(self.tier))

    @property
    def split_layer(self) -> int:
        """The split layer index of what this tier sends on (the wire's split-layer field)."""
        return self.spec.split_layer(self.tier + 1)

    @property
    def split_hwc(self) -> tuple[int, int, int]:
        return self.layers[-1].out_hwc

    @property
    def split_words(self) -> int:
        height, width, channels = self.split_hwc
        return height * width * words_for(channels)

    @property
    def split_bytes(self) -> int:
        """Payload bytes of the split as it travels (wire packing 4, dense: its H*W*C bits, not its words)."""
        height, width, channels = self.split_hwc
        return (height * width * channels + 7) // 8

    @property
    def n_classes(self) -> int:
        """Outputs of the exit (a Big-Little little net: its K priority classes + other)."""
        return self.spec.exit_outputs(self.tier)

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers) + self.exit.weight_bytes


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack the last axis (booleans) into little-endian uint64 words, zero-padded."""
    bits = np.asarray(bits, dtype=bool)
    channels = bits.shape[-1]
    n_words = words_for(channels)
    padded = np.zeros(bits.shape[:-1] + (n_words * WORD_BITS,), dtype=bool)
    padded[..., :channels] = bits
    as_bytes = np.packbits(padded, axis=-1, bitorder="little")
    return np.ascontiguousarray(as_bytes).view("<u8").reshape(bits.shape[:-1] + (n_words,))


def unpack_bits(words: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint64 words on the last axis -> booleans (..., channels)."""
    words = np.ascontiguousarray(words, dtype="<u8")
    as_bytes = words.view(np.uint8).reshape(words.shape[:-1] + (words.shape[-1] * 8,))
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :channels].astype(bool)


def chainer_bn_sign_threshold(s_min: int, s_max: int, unit: float, gamma: np.ndarray, beta: np.ndarray,
                              mean: np.ndarray, var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (threshold, flip) such that ``(S >= threshold) != flip`` equals the sign
    (>= 0) of Chainer's CPU test-mode BN of ``S * unit`` for every integer S in [s_min, s_max].

    Reproduces chainer.functions.fixed_batch_normalization's numpy path operation by
    operation in float32: inv_std = sqrt(1 / (var + eps)); y = ((x - mean) * inv_std) * gamma + beta.
    """
    f32 = np.float32
    s_values = np.arange(s_min, s_max + 1, dtype=np.int64)
    x = (s_values.astype(np.float64) * unit).astype(f32)  # exact: S * 2^-k fits float32
    if not np.array_equal(x.astype(np.float64), s_values * unit):
        raise CompileError("pre-activation range is too wide for exact float32 folding")
    var_eps = (var.astype(f32) + f32(eps)).astype(f32)
    inv_std = np.sqrt(np.reciprocal(var_eps)).astype(f32)
    y = ((x[None, :] - mean.astype(f32)[:, None]) * inv_std[:, None]) * gamma.astype(f32)[:, None]
    y = y + beta.astype(f32)[:, None]
    bits = y >= 0
    n_channels = len(gamma)
    threshold = np.zeros(n_channels, dtype=np.int64)
    flip = np.zeros(n_channels, dtype=bool)
    for channel in range(n_channels):
        row = bits[channel]
        if row.all():
            threshold[channel] = s_min  # always +1
        elif not row.any():
            threshold[channel] = s_max + 1  # always -1
        elif not row[0]:  # -1 ... -1 +1 ... +1: increasing
            first = int(np.argmax(row))
            if not row[first:].all():
                raise CompileError(f"BN of channel {channel} is not monotone; cannot fold")
            threshold[channel] = s_values[first]
        else:  # +1 ... +1 -1 ... -1: decreasing, store the complement
            first_off = int(np.argmin(row))
            if row[first_off:].any():
                raise CompileError(f"BN of channel {channel} is not monotone; cannot fold")
            threshold[channel] = s_values[first_off]
            flip[channel] = True
    if threshold.min() < np.iinfo(np.int32).min or threshold.max() > np.iinfo(np.int32).max:
        raise CompileError("folded threshold does not fit int32")
    return threshold.astype(np.int32), flip


def _bn_params(bn: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    return (np.asarray(bn.gamma.array), np.asarray(bn.beta.array),  # type: ignore[attr-defined]
            np.asarray(bn.avg_mean), np.asarray(bn.avg_var), float(bn.eps))  # type: ignore[attr-defined]


def _linear_weights_device_order(weight: np.ndarray, in_shape: tuple[int, ...]) -> np.ndarray:
    """Chainer flattens (C, H, W); the device holds (H, W, C). Reorder the columns once here."""
    height, width, channels = hwc(in_shape)
    if len(in_shape) == 1:
        return weight.reshape(weight.shape[0], 1, 1, channels)
    return weight.reshape(weight.shape[0], channels, height, width).transpose(0, 2, 3, 1)


def _sign_int8(weight: np.ndarray) -> np.ndarray:
    return np.where(weight >= 0, 1, -1).astype(np.int8)


def _fold_layer(layer: Layer, block: object, in_shape: tuple[int, ...], input_scale: float) -> FoldedLayer:
    out_shape = layer.out_shape(in_shape)
    gamma, beta, mean, var, eps = _bn_params(block.bn)  # type: ignore[attr-defined]
    if layer.type == "blinear":
        weights = _sign_int8(_linear_weights_device_order(np.asarray(block.fc.W.array), in_shape))  # type: ignore[attr-defined]
        n_in = int(np.prod(in_shape))
        threshold, flip = chainer_bn_sign_threshold(-n_in, n_in, 1.0, gamma, beta, mean, var, eps)
        return FoldedLayer(layer.name, layer.type, hwc(in_shape), hwc(out_shape), 0, 1, 0, None, weights,
                           threshold, flip)
    weight = np.asarray(block.conv.W.array)  # type: ignore[attr-defined]  # (OC, IC, KH, KW)
    weights = _sign_int8(weight.transpose(0, 2, 3, 1))
    taps = int(np.prod(weights.shape[1:]))
    if layer.type == "fconv":
        bound, unit = taps * 255, input_scale
    elif layer.type == "bconv":
        bound, unit = taps, 1.0
    else:
        raise CompileError(f"layer {layer.name!r}: type {layer.type!r} cannot run on the device")
    threshold, flip = chainer_bn_sign_threshold(-bound, bound, unit, gamma, beta, mean, var, eps)
    return FoldedLayer(layer.name, layer.type, hwc(in_shape), hwc(out_shape), layer.ksize, layer.stride,
                       layer.pad, layer.pool, weights, threshold, flip)


def _check_view(spec: ModelSpec, tier: int, view: int | None) -> int:
    """The view to fold: any for shared weights (all give the same program), one named for separate weights."""
    views = spec.views
    if views is None or tier != 0:
        if view not in (None, 0):
            raise CompileError(f"{spec.name}: view {view} names a view, but "
                               + ("the model has none" if views is None else f"tier {tier} is not the devices'"))
        return 0
    if view is None:
        if not views.shared:
            raise CompileError(f"{spec.name}: its {views.count} views have separate device weights; fold one view "
                               f"at a time (view 0..{views.count - 1}; `ddnngen compile --view K`)")
        return 0
    if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < views.count:
        raise CompileError(f"{spec.name}: view {view!r} is not one of its views 0..{views.count - 1}")
    return view


def fold(loaded: LoadedModel, threshold: float | None = None, tier: int = 0, view: int | None = None) -> DeviceProgram:
    """Fold binary tier ``tier`` (the device tier by default) and its early exit of a loaded model; in a
    multi-view model, tier 0 of view ``view`` (needed when the views have separate weights)."""
    spec = loaded.spec
    model = loaded.model
    if not 0 <= tier < len(spec.tiers) - 1 or not spec.tiers[tier].binary:
        raise CompileError(f"{spec.name}: tier {tier} is not a binary tier with an early exit; binary tiers: "
                           f"{[i for i, t in enumerate(spec.tiers[:-1]) if t.binary] or 'none'}")
    view = _check_view(spec, tier, view)
    blocks = model.tier_layers(tier) if spec.views is None or tier else model.view_layers(view)
    exit_link = model.tier_exit(tier) if spec.views is None or tier else model.view_exit(view)
    scale = spec.input.scale
    if not float(np.float32(scale)) == scale or scale <= 0 or np.log2(scale) != np.round(np.log2(scale)):
        raise CompileError(f"input scale {scale} must be a power of two for exact integer FConv sums")
    layers = []
    for index, (layer, block, in_shape) in enumerate(zip(spec.tiers[tier].layers, blocks, spec.tier_shapes(tier))):
        first_of_model = tier == 0 and index == 0
        if (layer.type == "fconv") != first_of_model:
            raise CompileError(f"layer {layer.name!r}: fconv must be the model's first layer and only the first "
                               "(it reads the 8-bit input)")
        layers.append(_fold_layer(layer, block, in_shape, scale))
    split_shape = spec.tier_output_shape(tier)
    gamma, beta, mean, var, eps = _bn_params(exit_link.bn)
    weights = _sign_int8(_linear_weights_device_order(np.asarray(exit_link.fc.W.array), split_shape))
    # Defined in double: logits = a * S + b. C prints a, b with %.17g so both sides agree exactly.
    a = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    b = beta.astype(np.float64) - a * mean.astype(np.float64)
    exit_ = FoldedExit(weights, a, b, hwc(split_shape))
    return DeviceProgram(spec, loaded.content_hash, tuple(layers), exit_,
                         spec.thresholds[tier] if threshold is None else float(threshold), tier, view)


def stage_work(program: DeviceProgram) -> list[tuple[int, int]]:
    """(FConv MACs, popcount words) per sample of every layer, then of the exit."""
    work = []
    for layer in program.layers:
        in_h, in_w, in_c = layer.in_hwc
        out_c = layer.out_hwc[2]
        if layer.is_conv:
            conv_h, conv_w = layer.conv_hw
            taps = conv_h * conv_w * out_c * layer.ksize * layer.ksize
            work.append((taps * in_c, 0) if layer.kind == "fconv" else (0, taps * words_for(in_c)))
        else:
            work.append((0, out_c * in_h * in_w * words_for(in_c)))
    exit_h, exit_w, exit_c = program.exit.in_hwc
    work.append((0, program.n_classes * exit_h * exit_w * words_for(exit_c)))
    return work
