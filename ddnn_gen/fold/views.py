"""A multi-view model as deployed: each view's device part folded (an ordinary binary device tier reading that
view's crop), the local aggregator that combines the present views' local exits into one answer, and tier 1
run on their aggregated splits. The evaluation (``ViewAggregator.outputs``, ``fold/exits.py``) calls the same
methods the aggregator of a running system calls, so an event's answer is the one ``ddnngen eval`` counts.

What a view's device sends: its local exit's integer sums S (one int32 per class, from which :meth:`scores`
rebuilds the logits ``a * S + b`` exactly as the device computes them) and, when the aggregated local exit is
not confident, its split bits. Missing views are left out as the model was trained (model/views.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ddnn_gen.errors import DdnnError
from ddnn_gen.fold import exits, reference
from ddnn_gen.fold.program import DeviceProgram, fold, words_for
from ddnn_gen.model.evaluate import EdgeExit, ExitOutputs
from ddnn_gen.model.fast_forward import FastForward
from ddnn_gen.model.modelfile import LoadedModel
from ddnn_gen.model.spec import ViewSpec, exit_decision
from ddnn_gen.model.views import aggregate_features, aggregate_scores, check_mask, extract_views, present_mask

# What a device sends for its local exit per event: one int32 sum per class (see the module docstring).
SCORE_BYTES_PER_CLASS = 4


@dataclass(frozen=True)
class ViewRuns:
    """Every view's device part on a batch of scenes, with the bitwise reference of its folded program."""

    logits: np.ndarray  # float64 (K, N, classes): each view's local-exit scores
    splits: np.ndarray  # uint64 (K, N, H, W, words): each view's split bits


@dataclass(frozen=True)
class Answer:
    """One exit's answer for a batch of events."""

    logits: np.ndarray  # float64 (N, classes)
    classes: np.ndarray  # int32 (N,), argmax (ties to the lowest class)
    entropy: np.ndarray  # float64 (N,), normalized; NaN if a logit is not finite
    exits: np.ndarray  # bool (N,): confident at the exit's threshold (always True at the final exit)


@dataclass(frozen=True)
class TierAnswer(Answer):
    """Tier 1's answer on the aggregated splits, and what it passes on when it is an edge that did not answer:
    packed split words (a binary edge) or float32 activations (a float edge); None after the final exit."""

    tier: int = 1
    output: np.ndarray | None = None


def _answer(logits: np.ndarray, threshold: float | None) -> Answer:
    logits = np.asarray(logits, dtype=np.float64)
    entropy = reference.normalized_entropy(logits)
    confident = np.ones(len(logits), dtype=bool) if threshold is None else exit_decision(entropy, threshold)
    return Answer(logits, logits.argmax(axis=1).astype(np.int32), entropy, confident)


class ViewAggregator:
    """The local aggregator and tier 1 of one multi-view model (``loaded.spec.views``)."""

    def __init__(self, loaded: LoadedModel) -> None:
        if loaded.spec.views is None:
            raise DdnnError(f"{loaded.spec.name} is not a multi-view model (its spec has no 'views')")
        self.loaded = loaded
        self.views: ViewSpec = loaded.spec.views
        self.programs: tuple[DeviceProgram, ...] = tuple(fold(loaded, view=view) for view in range(self.views.count))
        link = loaded.model.local_aggregator
        self._concat = None if link is None else (np.asarray(link.W.array, dtype=np.float64),
                                                   np.asarray(link.b.array, dtype=np.float64))
        self._edge = fold(loaded, tier=1) if loaded.spec.tiers[1].binary else None
        # A server sets the NumPy forward of a float tier 1 (bit-identical); the evaluation keeps Chainer's.
        self.fast: FastForward | None = None

    @property
    def count(self) -> int:
        return self.views.count

    @property
    def onward(self) -> bool:
        """Whether tier 1 is an edge whose unsure events go on to the tiers above (a model of three tiers or more)."""
        return len(self.loaded.spec.tiers) > 2

    @property
    def split_shape(self) -> tuple[int, int, int]:
        """One view's packed split (H, W, words)."""
        height, width, channels = self.programs[0].split_hwc
        return height, width, words_for(channels)

    def run_devices(self, images_u8: np.ndarray) -> ViewRuns:
        """Every device on its view of each scene (N, C, H, W), as the simulated cameras run them."""
        results = [reference.run_device(program, crop)
                   for program, crop in zip(self.programs, extract_views(self.views, images_u8))]
        return ViewRuns(np.stack([result.logits for result in results]),
                        np.stack([result.split_words for result in results]))

    def scores(self, view: int, exit_sums: np.ndarray) -> np.ndarray:
        """View ``view``'s local-exit logits (N, classes) in float64 from the int32 sums its device sends."""
        self._check_view(view)
        sums = np.asarray(exit_sums)
        if sums.ndim != 2 or sums.shape[1] != self.loaded.spec.n_classes:
            raise DdnnError(f"view {view}: exit sums must be (N, {self.loaded.spec.n_classes}), got {sums.shape}")
        return reference.exit_logits(self.programs[view].exit, sums)

    # The aggregator's calls, for one event or a batch of events with the same views present.

    def local_exit(self, view_logits: Mapping[int, np.ndarray], threshold: float | None = None) -> Answer:
        """The aggregated local exit from the present views' local-exit logits ({view: (classes,) for one event
        or (N, classes)}): its logits, classes, entropies and whether it answers at ``threshold`` (default: the
        model's local-exit threshold)."""
        stacked, mask = self._stack(view_logits, (self.loaded.spec.n_classes,), np.float64, "local-exit logits")
        return self.local_exit_batch(stacked, mask, threshold)

    def next_tier(self, view_splits: Mapping[int, np.ndarray]) -> TierAnswer:
        """Tier 1 on the present views' split bits ({view: (H, W, words) or flat words for one event, or with a
        leading N}): its exit's answer (the final answer for a two-tier model) and its output."""
        stacked, mask = self._stack(view_splits, self.split_shape, np.uint64, "split words")
        return self.next_tier_batch(stacked, mask)

    # Batch forms: per-view arrays (K, N, ...) and a presence mask (N, K); an absent view's slot is ignored.

    def local_exit_batch(self, view_logits: np.ndarray, mask: np.ndarray, threshold: float | None = None) -> Answer:
        mask = check_mask(self.views, mask, view_logits.shape[1])
        logits = aggregate_scores(self.views, view_logits, mask, self._concat)
        return _answer(logits, self.loaded.spec.thresholds[0] if threshold is None else threshold)

    def features_batch(self, view_splits: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Tier 1's input: float32 (N, ...) for a float tier 1; for a binary one (max only), the OR of the present
        views' packed words (a bit is +1 if it is +1 in any view)."""
        mask = check_mask(self.views, mask, view_splits.shape[1])
        if self._edge is not None:
            kept = np.where(mask.T.reshape(mask.shape[1], -1, 1, 1, 1), view_splits, np.uint64(0))
            return np.bitwise_or.reduce(kept, axis=0)
        values = np.stack([reference.split_to_server_input(program, split)
                           for program, split in zip(self.programs, view_splits)])
        return aggregate_features(self.views, values, mask)

    def next_tier_batch(self, view_splits: np.ndarray, mask: np.ndarray) -> TierAnswer:
        spec = self.loaded.spec
        features = self.features_batch(view_splits, mask)
        last = len(spec.tiers) == 2
        if self._edge is not None:
            result = reference.run_device(self._edge, features)
            return TierAnswer(result.logits, result.local_class, result.entropy, result.local_exit, 1,
                              result.split_words)
        if self.fast is not None:
            fast_logits, output = self.fast.run_tier(features, 1)
            logits = np.asarray(fast_logits, dtype=np.float64)
        else:
            logits, output = exits.float_tier(self.loaded, 1, features)
        answer = _answer(logits, None if last else spec.thresholds[1])
        return TierAnswer(answer.logits, answer.classes, answer.entropy, answer.exits, 1, None if last else output)

    # The evaluation: the same calls over a data set, one set of present views at a time.

    def outputs(self, runs: ViewRuns, labels: np.ndarray, present: tuple[int, ...] | None = None) -> ExitOutputs:
        """Every exit's answers with the views ``present`` (default all) on every sample, for
        model/evaluate.py: the aggregated local exit first, tier 1 on the aggregated splits, then the rest."""
        spec = self.loaded.spec
        mask = present_mask(self.views, len(labels), present)
        shown = tuple(int(view) for view in np.flatnonzero(mask[0])) if len(labels) else ()
        local = self.local_exit_batch(runs.logits, mask)
        tier1 = self.next_tier_batch(runs.splits, mask)
        edges: list[EdgeExit] = []
        if len(spec.tiers) == 2:
            final = tier1.classes
        else:
            assert tier1.output is not None
            binary = self._edge is not None
            hop = self._edge.split_bytes if self._edge is not None else exits.float_output_bytes(self.loaded, 1)
            edges.append(EdgeExit(spec.tiers[1].exit_name, tier1.classes, tier1.entropy, hop))
            more, final = exits.upper_exits(self.loaded, 2, self._edge or self.programs[0],
                                            tier1.output if binary else None, None if binary else tier1.output)
            edges.extend(more)
        program = self.programs[0]
        return ExitOutputs(labels=labels, local_class=local.classes, entropy=local.entropy, final_class=final,
                           split_bytes=len(shown) * program.split_bytes, device_bytes=program.weight_bytes,
                           edges=tuple(edges), exit_names=tuple(tier.exit_name for tier in spec.tiers),
                           views_present=shown, score_bytes=len(shown) * spec.n_classes * SCORE_BYTES_PER_CLASS)

    def _check_view(self, view: int) -> None:
        if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or not 0 <= view < self.count:
            raise DdnnError(f"view {view!r} is not one of {self.loaded.spec.name}'s views 0..{self.count - 1}")

    def _stack(self, per_view: Mapping[int, np.ndarray], shape: tuple[int, ...], dtype: type,
               what: str) -> tuple[np.ndarray, np.ndarray]:
        """{view: array} -> (K, N, *shape) with zeros for absent views, and the (N, K) presence mask."""
        if not per_view:
            raise DdnnError("no view is present: at least one device must answer for an event")
        size = int(np.prod(shape))
        arrays: dict[int, np.ndarray] = {}
        for view, value in per_view.items():
            self._check_view(view)
            array = np.asarray(value)
            if array.size == size and array.ndim in (1, len(shape)):
                array = array.reshape((1, *shape))
            elif array.ndim >= 2 and array[0].size == size:
                array = array.reshape((len(array), *shape))
            else:
                raise DdnnError(f"view {view}: {what} of shape {array.shape} do not fit {shape} per event")
            arrays[int(view)] = array.astype(dtype, copy=False)
        counts = {len(array) for array in arrays.values()}
        if len(counts) != 1:
            raise DdnnError(f"the views' {what} hold different numbers of events: {sorted(counts)}")
        count = counts.pop()
        stacked = np.zeros((self.count, count, *shape), dtype=dtype)
        mask = np.zeros((count, self.count), dtype=bool)
        for view, array in arrays.items():
            stacked[view] = array
            mask[:, view] = True
        return stacked, mask
