"""``ddnngen cluster up|down|status``: a RabbitMQ cluster on this machine (ddnn_gen/wire/rabbitmq_cluster.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ddnn_gen.wire.deployment import add_user, parse_roles

_dir = click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
                    help="The cluster's folder: nodes' config, data and logs, credentials, cluster.json.")


@click.group("cluster")
def cluster() -> None:
    """A RabbitMQ cluster on this machine: devices on MQTT 3.1.1, servers on AMQP (docs/deployment.md)."""


@cluster.command("up")
@_dir
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--models", "models_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Model file or folder of *.npz: a quorum queue per model (ddnn.req.<model>).")
@click.option("--roles", "roles_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="File of 'ROLE NAME' lines, as for broker-config (device, server, operator, monitor).")
@click.option("--device", "devices", multiple=True, help="A device id (repeatable).")
@click.option("--server", "servers", multiple=True, help="A server's user name (repeatable).")
@click.option("--operator", "operators", multiple=True, help="A user who may set thresholds (repeatable).")
def up(directory: Path, nodes: int, models_path: Path | None, roles_file: Path | None, devices: tuple[str, ...],
       servers: tuple[str, ...], operators: tuple[str, ...]) -> None:
    """Start NODES RabbitMQ nodes in DIR, join them into one cluster, enable MQTT, create the users and the
    request queues; the nodes keep running until `ddnngen cluster down --dir DIR`."""
    from ddnn_gen.model.modelfile import load_model
    from ddnn_gen.wire.rabbitmq_cluster import RabbitCluster

    users = parse_roles(roles_file.read_text(), str(roles_file)) if roles_file else {}
    for role, names in (("device", devices), ("server", servers), ("operator", operators)):
        for name in names:
            add_user(users, name, role, f"--{role}")
    paths = [] if models_path is None else sorted(models_path.glob("*.npz")) if models_path.is_dir() else [models_path]
    models = [(load_model(path).hash_bytes, 1) for path in paths]
    found = RabbitCluster(directory, nodes, users, models).up()
    for node in found.nodes:
        click.echo(f"{node.name}: AMQP {found.host}:{node.amqp_port}, MQTT {found.host}:{node.mqtt_port}")
    click.echo(f"users' passwords: {directory / 'credentials'}/NAME.password; stop with: ddnngen cluster down "
               f"--dir {directory}")


@cluster.command("status")
@_dir
def status(directory: Path) -> None:
    """The running nodes, as the cluster's first reachable node reports them."""
    from ddnn_gen.wire.rabbitmq_cluster import ClusterError, RabbitCluster

    found = RabbitCluster.load(directory)
    for node in found.nodes:
        try:
            click.echo("running: " + " ".join(sorted(found.running_nodes(node.index))))
            return
        except ClusterError:
            continue
    raise ClusterError(f"no node of the cluster in {directory} answers")


@cluster.command("down")
@_dir
def down(directory: Path) -> None:
    """Stop every node of the cluster in DIR and its epmd (the folder stays, with logs and credentials)."""
    from ddnn_gen.wire.rabbitmq_cluster import RabbitCluster

    RabbitCluster.load(directory).down()
    click.echo(f"stopped the cluster in {directory}")


def register(cli: click.Group) -> None:
    cli.add_command(cluster)
