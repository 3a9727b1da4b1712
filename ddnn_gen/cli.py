"""`ddnngen` command line. Each area registers its commands from ddnn_gen/commands/."""

from __future__ import annotations

import logging
import sys

import click

from ddnn_gen import __version__
from ddnn_gen.errors import DdnnError


class _Group(click.Group):
    """Turns our own errors, and the file system's, into one readable line and exit code 1, never a
    traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except DdnnError as error:
            raise click.ClickException(str(error)) from error
        except OSError as error:  # a folder that is not there or not writable, a full disk
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(f"{where}{error.strerror or error}") from error


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ddnngen")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Train, evaluate and compile early-exit binarized DDNNs for devices."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _register() -> None:
    from ddnn_gen.commands import model_commands

    model_commands.register(cli)
    # Later areas (compile, device, network) register here the same way.
    for module_name in ("compile_commands", "device_commands", "network_commands", "bench_commands", "plan_commands",
                        "broker_commands", "ops_commands",
                        "cluster_commands"):
        try:
            module = __import__(f"ddnn_gen.commands.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != f"ddnn_gen.commands.{module_name}":
                raise
            continue
        module.register(cli)


_register()


def main() -> None:
    cli(prog_name="ddnngen")
