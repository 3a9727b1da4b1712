"""Device-side commands: `export-samples` (sample files for the C runner) and `run-device`
(a model's device part on a dataset with any registered implementation, same CSV for all)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import click
import numpy as np

from ddnn_gen.codegen.targets import RegistryChoice
from ddnn_gen.commands.options import THRESHOLD, THRESHOLD_HELP, check_dataset_shape, data_dir_option
from ddnn_gen.device import impls
from ddnn_gen.device.samples import write_samples
from ddnn_gen.model import datasets

log = logging.getLogger(__name__)

_data_dir = data_dir_option
_dataset = click.option("--dataset", type=click.Choice(datasets.DATASETS), required=True)
_split = click.option("--split", "split_name", type=click.Choice(["train", "test"]), default="test",
                      show_default=True)
_count = click.option("--count", type=click.IntRange(min=1), default=None, help="Number of samples (default: all).")
_offset = click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
                       help="Index of the first sample.")


def _load(dataset: str, split_name: str, count: int | None, offset: int, data_dir: str | None) -> datasets.Dataset:
    data = datasets.load(dataset, split_name, data_dir)
    if offset >= len(data):
        raise click.BadParameter(f"offset {offset} is past the end of {dataset}/{split_name} ({len(data)} samples)",
                                 param_hint="--offset")
    return data.subset(count, offset)


@click.command("export-samples")
@_dataset
@_split
@_count
@_offset
@_data_dir
@click.option("--views-of", "views_model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A multi-view model: write what camera --view sees of each image (its crop), not the image.")
@click.option("--view", type=click.IntRange(0, 15), default=None, help="With --views-of: the camera's view index.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True, help="Sample file to write.")
def export_samples(dataset: str, split_name: str, count: int | None, offset: int, data_dir: str | None,
                   views_model: str | None, view: int | None, out: str) -> None:
    """Write a binary sample file (DDNS, HWC uint8 + labels) for the generated C runner."""
    if (views_model is None) != (view is None):
        raise click.UsageError("--views-of and --view go together")
    data = _load(dataset, split_name, count, offset, data_dir)
    images = data.images
    if views_model is not None:
        assert view is not None
        from ddnn_gen.model.modelfile import load_model
        from ddnn_gen.model.views import extract_views

        views = load_model(views_model).spec.views
        if views is None or view >= views.count:
            raise click.UsageError(f"{views_model} has no view {view}" + ("" if views is None else
                                                                          f" (views 0..{views.count - 1})"),)
        images = extract_views(views, images)[view]
    size = write_samples(out, images, data.labels)
    _, channels, height, width = images.shape
    click.echo(f"wrote {len(data)} samples of {height}x{width}x{channels} from {dataset}/{split_name} to {out} "
               f"({size} bytes)")


def write_results_csv(handle: TextIO, labels: np.ndarray, result: Any) -> None:
    """The runner's CSV: index,label,class,entropy,exit_local (entropy %.17g)."""
    handle.write("index,label,class,entropy,exit_local\n")
    for index, (label, cls, entropy, local) in enumerate(zip(labels.tolist(), result.local_class.tolist(),
                                                             result.entropy.tolist(), result.local_exit.tolist())):
        handle.write(f"{index},{label},{cls},{entropy:.17g},{int(local)}\n")


@click.command("run-device")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--impl", type=RegistryChoice(impls.device_impls), default="numpy", show_default=True,
              help="Which implementation of the device part runs.")
@click.option("--dataset", type=click.Choice(datasets.DATASETS), default=None,
              help="Dataset (default: the one the model was trained on).")
@_split
@_count
@_offset
@_data_dir
@click.option("--threshold", type=THRESHOLD, default=None,
              help=f"Local-exit entropy threshold {THRESHOLD_HELP} (default: the model's).")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None, help="CSV file (default: stdout).")
def run_device(model: str, impl: str, dataset: str | None, split_name: str, count: int | None, offset: int,
               data_dir: str | None, threshold: float | None, out: str | None) -> None:
    """Run MODEL's device part on a dataset; print per-sample class, entropy and exit decision."""
    from ddnn_gen.fold.program import fold
    from ddnn_gen.model.modelfile import load_model

    program = fold(load_model(model), threshold)
    dataset = dataset or program.spec.dataset
    if not dataset:
        raise click.UsageError(f"{model} names no dataset; pass --dataset")
    data = _load(dataset, split_name, count, offset, data_dir)
    check_dataset_shape(program.spec, data)
    result = impls.device_impls()[impl].function(program, data.images, program.threshold)
    if out is None:
        write_results_csv(sys.stdout, data.labels, result)
    else:
        with open(Path(out), "w", encoding="ascii") as handle:
            write_results_csv(handle, data.labels, result)
    local = np.asarray(result.local_exit, dtype=bool)
    correct = np.asarray(result.local_class) == data.labels
    log.info("%s on %d samples: local exit %.2f%%, local accuracy of exited %.2f%%", impl, len(data),
             100 * local.mean(), 100 * (correct[local].mean() if local.any() else float("nan")))


def register(cli: click.Group) -> None:
    cli.add_command(export_samples)
    cli.add_command(run_device)
