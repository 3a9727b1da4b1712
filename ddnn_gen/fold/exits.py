"""Every exit's answers on a data set, computed as the deployed system computes them: binary tiers (the
device, binary edges) with the bitwise reference of their folded programs, float tiers with Chainer's
test-mode forward resumed from the previous tier's output (multi-view models: fold/views.py, the views'
aggregator, then the same tiers; Big-Little models: the big net on the raw input). ddnn_gen.model.evaluate
turns them into accuracies and exit rates."""

from __future__ import annotations

from typing import Any

import chainer
import numpy as np

from ddnn_gen.errors import DdnnError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model.datasets import Dataset
from ddnn_gen.model.evaluate import EdgeExit, ExitOutputs
from ddnn_gen.model.links import input_to_float
from ddnn_gen.model.modelfile import LoadedModel

BATCH = 500


def server_classes(loaded: LoadedModel, program: DeviceProgram, split_words: np.ndarray,
                   batch_size: int = BATCH) -> np.ndarray:
    """Final-exit class of each sample, resumed after ``program``'s tier from its split bits, in test mode."""
    return resume_classes(loaded, program.tier + 1, lambda start, stop: reference.split_to_server_input(
        program, split_words[start:stop]), len(split_words), batch_size)


def resume_classes(loaded: LoadedModel, tier: int, inputs: Any, count: int, batch_size: int = BATCH) -> np.ndarray:
    """Final-exit class of ``count`` samples resumed at ``tier``; ``inputs(start, stop)`` gives a batch of that
    tier's input."""
    classes = []
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for start in range(0, count, batch_size):
            logits = loaded.model.resume_forward(inputs(start, min(count, start + batch_size)), tier).array
            classes.append(np.asarray(logits).argmax(axis=1))
    return np.concatenate(classes).astype(np.int32) if classes else np.zeros(0, dtype=np.int32)


def float_tier(loaded: LoadedModel, tier: int, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float tier with an early exit, in test mode: its exit logits (float64) and its output, batch by batch."""
    logits, outputs = [], []
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for start in range(0, len(inputs), BATCH):
            result = loaded.model.run_tiers(inputs[start:start + BATCH], tier, tier + 1)
            logits.append(np.asarray(result.exit_logits[0].array, dtype=np.float64))
            outputs.append(np.asarray(result.tier_outputs[0].array))
    return np.concatenate(logits), np.concatenate(outputs)


def binary_tier(loaded: LoadedModel, tier: int, split: np.ndarray) -> tuple[DeviceProgram, reference.DeviceResult]:
    """A binary edge tier folded and run with the bitwise reference on the previous tier's packed split."""
    program = fold(loaded, tier=tier)
    return program, reference.run_device(program, split)


def float_output_bytes(loaded: LoadedModel, tier: int) -> int:
    """Bytes a float tier's output takes per forwarded sample (float32)."""
    return 4 * int(np.prod(loaded.spec.tier_output_shape(tier)))


def upper_exits(loaded: LoadedModel, start: int, last_binary: DeviceProgram, split: np.ndarray | None,
                float_input: np.ndarray | None) -> tuple[list[EdgeExit], np.ndarray]:
    """Tiers ``start`` .. last on their input (the packed ``split`` of binary program ``last_binary``, or a float
    ``float_input``): the early exits of those before the last, and the final exit's classes."""
    spec = loaded.spec
    edges: list[EdgeExit] = []
    for tier in range(start, len(spec.tiers) - 1):
        name = spec.tiers[tier].exit_name
        if spec.tiers[tier].binary:
            assert split is not None
            edge_program, result = binary_tier(loaded, tier, split)
            edges.append(EdgeExit(name, result.local_class, result.entropy, edge_program.split_bytes))
            last_binary, split = edge_program, result.split_words
            continue
        inputs = float_input if float_input is not None else reference.split_to_server_input(last_binary, split)
        logits, float_input = float_tier(loaded, tier, inputs)
        edges.append(EdgeExit(name, logits.argmax(axis=1).astype(np.int32), reference.normalized_entropy(logits),
                              float_output_bytes(loaded, tier)))
    last = len(spec.tiers) - 1
    if float_input is None:
        assert split is not None
        return edges, server_classes(loaded, last_binary, split)
    kept = float_input
    return edges, resume_classes(loaded, last, lambda begin, stop: kept[begin:stop], len(kept))


def big_little_outputs(loaded: LoadedModel, program: DeviceProgram, device: reference.DeviceResult,
                       dataset: Dataset) -> ExitOutputs:
    """A Big-Little model: the little net's answers (bitwise reference, as the device computes them; it may answer
    only when it names a priority class) and the big net's on the raw images (Chainer test mode, as ddnn-server
    runs a raw packing-3 request). An offloaded sample sends its raw input, not the little net's split."""
    spec = loaded.spec
    images, scale = dataset.images, spec.input.scale
    final = resume_classes(loaded, 1, lambda start, stop: input_to_float(images[start:stop], scale), len(images))
    little_index = device.logits.argmax(axis=1)
    return ExitOutputs(labels=dataset.labels, local_class=device.local_class, entropy=device.entropy,
                       final_class=final, split_bytes=int(np.prod(spec.input.shape)),
                       device_bytes=program.weight_bytes, exit_names=tuple(tier.exit_name for tier in spec.tiers),
                       local_allowed=little_index < len(spec.priority_classes), little_class=device.local_class)


def compute_outputs(loaded: LoadedModel, dataset: Dataset) -> ExitOutputs:
    spec = loaded.spec
    if len(spec.tiers) < 2:
        raise DdnnError(f"{spec.name} is a cloud-only model: it has no early exit to evaluate thresholds of")
    if spec.views is not None:
        # fold/views.py builds the views' aggregation on this module's tier runners: imported here, not above.
        from ddnn_gen.fold.views import ViewAggregator

        aggregator = ViewAggregator(loaded)
        return aggregator.outputs(aggregator.run_devices(dataset.images), dataset.labels)
    program = fold(loaded)
    device = reference.run_device(program, dataset.images)
    if spec.big_little:
        return big_little_outputs(loaded, program, device, dataset)
    edges, final = upper_exits(loaded, 1, program, device.split_words, None)
    return ExitOutputs(labels=dataset.labels, local_class=device.local_class, entropy=device.entropy,
                       final_class=final, split_bytes=program.split_bytes, device_bytes=program.weight_bytes,
                       edges=tuple(edges), exit_names=tuple(tier.exit_name for tier in spec.tiers))
