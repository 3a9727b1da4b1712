"""Declarative, versioned description of a DDNN.

A model is a chain of *tiers* mapped onto a computing hierarchy: the end device first, then any number of
edge tiers, then the cloud (Teerapittayanon et al.'s configurations: (a) cloud only is one tier, (b) device +
cloud two, (d) device + edge + cloud three). Each tier is a list of layers followed by one exit classifier;
every exit but the last is an early exit with its own threshold on the normalized entropy. The input of a
tier is the output of the previous tier's last layer; that boundary is a split whose activations travel to
the next tier.

Binary tiers (eBNN style) come first:
  fconv   uint8 input x scale, binary weights: conv -> [max-pool] -> BN -> sign (first layer of the model)
  bconv   binary input and weights:           conv -> [max-pool] -> BN -> sign
  blinear binary input and weights:           linear -> BN -> sign
and end in a ``bexit`` (binary linear -> BN -> softmax). Float tiers follow: ``conv`` (conv -> [BN] ->
[ReLU] -> [max-pool]) and ``linear`` (linear -> [BN] -> [ReLU]), ending in a ``linear`` exit.

Horizontal DDNN (configurations (c), (e), (f)): an optional ``views`` object makes K end devices look at one
scene. Each view is a crop of the input image (the views are derived from single-view images: no multi-camera
data set is installable here), the device tier runs once per view (shared or separate weights), a local
aggregator combines the K local exits (max, average or concatenation + linear: the paper's MP / AP / CC) into
one aggregated local exit, and tier 1 (an edge or the cloud) reads the K splits combined the same way. A view
that is absent (a device down or late) is left out of max and average and is zeros in a concatenation.

Big-Little (De Coninck et al.'s "Big-Little" approach for IoT): ``priority_classes`` lists K of the classes. The
device tier is then a *little* net whose exit has K + 1 outputs (the priority classes, in the order listed, then
"other"), the cloud tier a *big* float net that reads the raw input, not the device's split: the two share only
the input. The device answers when the little net predicts a priority class with normalized entropy <= the
threshold (:func:`big_little_decision`), otherwise it sends its raw input (packing 3) and the big net answers.

Version 1 files (exactly a device and a server tier, one ``threshold``) load unchanged: their content
hashes, and so their wire identity, do not move.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddnn_gen.errors import SpecError
from ddnn_gen.model.datasets import DATASETS

SPEC_FORMAT = "ddnn-spec"
SPEC_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MAX_CLASSES = 1024
MAX_TIERS = 8

BINARY_LAYERS = ("fconv", "bconv", "blinear")
FLOAT_LAYERS = ("conv", "linear")
# Where a tier runs. Version 1 calls the last tier "server"; version 2 says "cloud".
TIER_KINDS = ("device", "edge", "cloud", "server")

# Every key a spec may hold, per object: a misspelt key ("kernel" for "ksize") is an error, not a default.
_KEYS = {
    "spec": {"format", "version", "name", "dataset", "input", "classes", "tiers", "threshold", "thresholds",
             "loss_weights", "training", "calibration", "views", "priority_classes"},
    "views": {"height", "width", "crops", "weights", "local_aggregation", "split_aggregation", "dropout"},
    "crop": {"top", "left"},
    "input": {"channels", "height", "width", "scale"},
    "tier": {"name", "kind", "layers", "exit"},
    "exit": {"name", "type"},
    "conv": {"name", "type", "out_channels", "ksize", "stride", "pad", "pool", "bn", "relu"},
    "linear": {"name", "type", "out_channels", "bn", "relu"},
    "pool": {"ksize", "stride", "pad"},
}

# How K views are combined (the DDNN paper's names): max pooling, average pooling, concatenation.
VIEW_AGGREGATIONS = {"max": "MP", "average": "AP", "concat": "CC"}
VIEW_WEIGHTS = ("shared", "separate")
MIN_VIEWS = 2
MAX_VIEWS = 16

THRESHOLD_RULE = "a finite number in [0, 1]"
# The text form of a threshold everywhere it is typed or sent (CLI options, retained MQTT payloads, the C
# runners' --threshold): plain ASCII decimal, optional exponent, optional surrounding blanks; no sign, hex,
# underscores, inf/nan or trailing bytes. c_runtime/ddnn_exit.c (ddnn_threshold_parse) reads the same.
THRESHOLD_TEXT_MAX = 63
_THRESHOLD_TEXT = re.compile(rb"[ \t\r\n]*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)[ \t\r\n]*")

# Names that reach generated C and OpenCL source. They only ever appear inside prefixed symbols
# (layer_<name>_weights, DDNN_<NAME>_IN_H) and string literals, so an ASCII identifier that starts with a
# letter is enough: no keyword can result, and no character can escape into code.
_C_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")


class ThresholdError(SpecError, ValueError):
    """A threshold that is not a finite number in [0, 1], or not written as one."""


def check_threshold(value: Any, what: str = "threshold") -> float:
    """The one definition of a valid local-exit threshold (normalized entropy): finite, in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ThresholdError(f"{what} must be {THRESHOLD_RULE}, got {value!r}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ThresholdError(f"{what} {value!r} is not in [0, 1] (a threshold is {THRESHOLD_RULE})")
    return float(value)


def exit_decision(entropy: np.ndarray, threshold: float) -> np.ndarray:
    """The exit rule (c_runtime ddnn_exit_decision): exit locally iff the normalized entropy is finite and
    <= threshold (NaN is not confident)."""
    entropy = np.asarray(entropy, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(entropy) & (entropy <= threshold)


OTHER_CLASS = -1  # a Big-Little device's local class when its little net says "other" (not a priority class)
OTHER_NAME = "other"


def big_little_decision(little_class: np.ndarray, entropy: np.ndarray, threshold: float, n_priority: int
                        ) -> np.ndarray:
    """Big-Little routing (the generated C does the same): answer locally iff the little net's argmax is one
    of the ``n_priority`` priority outputs (index < K; K is "other") and :func:`exit_decision` holds."""
    return (np.asarray(little_class) < n_priority) & exit_decision(entropy, threshold)


def parse_threshold_text(text: str | bytes, what: str = "threshold") -> float:
    """A threshold from its text form (grammar above), checked by :func:`check_threshold`."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    match = _THRESHOLD_TEXT.fullmatch(raw)
    if match is None or len(match.group(1)) > THRESHOLD_TEXT_MAX:
        shown = raw[:80].decode("ascii", "backslashreplace")
        raise ThresholdError(f"{what} {shown!r} is not a valid float threshold: write {THRESHOLD_RULE} as a plain "
                        "decimal such as 0.35 or 2.5e-1")
    return check_threshold(float(match.group(1)), what)


def check_identifier(name: Any, where: str) -> str:
    """A name that generated C/OpenCL uses in symbols: letters, digits and '_', starting with a letter."""
    if not isinstance(name, str) or _C_IDENTIFIER.fullmatch(name) is None:
        raise SpecError(f"{where}: name must be an ASCII identifier (a letter, then letters, digits or '_', at most "
                        f"63 characters), got {name!r}")
    return name


def _check_keys(obj: dict[str, Any], kind: str, where: str) -> None:
    unknown = sorted(set(obj) - _KEYS[kind])
    if unknown:
        raise SpecError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(sorted(_KEYS[kind]))}")


def check_input_scale(scale: Any) -> float:
    """FConv's input factor: a power of two, so its +-1-weighted sums of uint8 pixels stay exact integers."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise SpecError(f"input.scale must be a positive number, got {scale!r}")
    mantissa, _ = math.frexp(float(scale))
    if mantissa != 0.5 or not 2.0 ** -60 <= scale <= 2.0 ** 60:
        raise SpecError(f"input.scale must be a power of two (like 1/256 = 0.00390625) so FConv's integer sums "
                        f"are exact; got {scale!r}")
    return float(scale)


@dataclass(frozen=True)
class Pool:
    ksize: int
    stride: int
    pad: int

    def out_size(self, size: int) -> int:
        return (size + 2 * self.pad - self.ksize) // self.stride + 1


@dataclass(frozen=True)
class Layer:
    name: str
    type: str
    out_channels: int  # output features for linear layers
    ksize: int = 0
    stride: int = 1
    pad: int = 0
    pool: Pool | None = None
    bn: bool = True
    relu: bool = False

    @property
    def is_conv(self) -> bool:
        return self.type in ("fconv", "bconv", "conv")

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Output shape (C, H, W) for conv layers, (F,) for linear layers."""
        if not self.is_conv:
            return (self.out_channels,)
        _, height, width = in_shape
        out_h = (height + 2 * self.pad - self.ksize) // self.stride + 1
        out_w = (width + 2 * self.pad - self.ksize) // self.stride + 1
        if self.pool is not None:
            out_h, out_w = self.pool.out_size(out_h), self.pool.out_size(out_w)
        return (self.out_channels, out_h, out_w)


@dataclass(frozen=True)
class Tier:
    name: str
    kind: str
    layers: tuple[Layer, ...]
    exit_name: str
    exit_type: str

    @property
    def binary(self) -> bool:
        """Binarized (+-1 activations and weights, foldable into integer form) rather than float."""
        return self.exit_type == "bexit"


@dataclass(frozen=True)
class InputSpec:
    channels: int
    height: int
    width: int
    # One global factor applied to the raw uint8 pixels. A power of two keeps the float
    # forward exact (integer sums times 2^-k are representable), so the FConv threshold
    # folding in the bitwise reference is exact too.
    scale: float = 1.0 / 256.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class Crop:
    """Where one view sits in the scene image: its top-left pixel (the size is the views')."""

    top: int
    left: int


@dataclass(frozen=True)
class ViewSpec:
    """K devices seeing one scene: the crop each sees, whether their device parts share weights, and how their
    local exits and their splits are aggregated (``VIEW_AGGREGATIONS``). ``dropout`` is the share of views the
    training leaves out of each sample, so the model learns to answer with views missing."""

    crops: tuple[Crop, ...]
    height: int
    width: int
    weights: str = "shared"
    local_aggregation: str = "max"
    split_aggregation: str = "concat"
    dropout: float = 0.0

    @property
    def count(self) -> int:
        return len(self.crops)

    @property
    def shared(self) -> bool:
        return self.weights == "shared"

    def input_shape(self, channels: int) -> tuple[int, int, int]:
        """(C, H, W) one device reads."""
        return (channels, self.height, self.width)

    def aggregated_shape(self, split_shape: tuple[int, ...]) -> tuple[int, ...]:
        """What tier 1 reads, given one view's split: the same shape for max and average, K times the channels
        (or features) for a concatenation."""
        if self.split_aggregation != "concat":
            return split_shape
        return (self.count * split_shape[0], *split_shape[1:])

    def describe(self) -> str:
        crops = " ".join(f"({crop.top},{crop.left})" for crop in self.crops)
        return (f"{self.count} views {self.height}x{self.width} at {crops}; {self.weights} weights; local "
                f"aggregation {self.local_aggregation} ({VIEW_AGGREGATIONS[self.local_aggregation]}), split "
                f"aggregation {self.split_aggregation} ({VIEW_AGGREGATIONS[self.split_aggregation]})")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input: InputSpec
    classes: tuple[str, ...]
    tiers: tuple[Tier, ...]
    thresholds: tuple[float, ...] = (0.5,)  # one per early exit (every tier but the last)
    loss_weights: tuple[float, ...] = ()
    dataset: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    views: ViewSpec | None = None  # K devices seeing one scene; None: one device per request
    priority_classes: tuple[int, ...] = ()  # Big-Little: the little net's classes (empty: an ordinary DDNN)

    @property
    def big_little(self) -> bool:
        return bool(self.priority_classes)

    def exit_outputs(self, tier_index: int) -> int:
        """How many scores tier ``tier_index``'s exit gives: K + 1 for a Big-Little little net, else the classes."""
        return len(self.priority_classes) + 1 if self.big_little and tier_index == 0 else self.n_classes

    def exit_class_names(self, tier_index: int) -> tuple[str, ...]:
        """The names of tier ``tier_index``'s exit outputs (a little net's: its priority classes, then "other")."""
        if self.exit_outputs(tier_index) == self.n_classes:
            return self.classes
        return (*(self.classes[c] for c in self.priority_classes), OTHER_NAME)

    def exit_labels(self, tier_index: int, labels: np.ndarray) -> np.ndarray:
        """The labels tier ``tier_index``'s exit is trained and scored on: a little net's remapped to its K + 1
        outputs (priority class i -> i, every other class -> K), else ``labels`` unchanged."""
        if self.exit_outputs(tier_index) == self.n_classes:
            return labels
        table = np.full(self.n_classes, len(self.priority_classes), dtype=np.int32)
        table[list(self.priority_classes)] = np.arange(len(self.priority_classes), dtype=np.int32)
        return table[labels]

    def little_to_class(self, little_class: np.ndarray) -> np.ndarray:
        """A little net's output index -> the class it names (OTHER_CLASS for "other")."""
        table = np.array([*self.priority_classes, OTHER_CLASS], dtype=np.int32)
        return table[np.asarray(little_class)]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> Tier:
        return self.tiers[0]

    @property
    def server(self) -> Tier:
        """The last tier (the cloud): its exit is the final answer."""
        return self.tiers[-1]

    @property
    def threshold(self) -> float:
        """The device's (first) early exit threshold; 0.0 for a one-tier (cloud-only) model."""
        return self.thresholds[0] if self.thresholds else 0.0

    @property
    def n_exits(self) -> int:
        return len(self.tiers)

    def split_layer(self, tier_index: int) -> int:
        """Index of the first layer of tier ``tier_index`` in the whole network (= layers before it): the split
        layer a request resuming there names on the wire."""
        return sum(len(tier.layers) for tier in self.tiers[:tier_index])

    def tier_output_shape(self, tier_index: int) -> tuple[int, ...]:
        """Shape (C, H, W) or (F,) of what tier ``tier_index`` passes on (its exit reads it too)."""
        return self.tier_shapes(tier_index)[-1]

    def tier_input_shape(self, tier_index: int) -> tuple[int, ...]:
        """What tier ``tier_index`` reads: the image (one view of it with views), or the previous tier's output
        (tier 1 of a multi-view model: the views' splits aggregated)."""
        shape: tuple[int, ...] = self.input.shape if self.views is None else self.views.input_shape(
            self.input.channels)
        if self.big_little:
            return shape  # the big net reads the raw input too
        for index, tier in enumerate(self.tiers[:tier_index]):
            for layer in tier.layers:
                shape = layer.out_shape(shape)
            if index == 0 and self.views is not None:
                shape = self.views.aggregated_shape(shape)
        return shape

    def tier_shapes(self, tier_index: int) -> list[tuple[int, ...]]:
        """Input shape of the tier followed by each layer's output shape."""
        shape = self.tier_input_shape(tier_index)
        shapes = [shape]
        for layer in self.tiers[tier_index].layers:
            shape = layer.out_shape(shape)
            shapes.append(shape)
        return shapes

    @property
    def split_shape(self) -> tuple[int, ...]:
        """Shape of the device tier's output: the activations sent to the server (one view's, with views)."""
        return self.tier_shapes(0)[-1]

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    @property
    def calibration(self) -> dict[str, Any] | None:
        """What each exit's threshold costs, measured on a validation split when the thresholds were
        calibrated (model/evaluate.py calibration_curves); the threshold controller reads it."""
        value = self.raw.get("calibration")
        return copy.deepcopy(value) if isinstance(value, dict) else None

    def with_calibration(self, calibration: dict[str, Any]) -> ModelSpec:
        raw = self.to_dict()
        raw["calibration"] = calibration
        return parse_spec(raw)

    def with_threshold(self, threshold: float) -> ModelSpec:
        """The same model with the device exit's threshold changed (the others kept)."""
        return self.with_thresholds((float(threshold), *self.thresholds[1:]))

    def with_thresholds(self, thresholds: tuple[float, ...] | list[float]) -> ModelSpec:
        """The same model with one threshold per early exit."""
        if len(thresholds) != len(self.thresholds):
            raise SpecError(f"{self.name} has {len(self.thresholds)} early exits; got {len(thresholds)} thresholds")
        raw = self.to_dict()
        if raw.get("version") == 1:
            raw["threshold"] = float(thresholds[0])
        else:
            raw["thresholds"] = [float(t) for t in thresholds]
        return parse_spec(raw)

    def identity_json(self) -> str:
        """Canonical JSON of everything that defines the network (not the thresholds, which are operating
        points and may change without changing the model)."""
        raw = self.to_dict()
        raw.pop("threshold", None)
        raw.pop("thresholds", None)
        raw.pop("training", None)
        raw.pop("calibration", None)
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))

    def identity_hash(self) -> str:
        return hashlib.sha256(self.identity_json().encode()).hexdigest()


def _int(obj: dict[str, Any], key: str, where: str, default: int | None = None, minimum: int = 0) -> int:
    value = obj.get(key, default)
    if value is None:
        raise SpecError(f"{where}: missing required field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: field {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(f"{where}: field {key!r} must be >= {minimum}, got {value}")
    return value


def _parse_pool(obj: Any, where: str) -> Pool | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: 'pool' must be an object like {{\"ksize\": 2, \"stride\": 2, \"pad\": 0}}")
    _check_keys(obj, "pool", where + ".pool")
    ksize = _int(obj, "ksize", where + ".pool", minimum=1)
    stride = _int(obj, "stride", where + ".pool", default=ksize, minimum=1)
    pad = _int(obj, "pad", where + ".pool", default=0)
    if pad >= ksize:
        raise SpecError(f"{where}.pool: pad {pad} must be smaller than ksize {ksize}")
    return Pool(ksize, stride, pad)


def _parse_layer(obj: Any, where: str, allowed: tuple[str, ...]) -> Layer:
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: a layer must be an object")
    name = check_identifier(obj.get("name"), where)
    where = f"{where} ({name})"
    kind = obj.get("type")
    if kind not in allowed:
        raise SpecError(f"{where}: unsupported layer type {kind!r} here; allowed: {', '.join(allowed)}")
    _check_keys(obj, "conv" if kind in ("fconv", "bconv", "conv") else "linear", where)
    for flag in ("bn", "relu"):
        if flag in obj and not isinstance(obj[flag], bool):
            raise SpecError(f"{where}: {flag!r} must be true or false, got {obj[flag]!r}")
    out = _int(obj, "out_channels", where, minimum=1)
    if kind in ("fconv", "bconv", "conv"):
        ksize = _int(obj, "ksize", where, minimum=1)
        stride = _int(obj, "stride", where, default=1, minimum=1)
        pad = _int(obj, "pad", where, default=0)
        pool = _parse_pool(obj.get("pool"), where)
    else:
        ksize, stride, pad, pool = 0, 1, 0, None
    bn = bool(obj.get("bn", True))
    relu = bool(obj.get("relu", kind in FLOAT_LAYERS))
    if kind in BINARY_LAYERS and not bn:
        raise SpecError(f"{where}: binary layers always end in BN + sign ('bn' cannot be false)")
    return Layer(name, kind, out, ksize, stride, pad, pool, bn, relu)


def _check_shapes(spec: ModelSpec) -> None:
    for index, tier in enumerate(spec.tiers):
        # Earlier tiers were checked in earlier rounds, so their shapes are valid here.
        shape = spec.tier_input_shape(index)
        for layer in tier.layers:
            if layer.is_conv and len(shape) != 3:
                raise SpecError(f"layer {layer.name}: a convolution cannot follow a linear layer")
            new_shape = layer.out_shape(shape)
            if any(dim < 1 for dim in new_shape):
                raise SpecError(
                    f"layer {layer.name}: input {shape} gives empty output {new_shape} "
                    f"(ksize {layer.ksize}, stride {layer.stride}, pad {layer.pad}, pool {layer.pool})")
            if layer.is_conv and layer.pad >= layer.ksize:
                raise SpecError(f"layer {layer.name}: pad {layer.pad} must be smaller than ksize {layer.ksize}")
            shape = new_shape


def _parse_tier(tier_raw: Any, index: int, kind: str, binary: bool, names: set[str]) -> Tier:
    where = f"tier {index} ({kind})"
    _check_keys(tier_raw, "tier", where)
    layers_raw = tier_raw.get("layers")
    if not isinstance(layers_raw, list):
        raise SpecError(f"{where}: 'layers' must be a list")
    allowed = BINARY_LAYERS if binary else FLOAT_LAYERS
    layers = tuple(_parse_layer(obj, f"{where} layer {i}", allowed) for i, obj in enumerate(layers_raw))
    for layer in layers:
        if layer.name in names:
            raise SpecError(f"layer name {layer.name!r} is used twice")
        names.add(layer.name)
    exit_raw = tier_raw.get("exit", {})
    if not isinstance(exit_raw, dict):
        raise SpecError(f"{where}: 'exit' must be an object like {{\"name\": \"local\"}}")
    _check_keys(exit_raw, "exit", f"{where} exit")
    expected_exit = "bexit" if binary else "linear"
    exit_type = exit_raw.get("type", expected_exit)
    if exit_type != expected_exit:
        raise SpecError(f"{where}: a {'binary' if binary else 'float'} tier ends in a {expected_exit!r} exit, "
                        f"not {exit_type!r}")
    default_name = {"device": "local", "edge": f"edge{index}"}.get(kind, "final")
    tier_name = check_identifier(tier_raw.get("name", kind), where)
    exit_name = check_identifier(exit_raw.get("name", default_name), f"{where} exit")
    if exit_name in names:
        raise SpecError(f"exit name {exit_name!r} is also a layer or exit name")
    names.add(exit_name)
    return Tier(tier_name, kind, layers, exit_name, exit_type)


def _tier_is_binary(tier_raw: dict[str, Any]) -> bool:
    """A tier is binary when its layers (or, without layers, its exit) are: the first layer's type decides,
    and _parse_tier then insists that every layer agrees."""
    layers = tier_raw.get("layers")
    if isinstance(layers, list) and layers and isinstance(layers[0], dict):
        return layers[0].get("type") in BINARY_LAYERS
    exit_raw = tier_raw.get("exit")
    return isinstance(exit_raw, dict) and exit_raw.get("type") == "bexit"


def _parse_tiers(tiers_raw: Any, version: int) -> tuple[list[Tier], set[str]]:
    if version == 1:
        if not isinstance(tiers_raw, list) or len(tiers_raw) != 2:
            raise SpecError("a version 1 spec lists exactly two tiers (device, then server)")
    elif not isinstance(tiers_raw, list) or not 1 <= len(tiers_raw) <= MAX_TIERS:
        raise SpecError(f"spec 'tiers' must list 1..{MAX_TIERS} tiers (device, edge..., cloud)")
    tiers: list[Tier] = []
    names: set[str] = set()
    last = len(tiers_raw) - 1
    for index, tier_raw in enumerate(tiers_raw):
        if not isinstance(tier_raw, dict):
            raise SpecError(f"tier {index} must be an object")
        kind = tier_raw.get("kind")
        if version == 1:
            expected = ("device", "server")[index]
        else:
            expected = "cloud" if index == last else ("device" if index == 0 else "edge")
        if kind != expected:
            raise SpecError(f"tier {index} must have kind {expected!r} (device first, edge tiers between, the cloud "
                            f"last), got {kind!r}")
        binary = True if version == 1 and index == 0 else (False if version == 1 else _tier_is_binary(tier_raw))
        if binary and tiers and not tiers[-1].binary:
            raise SpecError(f"tier {index}: a binary tier cannot follow a float one (binary tiers come first)")
        if binary and index == last and last > 0:
            raise SpecError(f"tier {index}: the last tier gives the final answer with a float 'linear' exit")
        tiers.append(_parse_tier(tier_raw, index, kind, binary, names))
    for index, tier in enumerate(tiers):
        if not tier.layers and index < last:
            raise SpecError(f"tier {index} ({tier.name}) has no layers; only the last tier may be an exit alone")
        if not tier.binary:
            continue
        first_is_fconv = bool(tier.layers) and tier.layers[0].type == "fconv"
        if index == 0 and not first_is_fconv:
            raise SpecError("the device tier must start with an 'fconv' layer (it reads the raw 8-bit input)")
        if any(layer.type == "fconv" for layer in tier.layers[1:]) or (index > 0 and first_is_fconv):
            raise SpecError("only the first layer of the device tier may be 'fconv'")
    return tiers, names


def _parse_thresholds(raw: dict[str, Any], version: int, n_early: int) -> tuple[float, ...]:
    if version == 1:
        if "thresholds" in raw:
            raise SpecError("a version 1 spec has one 'threshold'; 'thresholds' needs version 2")
        return (check_threshold(raw.get("threshold", 0.5), "'threshold'"),)
    if "threshold" in raw:
        raise SpecError("a version 2 spec lists 'thresholds', one per early exit (every tier but the last)")
    values = raw.get("thresholds", [0.5] * n_early)
    if not isinstance(values, list) or len(values) != n_early:
        raise SpecError(f"'thresholds' must list one threshold per early exit ({n_early})")
    return tuple(check_threshold(value, f"thresholds[{i}]") for i, value in enumerate(values))


def _choice(obj: dict[str, Any], key: str, choices: tuple[str, ...], default: str, where: str) -> str:
    value = obj.get(key, default)
    if value not in choices:
        raise SpecError(f"{where}: {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def _parse_views(obj: Any, version: int, input_spec: InputSpec, tiers: list[Tier]) -> ViewSpec:
    where = "views"
    if version < 2:
        raise SpecError("'views' needs a version 2 spec")
    if not isinstance(obj, dict):
        raise SpecError("'views' must be an object like {\"height\": 20, \"width\": 20, \"crops\": [{\"top\": 0, "
                        "\"left\": 0}, ...]}")
    _check_keys(obj, "views", where)
    height = _int(obj, "height", where, minimum=1)
    width = _int(obj, "width", where, minimum=1)
    if height > input_spec.height or width > input_spec.width:
        raise SpecError(f"{where}: a {height}x{width} view does not fit the {input_spec.height}x{input_spec.width} "
                        "input image")
    crops_raw = obj.get("crops")
    if not isinstance(crops_raw, list) or not MIN_VIEWS <= len(crops_raw) <= MAX_VIEWS:
        raise SpecError(f"{where}: 'crops' must list {MIN_VIEWS}..{MAX_VIEWS} views (one per device), each "
                        "{\"top\": T, \"left\": L}")
    crops = []
    for index, crop_raw in enumerate(crops_raw):
        at = f"{where}.crops[{index}]"
        if not isinstance(crop_raw, dict):
            raise SpecError(f"{at}: a view must be an object like {{\"top\": 0, \"left\": 0}}")
        _check_keys(crop_raw, "crop", at)
        top, left = _int(crop_raw, "top", at), _int(crop_raw, "left", at)
        if top + height > input_spec.height or left + width > input_spec.width:
            raise SpecError(f"{at}: a {height}x{width} view at top {top}, left {left} reaches past the "
                            f"{input_spec.height}x{input_spec.width} input image")
        crops.append(Crop(top, left))
    dropout = obj.get("dropout", 0.0)
    if (isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not math.isfinite(dropout)
            or not 0.0 <= dropout < 1.0):
        raise SpecError(f"{where}: 'dropout' (the share of views training leaves out) must be in [0, 1), "
                        f"got {dropout!r}")
    aggregations = tuple(VIEW_AGGREGATIONS)
    views = ViewSpec(tuple(crops), height, width, _choice(obj, "weights", VIEW_WEIGHTS, "shared", where),
                     _choice(obj, "local_aggregation", aggregations, "max", where),
                     _choice(obj, "split_aggregation", aggregations, "concat", where), float(dropout))
    if len(tiers) < 2:
        raise SpecError(f"{where}: a multi-view model needs a tier after the devices' to aggregate their splits at")
    if tiers[1].binary and views.split_aggregation != "max":
        raise SpecError(f"{where}: tier 1 ({tiers[1].name}) is binary, so it can only aggregate the views' split bits "
                        f"by 'max' (their OR); {views.split_aggregation!r} needs a float tier 1")
    return views


def _parse_priority(value: Any, version: int, classes: list[str], tiers: list[Tier], has_views: bool
                    ) -> tuple[int, ...]:
    where = "priority_classes"
    if version < 2:
        raise SpecError(f"{where!r} (Big-Little) needs a version 2 spec")
    if (not isinstance(value, list) or not value
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in value)):
        raise SpecError(f"{where!r} must list K >= 1 class indices, like [8], got {value!r}")
    if any(not 0 <= c < len(classes) for c in value):
        raise SpecError(f"{where!r}: every class must be in 0..{len(classes) - 1}, got {value!r}")
    if len(set(value)) != len(value):
        raise SpecError(f"{where!r}: classes must be distinct, got {value!r}")
    if len(value) + 1 >= len(classes):
        raise SpecError(f"{where!r}: the little net's K + 1 outputs ({len(value)} priority classes + other) must be "
                        f"fewer than the {len(classes)} classes, or it is not little; got {value!r}")
    if len(tiers) != 2 or not tiers[0].binary or tiers[1].binary or has_views:
        raise SpecError(f"{where!r}: a Big-Little model has exactly a binary device tier (the little net) and a "
                        "float cloud tier (the big net), and no views")
    if not tiers[1].layers or not tiers[1].layers[0].is_conv:
        raise SpecError(f"{where!r}: the big net reads the raw image, so its first layer must be a 'conv'")
    return tuple(value)


def parse_spec(raw: Any) -> ModelSpec:
    """Validate a spec dict (as read from JSON) and build a ModelSpec."""
    if not isinstance(raw, dict):
        raise SpecError("a model spec must be a JSON object")
    if raw.get("format") != SPEC_FORMAT:
        raise SpecError(f"not a ddnn model spec: 'format' must be {SPEC_FORMAT!r}")
    version = raw.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise SpecError(f"spec version {version!r} is not supported by this ddnngen (supports "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    _check_keys(raw, "spec", "spec")
    name = check_identifier(raw.get("name"), "spec")
    inp = raw.get("input")
    if not isinstance(inp, dict):
        raise SpecError("spec needs an 'input' object with channels, height, width")
    _check_keys(inp, "input", "input")
    scale = check_input_scale(inp.get("scale", 1.0 / 256.0))
    input_spec = InputSpec(_int(inp, "channels", "input", minimum=1), _int(inp, "height", "input", minimum=1),
                           _int(inp, "width", "input", minimum=1), scale)
    classes = raw.get("classes")
    if (not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) and 0 < len(c) <= 64 for c in classes)):
        raise SpecError(f"spec 'classes' must be a list of 2..{MAX_CLASSES} class names of 1..64 characters")
    dataset = raw.get("dataset", "")
    if not isinstance(dataset, str) or (dataset and dataset not in DATASETS):
        raise SpecError(f"spec 'dataset' must be one of {', '.join(DATASETS)} (or absent), got {dataset!r}")
    tiers, names = _parse_tiers(raw.get("tiers"), version)
    upper = [n.upper() for n in names]
    if len(set(upper)) != len(upper):
        raise SpecError(f"layer and exit names {', '.join(sorted(names))} clash once upper-cased (generated C "
                        "macros are upper case); rename them")
    thresholds = _parse_thresholds(raw, version, len(tiers) - 1)
    weights = raw.get("loss_weights", [1.0] * len(tiers))
    if (not isinstance(weights, list) or len(weights) != len(tiers)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)):
        raise SpecError(f"'loss_weights' must list one non-negative weight per tier ({len(tiers)})")
    views = None if "views" not in raw else _parse_views(raw["views"], version, input_spec, tiers)
    priority = (() if "priority_classes" not in raw
                else _parse_priority(raw["priority_classes"], version, classes, tiers, views is not None))
    spec = ModelSpec(name, input_spec, tuple(classes), tuple(tiers), thresholds,
                     tuple(float(w) for w in weights), dataset, copy.deepcopy(raw), views, priority)
    _check_shapes(spec)
    return spec


def load_spec_file(path: str) -> ModelSpec:
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: invalid JSON ({exc})") from exc
    try:
        return parse_spec(raw)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from exc
