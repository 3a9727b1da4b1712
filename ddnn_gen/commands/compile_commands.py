"""`ddnngen compile`: turn a model file's device part into a device project (--target c, ...)."""

from __future__ import annotations

import logging
from typing import Any

import click

from ddnn_gen.codegen import targets
from ddnn_gen.commands.options import THRESHOLD, THRESHOLD_HELP

log = logging.getLogger(__name__)


def _plan_threshold(model: str, plan: str, threshold: float | None, arch: str | None) -> float | None:
    """The device exit's threshold a plan file gives MODEL (None: the plan uploads raw input)."""
    from ddnn_gen.model.modelfile import load_model
    from ddnn_gen.model.placement import read_plan

    if threshold is not None:
        raise click.UsageError("--plan sets the threshold; give --threshold or --plan, not both")
    loaded = load_model(model, arch)
    placement = read_plan(plan, loaded.spec, loaded.content_hash).placement
    if placement.server_only:
        log.warning("%s places the device tier at the %s: the device uploads its raw input (run the networked "
                    "device program with --server-only); compiling with the model's threshold for its fallback",
                    plan, placement.locations[0])
    return placement.device_threshold


def _view_program(model: str, view: int, threshold: float | None, arch: str | None) -> Any:
    """One camera's device part of a multi-view model (each view has its own program when weights are separate)."""
    from ddnn_gen.fold.program import fold
    from ddnn_gen.model.modelfile import load_model

    return fold(load_model(model, arch), threshold, view=view)


def _compile(model: str, target: str, out_dir: str, threshold: float | None, arch: str | None, plan: str | None,
             view: int | None, **target_options: Any) -> None:
    """Compile the device part of MODEL (a model .npz) for a device target."""
    if plan is not None:
        threshold = _plan_threshold(model, plan, threshold, arch)
    entry = targets.compile_targets()[target]
    own = {option.name for option in entry.options}
    defaults = {option.name: option.default for other in targets.compile_targets().values() for option in other.options}
    for name, value in target_options.items():
        if name not in own and value is not None and value != defaults.get(name):
            raise click.UsageError(f"--{name.replace('_', '-')} does not apply to --target {target}")
    kwargs = {name: value for name, value in target_options.items() if name in own}
    reproduce = f"ddnngen compile {model} --target {target} -o OUT" + (
        f" --threshold {threshold!r}" if threshold is not None else "") + (
        f" --view {view}" if view is not None else "")
    source = model if view is None else _view_program(model, view, threshold, arch)
    report = entry.function(source, out_dir, threshold=threshold, arch=arch, reproduce=reproduce, **kwargs)
    click.echo(report.summary())
    click.echo(f"RAM bytes: {report.ram_bytes}")
    click.echo(f"flash weight bytes: {report.flash_weight_bytes}")
    if report.code_bytes is not None:
        click.echo(f"flash code+weights bytes (host build text): {report.code_bytes}")


def make_command() -> click.Command:
    params: list[click.Parameter] = [
        click.Argument(["model"], type=click.Path(exists=True, dir_okay=False)),
        click.Option(["--target"], type=targets.RegistryChoice(targets.compile_targets), default="c",
                     show_default=True, help="What to generate."),
        click.Option(["-o", "--out", "out_dir"], type=click.Path(file_okay=False), required=True,
                     help="Output folder (created)."),
        click.Option(["--threshold"], type=THRESHOLD, default=None,
                     help=f"Default local-exit entropy threshold {THRESHOLD_HELP} (default: the model's)."),
        click.Option(["--plan"], type=click.Path(exists=True, dir_okay=False), default=None,
                     help="A plan file (ddnngen plan -o) for MODEL: the device exit's threshold it chose."),
        click.Option(["--arch"], type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Spec JSON for a bare Chainer npz without an embedded spec."),
        click.Option(["--view"], type=click.IntRange(0, 15), default=None,
                     help="Multi-view models: the camera (view index) whose device part to compile (docs/views.md)."),
    ]
    seen = {param.name for param in params}
    for entry in targets.compile_targets().values():
        for option in entry.options:
            if option.name not in seen:
                params.append(option)
                seen.add(option.name)
    return click.Command("compile", callback=_compile, params=params, help=_compile.__doc__)


def register(cli: click.Group) -> None:
    cli.add_command(make_command())
