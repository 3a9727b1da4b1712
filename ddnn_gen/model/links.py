"""Chainer links for the binarized device layers (eBNN style) and the float server layers.

Binarization convention, shared with the bitwise reference and the C runtime:
sign(x) = +1 for x >= 0, -1 otherwise (so an exact zero pre-activation gives +1).
Gradients pass straight through where |x| <= 1 (Courbariaux et al.'s estimator).
"""

from __future__ import annotations

from typing import Any

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer import function_node

from ddnn_gen.model.spec import Layer, Pool


class BinarizeSTE(function_node.FunctionNode):
    """Forward: sign with sign(0) = +1. Backward: straight-through where |x| <= 1."""

    def forward(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        self.retain_inputs((0,))
        (x,) = inputs
        xp = chainer.backend.get_array_module(x)
        return (xp.where(x >= 0, 1, -1).astype(x.dtype),)

    def backward(self, indexes: tuple[int, ...], grad_outputs: tuple[Any, ...]) -> tuple[Any, ...]:
        (x,) = self.get_retained_inputs()
        (gy,) = grad_outputs
        mask = (abs(x.array) <= 1).astype(gy.dtype)
        return (gy * mask,)


def binarize(x: Any) -> chainer.Variable:
    return BinarizeSTE().apply((x,))[0]


def max_pool(x: Any, pool: Pool | None) -> Any:
    if pool is None:
        return x
    # cover_all=False: output size (H + 2p - k) // s + 1, the formula the reference and C use.
    return F.max_pooling_2d(x, pool.ksize, pool.stride, pool.pad, cover_all=False)


class BinaryConv2D(L.Convolution2D):
    """Convolution whose weights are binarized to +-1 in the forward pass."""

    def forward(self, x: Any) -> Any:
        return F.convolution_2d(x, binarize(self.W), None, self.stride, self.pad)


class BinaryLinear(L.Linear):
    """Linear layer whose weights are binarized to +-1 in the forward pass."""

    def forward(self, x: Any) -> Any:
        return F.linear(x, binarize(self.W), None)


def clip_binary_weights(link: chainer.Link) -> None:
    """Clip every binary weight to [-1, 1] in place (the estimator's weights live there).

    Writing into ``param.array`` (not rebinding ``param.data``) is what makes the clip
    stick on CPU: rebinding would be lost when the optimizer's update rule holds a view.
    """
    for child in link.links():
        if isinstance(child, (BinaryConv2D, BinaryLinear)) and child.W.array is not None:
            xp = chainer.backend.get_array_module(child.W.array)
            xp.clip(child.W.array, -1.0, 1.0, out=child.W.array)


class BinaryConvBlock(chainer.Chain):
    """FConv / BConv: binary conv -> [max-pool] -> BN -> sign."""

    def __init__(self, layer: Layer, in_channels: int) -> None:
        super().__init__()
        self.layer = layer
        with self.init_scope():
            self.conv = BinaryConv2D(in_channels, layer.out_channels, layer.ksize, layer.stride, layer.pad,
                                     nobias=True)
            self.bn = L.BatchNormalization(layer.out_channels)

    def preactivation(self, x: Any) -> Any:
        """BN output before the sign; the bitwise reference's thresholds reproduce its sign."""
        return self.bn(max_pool(self.conv(x), self.layer.pool))

    def forward(self, x: Any) -> Any:
        return binarize(self.preactivation(x))


class BinaryLinearBlock(chainer.Chain):
    """BLinear: binary linear -> BN, then sign (hidden layer) or softmax logits (exit)."""

    def __init__(self, in_size: int, out_size: int, is_exit: bool) -> None:
        super().__init__()
        self.is_exit = is_exit
        with self.init_scope():
            self.fc = BinaryLinear(in_size, out_size, nobias=True)
            self.bn = L.BatchNormalization(out_size)

    def preactivation(self, x: Any) -> Any:
        return self.bn(self.fc(x))

    def forward(self, x: Any) -> Any:
        y = self.preactivation(x)
        return y if self.is_exit else binarize(y)


class FloatConvBlock(chainer.Chain):
    """Server conv: conv -> [BN] -> [ReLU] -> [max-pool]."""

    def __init__(self, layer: Layer, in_channels: int) -> None:
        super().__init__()
        self.layer = layer
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, layer.out_channels, layer.ksize, layer.stride, layer.pad,
                                        nobias=layer.bn)
            if layer.bn:
                self.bn = L.BatchNormalization(layer.out_channels)

    def forward(self, x: Any) -> Any:
        h = self.conv(x)
        if self.layer.bn:
            h = self.bn(h)
        if self.layer.relu:
            h = F.relu(h)
        return max_pool(h, self.layer.pool)


class FloatLinearBlock(chainer.Chain):
    """Server linear: linear -> [BN] -> [ReLU]."""

    def __init__(self, layer: Layer, in_size: int) -> None:
        super().__init__()
        self.layer = layer
        with self.init_scope():
            self.fc = L.Linear(in_size, layer.out_channels, nobias=layer.bn)
            if layer.bn:
                self.bn = L.BatchNormalization(layer.out_channels)

    def forward(self, x: Any) -> Any:
        h = self.fc(x)
        if self.layer.bn:
            h = self.bn(h)
        if self.layer.relu:
            h = F.relu(h)
        return h


def input_to_float(images_u8: np.ndarray, scale: float) -> np.ndarray:
    """Raw uint8 pixels -> the float input of FConv (one global factor, no per-channel terms)."""
    return images_u8.astype(np.float32) * np.float32(scale)
