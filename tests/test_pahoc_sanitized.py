"""Both C sides of the server's C transports under ASan/UBSan (and LeakSanitizer): tests/pahoc_check.c links
c_runtime/ddnn_pahoc.c with libpaho-mqtt3as, or c_runtime/ddnn_mqtt_batch.c (the server's own MQTT client, its
packet parser included) with OpenSSL, in a sanitizer build, then serves requests this test publishes through
a real Mosquitto, an overlong topic and an oversized payload among them. Under cffi the C side runs inside
Python, which no sanitizer watches; this is where its memory and its threads are checked."""

from __future__ import annotations

import os
import queue
import re
import subprocess
from pathlib import Path

import pytest
from net_harness import RawClient

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.extension import CFLAGS
from ddnn_gen.codegen.resources import c_runtime_dir
from ddnn_gen.wire.broker import Broker

# --transport: (its C source, the libraries it links, the header that says they are installed, the package)
C_SIDES = {"paho-c": ("ddnn_pahoc.c", ["-lpaho-mqtt3as"], "/usr/include/MQTTAsync.h", "libpaho-mqtt-dev"),
           "c-mqtt": ("ddnn_mqtt_batch.c", ["-lssl", "-lcrypto"], "/usr/include/openssl/ssl.h", "libssl-dev")}

CHECK = Path(__file__).with_name("pahoc_check.c")
# Leaks count here too: ddnn_pahoc_close() must free everything the shim allocated.
SANITIZERS = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
              "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
MAX_TOPIC, KEEP_OVERSIZED, BATCH = 128, 64, 4  # as in pahoc_check.c


def build_check(tmp: Path, side: str) -> Path:
    source, libraries, header, package = C_SIDES[side]
    if not os.path.exists(header):
        pytest.skip(f"--transport {side} needs {package}")
    binary = tmp / "pahoc_check"
    runtime = c_runtime_dir()
    cflags = [flag for flag in CFLAGS if flag != "-march=native"]  # the extension's flags, any host
    built = subprocess.run(["gcc", *cflags, *toolchain.WARNING_CFLAGS, *toolchain.SANITIZE_CFLAGS, "-I", str(runtime),
                            "-o", str(binary), str(CHECK), str(runtime / source),
                            str(runtime / "ddnn_pahoc_core.c"), *libraries, "-lpthread"],
                   capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return binary


@pytest.mark.parametrize("side", sorted(C_SIDES))
def test_shim_serves_batches_under_sanitizers(broker: Broker, tmp_path: Path, side: str) -> None:
    """Bounds enforced and counted (an overlong topic dropped, an oversized payload kept as its first bytes
    with its wire size), requests taken in batches, every reply delivered, a clean shutdown: exit status 0
    and no sanitizer report."""
    binary = build_check(tmp_path, side)
    normal = {f"dev{index}": bytes([index]) * (index + 1) for index in range(9)}
    big = bytes(range(256)) * 20  # 5120 bytes, over the 1000-byte bound
    expected = len(normal) + 2
    process = subprocess.Popen([str(binary), f"tcp://127.0.0.1:{broker.port}", str(broker.port), str(expected)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SANITIZERS)
    client = RawClient(broker.connection(), "checker", subscribe_replies=False)
    try:
        assert client.subscribe("check/rep/#").startswith("Granted")
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert ready == "READY\n", ready + process.communicate(timeout=30)[1]
        assert client.publish("check/req/" + "x" * (MAX_TOPIC + 1), b"dropped") == "Success"
        assert client.publish("check/req/big", big) == "Success"
        for name, payload in normal.items():
            assert client.publish(f"check/req/{name}", payload) == "Success"
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr

        batches = [int(n) for n in re.findall(r"^BATCH (\d+)$", stdout, re.M)]
        assert batches == [BATCH, BATCH, 2], stdout  # all ten were queued before the first take
        messages = re.findall(r"^MSG (\S+) (\d+) (\d+) (\d+)$", stdout, re.M)
        assert messages[0] == ("check/req/big", str(KEEP_OVERSIZED), str(len(big)), "1")
        assert [(topic, int(kept), int(wire)) for topic, kept, wire, _ in messages[1:]] == [
            (f"check/req/{name}", len(payload), len(payload)) for name, payload in normal.items()]
        stats = dict(re.findall(r"(\w+)=(\d+)", re.search(r"^STATS .*$", stdout, re.M).group(0)))  # type: ignore[union-attr]
        assert stats == {"received": "10", "dropped_full": "0", "dropped_topic": "1", "oversized": "1",
                         "published": "10", "completed": "10", "failed": "0", "connects": "1", "queued": "0"}

        replies: dict[str, bytes] = {}
        while len(replies) < 10:
            try:
                topic, payload = client.messages.get(timeout=10.0)
            except queue.Empty:
                break
            replies[topic] = payload
        assert replies == {"check/rep/big": big[:KEEP_OVERSIZED],
                           **{f"check/rep/{name}": payload for name, payload in normal.items()}}
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
            process.communicate()
