"""The generated C networked device (Paho C's SSL library) and ddnn-server over TLS with per-device credentials,
on a real Mosquitto running the broker-config deployment: classes equal the Python evaluation, device A cannot
read, impersonate or steer device B while B runs, the reply deadline and TCP_NODELAY hold, bad TLS options and
credentials end in one clear line."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from net_harness import (
    SAN_ENV,
    Expected,
    RawClient,
    ServerProcess,
    device_rows,
    finish_device,
    secure_broker,
    serving,
    start_device,
)

from ddnn_gen.codegen.resources import c_runtime_dir
from ddnn_gen.device.simulated import split_header
from ddnn_gen.wire import certs, codec, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.codec import Status
from ddnn_gen.wire.connection import BrokerConnection

N_SAMPLES = 1000
USERS = {"tlsA": "device", "tlsB": "device", "srv": "server"}
NOT_AUTHORIZED = "Not authorized"
# Round trip minus server compute, per offloaded sample: ~1 ms over loopback with TCP_NODELAY, ~40 ms without.
MAX_MEDIAN_COMM_US = 10_000


@pytest.fixture(scope="module")
def secure() -> Iterator[Broker]:
    with secure_broker(USERS) as broker:
        yield broker


@pytest.fixture(scope="module")
def server(secure: Broker, fmnist_model_path: Path) -> Iterator[ServerProcess]:
    with serving(secure.connection("srv"), fmnist_model_path, workers=2) as process:
        yield process


def test_c_device_over_tls_equals_python_while_device_a_attacks(
        net_device_bin: Path, fmnist_samples_file: Path, secure: Broker, server: ServerProcess,
        fmnist_expected: Expected, tmp_path: Path) -> None:
    model_hash = fmnist_expected.loaded.hash_bytes
    key = topics.model_key(model_hash)
    out = tmp_path / "b.csv"
    b = start_device(net_device_bin, fmnist_samples_file, out, "tlsB", secure.connection("tlsB"), "--timeout-ms",
                     "20000")
    attacker = RawClient(secure.connection("tlsA"), "tlsA")
    # The C runner with A's credentials claiming to be B: the broker names it tlsA, refuses B's reply topic
    # (the runner says so and answers locally) and denies its requests on B's topic.
    impostor_out = tmp_path / "impostor.csv"
    impostor = start_device(net_device_bin, fmnist_samples_file, impostor_out, "tlsB", secure.connection("tlsA"),
                       "--timeout-ms", "200", "--threshold", "0")
    denied: list[tuple[str, str]] = []
    try:
        for topic in (topics.reply_topic("tlsB"), "ddnn/reply/#", "#", f"$share/{topics.DEFAULT_SHARE_GROUP}/ddnn/req/"
                      f"{key}/+", f"ddnn/req/{key}/+", topics.threshold_topic(model_hash, "tlsB")):
            denied.append((topic, attacker.subscribe(topic)))
        request_as_b = codec.encode_request(split_header(fmnist_expected.program, model_hash, 5),
                                            fmnist_expected.device.split_words[0])
        for topic, payload in ((topics.request_topic(model_hash, "tlsB"), request_as_b),
                               (topics.status_topic("tlsB"), b"offline"),
                               (topics.threshold_topic(model_hash), b"1"),
                               (topics.threshold_topic(model_hash, "tlsB"), b"0")):
            denied.append((topic, attacker.publish(topic, payload, retain=True)))
        # On its own topic the request is A's (since protocol v3 no header field can name B): answered to A only.
        attacker.publish(topics.request_topic(model_hash, "tlsA"), request_as_b)
        reply = attacker.next_reply(30.0)
        impostor_err = finish_device(impostor)
        stderr = finish_device(b)
    finally:
        attacker.close()
        for process in (b, impostor):
            if process.poll() is None:
                process.kill()
    assert all(verdict == NOT_AUTHORIZED for _, verdict in denied), denied
    assert reply is not None and reply.status == Status.OK and reply.request_id == 5
    assert all(topic == topics.reply_topic("tlsA") for topic, _ in list(attacker.messages.queue))
    assert "refused the replies subscription ddnn/reply/tlsB: Not authorized" in impostor_err, impostor_err
    assert {r["source"] for r in device_rows(impostor_out)} <= {"local", "fallback"}
    # B: every sample, every class as the Python evaluation says, through the server where not confident.
    rows = device_rows(out)
    assert [int(r["index"]) for r in rows] == list(range(N_SAMPLES)), stderr
    local = np.array([r["exit_local"] == "1" for r in rows])
    assert np.array_equal(local, fmnist_expected.device.local_exit)
    assert all(r["source"] == ("local" if lo else "server") for r, lo in zip(rows, local)), stderr
    want = fmnist_expected.final_class(fmnist_expected.program.threshold)
    assert np.array_equal([int(r["final_class"]) for r in rows], want)
    assert "(TLS)" in stderr and "--insecure" not in stderr
    comm = [float(r["t_total_us"]) - float(r["t_device_us"]) - int(r["t_server_us"]) for r in rows
            if r["source"] == "server"]
    assert float(np.median(comm)) < MAX_MEDIAN_COMM_US, f"median T_Comm {np.median(comm):.0f} us: Nagle is back"


def test_c_device_with_a_client_certificate(net_device_bin: Path, fmnist_samples_file: Path, fmnist_expected: Expected,
                                           fmnist_model_path: Path, tmp_path: Path) -> None:
    with secure_broker({"certB": "device", "certsrv": "server"}, client_certificates=True) as broker, \
            serving(broker.connection("certsrv"), fmnist_model_path):
        out = tmp_path / "cert.csv"
        stderr = finish_device(start_device(net_device_bin, fmnist_samples_file, out, "certB",
                                            broker.connection("certB"), "--timeout-ms", "20000"))
    rows = device_rows(out)
    assert len(rows) == N_SAMPLES and {r["source"] for r in rows} == {"local", "server"}, stderr
    want = fmnist_expected.final_class(fmnist_expected.program.threshold)
    assert np.array_equal([int(r["final_class"]) for r in rows], want)


def test_c_device_says_why_the_broker_cannot_be_used(net_device_bin: Path, fmnist_samples_file: Path, secure: Broker,
                                                    tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-it\n")
    other_ca = certs.make_ca(tmp_path / "other")
    good = secure.connection("tlsA")
    cases = [
        (good.as_user("tlsA", wrong), "Bad user name or password|Not authorized"),
        (BrokerConnection(good.host, good.port, tls=True, ca_file=other_ca.cert, username="tlsA",
                          password_file=good.password_file), "TLS: .*certificate verify failed"),
        (BrokerConnection(good.host, good.port, username="tlsA", password_file=good.password_file), "cannot use"),
    ]
    for connection, message in cases:
        out = tmp_path / "refused.csv"
        stderr = finish_device(start_device(net_device_bin, fmnist_samples_file, out, "tlsA", connection,
                                            "--connect-wait-ms", "1500", "--timeout-ms", "50"), timeout_s=120)
        assert re.search(message, stderr), (connection, stderr)
        assert stderr.count("cannot use the broker") <= 2, stderr  # said once, not at every retry
        rows = device_rows(out)
        assert len(rows) == N_SAMPLES and {r["source"] for r in rows} <= {"local", "fallback"}


def test_c_device_rejects_tls_options_that_do_not_fit(net_device_bin: Path, fmnist_samples_file: Path, secure: Broker,
                                                      tmp_path: Path) -> None:
    good = secure.connection("tlsA")
    empty = tmp_path / "empty.password"
    empty.write_text("\n")
    long_password = tmp_path / "long.password"
    long_password.write_text("x" * 300 + "\n")
    for args, message in (
            (["--cert", str(good.ca_file)], "--cert and --key go together"),
            (["--insecure"], "--insecure needs --tls"),
            (["--password-file", str(empty)], "--password-file needs --username"),
            (["--username", "tlsA", "--password-file", str(tmp_path / "missing")], "cannot read it"),
            (["--username", "tlsA", "--password-file", str(empty)], "first line is empty"),
            (["--username", "tlsA", "--password-file", str(long_password)], "longer than 255"),
            (["--ca-file"], "--ca-file needs a value")):
        result = subprocess.run([str(net_device_bin), str(fmnist_samples_file), "--device-id", "tlsA", "--broker",
                                 good.address, *args], capture_output=True, text=True, timeout=60, env=SAN_ENV)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_nodelay_is_set_on_the_stream_sockets_the_runner_connects(tmp_path: Path) -> None:
    """ddnn_nodelay.c's connect() in a program of its own: TCP sockets come out with TCP_NODELAY, the real
    connect()'s result and errno are kept, other sockets are left alone."""
    require_tool("gcc")
    program = tmp_path / "probe.c"
    program.write_text(r'''
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int nodelay(int fd) {
    int v = 0; socklen_t n = sizeof(v);
    getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, &n);
    return v;
}

int main(void) {
    struct sockaddr_in a; socklen_t n = sizeof(a); int l = socket(AF_INET, SOCK_STREAM, 0), c, refused;
    struct sockaddr_un u; int us = socket(AF_UNIX, SOCK_STREAM, 0);
    memset(&a, 0, sizeof(a)); a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1) || getsockname(l, (struct sockaddr *)&a, &n))
        return 9;
    c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, sizeof(a)) != 0) return 8;
    printf("tcp %d\n", nodelay(c));
    close(l); c = socket(AF_INET, SOCK_STREAM, 0);
    refused = connect(c, (struct sockaddr *)&a, sizeof(a));
    printf("refused %d %d\n", refused, errno == ECONNREFUSED);
    memset(&u, 0, sizeof(u)); u.sun_family = AF_UNIX; strcpy(u.sun_path, "/nonexistent/ddnn.sock");
    refused = connect(us, (struct sockaddr *)&u, sizeof(u));
    printf("unix %d %d\n", refused, errno == ENOENT);
    return 0;
}
''')
    binary = tmp_path / "probe"
    build = subprocess.run(["gcc", "-std=c99", "-D_POSIX_C_SOURCE=200112L", "-Wall", "-Wextra", "-Werror",
                            "-fsanitize=address,undefined", "-o", str(binary), str(program),
                            str(c_runtime_dir() / "ddnn_nodelay.c"), "-ldl", "-lpthread"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30, env=SAN_ENV)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:3] == ["tcp 1", "refused -1 1", "unix -1 1"], run.stdout


def test_reply_deadline_is_kept(net_device_bin: Path, fmnist_samples_file: Path, tmp_path: Path) -> None:
    """No server: every offloaded sample waits its --timeout-ms on the monotonic clock, then falls back."""
    out = tmp_path / "deadline.csv"
    with secure_broker({"lonely": "device"}) as broker:
        stderr = finish_device(start_device(net_device_bin, fmnist_samples_file, out, "lonely",
                                            broker.connection("lonely"), "--timeout-ms", "30", "--threshold", "0"),
                               timeout_s=300)
    rows = device_rows(out)
    fallback = [float(r["t_total_us"]) for r in rows if r["source"] == "fallback"]
    assert len(fallback) >= N_SAMPLES - 5, stderr
    assert min(fallback) >= 30_000 and float(np.median(fallback)) < 45_000, (min(fallback), np.median(fallback))


def test_secure_demo_equals_the_python_evaluation(fmnist_model_path: Path) -> None:
    """`ddnngen demo --secure`: device and server log in as themselves on a TLS broker with the deployment."""
    require_tool("mosquitto")
    require_tool("openssl")
    from ddnn_gen.bench.demo import run_demo

    report = run_demo(fmnist_model_path, count=300, workers=1, timeout_ms=10000, secure=True)
    assert report.samples == 300 and report.rates["fallback"] == 0 and report.rates["error"] == 0
    assert report.overall_accuracy == report.expected_overall
    assert report.t_comm_us < MAX_MEDIAN_COMM_US
