"""``ddnngen broker-config``: a Mosquitto deployment with TLS, passwords and per-role authorization."""

from __future__ import annotations

from pathlib import Path

import click

from ddnn_gen.wire import topics
from ddnn_gen.wire.connection import DEFAULT_TLS_PORT

_file = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.command("broker-config")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (created; passwords already there are kept).")
@click.option("--roles", "roles_file", type=_file, default=None,
              help="File of 'ROLE NAME' lines (roles: device, server, edge, aggregator, operator, monitor; # "
                   "comments).")
@click.option("--device", "devices", multiple=True, help="A device id (repeatable).")
@click.option("--server", "servers", multiple=True, help="A server's user name = its --server-id (repeatable).")
@click.option("--edge", "edges", multiple=True,
              help="An edge server's user name = its --server-id (repeatable); NAME-up is made with it, for its "
                   "session towards the tier above (--upstream-username).")
@click.option("--aggregator", "aggregators", multiple=True,
              help="An aggregator's user name = its --server-id (repeatable): a server's rules, an edge's tier "
                   "thresholds, and NAME-up for its session towards the cloud when its model has one.")
@click.option("--operator", "operators", multiple=True, help="A user who may set thresholds (repeatable).")
@click.option("--monitor", "monitors", multiple=True,
              help="A user who may read everything, requests and replies included (repeatable).")
@click.option("--port", default=DEFAULT_TLS_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address the TLS listener binds.")
@click.option("--hostname", "hostnames", multiple=True,
              help="Name or address clients use to reach the broker, for the certificate this command makes "
                   "(repeatable; default localhost and 127.0.0.1).")
@click.option("--ca-file", type=_file, default=None, help="Your CA certificate (with --cert-file/--key-file).")
@click.option("--cert-file", type=_file, default=None, help="The broker's certificate (default: make a private CA "
                                                            "and one, in OUT/certs/).")
@click.option("--key-file", type=_file, default=None, help="The broker certificate's private key.")
@click.option("--client-certificates", is_flag=True,
              help="Clients log in with certificates (common name = user name) instead of passwords; with the "
                   "private CA, one is made per user in OUT/certs/clients/.")
@click.option("--install-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where OUT will be on the broker host, when it is copied there (paths in mosquitto.conf).")
@click.option("--dynsec-plugin", type=_file, default=None,
              help="Mosquitto's mosquitto_dynamic_security.so (default: found under /usr/lib).")
def broker_config(out_dir: Path, roles_file: Path | None, devices: tuple[str, ...], servers: tuple[str, ...],
                  edges: tuple[str, ...], aggregators: tuple[str, ...], operators: tuple[str, ...],
                  monitors: tuple[str, ...], port: int, bind: str,
                  hostnames: tuple[str, ...], ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
                  client_certificates: bool, install_dir: Path | None, dynsec_plugin: Path | None) -> None:
    """Write a Mosquitto 2 deployment to OUT: mosquitto.conf (TLS listener, no anonymous clients), passwd
    ($7$ PBKDF2-SHA512), dynamic-security.json (what each role may publish, subscribe to and receive),
    credentials/NAME.password for every user, and certs/ unless you bring your own. docs/security.md
    explains the roles and how to deploy."""
    from ddnn_gen.wire.deployment import ROLES, UPSTREAM_OWNERS, add_user, make_deployment, parse_roles, upstream_name

    users = parse_roles(roles_file.read_text(), str(roles_file)) if roles_file else {}
    for role, names in (("device", devices), ("server", servers), ("edge", edges), ("aggregator", aggregators),
                        ("operator", operators), ("monitor", monitors)):
        for name in names:
            add_user(users, name, role, f"--{role}")
    if "device" not in users.values() or not {"server", "edge", "aggregator"} & set(users.values()):
        raise click.UsageError("a deployment needs at least one device and one server, edge or aggregator (--roles, "
                               "--device, --server, --edge, --aggregator)")
    deployment = make_deployment(out_dir, users, server_names=list(hostnames), ca_file=ca_file, cert_file=cert_file,
                                 key_file=key_file, port=port, bind=bind, client_certificates=client_certificates,
                                 plugin=dynsec_plugin, install_dir=install_dir)
    counts = ", ".join(f"{sum(1 for r in users.values() if r == role)} {role}" for role in ROLES)
    click.echo(f"wrote {deployment.conf_path} ({counts}); start it with: mosquitto -c {deployment.conf_path}")
    if not client_certificates:
        click.echo(f"each client's password: {deployment.directory / 'credentials'}/NAME.password "
                   "(--username NAME --password-file FILE)")
    elif deployment.client_certs:
        click.echo(f"client certificates: {deployment.directory / 'certs' / 'clients'}/NAME.crt and NAME.key "
                   "(--cert FILE --key FILE)")
    for edge in sorted(name for name, role in users.items() if role in UPSTREAM_OWNERS):
        click.echo(f"{users[edge]} {edge}: towards the tier above as {upstream_name(edge)} (ddnn-server "
                   f"--upstream-username {upstream_name(edge)} --upstream-password-file ...)")
    click.echo(f"clients trust {deployment.ca_file} (--ca-file); device ids and user names: {topics.DEVICE_ID_RULE}")


def register(cli: click.Group) -> None:
    cli.add_command(broker_config)
