"""Option types and options shared by several commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ddnn_gen.errors import DdnnError, SpecError
from ddnn_gen.model.datasets import Dataset
from ddnn_gen.model.spec import THRESHOLD_RULE, ModelSpec, parse_threshold_text
from ddnn_gen.wire.connection import broker_options

# --broker and the TLS / credential options, one BrokerConnection per command (shared with ddnn-server).
__all__ = ["THRESHOLD", "THRESHOLD_HELP", "broker_options", "check_dataset_shape", "data_dir_option", "writable_file"]


class ThresholdType(click.ParamType):
    """A local-exit threshold: the same text grammar and range as every other place that reads one."""

    name = "threshold"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        try:
            return parse_threshold_text(text, "the threshold")
        except SpecError as error:
            self.fail(str(error), param, ctx)


class ThresholdsType(ThresholdType):
    """One threshold per early exit, comma-separated (device first): ``0.3`` or ``0.3,0.5``."""

    name = "thresholds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(ThresholdType.convert(self, part, param, ctx) for part in str(value).split(","))


THRESHOLD = ThresholdType()
THRESHOLDS = ThresholdsType()
THRESHOLD_HELP = f"({THRESHOLD_RULE})"

data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                               help="Dataset folder (default: $DDNN_DATA_DIR, then the user cache).")


def writable_file(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` if a file can be written there; checked before any long work (training) starts."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise click.BadParameter(f"{target} is a folder; give a file name", param_hint=option)
    if not parent.is_dir():
        raise click.BadParameter(f"folder {parent} does not exist", param_hint=option)
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise click.BadParameter(f"cannot write {target}: permission denied", param_hint=option)
    return target


def check_dataset_shape(spec: ModelSpec, dataset: Dataset) -> None:
    """The data set's images and labels fit the model's input and classes (else one clear error)."""
    if tuple(dataset.images.shape[1:]) != spec.input.shape:
        channels, height, width = dataset.images.shape[1:]
        raise DdnnError(f"dataset {dataset.name} has {channels}x{height}x{width} (CxHxW) images, model {spec.name} "
                        f"takes {'x'.join(map(str, spec.input.shape))}")
    if len(dataset) and int(dataset.labels.max()) >= spec.n_classes:
        raise DdnnError(f"dataset {dataset.name} has labels up to {int(dataset.labels.max())}, model {spec.name} has "
                        f"only {spec.n_classes} classes")
