"""Operation commands: ``control`` (the load-driven threshold controller on a running fleet)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import click

from ddnn_gen.commands.options import broker_options
from ddnn_gen.wire.connection import BrokerConnection

log = logging.getLogger(__name__)


@click.command("control")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--target-p99-ms", type=click.FloatRange(0.1, 600000), default=None,
              help="Keep the devices' p99 round trip under this many ms.")
@click.option("--max-load", type=click.FloatRange(0.01, 1.0), default=None,
              help="Keep the servers' load under this share of their capacity.")
@click.option("--capacity", type=click.FloatRange(min=0.1), default=None,
              help="Requests/s the servers sustain, as measured (bench/bench_server.py, bench/bench_control.py); "
                   "default: estimated from the servers' telemetry (served rate over the workers' busy share, an "
                   "upper bound where the network thread rather than the forward pass limits).")
@click.option("--t-min", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Never publish a threshold below this.")
@click.option("--t-max", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Never publish a threshold above this.")
@click.option("--threshold", "start", type=click.FloatRange(0, 1), default=None,
              help="Threshold to start from (default: the model's stored one).")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Seconds between decisions (the telemetry interval is a good choice).")
@click.option("--duration", type=click.FloatRange(0, 10**7), default=0.0,
              help="Stop after this many seconds (0: run until SIGINT/SIGTERM).")
@click.option("--per-device", is_flag=True,
              help="Give each device its own threshold (for devices whose data differ): raise first where it "
                   "buys the most offload per point of accuracy, judged from each device's observed exit rate "
                   "(docs/operation.md).")
@click.option("--tier", default="device", show_default=True,
              help="Whose exit to move: the devices', or a server tier's (an edge's: by name, kind `edge` or "
                   "index). A tier's exit is moved against the load on the tier above it (an edge's against the "
                   "cloud's; --capacity is then the tier above's), from the requests reaching it as its servers' "
                   "telemetry counts them; run one controller per hop.")
@broker_options(address_help="MQTT broker (as a user with the operator role, where the broker has roles).")
def control(model: str, target_p99_ms: float | None, max_load: float | None, capacity: float | None, t_min: float,
            t_max: float, start: float | None, interval: float, duration: float, per_device: bool, tier: str,
            broker: BrokerConnection) -> None:
    """Keep MODEL's servers at a target by moving the model's device-exit threshold along its calibration
    curve (stored by `ddnngen calibrate`): higher (more local exits) when overloaded, lower (more accurate)
    when there is room, never outside [--t-min, --t-max]; with --per-device, each device's. Each decision is
    logged (-v). Its retained state says "offline" once it stops or dies."""
    from ddnn_gen.model.modelfile import load_model
    from ddnn_gen.ops.allocation import DeviceThresholdController
    from ddnn_gen.ops.controller import ControlError, Curve, ThresholdController
    from ddnn_gen.ops.live import Controller, LiveController

    if (target_p99_ms is None) == (max_load is None):
        raise click.UsageError("give exactly one of --target-p99-ms and --max-load")
    if t_min > t_max:
        raise click.BadParameter(f"--t-min {t_min} is above --t-max {t_max}", param_hint="--t-min")
    from ddnn_gen.commands.network_commands import tier_index

    logging.getLogger("ddnn_gen.ops.live").setLevel(logging.INFO)  # each decision is logged, -v or not
    loaded = load_model(model)
    exit_index = tier_index(loaded.spec, tier)
    if exit_index and per_device:
        raise click.UsageError("--per-device moves the devices' own exits; a server tier's exit is moved model-wide "
                               "(its servers count requests per model, not per device)")
    try:
        curve = Curve.for_hop(loaded.spec.calibration, exit_index)
    except ControlError as error:
        raise click.ClickException(str(error)) from error
    initial = loaded.spec.thresholds[exit_index] if start is None else start

    def make(measured: float) -> Controller:
        kind = DeviceThresholdController if per_device else ThresholdController
        return kind(curve, measured, initial, t_min=t_min, t_max=t_max, max_load=max_load,
                    target_p99_ms=target_p99_ms)

    try:
        controller = make(capacity) if capacity is not None else None
    except ControlError as error:
        raise click.ClickException(str(error)) from error
    live = LiveController(broker, loaded.hash_bytes, controller, interval, make, tier=exit_index).start()
    target = f"p99 under {target_p99_ms} ms" if target_p99_ms is not None else f"load under {max_load} of capacity"
    where = f" tier {exit_index} ({loaded.spec.tiers[exit_index].name}) against tier {exit_index + 1}'s load" \
        if exit_index else ""
    click.echo(f"ddnngen control: {loaded.spec.name}{where} on {broker.url}: {target}, threshold in [{t_min}, "
               f"{t_max}], every {interval} s", err=True)
    _wait_for_signal(duration)
    live.stop()
    final = live.published if live.published is not None else initial
    if live.decisions:
        expected = f", expected accuracy {100 * live.decisions[-1][2].expected_accuracy:.2f} %"
    else:
        expected = f", expected accuracy {100 * curve.accuracy_at(final):.2f} %"
    devices = "".join(f"; {device_id} {value:.4f}" for device_id, value in sorted(live.published_devices.items()))
    click.echo(f"ddnngen control: {len(live.decisions)} decisions, threshold now {final:.4f}{expected}{devices}",
               err=True)


@click.command("dashboard")
@click.option("--http", "port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="Port of the operator's page.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address the page binds to (loopback: reach it through an SSH tunnel or a proxy that "
                   "authenticates the operator).")
@click.option("--model", "models", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A model file (repeatable): its calibration curve gives the accuracy expected at the thresholds "
                   "in force.")
@broker_options(address_help="MQTT broker (as a user with the operator role, where the broker has roles).")
def dashboard(port: int, address: str, models: tuple[str, ...], broker: BrokerConnection) -> None:
    """Serve the operator's live view of the fleet: devices online/offline with their exit rates and
    thresholds, servers' load and latency (server-sent events from the MQTT telemetry), the controller's
    target and decisions, the accuracy expected at the thresholds in force (for the --model files); its forms
    set a device's, a model's or an edge tier's retained threshold and the controller's target."""
    from ddnn_gen.ops.dashboard import Dashboard, model_info

    view = Dashboard(broker, tuple(model_info(path) for path in models)).start(port, address)
    click.echo(f"ddnngen dashboard: {view.url} (fleet on {broker.url})", err=True)
    _wait_for_signal(0.0)
    view.stop()


def _wait_for_signal(duration: float) -> None:
    """Until SIGINT/SIGTERM, or ``duration`` seconds when that is not 0."""
    stop = threading.Event()

    def _signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    ends = time.monotonic() + duration if duration else None
    while not stop.wait(0.2):
        if ends is not None and time.monotonic() >= ends:
            break


def register(cli: click.Group) -> None:
    cli.add_command(control)
    cli.add_command(dashboard)
