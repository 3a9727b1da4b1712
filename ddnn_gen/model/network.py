"""The DDNN as a Chainer chain built from a ModelSpec: each tier's layers and exit, in order."""

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
from ddnn_gen.model.spec import ModelSpec, Tier


@dataclass
class ForwardResult:
    """Exit logits per tier (device first) and every tier's output (the splits, then the last tier's)."""

    exit_logits: list[Any]
    tier_outputs: list[Any]

    @property
    def split(self) -> Any:
        """The device tier's output: the activations the device sends."""
        return self.tier_outputs[0]


def _flat_size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape))


def tier_link_names(spec: ModelSpec, index: int) -> tuple[str, str]:
    """Attribute names of tier ``index``'s layers and exit. The device and the last tier keep the names of
    version 1 models (their parameter paths are part of the content hash, so of the model's identity on the
    wire); edge tiers are ``tier<k>_layers`` / ``tier<k>_exit``."""
    if index == len(spec.tiers) - 1:
        return "server_layers", "final_exit"
    if index == 0:
        return "device_layers", "local_exit"
    return f"tier{index}_layers", f"tier{index}_exit"


def _tier_links(tier: Tier, shapes: list[tuple[int, ...]], n_classes: int) -> tuple[chainer.ChainList, chainer.Link]:
    layers = chainer.ChainList()
    for layer, in_shape in zip(tier.layers, shapes):
        if tier.binary:
            layers.append(BinaryConvBlock(layer, in_shape[0]) if layer.is_conv
                          else BinaryLinearBlock(_flat_size(in_shape), layer.out_channels, is_exit=False))
        else:
            layers.append(FloatConvBlock(layer, in_shape[0]) if layer.is_conv
                          else FloatLinearBlock(layer, _flat_size(in_shape)))
    out = _flat_size(shapes[-1])
    exit_link = (BinaryLinearBlock(out, n_classes, is_exit=True) if tier.binary
                 else chainer.links.Linear(out, n_classes))
    return layers, exit_link


class DDNN(chainer.Chain):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        with self.init_scope():
            for index, tier in enumerate(spec.tiers):
                layers, exit_link = _tier_links(tier, spec.tier_shapes(index), spec.n_classes)
                layers_name, exit_name = tier_link_names(spec, index)
                setattr(self, layers_name, layers)
                setattr(self, exit_name, exit_link)

    def tier_layers(self, index: int) -> chainer.ChainList:
        return getattr(self, tier_link_names(self.spec, index)[0])

    def tier_exit(self, index: int) -> chainer.Link:
        return getattr(self, tier_link_names(self.spec, index)[1])

    def run_tiers(self, x: Any, start: int = 0, stop: int | None = None) -> ForwardResult:
        """Tiers ``start`` .. ``stop - 1`` on ``x`` (the input of tier ``start``): each one's exit logits and
        output."""
        stop = len(self.spec.tiers) if stop is None else stop
        logits, outputs = [], []
        h = x
        for index in range(start, stop):
            for block in self.tier_layers(index):
                h = block(h)
            outputs.append(h)
            logits.append(self.tier_exit(index)(h))
        return ForwardResult(logits, outputs)

    def device_forward(self, x: Any) -> Any:
        h = x
        for block in self.tier_layers(0):
            h = block(h)
        return h

    def resume_forward(self, split: Any, tier: int) -> Any:
        """Final-exit logits resumed at tier ``tier`` from the output of tier ``tier - 1`` (+-1 floats for a
        binary tier, N x C x H x W or N x F), running every tier after it without their early exits."""
        h = split
        for index in range(tier, len(self.spec.tiers)):
            for block in self.tier_layers(index):
                h = block(h)
        return self.tier_exit(len(self.spec.tiers) - 1)(h)

    def server_forward(self, split: Any) -> Any:
        """Final-exit logits resumed after the device tier: what a cloud computes for an offloaded sample."""
        return self.resume_forward(split, 1)

    def forward(self, x: Any) -> ForwardResult:
        return self.run_tiers(x)

    def forward_images(self, images_u8: np.ndarray) -> ForwardResult:
        return self.forward(input_to_float(images_u8, self.spec.input.scale))


def predict_exits(model: DDNN, images_u8: np.ndarray, batch_size: int = 500) -> list[np.ndarray]:
    """Test-mode logits of every exit, device first: one (N, K) array per tier."""
    per_exit: list[list[np.ndarray]] = [[] for _ in model.spec.tiers]
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for start in range(0, len(images_u8), batch_size):
            result = model.forward_images(images_u8[start:start + batch_size])
            for store, logits in zip(per_exit, result.exit_logits):
                store.append(chainer.backend.CpuDevice().send(logits.array))
    return [np.concatenate(store) for store in per_exit]


def predict(model: DDNN, images_u8: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Test-mode logits of the device's exit and of the final exit: arrays (N, K)."""
    logits = predict_exits(model, images_u8, batch_size)
    return logits[0], logits[-1]


def softmax_cross_entropy_joint(model: DDNN, x: Any, t: Any, weights: tuple[float, ...]) -> tuple[Any, list[Any]]:
    """Weighted sum of the exits' softmax cross-entropies (DDNN joint training)."""
    result = model(x)
    losses = [F.softmax_cross_entropy(logits, t) for logits in result.exit_logits]
    total = sum(w * loss for w, loss in zip(weights, losses))
    return total, result.exit_logits
