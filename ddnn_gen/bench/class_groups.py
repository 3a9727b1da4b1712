"""Devices that see different data, made of real outputs: a group of devices that sees only the test images
of some classes offloads, and is right, as those images' own exits are. The plant of the per-device
threshold controller's test (tests/test_allocation.py) and bench (bench/bench_allocation.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddnn_gen.model.evaluate import ExitOutputs

# Fashion-MNIST classes the shipped models' local exit finds easy: trouser, sandal, sneaker, bag, ankle boot.
FMNIST_EASY_CLASSES = (1, 5, 7, 8, 9)


@dataclass(frozen=True)
class DeviceGroup:
    """The samples one group of devices sees: their local-exit entropies, both exits' classes, labels."""

    entropy: np.ndarray
    local_class: np.ndarray
    final_class: np.ndarray
    labels: np.ndarray

    def onward_at(self, threshold: float) -> float:
        """Share of the group's samples sent on at ``threshold``."""
        return float(np.mean(self.entropy > threshold))

    def accuracy_at(self, threshold: float) -> float:
        """Share the group classifies right at ``threshold`` (local exit if sure, else the final exit)."""
        answer = np.where(self.entropy <= threshold, self.local_class, self.final_class)
        return float(np.mean(answer == self.labels))


def class_groups(outputs: ExitOutputs, easy_classes: tuple[int, ...] = FMNIST_EASY_CLASSES) -> dict[str, DeviceGroup]:
    """{"easy": the samples of ``easy_classes``, "hard": the rest}."""
    easy = np.isin(outputs.labels, easy_classes)
    return {name: DeviceGroup(outputs.entropy[mask], outputs.local_class[mask], outputs.final_class[mask],
                              outputs.labels[mask])
            for name, mask in (("easy", easy), ("hard", ~easy))}
