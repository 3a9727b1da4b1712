"""The DDNN as a Chainer chain built from a ModelSpec: device tier, local exit, server tier, final exit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import chainer
import chainer.functions as F
import numpy as np

from ddnn_gen.model.links import (
    BinaryConvBlock,
    BinaryLinearBlock,
    FloatConvBlock,
    FloatLinearBlock,
    input_to_float,
)
from ddnn_gen.model.spec import ModelSpec


@dataclass
class ForwardResult:
    """Exit logits per tier (local first) and the split-layer activations (+-1 floats)."""

    exit_logits: list[Any]
    split: Any


def _flat_size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape))


class DDNN(chainer.Chain):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        device_shapes = spec.tier_shapes(0)
        server_shapes = spec.tier_shapes(1)
        with self.init_scope():
            self.device_layers = chainer.ChainList()
            for layer, in_shape in zip(spec.device.layers, device_shapes):
                if layer.is_conv:
                    self.device_layers.append(BinaryConvBlock(layer, in_shape[0]))
                else:
                    self.device_layers.append(
                        BinaryLinearBlock(_flat_size(in_shape), layer.out_channels, is_exit=False))
            self.local_exit = BinaryLinearBlock(_flat_size(device_shapes[-1]), spec.n_classes, is_exit=True)
            self.server_layers = chainer.ChainList()
            for layer, in_shape in zip(spec.server.layers, server_shapes):
                if layer.is_conv:
                    self.server_layers.append(FloatConvBlock(layer, in_shape[0]))
                else:
                    self.server_layers.append(FloatLinearBlock(layer, _flat_size(in_shape)))
            self.final_exit = chainer.links.Linear(_flat_size(server_shapes[-1]), spec.n_classes)

    def device_forward(self, x: Any) -> Any:
        h = x
        for block in self.device_layers:
            h = block(h)
        return h

    def server_forward(self, split: Any) -> Any:
        """Resume inference from the split-layer activations (+-1 floats, N x C x H x W or N x F)."""
        h = split
        for block in self.server_layers:
            h = block(h)
        return self.final_exit(h)

    def forward(self, x: Any) -> ForwardResult:
        split = self.device_forward(x)
        local = self.local_exit(split)
        final = self.server_forward(split)
        return ForwardResult([local, final], split)

    def forward_images(self, images_u8: np.ndarray) -> ForwardResult:
        return self.forward(input_to_float(images_u8, self.spec.input.scale))


def predict(model: DDNN, images_u8: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Test-mode logits of both exits: arrays (N, K) for the local and the final exit."""
    local, final = [], []
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for start in range(0, len(images_u8), batch_size):
            result = model.forward_images(images_u8[start:start + batch_size])
            local.append(chainer.backend.CpuDevice().send(result.exit_logits[0].array))
            final.append(chainer.backend.CpuDevice().send(result.exit_logits[1].array))
    return np.concatenate(local), np.concatenate(final)


def softmax_cross_entropy_joint(model: DDNN, x: Any, t: Any, weights: tuple[float, ...]) -> tuple[Any, list[Any]]:
    """Weighted sum of the exits' softmax cross-entropies (DDNN joint training)."""
    result = model(x)
    losses = [F.softmax_cross_entropy(logits, t) for logits in result.exit_logits]
    total = sum(w * loss for w, loss in zip(weights, losses))
    return total, result.exit_logits
