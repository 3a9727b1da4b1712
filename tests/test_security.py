"""Trust on the broker, against a real Mosquitto with the TLS listener, password file and authorization rules
that `ddnngen broker-config` writes: what each role may do, what device A cannot do to device B (and that
B's run is unaffected while A tries), credentials and certificates, and the server's bounded queues."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_tool
from net_harness import (
    Expected,
    RawClient,
    ServerProcess,
    run_one_device,
    secure_broker,
    serving,
    wait_for,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ddnn_gen.cli import cli
from ddnn_gen.device.simulated import SimDevice, split_header
from ddnn_gen.wire import certs, codec, deployment, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.codec import Status
from ddnn_gen.wire.connection import BrokerError
from ddnn_server.app import BUSY_MESSAGE

N_SAMPLES = 400
USERS = {"devA": "device", "devB": "device", "srv": "server", "ops": "operator", "mon": "monitor",
         "agg": "server", "srv2": "server"}
VIEWS_MODEL = Path(__file__).resolve().parent.parent / "models" / "views" / "fmnist_views_16.npz"
NOT_AUTHORIZED = "Not authorized"


@pytest.fixture(scope="module")
def secure() -> Iterator[Broker]:
    with secure_broker(USERS) as broker:
        yield broker


@pytest.fixture(scope="module")
def server(secure: Broker, fmnist_model_path: Path) -> Iterator[ServerProcess]:
    with serving(secure.connection("srv"), fmnist_model_path) as process:
        yield process


def _good_request(fmnist_expected: Expected, request_id: int, index: int = 0) -> bytes:
    header = split_header(fmnist_expected.program, fmnist_expected.loaded.hash_bytes, request_id)
    return codec.encode_request(header, fmnist_expected.device.split_words[index])


# ---- the deployment files ---------------------------------------------------------------------------------

def test_password_hash_is_mosquittos_own_format(tmp_path: Path) -> None:
    require_tool("mosquitto_passwd")
    path = tmp_path / "passwd"
    assert deployment.write_password_file(path, {"cam1": "s3cret"}, use_mosquitto_passwd=True) == "mosquitto_passwd"
    user, encoded = path.read_text().strip().split(":", 1)
    assert user == "cam1" and encoded.startswith("$7$101$")
    assert deployment.check_password_hash("s3cret", encoded) and not deployment.check_password_hash("other", encoded)
    ours = deployment.hash_password("s3cret", salt=bytes(12))
    assert ours.startswith("$7$101$AAAAAAAAAAAAAAAA$") and deployment.check_password_hash("s3cret", ours)
    assert path.stat().st_mode & 0o077 == 0o040  # group-readable for the broker, nobody else


def test_roles_file_and_names_are_checked() -> None:
    users = deployment.parse_roles("# who is who\ndevice cam1\nserver srv-1  # the GPU box\n\noperator ops\n")
    assert users == {"cam1": "device", "srv-1": "server", "ops": "operator"}
    for text, message in (("device", "expected 'ROLE NAME'"), ("admin root", "unknown role"),
                          ("device a/b", "invalid"), ("device cam1\nserver cam1", "listed twice"),
                          ("device -flag", "invalid"), ("device x y z", "expected")):
        with pytest.raises(deployment.DeploymentError, match=message):
            deployment.parse_roles(text, "roles.txt")


def test_broker_config_writes_a_deployment_and_keeps_passwords(tmp_path: Path) -> None:
    require_tool("openssl")
    roles = tmp_path / "roles.txt"
    roles.write_text("device cam1\nserver srv1\n")
    out = tmp_path / "deploy"
    runner = CliRunner()
    result = runner.invoke(cli, ["broker-config", "-o", str(out), "--roles", str(roles), "--operator", "ops",
                                 "--port", "18883", "--hostname", "broker.example", "--install-dir", "/etc/ddnn"])
    assert result.exit_code == 0, result.output
    conf = (out / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "listener 18883 0.0.0.0", "password_file /etc/ddnn/passwd",
                 "plugin_opt_config_file /etc/ddnn/dynamic-security.json", "keyfile /etc/ddnn/certs/broker.key",
                 "use_username_as_clientid true"):
        assert line in conf.splitlines(), line
    # use_username_as_clientid is per listener: before `listener` Mosquitto would open a default 1883 listener.
    assert conf.index("listener 18883") < conf.index("use_username_as_clientid")
    cert_text = subprocess.run(["openssl", "x509", "-in", str(out / "certs" / "broker.crt"), "-noout", "-text"],
                               capture_output=True, text=True, check=True).stdout
    assert "DNS:broker.example" in cert_text
    passwords = {name: (out / "credentials" / f"{name}.password").read_text() for name in ("cam1", "srv1", "ops")}
    assert len(set(passwords.values())) == 3
    again = runner.invoke(cli, ["broker-config", "-o", str(out), "--roles", str(roles), "--operator", "ops",
                                "--device", "cam2"])
    assert again.exit_code == 0, again.output
    assert all((out / "credentials" / f"{n}.password").read_text() == p for n, p in passwords.items())
    for bad, message in ((["--device", "x+y", "--server", "s"], "invalid"), (["--device", "only"], "at least one"),
                         (["--device", "d", "--server", "d"], "twice")):
        failed = runner.invoke(cli, ["broker-config", "-o", str(tmp_path / "bad"), *bad])
        assert failed.exit_code != 0 and message in failed.output, failed.output
        assert "Traceback" not in failed.output
    blank = runner.invoke(cli, ["broker-config", "-o", str(tmp_path / "with blank"), "--device", "d", "--server", "s"])
    assert blank.exit_code == 1 and "paths with blanks" in blank.output and not (tmp_path / "with blank").exists()


def test_hashlib_password_file_is_accepted_by_the_broker() -> None:
    require_tool("mosquitto")
    broker = Broker.secure({"cam1": "device", "srv": "server"})
    assert broker.deployment is not None
    password = broker.connection("cam1").password()
    assert password
    deployment.write_password_file(broker.deployment.password_path, {"cam1": password, "srv": "x"},
                                   use_mosquitto_passwd=False)
    with broker:
        client = RawClient(broker.connection("cam1"), "cam1")
        client.close()


# ---- credentials and TLS ----------------------------------------------------------------------------------

def test_no_anonymous_no_plain_tcp_no_wrong_password_no_foreign_ca(secure: Broker, fmnist_expected: Expected,
                                                                   tmp_path: Path) -> None:
    model_hash = fmnist_expected.loaded.hash_bytes
    device = secure.connection("devA")
    for connection, reason in ((device.as_user(None), "Not authorized"),
                               (device.as_user("devA", tmp_path / "wrong"), "Bad user name or password|Not auth")):
        (tmp_path / "wrong").write_text("not the password\n")
        with pytest.raises(BrokerError, match=reason):
            SimDevice("devA", connection, model_hash, timeout_s=1).start(timeout_s=5)
    plain = device.as_user("devA", device.password_file)
    plain = type(plain)(plain.host, plain.port, tls=False, username="devA", password_file=device.password_file)
    with pytest.raises(BrokerError, match="devA"):
        SimDevice("devA", plain, model_hash, timeout_s=1).start(timeout_s=3)
    other_ca = certs.make_ca(tmp_path / "other-ca")
    foreign = type(device)(device.host, device.port, tls=True, ca_file=other_ca.cert, username="devA",
                           password_file=device.password_file)
    with pytest.raises(BrokerError, match="certificate was not accepted"):
        SimDevice("devA", foreign, model_hash, timeout_s=1).start(timeout_s=5)
    # Only by explicit choice does a client skip the check.
    insecure = type(device)(device.host, device.port, tls=True, ca_file=other_ca.cert, username="devA",
                            password_file=device.password_file, insecure=True)
    SimDevice("devA", insecure, model_hash, timeout_s=1).start(timeout_s=5).stop()


def test_server_options_that_do_not_fit_are_one_line_errors(fmnist_model_path: Path, tmp_path: Path) -> None:
    from net_harness import SERVER_MAIN

    missing = tmp_path / "missing.pem"
    for args, message in ((["--ca-file", str(missing)], "need --broker"),
                          (["--broker", "127.0.0.1:1", "--ca-file", str(missing)], "cannot read it"),
                          (["--broker", "127.0.0.1:1", "--insecure"], "need TLS")):
        result = subprocess.run([sys.executable, "-c", SERVER_MAIN, "--models", str(fmnist_model_path), *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and "ready" not in result.stderr


def test_server_with_a_devices_credentials_says_why_it_is_not_ready(secure: Broker,
                                                                     fmnist_model_path: Path) -> None:
    wrong = ServerProcess(secure.connection("devA"), fmnist_model_path, workers=1)
    with pytest.raises(RuntimeError, match="did not become ready"):
        wrong.start(timeout_s=8.0)
    assert "refused the subscriptions" in wrong.output and NOT_AUTHORIZED in wrong.output, wrong.output


# ---- what device A cannot do to device B -------------------------------------------------------------------

def test_device_a_cannot_read_impersonate_or_steer_device_b(secure: Broker, server: ServerProcess,
                                                            fmnist_expected: Expected) -> None:
    model_hash = fmnist_expected.loaded.hash_bytes
    key = topics.model_key(model_hash)
    reports = []
    b_run = threading.Thread(target=lambda: reports.append(
        run_one_device(secure.connection("devB"), "devB", fmnist_expected, N_SAMPLES)))
    b_run.start()
    attacker = RawClient(secure.connection("devA"), "devA")
    try:
        # Reading B's replies, the servers' requests, everything: refused at SUBSCRIBE.
        for topic in (topics.reply_topic("devB"), "ddnn/reply/#", "ddnn/reply/+", "#", "ddnn/req/#",
                      f"ddnn/req/{key}/devB", f"$share/{topics.DEFAULT_SHARE_GROUP}/ddnn/req/{key}/+",
                      f"$share/{topics.DEFAULT_SHARE_GROUP}/ddnn/req/+/+", f"$share/other/ddnn/req/{key}/+",
                      topics.threshold_topic(model_hash, "devB"), "ddnn/status/#", "ddnn/server/+/status",
                      topics.feature_request_topic("devB"), "ddnn/features/+", "ddnn/features/#"):
            assert attacker.subscribe(topic) == NOT_AUTHORIZED, topic
        # Its own feature requests (an aggregator asking it for a split, scores first) it may read, not write.
        assert attacker.subscribe(topics.feature_request_topic("devA")).startswith("Granted")
        # Publishing as B, writing B's status, setting any threshold (B's, the model's, even its own).
        for topic, payload in ((topics.request_topic(model_hash, "devB"), _good_request(fmnist_expected, 77)),
                               (topics.reply_topic("devB"), codec.encode_reply(codec.Reply(78, Status.OK, 3))),
                               (topics.status_topic("devB"), b"offline"),
                               (topics.threshold_topic(model_hash), b"1"),
                               (topics.threshold_topic(model_hash, "devB"), b"1"),
                               (topics.threshold_topic(model_hash, "devA"), b"1"),
                               (topics.server_status_topic("srv"), b"offline"),
                               (topics.feature_request_topic("devB"),
                                codec.encode_feature_request(codec.FeatureRequest(model_hash, 1, 1))),
                               (topics.feature_request_topic("devA"),
                                codec.encode_feature_request(codec.FeatureRequest(model_hash, 1, 1)))):
            assert attacker.publish(topic, payload, retain=True) == NOT_AUTHORIZED, topic
        # Making the server answer B: no header field names a device (protocol v3), so a request on A's topic
        # is A's and answered to A; and a Response Topic naming B's reply topic is ignored (the reply comes to A).
        assert attacker.publish(topics.request_topic(model_hash, "devA"), _good_request(fmnist_expected, 79)) \
            != NOT_AUTHORIZED
        reply = attacker.next_reply(20.0)
        assert reply is not None and reply.status == Status.OK and reply.request_id == 79
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topics.reply_topic("devB")
        props.CorrelationData = b"steer"
        attacker.publish(topics.request_topic(model_hash, "devA"), _good_request(fmnist_expected, 80, 1),
                         properties=props)
        reply = attacker.next_reply(20.0)
        assert reply is not None and reply.status == Status.OK and reply.request_id == 80
        assert reply.class_id == int(fmnist_expected.server_class[1])
        # Taking B's session: the broker uses A's user name as A's client id, whatever A asks for.
        hijack = RawClient(secure.connection("devA"), "devA", client_id="devB")
        hijack.close()
    finally:
        b_run.join()
        attacker.close()
    assert all(topic == topics.reply_topic("devA") for topic, _ in list(attacker.messages.queue))
    report = reports[0]
    assert report.count("server") == N_SAMPLES, {s: report.count(s) for s in ("fallback", "error")}
    assert report.duplicates == 0 and report.misrouted == 0
    got = np.array([o.final_class for o in sorted(report.outcomes, key=lambda o: o.index)])
    assert np.array_equal(got, fmnist_expected.server_class[:N_SAMPLES])
    # Nothing A tried left a retained message behind: the operator sees no thresholds, and B's status is its own.
    operator = RawClient(secure.connection("ops"), "ops", subscribe_replies=False)
    try:
        assert operator.subscribe("ddnn/threshold/#").startswith("Granted")
        assert operator.subscribe(topics.status_topic("devB")).startswith("Granted")
        time.sleep(0.5)
        retained = list(operator.messages.queue)
    finally:
        operator.close()
    assert [(t, p) for t, p in retained if t.startswith("ddnn/threshold")] == []
    assert (topics.status_topic("devB"), b"offline") in retained  # B's own last word, not A's


def test_operator_sets_thresholds_and_a_device_cannot(secure: Broker, fmnist_expected: Expected,
                                                      fmnist_model_path: Path, tmp_path: Path) -> None:
    def threshold_set(user: str, value: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ddnn_gen", "threshold", "set", str(fmnist_model_path), value,
                               "--device", "devB", *secure.connection(user).runner_args()],
                              capture_output=True, text=True, timeout=60)

    device = SimDevice("devB", secure.connection("devB"), fmnist_expected.loaded.hash_bytes).start()
    try:
        refused = threshold_set("devA", "0.3")
        assert refused.returncode == 1 and "refused the publish" in refused.stderr and NOT_AUTHORIZED in refused.stderr
        assert "Traceback" not in refused.stderr
        wrong = tmp_path / "wrong.password"
        wrong.write_text("guess\n")
        result = subprocess.run([sys.executable, "-m", "ddnn_gen", "threshold", "set", str(fmnist_model_path), "0.3",
                                 *secure.connection("ops").as_user("ops", wrong).runner_args()],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "refused the connection" in result.stderr, result.stderr
        for bad, message in ((["--insecure"], "need TLS"), (["--password-file", str(wrong)], "needs --username"),
                             (["--cert", str(wrong)], "go together")):
            result = subprocess.run([sys.executable, "-m", "ddnn_gen", "threshold", "set", str(fmnist_model_path),
                                     "0.3", "--broker", secure.connection("ops").address, *bad],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, bad
        done = threshold_set("ops", "0.3")
        assert done.returncode == 0, done.stderr
        assert wait_for(lambda: device.threshold == 0.3, timeout_s=10)
        cleared = subprocess.run([sys.executable, "-m", "ddnn_gen", "threshold", "clear", str(fmnist_model_path),
                                  "--device", "devB", *secure.connection("ops").runner_args()],
                                 capture_output=True, text=True, timeout=60)
        assert cleared.returncode == 0, cleared.stderr
        assert wait_for(lambda: device.threshold == device.default_threshold, timeout_s=10)
    finally:
        device.stop()


def test_a_server_reads_every_devices_status_and_writes_none(secure: Broker) -> None:
    """The aggregator follows its cameras' births and wills (docs/views.md): with a server's credentials it
    gets ``ddnn/status/+`` granted (else it would never be ready), receives a device's birth, and still
    cannot write a device's status."""
    aggregator = ServerProcess(secure.connection("agg"), VIEWS_MODEL, workers=1, extra=["--role", "aggregator"])
    aggregator.start()
    try:
        server = RawClient(secure.connection("srv2"), "srv2", subscribe_replies=False)
        try:
            assert server.subscribe(topics.STATUS_SUBSCRIPTION).startswith("Granted")
            assert server.publish(topics.status_topic("devB"), b"offline") == NOT_AUTHORIZED
            device = SimDevice("devB", secure.connection("devB"), bytes(16), timeout_s=1).start(timeout_s=10)
            try:
                assert wait_for(lambda: (topics.status_topic("devB"), b"online") in list(server.messages.queue),
                                timeout_s=10)
            finally:
                device.stop()
        finally:
            server.close()
    finally:
        assert aggregator.terminate() == 0, aggregator.output


def test_monitor_reads_everything_and_writes_nothing(secure: Broker, server: ServerProcess,
                                                     fmnist_expected: Expected) -> None:
    monitor = RawClient(secure.connection("mon"), "mon", subscribe_replies=False)
    try:
        assert monitor.subscribe("ddnn/#").startswith("Granted")
        assert monitor.publish(topics.threshold_topic(fmnist_expected.loaded.hash_bytes), b"0.5") == NOT_AUTHORIZED
        assert monitor.publish(topics.request_topic(fmnist_expected.loaded.hash_bytes, "mon"), b"x") == NOT_AUTHORIZED
        device = RawClient(secure.connection("devA"), "devA")
        try:
            device.publish(topics.request_topic(fmnist_expected.loaded.hash_bytes, "devA"),
                           _good_request(fmnist_expected, 5))
            assert device.next_reply(20.0) is not None
        finally:
            device.close()
        assert wait_for(lambda: {t.split("/")[1] for t, _ in list(monitor.messages.queue)} >= {"req", "reply"})
    finally:
        monitor.close()


def test_client_certificates_identify_devices(fmnist_expected: Expected, fmnist_model_path: Path) -> None:
    with secure_broker({"certdev": "device", "certsrv": "server"}, client_certificates=True) as broker, \
            serving(broker.connection("certsrv"), fmnist_model_path):
        connection = broker.connection("certdev")
        assert connection.username is None and connection.cert_file is not None
        client = RawClient(connection, "certdev")
        try:
            assert client.subscribe(topics.reply_topic("someone-else")) == NOT_AUTHORIZED
            client.publish(topics.request_topic(fmnist_expected.loaded.hash_bytes, "certdev"),
                           _good_request(fmnist_expected, 9, 2))
            reply = client.next_reply(20.0)
            assert reply is not None and reply.status == Status.OK
            assert reply.class_id == int(fmnist_expected.server_class[2])
        finally:
            client.close()
        without = type(connection)(connection.host, connection.port, tls=True, ca_file=connection.ca_file)
        with pytest.raises(BrokerError):
            SimDevice("certdev", without, fmnist_expected.loaded.hash_bytes).start(timeout_s=5)


# ---- bounded everything -----------------------------------------------------------------------------------

@pytest.fixture()
def plain() -> Iterator[Broker]:
    require_tool("mosquitto")
    with Broker() as running:
        yield running


def _flood(plain: Broker, fmnist_expected: Expected, qos: int, count: int) -> list[codec.Reply]:
    client = RawClient(plain.connection(), "flooder")
    try:
        for i in range(count):
            client._client.publish(topics.request_topic(fmnist_expected.loaded.hash_bytes, "flooder"),
                                   _good_request(fmnist_expected, 1000 + i, i % N_SAMPLES), qos=qos)
        replies = []
        while len(replies) < count:
            reply = client.next_reply(20.0)
            if reply is None:
                break
            replies.append(reply)
        assert client.next_reply(0.5) is None  # and nothing more than one reply each
    finally:
        client.close()
    return replies


def test_full_queue_answers_busy_once_per_request(plain: Broker, fmnist_expected: Expected,
                                                  fmnist_model_path: Path) -> None:
    server = ServerProcess(plain.address, fmnist_model_path, workers=1,
                           extra=["--max-queue", "4", "--receive-maximum", "4"]).start()
    try:
        # QoS 0 is never flow-controlled, and Debian's Mosquitto 2.0.11 refills the whole Receive Maximum
        # window on every PUBACK (fixed in 2.0.13): with either, a flood overflows a queue of 4, and every
        # request still gets exactly one reply, the model's answer or UNAVAILABLE.
        for qos in (1, 0):
            replies = _flood(plain, fmnist_expected, qos, 600)
            assert sorted(r.request_id for r in replies) == list(range(1000, 1600)), qos
            busy = [r for r in replies if r.status == Status.UNAVAILABLE]
            ok = [r for r in replies if r.status == Status.OK]
            assert len(busy) + len(ok) == 600 and ok, {r.status for r in replies}
            assert all(r.message == BUSY_MESSAGE and r.class_id == -1 for r in busy)
            assert all(r.class_id == int(fmnist_expected.server_class[(r.request_id - 1000) % N_SAMPLES]) for r in ok)
        assert busy, "a QoS 0 flood of 600 must overflow a queue of 4"
    finally:
        assert server.terminate() == 0
    assert "queue is full" in server.output


def test_server_asks_the_broker_for_a_receive_maximum(fmnist_model_path: Path) -> None:
    """The CONNECT packet ddnn-server sends, read off the socket: it carries MQTT 5 Receive Maximum."""
    import socket

    from paho.mqtt.properties import Properties as Props

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server = ServerProcess(f"127.0.0.1:{port}", fmnist_model_path, workers=1, extra=["--receive-maximum", "7"])
        threading.Thread(target=lambda: _start_quietly(server), daemon=True).start()
        listener.settimeout(60)
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(10)
            packet = b""
            while len(packet) < 2 or len(packet) < _mqtt_length(packet):
                packet += connection.recv(4096)
        server.kill()
    assert packet[0] == 0x10  # CONNECT
    header = 1 + _varint_bytes(packet[1:])
    variable = packet[header:]
    assert variable[:7] == b"\x00\x04MQTT\x05"  # protocol name, version 5
    properties, _ = Props(PacketTypes.CONNECT).unpack(variable[10:])
    assert properties.ReceiveMaximum == 7


def _start_quietly(server: ServerProcess) -> None:
    try:
        server.start(timeout_s=30)
    except RuntimeError:
        pass  # the fake listener never answers the CONNECT


def _varint_bytes(data: bytes) -> int:
    count = 0
    while data[count] & 0x80:
        count += 1
    return count + 1


def _mqtt_length(packet: bytes) -> int:
    value, shift, i = 0, 0, 1
    while True:
        byte = packet[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return 1 + i + value
        shift += 7
        i += 1


def test_simulated_device_forgets_answered_requests(plain: Broker, fmnist_expected: Expected,
                                                    fmnist_model_path: Path) -> None:
    with serving(plain.address, fmnist_model_path):
        device = SimDevice("forgetful", plain.connection(), fmnist_expected.loaded.hash_bytes, timeout_s=20).start()
        late = RawClient(plain.connection(), "late-replier", subscribe_replies=False)
        try:
            issued = []
            for i in range(3000):
                request_id = device.next_request_id()
                issued.append(request_id)
                header = split_header(fmnist_expected.program, fmnist_expected.loaded.hash_bytes, request_id)
                reply, _ = device.request(header, fmnist_expected.device.split_words[i % N_SAMPLES])
                assert reply is not None and reply.status == Status.OK
            assert device.outstanding == 0 and len(device._custom_ids) == 0
            # A reply that comes again later is still known as a duplicate, one never asked for as misrouted.
            late.publish(topics.reply_topic("forgetful"), codec.encode_reply(codec.Reply(issued[5], Status.OK, 1)))
            late.publish(topics.reply_topic("forgetful"),
                         codec.encode_reply(codec.Reply(issued[-1] + 999, Status.OK, 1)))
            assert wait_for(lambda: device.duplicates == 1 and device.misrouted == 1, timeout_s=5)
        finally:
            late.close()
            device.stop()


def test_only_the_operator_writes_the_controllers_target_and_state(secure: Broker) -> None:
    """``ddnngen control`` runs as an operator (it reads the target and writes the state); a device or a server
    can neither steer the controller nor forge its state, nor read either."""
    model_hash = bytes(range(16))
    target, state = topics.control_target_topic(model_hash), topics.control_state_topic(model_hash)
    for name in ("devA", "srv2"):  # srv2: "srv" is the module's running server (one session per user)
        other = RawClient(secure.connection(name), name, subscribe_replies=name.startswith("dev"))
        try:
            for topic in (target, state):
                assert other.publish(topic, b'{"max_load": 0.1}', retain=True) == NOT_AUTHORIZED, (name, topic)
                assert other.subscribe(topic) == NOT_AUTHORIZED, (name, topic)
        finally:
            other.close()
    operator = RawClient(secure.connection("ops"), "ops", subscribe_replies=False)
    try:
        assert operator.subscribe(f"ddnn/control/{topics.model_key(model_hash)}/+").startswith("Granted")
        for topic in (target, state):
            assert operator.publish(topic, b'{"max_load": 0.5}', retain=True) != NOT_AUTHORIZED, topic
        assert wait_for(lambda: {t for t, _ in list(operator.messages.queue)} >= {target, state}, timeout_s=10)
        for topic in (target, state):
            operator.publish(topic, b"", retain=True)  # leave no retained message for the other tests
    finally:
        operator.close()
