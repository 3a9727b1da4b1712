"""Accuracy of the exit hierarchy at its thresholds, as the adaptive-DDNN and DDNN papers report it.

The answers of every exit come from ddnn_gen.fold.exits (binary tiers with the bitwise reference, what the
device and a binary edge really compute; float tiers with Chainer's test-mode forward resumed from the
previous split, what ddnn-server computes). A sample is answered by the first exit whose normalized entropy
is finite and <= that exit's threshold, else by the final exit. Definitions, over N samples:

* Local   = samples answered by the device's exit *and* correct there / N
* Server  = accuracy on the samples that leave the device (answered by an edge or the cloud; NaN if none)
* Overall = accuracy of the hierarchy (each sample's answer from the exit that took it)
* Ideal   = samples correct at any exit / N (an oracle choosing the exit; independent of the thresholds)
* per exit: the share of samples it answers and its accuracy on them; per hop: split bytes per sample

Multi-view models (several devices, one scene) are evaluated once per set of views present: the local exit is
the aggregated one, the first hop carries the present views' splits of every offloaded event, and each
present device sends its local exit's scores to the local aggregator for every event. :func:`view_rows` and
:func:`format_view_tables` give the DDNN paper's tables: accuracy vs the number of devices present, and with
each single device missing.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ddnn_gen.model.spec import exit_decision


@dataclass(frozen=True)
class EdgeExit:
    """An early exit after the device's: its answers and what it sends on when it does not answer."""

    name: str
    classes: np.ndarray  # int32 (N,)
    entropy: np.ndarray  # float64 (N,)
    split_bytes: int  # what the hop after it carries per forwarded sample


@dataclass
class ExitOutputs:
    """Every exit's answers for every sample; thresholds are applied afterwards (cheap)."""

    labels: np.ndarray
    local_class: np.ndarray
    entropy: np.ndarray
    final_class: np.ndarray
    split_bytes: int  # bit-packed device split per offloaded sample (the first hop)
    device_bytes: int  # folded device part: packed weights, thresholds, exit constants
    edges: tuple[EdgeExit, ...] = ()  # early exits between the device's and the final one, in order
    exit_names: tuple[str, ...] = ()
    views_present: tuple[int, ...] = ()  # multi-view: the views every sample had (empty: one device per sample)
    score_bytes: int = 0  # multi-view: what the present devices send the local aggregator per event
    # Big-Little: the little net named a priority class (it may answer only then); None: every sample may exit.
    local_allowed: np.ndarray | None = None
    little_class: np.ndarray | None = None  # Big-Little: the little net's argmax as a class (-1 = "other")

    @property
    def n_early(self) -> int:
        return 1 + len(self.edges)

    @property
    def early_classes(self) -> list[np.ndarray]:
        return [self.local_class, *(edge.classes for edge in self.edges)]

    @property
    def early_entropy(self) -> list[np.ndarray]:
        return [self.entropy, *(edge.entropy for edge in self.edges)]

    @property
    def hop_bytes(self) -> list[int]:
        return [self.split_bytes, *(edge.split_bytes for edge in self.edges)]


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
    server_classifier_accuracy: float  # the final exit alone on every sample
    samples: int
    thresholds: tuple[float, ...] = ()  # one per early exit (device first)
    exit_rates: tuple[float, ...] = ()  # share of samples each exit answers (final exit last)
    exit_accuracies: tuple[float, ...] = ()  # accuracy of each exit on the samples it answers (NaN if none)
    hop_bytes_per_sample: tuple[float, ...] = ()  # bytes each hop carries, averaged over all samples
    exit_names: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        def clean(value: object) -> object:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, tuple):
                return [clean(item) for item in value]
            return value

        return {key: clean(value) for key, value in asdict(self).items()}


def answering_exit(outputs: ExitOutputs, thresholds: Sequence[float]) -> np.ndarray:
    """Index of the exit that answers each sample: the first early exit that is confident, else the final."""
    if len(thresholds) != outputs.n_early:
        raise ValueError(f"{outputs.n_early} early exits need {outputs.n_early} thresholds, got {len(thresholds)}")
    answered = np.full(len(outputs.labels), outputs.n_early, dtype=np.int32)
    for index in reversed(range(outputs.n_early)):
        confident = exit_decision(outputs.early_entropy[index], thresholds[index])
        if index == 0 and outputs.local_allowed is not None:
            confident &= outputs.local_allowed  # Big-Little: the rule of spec.big_little_decision
        answered = np.where(confident, index, answered)
    return answered


def metrics_at(outputs: ExitOutputs, threshold: float | Sequence[float]) -> ThresholdMetrics:
    thresholds = (float(threshold),) if isinstance(threshold, (int, float)) else tuple(float(t) for t in threshold)
    n = len(outputs.labels)
    answered = answering_exit(outputs, thresholds)
    classes = [*outputs.early_classes, outputs.final_class]
    correct = [cls == outputs.labels for cls in classes]
    answered_correct = np.choose(answered, correct)
    local = answered == 0
    local_correct, server_correct = correct[0], correct[-1]
    leaves = ~local
    n_leaving = int(leaves.sum())
    rates = tuple(float((answered == e).mean()) for e in range(len(classes)))
    accuracies = tuple(float(correct[e][answered == e].mean()) if (answered == e).any() else math.nan
                       for e in range(len(classes)))
    hops = tuple(float((answered > e).mean() * size) for e, size in enumerate(outputs.hop_bytes))
    return ThresholdMetrics(
        threshold=thresholds[0],
        local_accuracy=float((local & local_correct).sum() / n),
        server_accuracy=float(answered_correct[leaves].mean()) if n_leaving else math.nan,
        overall_accuracy=float(answered_correct.mean()),
        ideal_accuracy=float(np.logical_or.reduce(correct).mean()),
        local_exit_rate=float(local.mean()),
        server_exit_rate=float(leaves.mean()),
        offload_bytes_per_sample=hops[0],
        local_classifier_accuracy=float(local_correct.mean()),
        server_classifier_accuracy=float(server_correct.mean()),
        samples=n,
        thresholds=thresholds,
        exit_rates=rates,
        exit_accuracies=accuracies,
        hop_bytes_per_sample=hops,
        exit_names=outputs.exit_names,
    )


def format_table(rows: list[ThresholdMetrics]) -> str:
    if rows and len(rows[0].thresholds) > 1:
        return _format_tiers_table(rows)
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


def _format_tiers_table(rows: list[ThresholdMetrics]) -> str:
    """One row per threshold tuple: overall / ideal, then each exit's share of samples and accuracy on them,
    then the bytes each hop carries per sample."""
    names = rows[0].exit_names or tuple(f"exit{i}" for i in range(len(rows[0].exit_rates)))
    width = max(9, 6 * len(rows[0].thresholds))
    header = (f"{'thresholds':>{width}} {'overall':>7} {'ideal':>7} "
              + " ".join(f"{name[:12]:>19}" for name in names)
              + " " + " ".join(f"{f'hop{i} B':>8}" for i in range(len(rows[0].hop_bytes_per_sample))))
    lines = [header, " " * (width + 17) + " ".join(f"{'answers @ accuracy':>19}" for _ in names), "-" * len(header)]
    for row in rows:
        cells = []
        for rate, accuracy in zip(row.exit_rates, row.exit_accuracies):
            shown = "   n/a" if math.isnan(accuracy) else f"{100 * accuracy:6.2f}%"
            cells.append(f"{100 * rate:7.2f}% @ {shown:>8}")
        lines.append(f"{'/'.join(f'{t:.3f}' for t in row.thresholds):>{width}} {100 * row.overall_accuracy:6.2f}% "
                     f"{100 * row.ideal_accuracy:6.2f}% " + " ".join(f"{cell:>19}" for cell in cells) + " "
                     + " ".join(f"{hop:8.1f}" for hop in row.hop_bytes_per_sample))
    return "\n".join(lines)


def sweep(outputs: ExitOutputs, steps: int = 51, others: Sequence[float] = ()) -> list[ThresholdMetrics]:
    """The device threshold from 0 to 1; the edge exits' thresholds fixed at ``others``."""
    return [metrics_at(outputs, (float(t), *others)) for t in np.linspace(0.0, 1.0, steps)]


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
    threshold: float  # the device exit's
    metrics: ThresholdMetrics
    goal: str
    thresholds: tuple[float, ...] = ()  # every early exit's


def _candidates(entropy: np.ndarray, count: int | None = None) -> np.ndarray:
    """Thresholds worth trying for one exit: every distinct finite entropy (the decision points), or
    ``count`` of its quantiles, plus 0 and 1."""
    finite = np.sort(entropy[np.isfinite(entropy)])
    if count is not None and len(finite) > count:
        finite = np.quantile(finite, np.linspace(0.0, 1.0, count))
    return np.unique(np.concatenate([[0.0], finite, [1.0]]))


def calibrate(outputs: ExitOutputs, target_exit_rate: float | Sequence[float] | None = None,
              min_accuracy: float | None = None) -> Calibration:
    """Pick thresholds from the candidate entropies themselves (decision points).

    * target_exit_rate: the smallest thresholds whose exits answer at least these shares of all samples
      (one per early exit, device first; a single number for a two-tier model).
    * min_accuracy: the thresholds that answer the most samples before the final exit while the overall
      accuracy stays >= the bound (ties: more answered earlier).
    """
    if (target_exit_rate is None) == (min_accuracy is None):
        raise ValueError("give exactly one of target_exit_rate and min_accuracy")
    if target_exit_rate is not None:
        rates = ((float(target_exit_rate),) if isinstance(target_exit_rate, (int, float))
                 else tuple(float(r) for r in target_exit_rate))
        if len(rates) != outputs.n_early:
            raise ValueError(f"{outputs.n_early} early exits need {outputs.n_early} target exit rates")
        return _calibrate_rates(outputs, rates)
    assert min_accuracy is not None
    if outputs.n_early == 1:
        return _calibrate_accuracy_one(outputs, min_accuracy)
    return _calibrate_accuracy_grid(outputs, min_accuracy)


def _calibrate_rates(outputs: ExitOutputs, rates: tuple[float, ...]) -> Calibration:
    chosen: list[float] = []
    reached = True
    for index, rate in enumerate(rates):
        candidates = _candidates(outputs.early_entropy[index])
        later = [0.0] * (outputs.n_early - index - 1)

        def share(position: int, index: int = index, later: list[float] = later,
                  candidates: np.ndarray = candidates) -> float:
            return metrics_at(outputs, (*chosen, float(candidates[position]), *later)).exit_rates[index]

        # The share an exit answers only grows with its threshold: binary search the decision points.
        low, high = 0, len(candidates) - 1
        if share(high) < rate:
            reached, low = False, high
        while low < high:
            middle = (low + high) // 2
            if share(middle) >= rate:
                high = middle
            else:
                low = middle + 1
        chosen.append(float(candidates[low]))
    metrics = metrics_at(outputs, chosen)
    goal = ("local-exit rate" if len(rates) == 1 else "exit rates") + " >= " + "/".join(f"{r:.3f}" for r in rates)
    return Calibration(chosen[0], metrics, goal + ("" if reached else " (unreachable; max shown)"), tuple(chosen))


def _calibrate_accuracy_one(outputs: ExitOutputs, min_accuracy: float) -> Calibration:
    best: Calibration | None = None
    for candidate in _candidates(outputs.entropy):
        metrics = metrics_at(outputs, float(candidate))
        if metrics.overall_accuracy >= min_accuracy:
            best = Calibration(float(candidate), metrics, f"overall accuracy >= {min_accuracy:.4f}",
                               (float(candidate),))
    if best is None:
        metrics = metrics_at(outputs, 0.0)
        return Calibration(0.0, metrics, f"overall accuracy >= {min_accuracy:.4f} (unreachable; all to server)",
                           (0.0,))
    return best


def _calibrate_accuracy_grid(outputs: ExitOutputs, min_accuracy: float, per_exit: int = 41) -> Calibration:
    """Every combination of ``per_exit`` quantile thresholds per early exit (two edge exits: 43^3 points at
    most; the search is meant for the few exits a hierarchy has)."""
    grids = [_candidates(entropy, per_exit) for entropy in outputs.early_entropy]
    best: tuple[tuple[float, ...], ThresholdMetrics] | None = None
    for point in itertools.product(*grids):
        metrics = metrics_at(outputs, point)
        if metrics.overall_accuracy < min_accuracy:
            continue
        key = (1.0 - metrics.exit_rates[-1], metrics.exit_rates[:-1])
        if best is None or key > (1.0 - best[1].exit_rates[-1], best[1].exit_rates[:-1]):
            best = (tuple(float(t) for t in point), metrics)
    goal = f"overall accuracy >= {min_accuracy:.4f}"
    if best is None:
        zeros = (0.0,) * outputs.n_early
        return Calibration(0.0, metrics_at(outputs, zeros), goal + " (unreachable; all to the final exit)", zeros)
    return Calibration(best[0][0], best[1], goal, best[0])


def calibration_curves(outputs: ExitOutputs, thresholds: Sequence[float], samples: str,
                       steps: int = 101) -> dict[str, object]:
    """For each early exit, its threshold from 0 to 1 with the other exits at ``thresholds``: the share of
    samples it answers, the share that go on past it (the load on the tiers above) and the overall accuracy.
    Stored in the model at calibrate time, so whoever moves thresholds at run time knows what each costs."""
    grid = [round(float(t), 6) for t in np.linspace(0.0, 1.0, steps)]
    curves = []
    for index in range(outputs.n_early):
        rows = [metrics_at(outputs, (*thresholds[:index], t, *thresholds[index + 1:])) for t in grid]
        curves.append({"exit": outputs.exit_names[index] if outputs.exit_names else f"exit{index}",
                       "thresholds": grid,
                       "exit_rate": [round(row.exit_rates[index], 6) for row in rows],
                       "onward_rate": [round(float(sum(row.exit_rates[index + 1:])), 6) for row in rows],
                       "overall_accuracy": [round(row.overall_accuracy, 6) for row in rows]})
    return {"samples": samples, "thresholds": [float(t) for t in thresholds], "exits": curves}


def threshold_margin(entropy: np.ndarray, threshold: float) -> float:
    """How close the nearest sample's entropy comes to the threshold (exit decisions flip inside it)."""
    finite = entropy[np.isfinite(entropy)]
    return float(np.abs(finite - threshold).min()) if len(finite) else math.inf


def view_subsets(count: int, per_size: int = 8, seed: int = 0) -> list[tuple[int, ...]]:
    """The sets of views present to evaluate for ``count`` views: every set of each size when there are at most
    ``per_size`` of them, else ``per_size`` drawn at random (seeded); always each view alone, each view missing
    and all of them. Smallest first."""
    rng = np.random.RandomState(seed)
    chosen: list[tuple[int, ...]] = []
    for size in range(1, count + 1):
        sets = list(itertools.combinations(range(count), size))
        if len(sets) > per_size and size not in (1, count - 1):
            sets = [sets[i] for i in sorted(rng.choice(len(sets), per_size, replace=False))]
        chosen.extend(sets)
    return chosen


@dataclass
class ViewRow:
    """A multi-view model with the views ``present``: its metrics at the thresholds, and what goes up per event."""

    present: tuple[int, ...]
    metrics: ThresholdMetrics
    score_bytes: int  # every event: the present devices' local-exit scores to the local aggregator
    split_bytes: float  # per event on average: the present devices' splits of the offloaded events to tier 1

    def as_dict(self) -> dict[str, object]:
        return {"present": list(self.present), "score_bytes": self.score_bytes, "split_bytes": self.split_bytes,
                **self.metrics.as_dict()}


def view_rows(outputs: Sequence[ExitOutputs], thresholds: Sequence[float]) -> list[ViewRow]:
    rows = []
    for output in outputs:
        metrics = metrics_at(output, thresholds)
        rows.append(ViewRow(output.views_present, metrics, output.score_bytes, metrics.hop_bytes_per_sample[0]))
    return rows


@dataclass
class CountRow:
    """The mean over the evaluated sets of views of one size."""

    devices: int
    sets: int
    local_alone: float
    final_alone: float
    overall: float
    local_exit_rate: float
    score_bytes: float
    split_bytes: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def by_device_count(rows: Sequence[ViewRow]) -> list[CountRow]:
    counts = sorted({len(row.present) for row in rows})
    table = []
    for count in counts:
        group = [row for row in rows if len(row.present) == count]

        def mean(values: list[float]) -> float:
            return float(np.mean(values))

        table.append(CountRow(count, len(group), mean([r.metrics.local_classifier_accuracy for r in group]),
                              mean([r.metrics.server_classifier_accuracy for r in group]),
                              mean([r.metrics.overall_accuracy for r in group]),
                              mean([r.metrics.local_exit_rate for r in group]),
                              mean([float(r.score_bytes) for r in group]), mean([r.split_bytes for r in group])))
    return table


def _present_label(present: tuple[int, ...], count: int) -> str:
    if len(present) == count:
        return "all"
    missing = sorted(set(range(count)) - set(present))
    if len(missing) == 1:
        return f"all but {missing[0]}"
    if len(present) == 1:
        return f"only {present[0]}"
    return ",".join(map(str, present))


def format_view_tables(rows: Sequence[ViewRow], count: int) -> str:
    """Accuracy vs the number of devices present, then each device alone and each one missing."""
    thresholds = "/".join(f"{t:.3f}" for t in rows[0].metrics.thresholds)
    header = (f"{'devices':>7} {'sets':>4} {'local':>7} {'final':>7} {'overall':>7} {'exit@agg':>8} "
              f"{'scores B':>8} {'splits B':>8}")
    lines = [f"accuracy vs devices present at t={thresholds} (local, final: each exit alone on every sample; "
             "mean over the sets of each size)", header, "-" * len(header)]
    for row in by_device_count(rows):
        lines.append(f"{row.devices:7d} {row.sets:4d} {100 * row.local_alone:6.2f}% {100 * row.final_alone:6.2f}% "
                     f"{100 * row.overall:6.2f}% {100 * row.local_exit_rate:7.2f}% {row.score_bytes:8.1f} "
                     f"{row.split_bytes:8.1f}")
    header = (f"{'present':>10} {'local':>7} {'final':>7} {'overall':>7} {'exit@agg':>8} {'scores B':>8} "
              f"{'splits B':>8}")
    lines += ["", "each device alone and each one missing", header, "-" * len(header)]
    shown = [row for row in rows if len(row.present) in (1, count - 1, count)]

    def order(row: ViewRow) -> tuple[int, tuple[int, ...]]:
        missing = tuple(sorted(set(range(count)) - set(row.present)))
        return -len(row.present), missing if len(row.present) == count - 1 else row.present

    for row in sorted(shown, key=order):
        metrics = row.metrics
        lines.append(f"{_present_label(row.present, count):>10} {100 * metrics.local_classifier_accuracy:6.2f}% "
                     f"{100 * metrics.server_classifier_accuracy:6.2f}% {100 * metrics.overall_accuracy:6.2f}% "
                     f"{100 * metrics.local_exit_rate:7.2f}% {row.score_bytes:8d} {row.split_bytes:8.1f}")
    return "\n".join(lines)


# --- Priority classes (Big-Little, De Coninck et al.): F1 per priority class, and what the device answers. ---

def f1_score(predicted: np.ndarray, labels: np.ndarray, cls: int) -> float:
    """F1 of class ``cls`` (2 TP / (2 TP + FP + FN)); NaN when the class is neither predicted nor present."""
    true_positive = int(((predicted == cls) & (labels == cls)).sum())
    wrong = int(((predicted == cls) != (labels == cls)).sum())
    return 2 * true_positive / (2 * true_positive + wrong) if true_positive or wrong else math.nan


@dataclass
class PriorityRow:
    """One priority class at one threshold: F1 of the little (or local) exit alone on every sample, of the
    hierarchy as routed, and of the final (big) exit alone; and how many of its samples the device answered."""

    cls: int
    f1_little: float  # the device's own classifier on every sample (a Big-Little little net: its argmax)
    f1_routed: float  # each sample's answer from the exit that took it
    f1_big: float  # the final exit alone on every sample
    samples: int  # test samples of the class
    local_share: float  # share of them answered on the device
    local_precision: float  # of the device's local answers naming this class, the share that are right

    def as_dict(self) -> dict[str, object]:
        return {key: (None if isinstance(value, float) and math.isnan(value) else value)
                for key, value in asdict(self).items()}


@dataclass
class PriorityReport:
    threshold: float
    metrics: ThresholdMetrics
    rows: list[PriorityRow]
    priority_local_share: float  # share of all priority-class samples answered on the device
    request_bytes: float  # per sample on average: what offloaded samples send (header + payload)

    def as_dict(self) -> dict[str, object]:
        return {"threshold": self.threshold, "overall_accuracy": self.metrics.overall_accuracy,
                "local_exit_rate": self.metrics.local_exit_rate, "priority_local_share": self.priority_local_share,
                "request_bytes_per_sample": self.request_bytes, "classes": [row.as_dict() for row in self.rows]}


def priority_report(outputs: ExitOutputs, thresholds: float | Sequence[float], priority: Sequence[int],
                    request_header_bytes: int = 0) -> PriorityReport:
    """F1 of each priority class, the overall accuracy, and the share answered on the device, at ``thresholds``.
    Works for a Big-Little model (the little net's own argmax is ``little_class``) and for an ordinary DDNN (its
    local exit's argmax), so the two compare on the same classes."""
    metrics = metrics_at(outputs, thresholds)
    answered = answering_exit(outputs, metrics.thresholds)
    classes = [*outputs.early_classes, outputs.final_class]
    routed = np.choose(answered, classes)
    local = answered == 0
    little = outputs.little_class if outputs.little_class is not None else outputs.local_class
    labels = outputs.labels
    rows = []
    for cls in priority:
        mine = labels == cls
        said = local & (outputs.local_class == cls)
        rows.append(PriorityRow(int(cls), f1_score(little, labels, cls), f1_score(routed, labels, cls),
                                f1_score(outputs.final_class, labels, cls), int(mine.sum()),
                                float(local[mine].mean()) if mine.any() else math.nan,
                                float((labels[said] == cls).mean()) if said.any() else math.nan))
    in_priority = np.isin(labels, list(priority))
    share = float(local[in_priority].mean()) if in_priority.any() else math.nan
    sent = float((~local).mean()) * (outputs.split_bytes + request_header_bytes)
    return PriorityReport(metrics.threshold, metrics, rows, share, sent)


def match_routed_f1(outputs: ExitOutputs, priority: Sequence[int], target: float, others: Sequence[float] = (),
                    request_header_bytes: int = 0) -> PriorityReport:
    """The device threshold (among the decision points) that answers the most priority samples on the device
    while the mean routed F1 over the priority classes stays >= ``target``: an early-exit model at the F1 of
    another one. Threshold 0 (nothing local but certain answers) when none reaches it."""
    best: PriorityReport | None = None
    for candidate in _candidates(outputs.entropy, 400):
        report = priority_report(outputs, (float(candidate), *others), priority, request_header_bytes)
        f1 = float(np.mean([row.f1_routed for row in report.rows]))
        if f1 >= target and (best is None or report.priority_local_share > best.priority_local_share):
            best = report
    return best or priority_report(outputs, (0.0, *others), priority, request_header_bytes)


def format_priority_table(report: PriorityReport, class_names: Sequence[str]) -> str:
    header = (f"{'class':>8} {'samples':>7} {'F1 little':>9} {'F1 routed':>9} {'F1 big':>7} {'local':>7} "
              f"{'local prec':>10}")
    lines = [f"priority classes at t={report.threshold:.4f}: overall {100 * report.metrics.overall_accuracy:.2f}%, "
             f"answered on the device {100 * report.metrics.local_exit_rate:.2f}% of all samples, "
             f"{100 * report.priority_local_share:.2f}% of the priority samples; "
             f"{report.request_bytes:.1f} B sent per sample", header, "-" * len(header)]

    def pct(value: float, width: int) -> str:
        return f"{'n/a':>{width}}" if math.isnan(value) else f"{100 * value:{width - 1}.2f}%"

    for row in report.rows:
        lines.append(f"{class_names[row.cls]:>8} {row.samples:7d} {pct(row.f1_little, 9)} {pct(row.f1_routed, 9)} "
                     f"{pct(row.f1_big, 7)} {pct(row.local_share, 7)} {pct(row.local_precision, 10)}")
    return "\n".join(lines)
