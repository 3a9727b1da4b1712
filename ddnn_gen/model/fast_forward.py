"""The test-mode forward of a DDNN's tiers in plain NumPy/BLAS, bit-identical to Chainer's on CPU.

A server answers lone requests: at batch 1, Chainer's per-function machinery (Variables, FunctionNodes,
config look-ups, type checks) costs far more than the arithmetic of a small server part. This module runs the
same links with exactly the NumPy calls Chainer 7.8.1 makes on CPU without iDeep, in the same order and on the
same memory layouts, so that the logits are equal bit for bit, not merely close:

* convolution_2d: ``conv.im2col_cpu`` then ``numpy.tensordot(col, W, ((1, 2, 3), (1, 2, 3)))``, done here as
  tensordot does it (the transposed, reshaped column matrix times W reshaped to (C*kh*kw, O)), + bias, rollaxis;
* linear: ``numpy.dot(x, W.T, out=y)`` (+= b) on the flattened input;
* fixed_batch_normalization: ``((x - mean) * inv_std) * gamma + beta`` with inv_std = sqrt(1 / (var + eps));
* max_pooling_2d (cover_all=False), relu (``numpy.maximum(x, 0)``) and the project's binarize (sign(0) = +1).

Only values Chainer computes from the parameters alone, the same way every call, are computed once here: the
binarized weights, W's tensordot reshape, and BN's inv_std. Folding gamma into inv_std would change rounding,
so it is not done. tests/test_fast_forward.py checks the bit-identity on every shipped model's test set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chainer.links as L
import numpy as np
from chainer.utils.conv import im2col_cpu

from ddnn_gen.errors import DdnnError
from ddnn_gen.model.links import (
    BinaryConvBlock,
    BinaryLinearBlock,
    FloatConvBlock,
    FloatLinearBlock,
    input_to_float,
)
from ddnn_gen.model.network import DDNN
from ddnn_gen.model.spec import Pool

Op = Callable[[np.ndarray], np.ndarray]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _array(param: Any) -> np.ndarray:
    array = param.array if hasattr(param, "array") else param
    if not isinstance(array, np.ndarray):
        raise DdnnError("the NumPy forward runs on host arrays; move the model to the CPU first")
    return array


def _binarized(weights: np.ndarray) -> np.ndarray:
    # links.BinarizeSTE.forward, once: the same values Chainer recomputes every call.
    return np.where(weights >= 0, 1, -1).astype(weights.dtype)


def binarize(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1, -1).astype(x.dtype)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, dtype=x.dtype)


def _conv(conv: L.Convolution2D, weights: np.ndarray) -> Op:
    if getattr(conv, "groups", 1) != 1 or _pair(getattr(conv, "dilate", 1)) != (1, 1):
        raise DdnnError("the NumPy forward covers ungrouped, undilated convolutions only")
    out_channels, _, kh, kw = weights.shape
    sy, sx = _pair(conv.stride)
    ph, pw = _pair(conv.pad)
    # numpy.tensordot's own reshape of W for axes ((1, 2, 3), (1, 2, 3)), made once.
    w_matrix = weights.transpose(1, 2, 3, 0).reshape(-1, out_channels)
    bias = None if conv.b is None else _array(conv.b)

    def forward(x: np.ndarray) -> np.ndarray:
        col = im2col_cpu(x, kh, kw, sy, sx, ph, pw, cover_all=False, dy=1, dx=1)
        n, _, _, _, out_h, out_w = col.shape
        at = col.transpose(0, 4, 5, 1, 2, 3).reshape(n * out_h * out_w, -1)
        y = np.dot(at, w_matrix).reshape(n, out_h, out_w, out_channels).astype(x.dtype, copy=False)
        if bias is not None:
            y += bias
        return np.rollaxis(y, 3, 1)

    return forward


def _linear(weights: np.ndarray, bias: np.ndarray | None) -> Op:
    weights_t = weights.T

    def forward(x: np.ndarray) -> np.ndarray:
        if x.ndim > 2:
            x = x.reshape(len(x), -1)
        if not (x.flags.c_contiguous or x.flags.f_contiguous) and 1 in x.shape:
            x = np.ascontiguousarray(x)  # as Chainer does (NumPy issue chainer#2744)
        y = np.empty((x.shape[0], weights.shape[0]), dtype=x.dtype)
        if x.dtype == weights.dtype:
            np.dot(x, weights_t, out=y)
        else:
            y[:] = x.dot(weights_t).astype(x.dtype, copy=False)
        if bias is not None:
            y += bias
        return y

    return forward


def _batch_norm(bn: L.BatchNormalization, ndim: int) -> Op:
    if bn.axis is not None:
        raise DdnnError("the NumPy forward covers BatchNormalization over the default axes only")
    expander = (None, slice(None)) + (None,) * (ndim - 2)
    mean = _array(bn.avg_mean)[expander]
    inv_std_1d = np.reciprocal(_array(bn.avg_var) + bn.eps)
    inv_std = np.sqrt(inv_std_1d, dtype=inv_std_1d.dtype)[expander]
    gamma = _array(bn.gamma)[expander]
    beta = _array(bn.beta)[expander]

    def forward(x: np.ndarray) -> np.ndarray:
        x_hat = x - mean
        x_hat *= inv_std
        y = x_hat * gamma
        y += beta
        return y.astype(x.dtype)

    return forward


def _max_pool(pool: Pool | None) -> list[Op]:
    if pool is None:
        return []
    k, s, p = pool.ksize, pool.stride, pool.pad

    def forward(x: np.ndarray) -> np.ndarray:
        # A maximum is exact whatever the order, so any gathering gives Chainer's values.
        col = im2col_cpu(x, k, k, s, s, p, p, pval=-float("inf"), cover_all=False)
        return col.max(axis=(2, 3))

    return [forward]


def _block_ops(block: Any) -> list[Op]:
    if isinstance(block, BinaryConvBlock):
        return [_conv(block.conv, _binarized(_array(block.conv.W))), *_max_pool(block.layer.pool),
                _batch_norm(block.bn, 4), binarize]
    if isinstance(block, BinaryLinearBlock):
        ops = [_linear(_binarized(_array(block.fc.W)), None), _batch_norm(block.bn, 2)]
        return ops if block.is_exit else [*ops, binarize]
    if isinstance(block, FloatConvBlock):
        ops = [_conv(block.conv, _array(block.conv.W))]
        if block.layer.bn:
            ops.append(_batch_norm(block.bn, 4))
        if block.layer.relu:
            ops.append(relu)
        return [*ops, *_max_pool(block.layer.pool)]
    if isinstance(block, FloatLinearBlock):
        ops = [_linear(_array(block.fc.W), None if block.fc.b is None else _array(block.fc.b))]
        if block.layer.bn:
            ops.append(_batch_norm(block.bn, 2))
        if block.layer.relu:
            ops.append(relu)
        return ops
    if isinstance(block, L.Linear):
        return [_linear(_array(block.W), None if block.b is None else _array(block.b))]
    raise DdnnError(f"the NumPy forward has no equivalent of {type(block).__name__}")


def _run(ops: list[Op], x: np.ndarray) -> np.ndarray:
    for op in ops:
        x = op(x)
    return x


class FastForward:
    """A loaded DDNN's tiers as NumPy operations, built once (the parameters are read, not copied: a model
    changed afterwards needs a new FastForward)."""

    def __init__(self, model: DDNN) -> None:
        self.spec = model.spec
        self._layers = [[op for block in model.tier_layers(index) for op in _block_ops(block)]
                        for index in range(len(self.spec.tiers))]
        self._exits = [_block_ops(model.tier_exit(index)) for index in range(len(self.spec.tiers))]

    def _layers_from(self, x: np.ndarray, index: int, h: np.ndarray) -> np.ndarray:
        if index == 1 and self.spec.big_little:
            h = x  # the big net reads the raw input, as DDNN.run_tiers does
        return _run(self._layers[index], h)

    def run_tier(self, x: np.ndarray, tier: int) -> tuple[np.ndarray, np.ndarray]:
        """Tier ``tier`` on its float32 input: its exit logits and its output (DDNN.run_tiers(x, tier, tier + 1))."""
        h = self._layers_from(x, tier, x)
        return _run(self._exits[tier], h), h

    def resume(self, x: np.ndarray, tier: int) -> np.ndarray:
        """Final-exit logits (float32) resumed at ``tier`` from its input, as DDNN.resume_forward."""
        h = x
        for index in range(tier, len(self.spec.tiers)):
            h = self._layers_from(x, index, h)
        return _run(self._exits[-1], h)

    def images(self, images_u8: np.ndarray) -> np.ndarray:
        """Final-exit logits of the whole model on uint8 (N, C, H, W) images (DDNN.forward_images, no views)."""
        if self.spec.views is not None:
            raise DdnnError(f"{self.spec.name} is multi-view: its devices and aggregator run separately")
        return self.resume(input_to_float(images_u8, self.spec.input.scale), 0)
