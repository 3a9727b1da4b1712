"""Accuracy of the exit hierarchy at a threshold, as the adaptive-DDNN paper reports it.

The answers of both exits come from ddnn_gen.fold.exits (the local exit with the bitwise reference,
what the device really computes; the server exit with Chainer's test-mode forward resumed from the
reference's split bits, what ddnn-server really computes). Definitions, per threshold t over N samples:

* Local   = samples that exit locally *and* are correct there / N
* Server  = accuracy on the samples that reach the server (NaN when none do)
* Overall = accuracy of the hierarchy at t (local answer if it exits, else the server's)
* Ideal   = samples correct at either exit / N (an oracle choosing the exit; independent of t)
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ddnn_gen.model.spec import exit_decision


@dataclass
class ExitOutputs:
    """Both exits' answers for every sample; thresholds are applied afterwards (cheap)."""

    labels: np.ndarray
    local_class: np.ndarray
    entropy: np.ndarray
    final_class: np.ndarray
    split_bytes: int  # bit-packed split activations per offloaded sample
    device_bytes: int  # folded device part: packed weights, thresholds, exit constants


@dataclass
class ThresholdMetrics:
    threshold: float
    local_accuracy: float
    server_accuracy: float
    overall_accuracy: float
    ideal_accuracy: float
    local_exit_rate: float
    server_exit_rate: float
    offload_bytes_per_sample: float
    local_classifier_accuracy: float  # the local exit alone on every sample
    server_classifier_accuracy: float  # the server exit alone on every sample
    samples: int

    def as_dict(self) -> dict[str, float]:
        return {key: (None if isinstance(value, float) and math.isnan(value) else value)
                for key, value in asdict(self).items()}


def metrics_at(outputs: ExitOutputs, threshold: float) -> ThresholdMetrics:
    n = len(outputs.labels)
    exits = exit_decision(outputs.entropy, threshold)
    local_correct = outputs.local_class == outputs.labels
    server_correct = outputs.final_class == outputs.labels
    to_server = ~exits
    answered_correct = np.where(exits, local_correct, server_correct)
    n_server = int(to_server.sum())
    return ThresholdMetrics(
        threshold=float(threshold),
        local_accuracy=float((exits & local_correct).sum() / n),
        server_accuracy=float(server_correct[to_server].mean()) if n_server else math.nan,
        overall_accuracy=float(answered_correct.mean()),
        ideal_accuracy=float((local_correct | server_correct).mean()),
        local_exit_rate=float(exits.mean()),
        server_exit_rate=float(to_server.mean()),
        offload_bytes_per_sample=float(to_server.mean() * outputs.split_bytes),
        local_classifier_accuracy=float(local_correct.mean()),
        server_classifier_accuracy=float(server_correct.mean()),
        samples=n,
    )


def format_table(rows: list[ThresholdMetrics]) -> str:
    header = f"{'threshold':>9} {'local':>7} {'server':>7} {'overall':>7} {'ideal':>7} " \
             f"{'exit@dev':>8} {'exit@srv':>8} {'offload B':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        server = "   n/a" if math.isnan(row.server_accuracy) else f"{100 * row.server_accuracy:6.2f}%"
        lines.append(f"{row.threshold:9.3f} {100 * row.local_accuracy:6.2f}% {server} "
                     f"{100 * row.overall_accuracy:6.2f}% {100 * row.ideal_accuracy:6.2f}% "
                     f"{100 * row.local_exit_rate:7.2f}% {100 * row.server_exit_rate:7.2f}% "
                     f"{row.offload_bytes_per_sample:9.1f}")
    return "\n".join(lines)


def sweep(outputs: ExitOutputs, steps: int = 51) -> list[ThresholdMetrics]:
    return [metrics_at(outputs, float(t)) for t in np.linspace(0.0, 1.0, steps)]


def write_sweep(rows: list[ThresholdMetrics], csv_path: Path, png_path: Path, title: str) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].as_dict()))
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = [row.threshold for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    axis.plot(thresholds, [100 * r.overall_accuracy for r in rows], label="Overall accuracy", linewidth=2)
    axis.plot(thresholds, [100 * r.ideal_accuracy for r in rows], "--", label="Ideal accuracy")
    axis.plot(thresholds, [100 * r.local_classifier_accuracy for r in rows], ":", label="Local exit alone")
    axis.plot(thresholds, [100 * r.local_exit_rate for r in rows], label="Local exit rate", linewidth=2)
    axis.set_xlabel("Local-exit threshold on normalized entropy")
    axis.set_ylabel("Percent of test samples (%)")
    axis.set_title(title)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 101)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)


@dataclass
class Calibration:
    threshold: float
    metrics: ThresholdMetrics
    goal: str


def calibrate(outputs: ExitOutputs, target_exit_rate: float | None = None,
              min_accuracy: float | None = None) -> Calibration:
    """Pick a threshold from the candidate entropies themselves (every distinct decision point).

    * target_exit_rate: the smallest threshold whose local-exit rate reaches the target.
    * min_accuracy: the largest threshold whose overall accuracy stays >= the bound
      (most local exits while accurate enough).
    """
    if (target_exit_rate is None) == (min_accuracy is None):
        raise ValueError("give exactly one of target_exit_rate and min_accuracy")
    finite = np.sort(outputs.entropy[np.isfinite(outputs.entropy)])
    candidates = np.unique(np.concatenate([[0.0], finite, [1.0]]))
    if target_exit_rate is not None:
        for candidate in candidates:
            metrics = metrics_at(outputs, float(candidate))
            if metrics.local_exit_rate >= target_exit_rate:
                return Calibration(float(candidate), metrics, f"local-exit rate >= {target_exit_rate:.3f}")
        metrics = metrics_at(outputs, 1.0)
        return Calibration(1.0, metrics, f"local-exit rate >= {target_exit_rate:.3f} (unreachable; max shown)")
    assert min_accuracy is not None
    best: Calibration | None = None
    for candidate in candidates:
        metrics = metrics_at(outputs, float(candidate))
        if metrics.overall_accuracy >= min_accuracy:
            best = Calibration(float(candidate), metrics, f"overall accuracy >= {min_accuracy:.4f}")
    if best is None:
        metrics = metrics_at(outputs, 0.0)
        return Calibration(0.0, metrics, f"overall accuracy >= {min_accuracy:.4f} (unreachable; all to server)")
    return best


def threshold_margin(entropy: np.ndarray, threshold: float) -> float:
    """How close the nearest sample's entropy comes to the threshold (exit decisions flip inside it)."""
    finite = entropy[np.isfinite(entropy)]
    return float(np.abs(finite - threshold).min()) if len(finite) else math.inf
