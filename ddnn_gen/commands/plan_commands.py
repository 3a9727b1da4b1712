"""``ddnngen plan``: where to cut a model between device, edge and cloud, and at which thresholds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from ddnn_gen.commands.options import check_dataset_shape, data_dir_option, writable_file

log = logging.getLogger(__name__)


@click.command("plan")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--link", "link_texts", multiple=True, required=True, metavar="HOP=RTT_MS:MBPS",
              help="A hop's round trip and bandwidth: device-edge, device-cloud or edge-cloud, e.g. "
                   "--link device-edge=2:50 --link edge-cloud=40:10. Placements that need a missing hop are "
                   "not considered.")
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Tier compute times recorded earlier (--save-profile); default: measure on this host.")
@click.option("--device-bench", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The stderr of `ddnn_device SAMPLES --bench` run on the real board: its per-sample total "
                   "replaces the device time.")
@click.option("--save-profile", type=click.Path(dir_okay=False), default=None, help="Write the profile used.")
@click.option("--max-latency-ms", type=click.FloatRange(0, min_open=True), default=None,
              help="Mean latency per sample the plan may not exceed.")
@click.option("--min-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Overall accuracy the plan must reach; then the fastest such plan wins.")
@click.option("--max-uplink-bytes", type=click.FloatRange(0), default=None,
              help="Bytes per sample the device may send (requests and replies), on average.")
@click.option("--count", type=click.IntRange(100), default=2000, show_default=True,
              help="Test samples the accuracy and latency predictions are computed on.")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Rows of the candidate table.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None, help="Write the chosen plan (JSON).")
@data_dir_option
def plan_command(model: str, link_texts: tuple[str, ...], profile_path: str | None, device_bench: str | None,
                 save_profile: str | None, max_latency_ms: float | None, min_accuracy: float | None,
                 max_uplink_bytes: float | None, count: int, top: int, out: str | None, data_dir: str | None) -> None:
    """Predict accuracy, mean and p99 latency, bytes per hop and device memory for every placement of MODEL's
    tiers on device, edge and cloud and every threshold choice at the cuts, from an evaluation on real test
    data, measured compute times and the links given; print the best and write it as a plan."""
    from ddnn_gen.codegen.toolchain import parse_bench
    from ddnn_gen.fold.exits import compute_outputs
    from ddnn_gen.model import datasets
    from ddnn_gen.model.modelfile import load_model
    from ddnn_gen.plan import candidates, profiles

    links = dict(profiles.parse_link(text) for text in link_texts)
    for path, option in ((out, "-o"), (save_profile, "--save-profile")):
        if path is not None:
            writable_file(path, option)
    loaded = load_model(model)
    data = datasets.load(loaded.spec.dataset, "test", data_dir).subset(count)
    check_dataset_shape(loaded.spec, data)
    times = (profiles.TierTimes.read(profile_path, loaded) if profile_path
             else profiles.measure(loaded, data.images[:200]))
    if device_bench is not None:
        bench = parse_bench(Path(device_bench).read_text(errors="replace"))
        if "total" not in bench:
            raise profiles.PlanError(f"{device_bench}: no 'total us_per_sample=' line (ddnn_device --bench output)")
        times.device_us, times.source = bench["total"], f"device from {device_bench}, servers measured here"
        times.device_stage_us = {key: value for key, value in bench.items() if key not in ("total", "stages_total")}
    if save_profile:
        Path(save_profile).write_text(json.dumps(times.to_json(), indent=1))
    outputs = compute_outputs(loaded, data)
    predictions = candidates.candidates(loaded.spec, outputs, times, links)
    chosen = candidates.choose(predictions, max_latency_ms, min_accuracy, max_uplink_bytes)
    ranked = sorted(predictions, key=lambda p: (-p.accuracy, p.mean_ms))[:top]
    click.echo(f"{loaded.spec.name}: {len(predictions)} candidate plans on {len(data)} test samples; device "
               f"{times.device_us:.1f} us, server tiers " + ", ".join(f"{us:.0f}" for us in times.server_us)
               + f" us ({times.source})")
    click.echo(f"{'placement':<26} {'thresholds':<22} {'accuracy':>8} {'mean ms':>8} {'p99 ms':>8} {'uplink B':>9}")
    for row in ranked + ([chosen] if chosen not in ranked else []):
        thresholds = "/".join("off" if t is None else f"{t:.3f}" for t in row.thresholds)
        mark = "  <- chosen" if row is chosen else ""
        click.echo(f"{row.label():<26} {thresholds:<22} {100 * row.accuracy:7.2f}% {row.mean_ms:8.2f} "
                   f"{row.p99_ms:8.2f} {row.uplink_bytes:9.1f}{mark}")
    if out:
        plan = candidates.plan_json(loaded.spec, loaded.content_hash, chosen, links, times)
        Path(out).write_text(json.dumps(plan, indent=1))
        click.echo(f"wrote {out}")


def register(cli: click.Group) -> None:
    cli.add_command(plan_command)
