"""Network commands: ``threshold set|clear``, ``device-sim`` and ``demo``."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from ddnn_gen.codegen.toolchain import have_tool
from ddnn_gen.commands.options import (
    THRESHOLD,
    THRESHOLD_HELP,
    broker_options,
    check_dataset_shape,
    data_dir_option,
)
from ddnn_gen.model import datasets
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.connection import BrokerConnection
from ddnn_gen.wire.retained import publish_retained


def model_wire_hash(model: str) -> bytes:
    """A model file's 16 wire hash bytes, or the bytes of a 32-hex-digit key given directly."""
    if re.fullmatch(r"[0-9a-fA-F]{32}", model) and not Path(model).exists():
        return bytes.fromhex(model)
    from ddnn_gen.model.modelfile import load_model

    return load_model(model).hash_bytes


@click.group("threshold")
def threshold_group() -> None:
    """Change exit thresholds of running devices and edges (retained MQTT messages)."""


_tier_option = click.option("--tier", default="device", show_default=True,
                            help="Whose exit: the device's, or an edge tier's, by name or kind (edge) or index (1, "
                                 "2, ... with a 32-hex model hash).")


def tier_index(spec: Any, tier: str) -> int:
    """The index of ``spec``'s tier named ``tier`` (device, a name or kind, or an index), one that has a
    threshold (not the last: its exit is final); else click's usage error."""
    if tier in ("device", "0"):
        return 0
    if tier.isdigit():
        index = int(tier)
    else:
        matches = [i for i, t in enumerate(spec.tiers) if tier in (t.name, t.kind)]
        if not matches:
            raise click.BadParameter(f"{spec.name} has no tier {tier!r}; its tiers: "
                                     f"{', '.join(t.name for t in spec.tiers)}", param_hint="--tier")
        index = matches[0]
    if index >= len(spec.tiers) - 1:
        raise click.BadParameter(f"tier {tier!r} is {spec.name}'s last: its exit is final, it has no threshold",
                                 param_hint="--tier")
    return index


def threshold_topic_for(model: str, tier: str, device_id: str | None) -> str:
    """The retained topic of MODEL's exit at ``tier`` (the device's by default), model-wide or one device's."""
    model_hash = model_wire_hash(model)
    if tier in ("device", "0"):
        return topics.threshold_topic(model_hash, device_id)
    if tier.isdigit():
        index = int(tier)
    else:
        if not Path(model).exists():
            raise click.BadParameter(f"{tier!r}: name tiers by index when MODEL is a wire hash", param_hint="--tier")
        from ddnn_gen.model.modelfile import load_model

        index = tier_index(load_model(model).spec, tier)
    if index == 0:
        return topics.threshold_topic(model_hash, device_id)
    try:
        return topics.tier_threshold_topic(model_hash, index, device_id)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--tier") from error


# ignore_unknown_options: a negative VALUE such as -0.2 reaches the threshold check (and its message)
# instead of being read as an unknown option "-0".
@threshold_group.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("model")
@click.argument("value", type=THRESHOLD)
@click.option("--device", "device_id", default=None, help="Only this device (default: every device of the model).")
@_tier_option
@broker_options(address_help="MQTT broker (as a user with the operator role, where the broker has roles).")
def threshold_set(model: str, value: float, device_id: str | None, tier: str, broker: BrokerConnection) -> None:
    """Publish VALUE (a number in [0, 1]) as the retained threshold of MODEL (model file or 32-hex wire
    hash); devices (or, with --tier, edges) apply it to the next samples."""
    topic = threshold_topic_for(model, tier, device_id)
    payload = codec.encode_threshold(value)
    publish_retained(broker, topic, payload)
    click.echo(f"{topic} = {payload.decode()}")


@threshold_group.command("clear")
@click.argument("model")
@click.option("--device", "device_id", default=None, help="Only this device's override.")
@_tier_option
@broker_options(address_help="MQTT broker (as a user with the operator role, where the broker has roles).")
def threshold_clear(model: str, device_id: str | None, tier: str, broker: BrokerConnection) -> None:
    """Remove a retained threshold: devices go back to the model-wide one or their built-in default."""
    topic = threshold_topic_for(model, tier, device_id)
    publish_retained(broker, topic, b"")
    click.echo(f"{topic} cleared")


@click.command("device-sim")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@broker_options(address_help="MQTT broker.")
@click.option("--credentials", "credentials_dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Folder of <device-id>.password files (the credentials/ folder broker-config writes): each "
                   "simulated device logs in as its own id. Replaces --username/--password-file.")
@click.option("--device-prefix", default="sim", show_default=True,
              help="Device ids are PREFIX0, PREFIX1, ...")
@click.option("--devices", default=4, show_default=True, type=click.IntRange(1, 1000))
@click.option("--requests", default=100, show_default=True, type=click.IntRange(1), help="Samples per device.")
@click.option("--dataset", default=None, type=click.Choice(datasets.DATASETS),
              help="Dataset (default: the one the model was trained on).")
@click.option("--count", default=1000, show_default=True, type=click.IntRange(1), help="Test samples to draw from.")
@data_dir_option
@click.option("--timeout-ms", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--window", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Requests each device keeps in flight.")
@click.option("--all-to-server", is_flag=True, help="Send every sample to the server (load tests).")
@click.option("--impl", type=click.Choice(["c", "numpy"]), default=None,
              help="Device part: the generated C called in-process (cffi; default when a C compiler is present) "
                   "or the NumPy reference computed beforehand.")
@click.option("--also-broker", "also_brokers", multiple=True, metavar="HOST:PORT",
              help="Another node of the broker's cluster (repeatable; same TLS and credentials): device i starts "
                   "on node i mod N and fails over to the next (docs/deployment.md).")
@click.option("--mqtt-version", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True,
              help="3.1.1 for RabbitMQ's MQTT plugin.")
@click.option("--subscribe-qos", type=click.IntRange(0, 1), default=1, show_default=True,
              help="QoS of the reply and threshold subscriptions; 0 on a RabbitMQ cluster.")
def device_sim(model: str, broker: BrokerConnection, credentials_dir: str | None, device_prefix: str, devices: int,
               requests: int, dataset: str | None, count: int, data_dir: str | None, timeout_ms: int, window: int,
               all_to_server: bool, impl: str | None, also_brokers: tuple[str, ...], mqtt_version: str,
               subscribe_qos: int) -> None:
    """Simulate DEVICES devices running MODEL's device part against ddnn-server."""
    from ddnn_gen.device.simulated import precomputed, simulate
    from ddnn_gen.fold.program import fold
    from ddnn_gen.fold.reference import run_device
    from ddnn_gen.model.modelfile import load_model

    if not topics.valid_device_id(f"{device_prefix}{devices - 1}"):
        raise click.BadParameter(f"{device_prefix!r} makes invalid device ids: {topics.DEVICE_ID_RULE}",
                                 param_hint="--device-prefix")
    import dataclasses

    import paho.mqtt.client as mqtt

    from ddnn_gen.wire.connection import ConnectionConfigError, parse_address

    nodes = [broker]
    for address in also_brokers:
        try:
            host, port = parse_address(address, broker.port)
        except ConnectionConfigError as error:
            raise click.BadParameter(str(error), param_hint="--also-broker") from error
        nodes.append(dataclasses.replace(broker, host=host, port=port))
    folder = Path(credentials_dir) if credentials_dir is not None else None

    def connection(device_id: str) -> list[BrokerConnection]:
        first = int(device_id[len(device_prefix):]) % len(nodes)
        order = nodes[first:] + nodes[:first]
        if folder is None:
            return order
        return [node.as_user(device_id, folder / f"{device_id}.password").check() for node in order]

    connection(f"{device_prefix}0")  # a missing file is a one-line error before anything starts
    loaded = load_model(model)
    program = fold(loaded)
    dataset = dataset or loaded.spec.dataset
    if not dataset:
        raise click.UsageError(f"{model} names no dataset; pass --dataset")
    data = datasets.load(dataset, "test", data_dir)
    check_dataset_shape(loaded.spec, data)
    images = data.images[:count]
    impl = impl or ("c" if have_tool("cc") or have_tool("gcc") else "numpy")
    if impl == "c":
        from ddnn_gen.device import c_binding

        device_part = c_binding.load(program).answers(images)
    else:
        result = run_device(program, images)
        device_part = precomputed(result.split_words, result.entropy, result.local_class)
    report = simulate(connection, program, loaded.hash_bytes, device_part, len(images), devices, requests,
                      timeout_s=timeout_ms / 1000, window=window, all_to_server=all_to_server,
                      device_prefix=device_prefix, subscribe_qos=subscribe_qos,
                      protocol=mqtt.MQTTv311 if mqtt_version == "3.1.1" else mqtt.MQTTv5)
    labels = data.labels[:count]
    correct = sum(1 for o in report.outcomes if o.final_class == labels[o.index])
    sent = [o for o in report.outcomes if o.source != "local"]
    rtt = np.array([o.t_round_trip_us for o in sent if o.source == "server"], dtype=np.float64)
    click.echo(f"samples {len(report.outcomes)} in {report.wall_s:.2f} s: " + ", ".join(
        f"{source} {report.count(source)}" for source in ("local", "server", "fallback", "error")))
    click.echo(f"accuracy {correct / max(1, len(report.outcomes)):.4f}; duplicates {report.duplicates}, "
               f"misrouted {report.misrouted}")
    if impl == "c":
        device_us = np.array([o.t_device_us for o in report.outcomes], dtype=np.float64)
        click.echo(f"device part (generated C, in-process) us per sample: median {np.median(device_us):.0f}")
    if len(rtt):
        click.echo(f"round trip us: median {np.median(rtt):.0f}, p99 {np.percentile(rtt, 99):.0f}; "
                   f"server requests/s {len(rtt) / report.wall_s:.0f}")


@click.command("demo")
@click.option("--model", "model_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Model file (default: the shipped Fashion-MNIST model).")
@click.option("--count", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--threshold", default=None, type=THRESHOLD, help=f"Local-exit threshold {THRESHOLD_HELP}.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--timeout-ms", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--secure", is_flag=True,
              help="Private Mosquitto with TLS and per-role credentials (a broker-config deployment with its own "
                   "CA in a temp dir): device and server each log in as themselves.")
@broker_options(default=None, address_help="Use this broker instead of a private Mosquitto (device and server "
                                           "then share these credentials).")
def demo(model_path: str | None, count: int, threshold: float | None, workers: int, timeout_ms: int, secure: bool,
         broker: BrokerConnection | None) -> None:
    """Whole path: C device program -> MQTT -> ddnn-server, on real test images."""
    from ddnn_gen.bench.demo import DEFAULT_MODEL, run_demo

    if secure and broker is not None:
        raise click.UsageError("--secure starts its own broker: leave out --broker")
    started = time.monotonic()
    where = broker.url if broker else (("a private TLS Mosquitto with per-role credentials" if secure else
                                        "a private Mosquitto") + " on a free loopback port")
    click.echo(f"{model_path or DEFAULT_MODEL}: compiling the device part to C, building the networked device "
               f"program, starting ddnn-server ({workers} workers) on {where}, classifying {count} test images...")
    report = run_demo(model_path, count, threshold, workers=workers, timeout_ms=timeout_ms, broker=broker,
                      secure=secure)
    click.echo(report.table())
    click.echo(f"demo took {time.monotonic() - started:.1f} s")


def register(cli: click.Group) -> None:
    cli.add_command(threshold_group)
    cli.add_command(device_sim)
    cli.add_command(demo)
