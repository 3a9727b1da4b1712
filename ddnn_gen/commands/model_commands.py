"""Model commands: zoo, train, eval, calibrate."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from ddnn_gen.commands.options import THRESHOLD_HELP, THRESHOLDS, check_dataset_shape, data_dir_option, writable_file
from ddnn_gen.errors import DdnnError
from ddnn_gen.fold import exits
from ddnn_gen.model import datasets, zoo
from ddnn_gen.model.spec import ModelSpec, load_spec_file, parse_spec
from ddnn_gen.wire.codec import REQUEST_HEADER_BYTES

if TYPE_CHECKING:
    from ddnn_gen.model.evaluate import ExitOutputs, ViewRow
    from ddnn_gen.model.modelfile import LoadedModel

log = logging.getLogger(__name__)


def _unit_interval(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"{value} is not in [0, 1]")
    return value


def _unit_intervals(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(part) for part in value.split(","))
    except ValueError as error:
        raise click.BadParameter(f"{value!r}: expected numbers in [0, 1], comma-separated") from error
    if not all(0.0 <= v <= 1.0 for v in values):
        raise click.BadParameter(f"{value} is not in [0, 1]")
    return values


def _parse_loss_weights(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        weights = tuple(float(part) for part in value.split(","))
    except ValueError as error:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers like 1,1") from error
    if any(weight < 0 for weight in weights):
        raise click.BadParameter("loss weights must be >= 0")
    return weights


@click.command("zoo")
@click.argument("name", required=False)
@click.option("--filters", type=click.IntRange(1, 1024), default=None, help="Filter count of the family.")
def zoo_command(name: str | None, filters: int | None) -> None:
    """List the model zoo, or print one family's spec as JSON (a starting point for --arch)."""
    if name is None:
        for key in zoo.ZOO:
            click.echo(key)
        return
    click.echo(json.dumps(parse_spec(zoo.build(name, filters)).to_dict(), indent=2))


@click.command("train")
@click.option("--zoo", "zoo_name", type=click.Choice(sorted(zoo.ZOO)), help="Model family from the zoo.")
@click.option("--filters", type=click.IntRange(1, 1024), default=None)
@click.option("--arch", type=click.Path(exists=True, dir_okay=False), help="Spec JSON instead of --zoo.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True, help="Model file to write (.npz).")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--lr-decay-epochs", default="", help="Comma-separated epochs at which the rate drops 10x.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--loss-weights", default=None, help="Exit loss weights, local first (default: from spec).")
@click.option("--augment", default="", help="Training augmentation, comma-separated: crop:P (pad by P pixels and "
                                            "crop back at random), flip (horizontal), e.g. crop:4,flip.")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after this many batches.")
@click.option("--train-count", type=click.IntRange(1), default=None, help="Use only the first N training samples.")
@click.option("--resume", is_flag=True, help="Continue from OUT and its .opt.npz checkpoint.")
@click.option("--progress/--no-progress", default=True)
@data_dir_option
def train_command(zoo_name: str | None, filters: int | None, arch: str | None, out: str, epochs: int,
                  batch_size: int, lr: float, lr_decay_epochs: str, seed: int, loss_weights: str | None, augment: str,
                  max_steps: int | None, train_count: int | None, resume: bool, progress: bool,
                  data_dir: str | None) -> None:
    """Jointly train all exits of a DDNN and write a self-describing model file."""
    from ddnn_gen.model.train import TrainConfig, train

    spec = _spec_from(zoo_name, filters, arch)
    out_path = writable_file(out, "-o")
    if resume:
        _check_resumable(out_path)
    try:
        decay = tuple(int(part) for part in lr_decay_epochs.split(",") if part.strip())
    except ValueError as error:
        raise click.BadParameter(f"{lr_decay_epochs!r}: expected comma-separated epochs") from error
    from ddnn_gen.model.train import parse_augment

    try:
        augmentations = parse_augment(augment)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--augment") from error
    weights = _parse_loss_weights(loss_weights)
    if weights is not None and len(weights) != len(spec.tiers):
        raise click.BadParameter(f"{len(weights)} loss weights for {len(spec.tiers)} exits",
                                 param_hint="--loss-weights")
    if not spec.dataset:
        raise click.UsageError(f"spec {spec.name} names no dataset to train on ('dataset' in the spec)")
    train_set = datasets.load(spec.dataset, "train", data_dir).subset(train_count)
    check_dataset_shape(spec, train_set)
    if progress:
        # Progress and epoch lines are INFO records of the trainer; show them without -v.
        logging.getLogger("ddnn_gen.model.train").setLevel(logging.INFO)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=lr, seed=seed, loss_weights=weights,
                         max_steps=max_steps, progress=progress, lr_decay_epochs=decay, augment=augmentations)
    result = train(spec, train_set, config, out=out_path, resume=resume)
    last = result.history[-1] if result.history else {}
    log.info("trained %d epochs in %.1f s", result.epochs_done, result.seconds)
    click.echo(f"wrote {out} ({result.epochs_done} epochs, {result.seconds:.1f} s; "
               + ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k != "epoch") + ")")


def _check_resumable(out: Path) -> None:
    from ddnn_gen.model.train import optimizer_path

    if not out.exists():
        raise click.UsageError(f"--resume: {out} does not exist; leave out --resume to start training")
    if not optimizer_path(out).exists():
        raise click.UsageError(f"--resume: {out} has no optimizer checkpoint {optimizer_path(out)} beside it "
                               "(it was not written by `ddnngen train`); leave out --resume to start over")


def _spec_from(zoo_name: str | None, filters: int | None, arch: str | None) -> ModelSpec:
    if (zoo_name is None) == (arch is None):
        raise click.UsageError("give exactly one of --zoo and --arch")
    if arch is not None:
        return load_spec_file(arch)
    assert zoo_name is not None
    return parse_spec(zoo.build(zoo_name, filters))


@click.command("eval")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("more_thresholds", nargs=-1, type=THRESHOLDS, metavar="[T...]")
@click.option("--threshold", "-t", "thresholds", type=THRESHOLDS, multiple=True,
              help=f"Exit threshold(s) {THRESHOLD_HELP}; list several after one --threshold: -t 0.4 0.8. A model "
                   "with edge tiers takes one per early exit, device first, comma-separated: -t 0.3,0.5.")
@click.option("--arch", type=click.Path(exists=True, dir_okay=False), help="Spec for a file without one.")
@click.option("--dataset", "dataset_name", default=None, help="Dataset (default: the model's).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--count", type=click.IntRange(1), default=None, help="Only the first N samples.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@click.option("--sweep", "sweep_prefix", type=click.Path(dir_okay=False), default=None,
              help="Also write PREFIX.csv and PREFIX.png over thresholds 0..1.")
@click.option("--priority-classes", "priority_text", default=None,
              help="Report F1 of these classes (comma-separated indices) and how many of their samples the device "
                   "answers (default: a Big-Little model's priority classes).")
@click.option("--match-f1", type=float, callback=_unit_interval, default=None,
              help="With priority classes: use the device threshold that answers the most priority samples on the "
                   "device while their mean routed F1 stays >= this (compare early exits at equal F1).")
@data_dir_option
def eval_command(model: str, more_thresholds: tuple[tuple[float, ...], ...], thresholds: tuple[tuple[float, ...], ...],
                 arch: str | None,
                 dataset_name: str | None, split: str, count: int | None, as_json: bool,
                 sweep_prefix: str | None, priority_text: str | None, match_f1: float | None,
                 data_dir: str | None) -> None:
    """Local / Server / Overall / Ideal accuracy, each exit's share and accuracy, and bytes per hop, per threshold
    (one per early exit); for priority classes (Big-Little) their F1 and the share the device answers."""
    from ddnn_gen.model import evaluate
    from ddnn_gen.model.modelfile import load_model

    loaded = load_model(model, arch)
    values = list(thresholds) + list(more_thresholds) or [loaded.spec.thresholds]
    for value in values:
        if len(value) != len(loaded.spec.thresholds):
            raise click.BadParameter(f"{','.join(map(str, value))}: {loaded.spec.name} has "
                                     f"{len(loaded.spec.thresholds)} early exit(s) "
                                     f"({', '.join(t.exit_name for t in loaded.spec.tiers[:-1])}); give one "
                                     "threshold for each, comma-separated", param_hint="--threshold")
    dataset_name = dataset_name or loaded.spec.dataset
    if not dataset_name:
        raise click.UsageError(f"{model} names no dataset; pass --dataset")
    dataset = datasets.load(dataset_name, split, data_dir).subset(count)
    check_dataset_shape(loaded.spec, dataset)
    view_rows: list[evaluate.ViewRow] = []
    if loaded.spec.views is None:
        outputs = exits.compute_outputs(loaded, dataset)
    else:
        outputs, view_rows = _view_evaluation(loaded, dataset, values[0])
    priority = _priority_classes(loaded.spec, priority_text)
    if match_f1 is not None:
        if not priority:
            raise click.UsageError("--match-f1 needs priority classes (--priority-classes, or a Big-Little model)")
        values = [evaluate.match_routed_f1(outputs, priority, match_f1, values[0][1:]).metrics.thresholds]
    rows = [evaluate.metrics_at(outputs, value) for value in values]
    reports = [evaluate.priority_report(outputs, value, priority, REQUEST_HEADER_BYTES)
               for value in values] if priority else []
    margins = [[evaluate.threshold_margin(entropy, t) for entropy, t in zip(outputs.early_entropy, value)]
               for value in values]
    if sweep_prefix:
        prefix = Path(sweep_prefix)
        evaluate.write_sweep(evaluate.sweep(outputs, others=values[0][1:]), prefix.with_suffix(".csv"),
                             prefix.with_suffix(".png"),
                             f"{loaded.spec.name} on {dataset.name} {split} ({len(dataset)} samples)")
    if as_json:
        click.echo(json.dumps({"model": str(model), "content_hash": loaded.content_hash, "dataset": dataset.name,
                               "split": split, "samples": len(dataset),
                               "device_part_bytes": outputs.device_bytes, "split_bytes": outputs.split_bytes,
                               "hop_bytes": outputs.hop_bytes,
                               "results": [row.as_dict() | {"nearest_entropy_distance": margin[0],
                                                            "nearest_entropy_distances": margin}
                                           for row, margin in zip(rows, margins)]}
                              | ({"priority": [report.as_dict() for report in reports]} if reports else {})
                              | (_views_json(loaded.spec, view_rows) if view_rows else {}), indent=2))
        return
    click.echo(f"{loaded.spec.name} ({loaded.content_hash[:12]}) on {dataset.name} {split}, {len(dataset)} samples")
    click.echo(evaluate.format_table(rows))
    click.echo(f"local exit alone: {100 * rows[0].local_classifier_accuracy:.2f}%, "
               f"server exit alone: {100 * rows[0].server_classifier_accuracy:.2f}%; "
               + (f"device part {outputs.device_bytes} bytes, split activations {outputs.split_bytes} bytes"
                  if loaded.spec.views is None else
                  f"device part {outputs.device_bytes} bytes per view, split activations {loaded.spec.views.count} x "
                  f"{outputs.split_bytes // loaded.spec.views.count} bytes"))
    if outputs.edges:
        click.echo("bytes per forwarded sample on each hop: " + ", ".join(map(str, outputs.hop_bytes)))
    for value, margin in zip(values, margins):
        for tier, t, distance in zip(loaded.spec.tiers, value, margin):
            at = f" at the {tier.exit_name} exit" if outputs.edges else ""
            click.echo(f"nearest sample entropy to t={t:g}{at}: {distance:.3e} away")
    if view_rows:
        _echo_views(loaded.spec, outputs, view_rows)
    for report in reports:
        click.echo(evaluate.format_priority_table(report, loaded.spec.classes))
    if loaded.spec.big_little:
        click.echo("F1 little: the little net's argmax on every sample; routed: each sample's answer (the little net "
                   "when it names a priority class with entropy <= t, else the big net on the raw input, "
                   f"{outputs.split_bytes} B + {REQUEST_HEADER_BYTES} B header); big: the big net alone. "
                   "'local exit alone' above counts the little net's 'other' as wrong")
    if sweep_prefix:
        click.echo(f"wrote {Path(sweep_prefix).with_suffix('.csv')} and {Path(sweep_prefix).with_suffix('.png')}")


def _priority_classes(spec: ModelSpec, text: str | None) -> tuple[int, ...]:
    if text is None:
        return spec.priority_classes
    try:
        classes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: give class indices like 8 or 3,8",
                                 param_hint="--priority-classes") from exc
    if not classes or any(not 0 <= c < spec.n_classes for c in classes) or len(set(classes)) != len(classes):
        raise click.BadParameter(f"{text!r}: distinct class indices in 0..{spec.n_classes - 1}",
                                 param_hint="--priority-classes")
    return classes


def _view_evaluation(loaded: LoadedModel, dataset: datasets.Dataset,
                     thresholds: tuple[float, ...]) -> tuple[ExitOutputs, list[ViewRow]]:
    """A multi-view model: its outputs with every view present (the plain table's) and one row per evaluated set
    of views present (``evaluate.view_subsets``) at ``thresholds``."""
    from ddnn_gen.fold.views import ViewAggregator
    from ddnn_gen.model import evaluate

    aggregator = ViewAggregator(loaded)
    runs = aggregator.run_devices(dataset.images)
    subsets = evaluate.view_subsets(aggregator.count)
    per_set = [aggregator.outputs(runs, dataset.labels, present) for present in subsets]
    return per_set[-1], evaluate.view_rows(per_set, thresholds)


def _views_json(spec: ModelSpec, rows: list[ViewRow]) -> dict[str, object]:
    from ddnn_gen.model import evaluate

    assert spec.views is not None
    return {"views": {"description": spec.views.describe(), "count": spec.views.count,
                      "thresholds": list(rows[0].metrics.thresholds),
                      "by_devices": [row.as_dict() for row in evaluate.by_device_count(rows)],
                      "sets": [row.as_dict() for row in rows]}}


def _echo_views(spec: ModelSpec, outputs: ExitOutputs, rows: list[ViewRow]) -> None:
    from ddnn_gen.model import evaluate

    views = spec.views
    assert views is not None
    split = outputs.split_bytes // views.count
    click.echo("")
    click.echo(f"{views.describe()}; the views are crops of single-view images (no multi-camera data set is "
               "installable here)")
    click.echo(evaluate.format_view_tables(rows, views.count))
    click.echo(f"per event: each present device sends {outputs.score_bytes // views.count} B of local-exit scores "
               f"to the local aggregator, and its {split} B split when the aggregated local exit does not answer; "
               f"all {views.count} splits are {outputs.split_bytes} B, the {views.count} raw views "
               f"{views.count * views.height * views.width * spec.input.channels} B, the whole image "
               f"{int(np.prod(spec.input.shape))} B")


@click.command("calibrate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--target-exit-rate", callback=_unit_intervals,
              help="Wanted local-exit rate (0..1); with edge tiers one share of all samples per early exit, "
                   "comma-separated: 0.5,0.3.")
@click.option("--min-accuracy", type=float, callback=_unit_interval, help="Lowest acceptable overall accuracy.")
@click.option("--val-count", type=click.IntRange(100), default=5000, show_default=True,
              help="Validation samples: the last N of the training split (the test split stays unseen).")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None, help="Write here (default: in place).")
@data_dir_option
def calibrate_command(model: str, target_exit_rate: tuple[float, ...] | None, min_accuracy: float | None,
                      val_count: int,
                      out: str | None, data_dir: str | None) -> None:
    """Choose the exit thresholds on a validation split and store them in the model file."""
    from ddnn_gen.model import evaluate
    from ddnn_gen.model.modelfile import load_model, save_model

    if (target_exit_rate is None) == (min_accuracy is None):
        raise click.UsageError("give exactly one of --target-exit-rate and --min-accuracy")
    loaded = load_model(model)
    if target_exit_rate is not None and len(target_exit_rate) != len(loaded.spec.thresholds):
        raise click.BadParameter(f"{loaded.spec.name} has {len(loaded.spec.thresholds)} early exit(s); give one "
                                 "rate for each, comma-separated", param_hint="--target-exit-rate")
    if out is not None:
        writable_file(out, "-o")
    if not loaded.spec.dataset:
        raise DdnnError(f"{model} names no dataset to calibrate on")
    train_set = datasets.load(loaded.spec.dataset, "train", data_dir)
    check_dataset_shape(loaded.spec, train_set)
    val = train_set.subset(val_count, offset=max(0, len(train_set) - val_count))
    outputs = exits.compute_outputs(loaded, val)
    result = evaluate.calibrate(outputs, target_exit_rate, min_accuracy)
    curves = evaluate.calibration_curves(outputs, result.thresholds,
                                         f"{loaded.spec.dataset} train[{len(train_set) - len(val)}:]")
    save_model(out or model, loaded.model, loaded.spec.with_thresholds(result.thresholds).with_calibration(curves))
    shares = ", ".join(f"{tier.exit_name} {100 * rate:.2f}%"
                       for tier, rate in zip(loaded.spec.tiers, result.metrics.exit_rates))
    click.echo(f"threshold{'s' if len(result.thresholds) > 1 else ''} "
               f"{'/'.join(f'{t:.6f}' for t in result.thresholds)} ({result.goal}) on {len(val)} validation "
               f"samples: overall {100 * result.metrics.overall_accuracy:.2f}%, "
               + (f"local exits {100 * result.metrics.local_exit_rate:.2f}%" if len(result.thresholds) == 1
                  else f"answered by {shares}") + f"; stored in {out or model}")


def register(cli: click.Group) -> None:
    for command in (zoo_command, train_command, eval_command, calibrate_command):
        cli.add_command(command)
