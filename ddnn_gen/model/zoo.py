"""Model zoo: the adaptive-DDNN paper's CIFAR-10 families and a 28x28 family for MNIST-like data.

Every builder returns a raw spec dict (see ``spec.parse_spec``); ``filters`` scales the
device part, as in the paper's deep-16/32/64 variants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ddnn_gen.model.datasets import CLASS_NAMES
from ddnn_gen.model.spec import SPEC_FORMAT, SPEC_VERSION, parse_spec

Raw = dict[str, Any]


def _spec(name: str, dataset: str, channels: int, size: int, device: list[Raw], server: list[Raw],
          threshold: float) -> Raw:
    raw: Raw = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "name": name,
        "dataset": dataset,
        "input": {"channels": channels, "height": size, "width": size, "scale": 1.0 / 256.0},
        "classes": list(CLASS_NAMES[dataset]),
        "tiers": [
            {"name": "device", "kind": "device", "layers": device, "exit": {"name": "local", "type": "bexit"}},
            {"name": "server", "kind": "server", "layers": server, "exit": {"name": "final", "type": "linear"}},
        ],
        "threshold": threshold,
        "loss_weights": [1.0, 1.0],
    }
    parse_spec(raw)  # a zoo entry must always be valid
    return raw


def _conv(name: str, kind: str, out: int, ksize: int = 3, pad: int = 1, pool: Raw | None = None) -> Raw:
    layer: Raw = {"name": name, "type": kind, "out_channels": out, "ksize": ksize, "stride": 1, "pad": pad}
    if pool is not None:
        layer["pool"] = pool
    return layer


POOL_2 = {"ksize": 2, "stride": 2, "pad": 0}
POOL_3_1_1 = {"ksize": 3, "stride": 1, "pad": 1}


def cifar10_shallow(filters: int = 64) -> Raw:
    """Device: FConv + BConv, local exit BLinear. Server: two float conv blocks + linear."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_3_1_1), _conv("conv2", "bconv", filters, pool=POOL_2)]
    server = [_conv("sconv1", "conv", 64, pool=POOL_2), _conv("sconv2", "conv", 64, pool=POOL_2)]
    return _spec(f"cifar10_shallow_{filters}", "cifar10", 3, 32, device, server, 0.8)


def cifar10_deep(filters: int = 64) -> Raw:
    """Device: FConv only, local exit BLinear. Server: four conv3x3-64/BN/ReLU/max-pool 3-1-1 blocks + linear."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2)]
    server = [_conv(f"sconv{i}", "conv", 64, pool=POOL_3_1_1) for i in range(1, 5)]
    return _spec(f"cifar10_deep_{filters}", "cifar10", 3, 32, device, server, 0.8)


def mnist28(filters: int = 16, dataset: str = "mnist") -> Raw:
    """28x28x1 family. Device: FConv + BConv with 2x2 pools, local exit BLinear.
    Server: two float conv blocks + a hidden linear layer."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2), _conv("conv2", "bconv", 2 * filters, pool=POOL_2)]
    server = [_conv("sconv1", "conv", 64), _conv("sconv2", "conv", 64, pool=POOL_2),
              {"name": "sfc1", "type": "linear", "out_channels": 128}]
    prefix = "fmnist" if dataset == "fashion-mnist" else "mnist"
    return _spec(f"{prefix}_{filters}", dataset, 1, 28, device, server, 0.5)


ZOO: dict[str, Callable[..., Raw]] = {
    "cifar10_shallow": cifar10_shallow,
    "cifar10_deep": cifar10_deep,
    "mnist": lambda filters=16: mnist28(filters, "mnist"),
    "fashion-mnist": lambda filters=16: mnist28(filters, "fashion-mnist"),
}


def build(name: str, filters: int | None = None) -> Raw:
    if name not in ZOO:
        from ddnn_gen.errors import SpecError

        raise SpecError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]() if filters is None else ZOO[name](filters)
