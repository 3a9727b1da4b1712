"""Several devices, one scene: the views each device sees, which of them are present, and how their local exits
and splits are aggregated (the DDNN paper's MP / AP / CC), in Chainer for training and in NumPy for the
deployed aggregator.

The views are crops of one real single-view image (Fashion-MNIST, CIFAR-10): no multi-camera data set is
installable here. :func:`extract_views` is the one definition, used by training, evaluation and the simulated
devices alike.

An absent view (its device is down or late) never takes part: max and average run over the present views
only, a concatenation holds zeros in its place (a zero is neither +1 nor -1: no evidence either way). Training
leaves views out at random (``ViewSpec.dropout``) so the model has seen every such hole.

The deployed aggregator runs in NumPy: the local exit's scores in float64 (as the devices' folded exits give
them), the features for tier 1 in float32 (what Chainer's tier 1 reads). Each is computed elementwise, or
summed in a fixed order, so an event's answer does not depend on the batch it is computed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chainer
import chainer.functions as F
import numpy as np

from ddnn_gen.errors import DdnnError
from ddnn_gen.model.spec import ViewSpec


def extract_views(views: ViewSpec, images: Any) -> list[Any]:
    """(N, C, H, W) scene images -> K arrays (N, C, h, w), view k first... last: what device k sees. Works on
    uint8 pixels, float inputs and Chainer variables alike (a crop is a slice)."""
    return [images[:, :, crop.top:crop.top + views.height, crop.left:crop.left + views.width]
            for crop in views.crops]


def present_mask(views: ViewSpec, count: int, present: Sequence[int] | None = None) -> np.ndarray:
    """bool (count, K): the views in ``present`` (every view if None) are there for every sample."""
    mask = np.zeros((count, views.count), dtype=bool)
    mask[:, list(check_present(views, present))] = True
    return mask


def check_present(views: ViewSpec, present: Sequence[int] | None) -> tuple[int, ...]:
    """The present views as sorted distinct indices; DdnnError for none, duplicates or indices out of range."""
    if present is None:
        return tuple(range(views.count))
    chosen = tuple(sorted(int(view) for view in present))
    if not chosen:
        raise DdnnError("no view is present: at least one device must answer for an event")
    if len(set(chosen)) != len(chosen):
        raise DdnnError(f"views {list(present)} name a view twice")
    if chosen[0] < 0 or chosen[-1] >= views.count:
        raise DdnnError(f"view index out of range in {list(present)}: this model has views 0..{views.count - 1}")
    return chosen


def check_mask(views: ViewSpec, mask: np.ndarray, count: int) -> np.ndarray:
    """A presence mask (count, K) of booleans with at least one view per sample."""
    mask = np.asarray(mask)
    if mask.shape != (count, views.count) or mask.dtype != bool:
        raise DdnnError(f"presence mask must be bool ({count}, {views.count}), got {mask.dtype} {mask.shape}")
    if count and not mask.any(axis=1).all():
        raise DdnnError(f"sample {int(np.argmin(mask.any(axis=1)))} has no view present")
    return mask


def dropout_mask(views: ViewSpec, count: int, rng: np.random.RandomState) -> np.ndarray:
    """Training's random holes: each view absent with probability ``dropout``; a sample left with none keeps
    one view drawn at random."""
    mask = rng.random_sample((count, views.count)) >= views.dropout
    empty = ~mask.any(axis=1)
    mask[np.flatnonzero(empty), rng.randint(0, views.count, int(empty.sum()))] = True
    return mask


def _column(mask: np.ndarray, view: int, ndim: int, dtype: Any) -> np.ndarray:
    """Column ``view`` of the mask shaped to broadcast against an (N, ...) array of ``ndim`` axes."""
    return mask[:, view].reshape((-1,) + (1,) * (ndim - 1)).astype(dtype)


# Training: Chainer versions. Absent views still run through their device part (the batch stays rectangular)
# but contribute nothing forward and receive no gradient.

def aggregate_chainer(values: Sequence[Any], mask: np.ndarray, mode: str, low: float) -> Any:
    """MP / AP / CC of K Chainer variables (N, ...) over the present views; ``low`` stands in for an absent
    view under max (it never wins: -1 for +-1 features, the float32 minimum for scores)."""
    dtype = values[0].dtype
    if mode == "max":
        filled = [F.where(np.broadcast_to(_column(mask, k, v.ndim, bool), v.shape), v,
                          np.full(v.shape, low, dtype=dtype)) for k, v in enumerate(values)]
        return F.max(F.stack(filled), axis=0)
    masked = [v * _column(mask, k, v.ndim, dtype) for k, v in enumerate(values)]
    if mode == "concat":
        return F.concat(masked, axis=1)
    counts = mask.sum(axis=1).astype(dtype).reshape((-1,) + (1,) * (values[0].ndim - 1))
    return F.sum(F.stack(masked), axis=0) / np.broadcast_to(counts, values[0].shape)


# Deployment: NumPy versions, the aggregator's and the evaluation's.

def aggregate_numpy(values: np.ndarray, mask: np.ndarray, mode: str, low: float) -> np.ndarray:
    """MP / AP / CC of stacked per-view arrays (K, N, ...) over the present views, in the arrays' dtype;
    whatever an absent view's slot holds (zeros, NaN) is ignored."""
    dtype = values.dtype
    absent = dtype.type(low) if mode == "max" else dtype.type(0)
    kept = [np.where(_column(mask, k, v.ndim, bool), v, absent) for k, v in enumerate(values)]
    if mode == "concat":
        return np.concatenate(kept, axis=1)
    if mode == "max":
        return np.max(np.stack(kept), axis=0)
    total = kept[0]
    for value in kept[1:]:  # in view order, so every event sums the same way
        total = total + value
    counts = mask.sum(axis=1).astype(dtype).reshape((-1,) + (1,) * (values.ndim - 2))
    return total / counts


def linear_numpy(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x @ weight.T + bias`` in float64, summed over the inputs in index order: unlike a BLAS product, the same
    bits for an event whatever the batch around it."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    out = np.broadcast_to(np.asarray(bias, dtype=np.float64), (len(x), len(weight))).copy()
    for j in range(weight.shape[1]):
        out += x[:, j:j + 1] * weight[None, :, j]
    return out


SCORE_LOW = float(np.finfo(np.float32).min)  # an absent view's local scores under max: never the largest
FEATURE_LOW = -1.0  # an absent view's +-1 features under max: never +1


def aggregate_scores_chainer(views: ViewSpec, logits: Sequence[Any], mask: np.ndarray,
                             aggregator: chainer.Link | None) -> Any:
    """The aggregated local exit's logits in training: MP / AP of the views' exit logits, or CC then the local
    aggregator's linear layer."""
    combined = aggregate_chainer(logits, mask, views.local_aggregation, SCORE_LOW)
    return combined if aggregator is None else aggregator(combined)


def aggregate_scores(views: ViewSpec, logits: np.ndarray, mask: np.ndarray,
                     aggregator: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The aggregated local exit's logits (N, classes) in float64 from the views' (K, N, classes) exit logits;
    ``aggregator`` is CC's (weight, bias)."""
    combined = aggregate_numpy(np.asarray(logits, dtype=np.float64), mask, views.local_aggregation, SCORE_LOW)
    if views.local_aggregation != "concat":
        return combined
    if aggregator is None:
        raise DdnnError("a concatenating local aggregator needs its linear layer's weight and bias")
    return linear_numpy(combined, *aggregator)


def aggregate_features(views: ViewSpec, splits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Tier 1's float32 input from the views' +-1 splits (K, N, C, H, W) or (K, N, F)."""
    return aggregate_numpy(np.asarray(splits, dtype=np.float32), mask, views.split_aggregation, FEATURE_LOW)
