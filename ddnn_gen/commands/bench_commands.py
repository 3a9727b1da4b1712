"""``ddnngen bench``: the whole-system benchmark (paper Tables II-IV) for any model files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from ddnn_gen.commands.options import THRESHOLD, THRESHOLD_HELP

log = logging.getLogger(__name__)


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", default=Path("bench/out"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where tables, JSON and plots go.")
@click.option("--samples", default=1000, show_default=True, type=click.IntRange(1, 100000),
              help="Test samples per model and configuration.")
@click.option("--threshold", "thresholds", multiple=True, type=THRESHOLD, default=(0.4, 0.8),
              show_default=True, help=f"Local-exit thresholds {THRESHOLD_HELP} to run (the model's calibrated one is "
                                      "always added).")
@click.option("--workload", "workloads", multiple=True, type=click.IntRange(1, 64), default=(2, 6, 10),
              show_default=True, help="Models loaded at once in the server-load runs (W1, W2, ...).")
@click.option("--p99-bound-ms", default=50.0, show_default=True, type=click.FloatRange(0.1),
              help="Latency bound for the sustained request rate.")
@click.option("--step-s", default=2.0, show_default=True, type=click.FloatRange(0.2, 60),
              help="Seconds per offered-rate step.")
@click.option("--per-device-hz", default=1.0, show_default=True, type=click.FloatRange(0.001),
              help="Samples per second per device, for 'devices one server supports'.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Dataset directory.")
@click.option("--secure", is_flag=True,
              help="Run everything over TLS with one identity per device and server (a broker-config deployment "
                   "with its own CA on the private broker), to measure what TLS and the broker's checks cost.")
@click.option("--plan", "plan_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Instead: deploy this plan (ddnngen plan -o) of the one MODEL, with its links emulated, and print "
                   "what it measures per tier and hop next to what the planner predicted.")
@click.option("--emulate-links/--no-emulate-links", default=True, show_default=True,
              help="With --plan: hold and pace every hop's bytes as the plan's links would (round trip, bandwidth).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON with every number to stdout.")
def bench(models: tuple[Path, ...], out_dir: Path, samples: int, thresholds: tuple[float, ...],
          workloads: tuple[int, ...], p99_bound_ms: float, step_s: float, per_device_hz: float, data_dir: str | None,
          secure: bool, plan_path: Path | None, emulate_links: bool, as_json: bool) -> None:
    """Measure MODELS end to end (C device program, Mosquitto, ddnn-server): time decomposition, accuracy
    and exit rates per threshold, bytes on the wire, server load; writes Markdown tables, JSON and PNGs.
    With --plan: one model deployed as planned (device, edge, cloud), measured against the plan's prediction."""
    if plan_path is not None:
        _bench_plan(models, plan_path, out_dir, samples, data_dir, emulate_links, secure, as_json)
        return
    from ddnn_gen.bench.report import write_report
    from ddnn_gen.bench.system import BenchConfig, clean_json, run_bench, write_json

    config = BenchConfig(models=list(models), out_dir=out_dir, samples=samples, thresholds=tuple(thresholds),
                         workloads=tuple(workloads), step_s=step_s, p99_bound_ms=p99_bound_ms,
                         per_device_hz=per_device_hz, data_dir=data_dir, secure=secure)
    result = run_bench(config)
    json_path = out_dir / "bench_system.json"
    write_json(result, json_path)
    files = write_report(clean_json(result), out_dir)
    if as_json:
        click.echo(json.dumps(clean_json(result), indent=1))
    else:
        click.echo(files["tables"].read_text())
    click.echo(f"wrote {json_path}, " + ", ".join(str(path) for path in files.values()), err=True)


def _bench_plan(models: tuple[Path, ...], plan_path: Path, out_dir: Path, samples: int, data_dir: str | None,
                emulate_links: bool, secure: bool, as_json: bool) -> None:
    from ddnn_gen.bench.plan_run import run_plan
    from ddnn_gen.bench.system import clean_json

    if len(models) != 1:
        raise click.UsageError("--plan benches one model: give the model the plan is for")
    if secure:
        raise click.UsageError("--plan runs on a plain private broker (an edge on a secured one is not supported "
                               "yet; docs/security.md)")
    result = run_plan(models[0], plan_path, samples, data_dir, emulate_links)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench_plan.json"
    json_path.write_text(json.dumps(clean_json(result.to_json()), indent=1))
    click.echo(json.dumps(clean_json(result.to_json()), indent=1) if as_json else result.table())
    click.echo(f"wrote {json_path}", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(bench)
