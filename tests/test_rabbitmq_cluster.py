"""`ddnngen cluster up|down`: a real 3-node RabbitMQ cluster in a temp dir, users and queues as documented,
and nothing left running after `down`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddnn_gen.cli import cli
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire import topics
from ddnn_gen.wire.broker import port_open
from ddnn_gen.wire.rabbitmq_cluster import RabbitCluster, password_hash, permissions_for, rabbitmq_sbin

pytestmark = pytest.mark.skipif(rabbitmq_sbin() is None,
                                reason="rabbitmq-server not installed (make setup installs it)")


def test_password_hash_is_rabbitmqs_sha256_format() -> None:
    import base64
    import hashlib

    encoded = password_hash("secret", b"\x01\x02\x03\x04")
    raw = base64.b64decode(encoded)
    assert raw[:4] == b"\x01\x02\x03\x04" and raw[4:] == hashlib.sha256(b"\x01\x02\x03\x04secret").digest()


def test_device_topic_permissions_are_its_own() -> None:
    import re

    _, topic = permissions_for("cam0", "device")
    write = re.compile(topic["write"].replace("{username}", "cam0"))
    read = re.compile(topic["read"].replace("{username}", "cam0"))
    model = "0" * 32
    assert write.fullmatch(f"ddnn.req.{model}.cam0") and write.fullmatch("ddnn.status.cam0")
    assert not write.fullmatch(f"ddnn.req.{model}.cam1") and not write.fullmatch("ddnn.reply.cam0")
    assert not write.fullmatch(f"ddnn.req.{model}.cam0.t2") and not write.fullmatch(f"ddnn.threshold.{model}")
    assert write.fullmatch("ddnn.device.cam0.telemetry") and not write.fullmatch("ddnn.device.cam1.telemetry")
    assert not write.fullmatch("ddnn.server.cam0.telemetry")
    assert read.fullmatch("ddnn.reply.cam0") and read.fullmatch(f"ddnn.threshold.{model}.cam0")
    assert not read.fullmatch("ddnn.reply.cam1") and not read.fullmatch(f"ddnn.req.{model}.cam0")


def test_cluster_up_status_down(tmp_path: Path, fmnist_model_path: Path) -> None:
    directory = tmp_path / "cluster"
    runner = CliRunner()
    result = runner.invoke(cli, ["cluster", "up", "--nodes", "3", "--dir", str(directory), "--models",
                                 str(fmnist_model_path), "--device", "cam0", "--server", "srv1"])
    try:
        assert result.exit_code == 0, result.output
        found = RabbitCluster.load(directory)
        names = sorted(node.name for node in found.nodes)
        assert len(set(names)) == 3
        ports = [port for node in found.nodes for port in (node.amqp_port, node.mqtt_port, node.dist_port)]
        assert len(set(ports)) == 9 and all(port_open(port) for port in ports)
        status = runner.invoke(cli, ["cluster", "status", "--dir", str(directory)])
        assert status.exit_code == 0, status.output
        assert status.output.split() == ["running:", *names]
        queues = json.loads(found.ctl("list_queues", "name", "type", "durable", "members", "--formatter", "json"))
        queue = topics.request_queue(load_model(fmnist_model_path).hash_bytes)
        [entry] = [q for q in queues if q["name"] == queue]
        assert entry["type"] == "quorum" and entry["durable"] and sorted(entry["members"]) == names
        users = {u["user"] for u in json.loads(found.ctl("list_users", "--formatter", "json"))}
        assert {"cam0", "srv1"} <= users and "guest" not in users
        pids = [found.pid(node.index) for node in found.nodes]
        assert all(pid is not None for pid in pids)
        assert oct((directory / "credentials" / "cam0.password").stat().st_mode & 0o777) == "0o600"
    finally:
        down = runner.invoke(cli, ["cluster", "down", "--dir", str(directory)])
    assert down.exit_code == 0, down.output
    assert not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in pids)
    assert not any(port_open(port) for port in [*ports, found.epmd_port])


def test_amqp_urls_keep_passwords_off_the_command_line(tmp_path: Path) -> None:
    from ddnn_gen.wire.connection import ConnectionConfigError
    from ddnn_server.amqp_transport import parse_amqp_url

    secret = tmp_path / "srv1.password"
    secret.write_text("s3cret\n")
    endpoint = parse_amqp_url("amqp://srv1@127.0.0.1:5673/%2F", secret)
    assert (endpoint.host, endpoint.port, endpoint.vhost, endpoint.username) == ("127.0.0.1", 5673, "/", "srv1")
    assert endpoint.parameters().credentials.password == "s3cret"
    assert parse_amqp_url("amqp://srv1@example.org").port == 5672
    for bad in ("amqp://srv1:s3cret@127.0.0.1/", "amqp://127.0.0.1/", "http://srv1@127.0.0.1/", "amqp://srv1@:1/"):
        with pytest.raises(ConnectionConfigError):
            parse_amqp_url(bad)
