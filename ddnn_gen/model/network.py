"""The DDNN as a Chainer chain built from a ModelSpec: each tier's layers and exit, in order; with views, the
device tier once per view, their local exits and splits aggregated (model/views.py) before tier 1."""

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
from ddnn_gen.model.views import FEATURE_LOW, aggregate_chainer, aggregate_scores_chainer, extract_views, present_mask


@dataclass
class ForwardResult:
    """Exit logits per tier (device first) and every tier's output (the splits, then the last tier's). With
    views, the device tier's exit is the aggregated local exit and its output the aggregated splits (tier 1's
    input); each view's own exit logits and split are kept beside them."""

    exit_logits: list[Any]
    tier_outputs: list[Any]
    view_logits: list[Any] | None = None
    view_splits: list[Any] | None = None

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


def view_link_names(spec: ModelSpec, view: int) -> tuple[str, str]:
    """Attribute names of view ``view``'s device layers and local exit: the device tier's own for every view when
    the views share weights, else for view 0, and ``view<k>_layers`` / ``view<k>_exit`` for the others."""
    assert spec.views is not None
    if spec.views.shared or view == 0:
        return tier_link_names(spec, 0)
    return f"view{view}_layers", f"view{view}_exit"


LOCAL_AGGREGATOR = "local_concat"  # CC's linear layer from K concatenated score vectors to the classes


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
                layers, exit_link = _tier_links(tier, spec.tier_shapes(index), spec.exit_outputs(index))
                layers_name, exit_name = tier_link_names(spec, index)
                setattr(self, layers_name, layers)
                setattr(self, exit_name, exit_link)
            views = spec.views
            if views is not None:
                for view in range(1, 1 if views.shared else views.count):
                    layers, exit_link = _tier_links(spec.tiers[0], spec.tier_shapes(0), spec.n_classes)
                    layers_name, exit_name = view_link_names(spec, view)
                    setattr(self, layers_name, layers)
                    setattr(self, exit_name, exit_link)
                if views.local_aggregation == "concat":
                    setattr(self, LOCAL_AGGREGATOR, chainer.links.Linear(views.count * spec.n_classes,
                                                                         spec.n_classes))

    def tier_layers(self, index: int) -> chainer.ChainList:
        return getattr(self, tier_link_names(self.spec, index)[0])

    def tier_exit(self, index: int) -> chainer.Link:
        return getattr(self, tier_link_names(self.spec, index)[1])

    def view_layers(self, view: int) -> chainer.ChainList:
        return getattr(self, view_link_names(self.spec, view)[0])

    def view_exit(self, view: int) -> chainer.Link:
        return getattr(self, view_link_names(self.spec, view)[1])

    @property
    def local_aggregator(self) -> chainer.Link | None:
        """CC's linear layer, None for MP and AP (no parameters)."""
        return getattr(self, LOCAL_AGGREGATOR, None)

    def run_tiers(self, x: Any, start: int = 0, stop: int | None = None) -> ForwardResult:
        """Tiers ``start`` .. ``stop - 1`` on ``x`` (the input of tier ``start``): each one's exit logits and
        output."""
        stop = len(self.spec.tiers) if stop is None else stop
        logits, outputs = [], []
        h = x
        for index in range(start, stop):
            if index == 1 and self.spec.big_little:
                h = x  # the big net reads the raw input (tier 0's too), not the little net's split
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

    def forward(self, x: Any, present: np.ndarray | None = None) -> ForwardResult:
        """Every exit on a batch of float inputs; with views, ``x`` is the scene and ``present`` (bool (N, K),
        default all) says which views each sample has."""
        if self.spec.views is None:
            return self.run_tiers(x)
        return self.forward_views(x, present)

    def forward_views(self, x: Any, present: np.ndarray | None = None) -> ForwardResult:
        """Each view's device part on its crop of the scene ``x``, the aggregated local exit, then tiers 1.. on
        the aggregated splits."""
        views = self.spec.views
        assert views is not None
        mask = present_mask(views, len(x)) if present is None else present
        splits, logits = [], []
        for view, crop in enumerate(extract_views(views, x)):
            h = crop
            for block in self.view_layers(view):
                h = block(h)
            splits.append(h)
            logits.append(self.view_exit(view)(h))
        local = aggregate_scores_chainer(views, logits, mask, self.local_aggregator)
        features = aggregate_chainer(splits, mask, views.split_aggregation, FEATURE_LOW)
        upper = self.run_tiers(features, 1)
        return ForwardResult([local, *upper.exit_logits], [features, *upper.tier_outputs], logits, splits)

    def forward_images(self, images_u8: np.ndarray, present: np.ndarray | None = None) -> ForwardResult:
        return self.forward(input_to_float(images_u8, self.spec.input.scale), present)


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


def exit_targets(spec: ModelSpec, tier_index: int, t: Any) -> Any:
    """The labels exit ``tier_index`` learns (spec.exit_labels), on the device ``t`` lives on."""
    if spec.exit_outputs(tier_index) == spec.n_classes:
        return t
    xp = chainer.backend.get_array_module(t)
    return xp.asarray(spec.exit_labels(tier_index, chainer.backend.CpuDevice().send(t)))


def softmax_cross_entropy_joint(model: DDNN, x: Any, t: Any, weights: tuple[float, ...],
                                present: np.ndarray | None = None) -> tuple[Any, list[Any]]:
    """Weighted sum of the exits' softmax cross-entropies (DDNN joint training); with views the local exit's is
    the aggregated one's, over the views ``present``."""
    result = model(x, present) if present is not None else model(x)
    losses = [F.softmax_cross_entropy(logits, exit_targets(model.spec, index, t))
              for index, logits in enumerate(result.exit_logits)]
    total = sum(w * loss for w, loss in zip(weights, losses))
    return total, result.exit_logits
