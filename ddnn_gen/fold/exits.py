"""Both exits' answers on a data set, computed as the deployed system computes them: the device part with
the bitwise reference of its folded program, the server part with Chainer's test-mode forward resumed
from the reference's split bits. ddnn_gen.model.evaluate turns them into accuracies and exit rates."""

from __future__ import annotations

import chainer
import numpy as np

from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model.datasets import Dataset
from ddnn_gen.model.evaluate import ExitOutputs
from ddnn_gen.model.modelfile import LoadedModel


def server_classes(loaded: LoadedModel, program: DeviceProgram, split_words: np.ndarray,
                   batch_size: int = 500) -> np.ndarray:
    """Final-exit class of each sample, resumed from the device's split bits in test mode."""
    classes = []
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        for start in range(0, len(split_words), batch_size):
            server_input = reference.split_to_server_input(program, split_words[start:start + batch_size])
            logits = loaded.model.server_forward(server_input).array
            classes.append(np.asarray(logits).argmax(axis=1))
    return np.concatenate(classes).astype(np.int32) if classes else np.zeros(0, dtype=np.int32)


def compute_outputs(loaded: LoadedModel, dataset: Dataset) -> ExitOutputs:
    program = fold(loaded)
    device = reference.run_device(program, dataset.images)
    final = server_classes(loaded, program, device.split_words)
    return ExitOutputs(labels=dataset.labels, local_class=device.local_class, entropy=device.entropy,
                       final_class=final, split_bytes=program.split_words * 8,
                       device_bytes=program.weight_bytes)
