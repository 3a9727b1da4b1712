"""Model zoo: the adaptive-DDNN paper's CIFAR-10 families, a 28x28 family for MNIST-like data,
three-tier (device, edge, cloud) families for Fashion-MNIST and CIFAR-10, a multi-view family (four devices
seeing overlapping crops of one Fashion-MNIST image), and Big-Little families for MNIST (a little binarized net
for priority classes on the device, a big float net on the raw input in the cloud).

Every builder returns a raw spec dict (see ``spec.parse_spec``); ``filters`` scales the
device part, as in the paper's deep-16/32/64 variants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ddnn_gen.model.datasets import CLASS_NAMES
from ddnn_gen.model.spec import SPEC_FORMAT, SPEC_VERSION, parse_spec

Raw = dict[str, Any]


def _tier(name: str, kind: str, layers: list[Raw], exit_name: str, binary: bool) -> Raw:
    return {"name": name, "kind": kind, "layers": layers,
            "exit": {"name": exit_name, "type": "bexit" if binary else "linear"}}


def _spec(name: str, dataset: str, channels: int, size: int, tiers: list[Raw], thresholds: list[float],
          extra: Raw | None = None) -> Raw:
    raw: Raw = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "name": name,
        "dataset": dataset,
        "input": {"channels": channels, "height": size, "width": size, "scale": 1.0 / 256.0},
        "classes": list(CLASS_NAMES[dataset]),
        "tiers": tiers,
        "thresholds": thresholds,
        "loss_weights": [1.0] * len(tiers),
        **(extra or {}),
    }
    parse_spec(raw)  # a zoo entry must always be valid
    return raw


def _two_tier(name: str, dataset: str, channels: int, size: int, device: list[Raw], cloud: list[Raw],
              threshold: float) -> Raw:
    """Configuration (b): device + cloud."""
    return _spec(name, dataset, channels, size, [_tier("device", "device", device, "local", True),
                                                 _tier("cloud", "cloud", cloud, "final", False)], [threshold])


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
    return _two_tier(f"cifar10_shallow_{filters}", "cifar10", 3, 32, device, server, 0.8)


def cifar10_deep(filters: int = 64) -> Raw:
    """Device: FConv only, local exit BLinear. Server: four conv3x3-64/BN/ReLU/max-pool 3-1-1 blocks + linear."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2)]
    server = [_conv(f"sconv{i}", "conv", 64, pool=POOL_3_1_1) for i in range(1, 5)]
    return _two_tier(f"cifar10_deep_{filters}", "cifar10", 3, 32, device, server, 0.8)


def mnist28(filters: int = 16, dataset: str = "mnist") -> Raw:
    """28x28x1 family. Device: FConv + BConv with 2x2 pools, local exit BLinear.
    Server: two float conv blocks + a hidden linear layer."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2), _conv("conv2", "bconv", 2 * filters, pool=POOL_2)]
    server = [_conv("sconv1", "conv", 64), _conv("sconv2", "conv", 64, pool=POOL_2),
              {"name": "sfc1", "type": "linear", "out_channels": 128}]
    prefix = "fmnist" if dataset == "fashion-mnist" else "mnist"
    return _two_tier(f"{prefix}_{filters}", dataset, 1, 28, device, server, 0.5)


def _three_tier(name: str, dataset: str, channels: int, size: int, device: list[Raw], edge: list[Raw],
                cloud: list[Raw], thresholds: list[float]) -> Raw:
    """Configuration (d): device + edge + cloud, the device and edge binarized (the edge's layers run on a
    gateway as XNOR-popcount kernels), the cloud float."""
    return _spec(name, dataset, channels, size, [_tier("device", "device", device, "local", True),
                                                 _tier("edge", "edge", edge, "edge", True),
                                                 _tier("cloud", "cloud", cloud, "final", False)], thresholds)


def fmnist28_3tier(filters: int = 32) -> Raw:
    """Fashion-MNIST, 3 tiers. Device: FConv + BConv (7x7 split, 392 B). Edge: a wider BConv pooled to 3x3 and
    its binary exit (144 B onward). Cloud: one float conv and a hidden linear layer."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2), _conv("conv2", "bconv", 2 * filters, pool=POOL_2)]
    edge = [_conv("econv1", "bconv", 4 * filters, pool=POOL_2)]
    cloud = [_conv("sconv1", "conv", 128), {"name": "sfc1", "type": "linear", "out_channels": 256}]
    return _three_tier(f"fmnist3_{filters}", "fashion-mnist", 1, 28, device, edge, cloud, [0.3, 0.3])


def cifar10_3tier(filters: int = 64) -> Raw:
    """CIFAR-10, 3 tiers. Device: FConv 3->64 and BConv 64, each with a 2x2 pool (8x8 split, 512 B), so the
    local exit sees two binary layers. Edge: a BConv 128 pooled to 4x4 and its binary exit (256 B onward).
    Cloud: two float 3x3 convolutions at 4x4 (the second pooled) and a hidden linear layer: cheap per sample,
    unlike four full-resolution ones."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2), _conv("conv2", "bconv", filters, pool=POOL_2)]
    edge = [_conv("econv1", "bconv", 2 * filters, pool=POOL_2)]
    cloud = [_conv("sconv1", "conv", 4 * filters), _conv("sconv2", "conv", 4 * filters, pool=POOL_2),
             {"name": "sfc1", "type": "linear", "out_channels": 8 * filters}]
    return _three_tier(f"cifar10_3tier_{filters}", "cifar10", 3, 32, device, edge, cloud, [0.5, 0.5])


def cifar10_2tier(filters: int = 64) -> Raw:
    """cifar10_3tier without its edge: the same device part, and a cloud that runs the edge's convolution
    (float, as every cloud layer is) before the same cloud layers. Its two-tier counterpart for comparisons."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2), _conv("conv2", "bconv", filters, pool=POOL_2)]
    cloud = [_conv("econv1", "conv", 2 * filters, pool=POOL_2), _conv("sconv1", "conv", 4 * filters),
             _conv("sconv2", "conv", 4 * filters, pool=POOL_2),
             {"name": "sfc1", "type": "linear", "out_channels": 8 * filters}]
    return _two_tier(f"cifar10_2tier_{filters}", "cifar10", 3, 32, device, cloud, 0.5)


def corner_crops(size: int, view: int) -> list[Raw]:
    """Four ``view`` x ``view`` crops of a ``size`` x ``size`` image, one per corner: four cameras that overlap in
    the middle of the scene."""
    far = size - view
    return [{"top": top, "left": left} for top in (0, far) for left in (0, far)]


def fmnist28_views(filters: int = 16) -> Raw:
    """Fashion-MNIST seen by four devices, each a 20x20 corner crop of the 28x28 image (configuration (e): devices,
    local aggregator, cloud). Device (per view, separate weights: each camera its own): FConv + BConv with 2x2
    pools, a 5x5 split of 2 * filters bits (200 B for up to 32 filters) and a binary local exit; the local
    aggregator takes the max of the four exits' scores (MP), the cloud concatenates the four splits (CC) before
    two float convolutions and a hidden linear layer. Trained with a quarter of the views left out at random."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2), _conv("conv2", "bconv", 2 * filters, pool=POOL_2)]
    cloud = [_conv("sconv1", "conv", 64), _conv("sconv2", "conv", 64, pool=POOL_2),
             {"name": "sfc1", "type": "linear", "out_channels": 128}]
    raw = _two_tier(f"fmnist_views_{filters}", "fashion-mnist", 1, 28, device, cloud, 0.5)
    raw["views"] = {"height": 20, "width": 20, "crops": corner_crops(28, 20), "weights": "separate",
                    "local_aggregation": "max", "split_aggregation": "concat", "dropout": 0.25}
    parse_spec(raw)
    return raw


def fmnist28_views_3tier(filters: int = 16) -> Raw:
    """fmnist28_views with an edge between the local aggregator and the cloud (configuration (f): devices, local
    aggregator, edge, cloud). The aggregator runs the edge tier: the OR of the present views' split bits (binary
    max aggregation) through a BConv of 4 * ``filters`` at 5x5 and its binary exit; what that exit is unsure of
    goes on to the cloud as 5x5 x 4 * ``filters`` bits (200 B for 16 filters): one float convolution pooled to
    2x2 and a hidden linear layer."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2), _conv("conv2", "bconv", 2 * filters, pool=POOL_2)]
    edge = [_conv("econv1", "bconv", 4 * filters)]
    cloud = [_conv("sconv1", "conv", 64, pool=POOL_2), {"name": "sfc1", "type": "linear", "out_channels": 128}]
    raw = _three_tier(f"fmnist_views3_{filters}", "fashion-mnist", 1, 28, device, edge, cloud, [0.5, 0.5])
    raw["views"] = {"height": 20, "width": 20, "crops": corner_crops(28, 20), "weights": "separate",
                    "local_aggregation": "max", "split_aggregation": "max", "dropout": 0.25}
    parse_spec(raw)
    return raw


def mnist_biglittle(filters: int = 8, priority: tuple[int, ...] = (8,)) -> Raw:
    """Big-Little on MNIST: the little net (device, binarized) FConv ``filters`` + BConv 2 * ``filters`` with 2x2
    pools and a binary exit over the priority classes + "other"; the big net (cloud, float) reads the raw image:
    three 3x3 conv blocks of 16, 32, 32 channels, each max-pooled 2x2 (28 -> 14 -> 7 -> 3), and a hidden linear
    layer of 64. The big net is small on purpose: the paper compares with a big net of ~97 % F1 on class '8'."""
    device = [_conv("conv1", "fconv", filters, pool=POOL_2), _conv("conv2", "bconv", 2 * filters, pool=POOL_2)]
    cloud = [_conv("bconv1", "conv", 16, pool=POOL_2), _conv("bconv2", "conv", 32, pool=POOL_2),
             _conv("bconv3", "conv", 32, pool=POOL_2), {"name": "bfc1", "type": "linear", "out_channels": 64}]
    suffix = "_".join(map(str, priority))
    return _spec(f"mnist_bl{suffix}_{filters}", "mnist", 1, 28,
                 [_tier("little", "device", device, "little", True), _tier("big", "cloud", cloud, "big", False)],
                 [0.2], {"priority_classes": list(priority)})


ZOO: dict[str, Callable[..., Raw]] = {
    "cifar10_shallow": cifar10_shallow,
    "cifar10_deep": cifar10_deep,
    "cifar10_2tier": cifar10_2tier,
    "cifar10_3tier": cifar10_3tier,
    "mnist": lambda filters=16: mnist28(filters, "mnist"),
    "fashion-mnist": lambda filters=16: mnist28(filters, "fashion-mnist"),
    "fashion-mnist-3tier": fmnist28_3tier,
    "fashion-mnist-views": fmnist28_views,
    "fashion-mnist-views-3tier": fmnist28_views_3tier,
    "biglittle": lambda filters=8: mnist_biglittle(filters, (8,)),
    "biglittle-3-8": lambda filters=8: mnist_biglittle(filters, (3, 8)),
}


def build(name: str, filters: int | None = None) -> Raw:
    if name not in ZOO:
        from ddnn_gen.errors import SpecError

        raise SpecError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]() if filters is None else ZOO[name](filters)
