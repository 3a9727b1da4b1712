"""Helpers for the networked tests: ddnn-server as a real subprocess, reference expectations."""

from __future__ import annotations

import csv
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import chainer
import numpy as np
from conftest import require_tool
from paho.mqtt.subscribeoptions import SubscribeOptions

from ddnn_gen.bench import procstat
from ddnn_gen.device.simulated import SampleOutcome, SimDevice, SimReport, split_header
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.fold.reference import DeviceResult, run_device, split_to_server_input
from ddnn_gen.model.modelfile import LoadedModel, load_model
from ddnn_gen.wire import codec, mqtt_client, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.connection import BrokerConnection

SERVER_MAIN = "from ddnn_server.cli import main; main()"
# Paho C keeps a few process-lifetime allocations; leaks in our code are covered by the standalone runner tests.
SAN_ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1"}


@contextmanager
def secure_broker(users: dict[str, str], client_certificates: bool = False) -> Iterator[Broker]:
    """A private Mosquitto running a broker-config deployment for ``users`` ({name: role})."""
    require_tool("mosquitto")
    require_tool("openssl")
    with Broker.secure(users, client_certificates=client_certificates) as broker:
        yield broker


@contextmanager
def serving(broker: str | BrokerConnection, models: str | Path, workers: int = 1) -> Iterator[ServerProcess]:
    """ddnn-server for the duration of a ``with``; it must stop cleanly (exit 0) at the end."""
    process = ServerProcess(broker, models, workers=workers).start()
    try:
        yield process
    finally:
        assert process.terminate() == 0, process.output


class ServerProcess:
    """``ddnn-server`` in its own process, stderr collected; ``start`` waits for its ready line."""

    def __init__(self, broker: str | BrokerConnection | None, models: str | Path, workers: int = 2,
                 server_id: str | None = None, extra: list[str] | None = None) -> None:
        """``broker`` None: no --broker (``extra`` says where, e.g. --amqp)."""
        broker_args = ([] if broker is None else ["--broker", broker] if isinstance(broker, str)
                       else broker.runner_args())
        self.args = [sys.executable, "-c", SERVER_MAIN, *broker_args, "--models", str(models),
                     "--workers", str(workers), "-v"]
        if server_id:
            self.args += ["--server-id", server_id]
        self.args += extra or []
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        self._ready.clear()
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        if not self._ready.wait(timeout_s):
            self.kill()
            raise RuntimeError("ddnn-server did not become ready:\n" + self.output)
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.append(line)
            if "ddnn-server: ready" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def minor_faults(self) -> int:
        """Minor page faults of the server process so far (Linux /proc)."""
        assert self.process is not None
        return procstat.minor_faults(self.process.pid)

    def replies_sent(self) -> int:
        """Replies reported by the server's shutdown log line (after terminate)."""
        found = re.findall(r"stopped after (\d+) replies", self.output)
        return int(found[-1]) if found else -1


class ControlProcess:
    """``ddnngen control ARGS`` in its own process, its stderr collected as it comes; ``running`` is set once
    it says it runs."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "ddnn_gen", "control", *args], stderr=subprocess.PIPE,
                                        text=True)
        self.lines: list[str] = []
        self.running = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith("ddnngen control:"):
                self.running.set()

    def log(self) -> str:
        """Everything it wrote (all of it once it has exited)."""
        self._reader.join(5)
        return "".join(self.lines)


class RawClient:
    """What no device would do: publish any bytes on any topic; replies to ``device_id`` read in order.

    On a broker with roles it logs in with ``broker``'s credentials; :meth:`subscribe` and :meth:`publish`
    return the broker's verdict (SUBACK / PUBACK reason) so tests can assert what is denied."""

    def __init__(self, broker: BrokerConnection, device_id: str, client_id: str | None = None,
                 subscribe_replies: bool = True) -> None:
        self.device_id = device_id
        self.replies: queue.Queue[bytes] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnected = threading.Event()
        self._verdicts: dict[int, str] = {}
        self._verdict_cond = threading.Condition()
        self._client = mqtt_client.Client(client_id or f"raw-{device_id}-{os.getpid()}-{time.monotonic_ns() % 10**6}",
                                          broker)
        self._client.on_message = self._message
        self._client.on_subscribe = lambda c, u, mid, codes, p: self._verdict(mid, codes[0])
        self._client.on_publish = lambda c, u, mid, code, p: self._verdict(mid, code)
        self._client.on_disconnect = lambda *args: self.disconnected.set()
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        if subscribe_replies and not self.subscribe(topics.reply_topic(device_id)).startswith("Granted"):
            raise RuntimeError("the broker refused the raw client's reply topic")

    def _message(self, client: object, userdata: object, message: object) -> None:
        topic, payload = message.topic, message.payload  # type: ignore[attr-defined]
        self.messages.put((topic, payload))
        if topic == topics.reply_topic(self.device_id):
            self.replies.put(payload)

    def _verdict(self, mid: int, code: object) -> None:
        with self._verdict_cond:
            self._verdicts[mid] = str(code)
            self._verdict_cond.notify_all()

    def _wait_verdict(self, mid: int, timeout_s: float = 10.0) -> str:
        with self._verdict_cond:
            if not self._verdict_cond.wait_for(lambda: mid in self._verdicts, timeout_s):
                return "no answer"
            return self._verdicts.pop(mid)

    def subscribe(self, topic: str) -> str:
        """The SUBACK's reason ("Granted QoS 1", "Not authorized", ...)."""
        _, mid = self._client.subscribe(topic, options=SubscribeOptions(qos=1))
        return self._wait_verdict(mid)

    def publish(self, topic: str, payload: bytes, retain: bool = False, properties: object = None) -> str:
        """The PUBACK's reason ("Success", "No matching subscribers", "Not authorized", ...)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        return self._wait_verdict(info.mid)

    def next_reply(self, timeout_s: float) -> codec.Reply | None:
        try:
            return codec.decode_reply(self.replies.get(timeout=timeout_s))
        except queue.Empty:
            return None

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class Expected:
    loaded: LoadedModel
    program: DeviceProgram
    device: DeviceResult
    server_class: np.ndarray  # argmax of model.server_forward on each sample's split

    def final_class(self, threshold: float) -> np.ndarray:
        from ddnn_gen.fold.reference import exit_decision

        local = exit_decision(self.device.entropy, threshold)
        return np.where(local, self.device.local_class, self.server_class)


def expectations(model_path: str | Path, images: np.ndarray) -> Expected:
    loaded = load_model(model_path)
    program = fold(loaded)
    device = run_device(program, images)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        logits = loaded.model.server_forward(split_to_server_input(program, device.split_words)).array
    return Expected(loaded, program, device, np.asarray(logits).argmax(axis=1))


def run_one_device(broker: BrokerConnection, device_id: str, expected: Expected, count: int) -> SimReport:
    """Device ``device_id`` (its own credentials in ``broker``) sends samples 0..count-1 (mod the set) to the
    server one at a time; every answer recorded as run_devices does."""
    device = SimDevice(device_id, broker, expected.loaded.hash_bytes, timeout_s=30.0,
                       default_threshold=expected.program.threshold).start()
    outcomes = []
    started = time.monotonic()
    try:
        for i in range(count):
            index = i % len(expected.server_class)
            request_id = device.next_request_id()
            header = split_header(expected.program, expected.loaded.hash_bytes, request_id)
            reply, rtt = device.request(header, expected.device.split_words[index])
            source = "fallback" if reply is None else "server" if reply.status == codec.Status.OK else "error"
            outcomes.append(SampleOutcome(device_id, index, request_id, source,
                                          reply.class_id if reply is not None else -1,
                                          int(expected.device.local_class[index]), device.threshold,
                                          int(reply.status) if reply is not None else -1, rtt))
        time.sleep(0.2)  # a late duplicate would arrive within a moment
    finally:
        device.stop()
    return SimReport(outcomes, device.duplicates, device.misrouted, time.monotonic() - started)


def device_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows a device runner has written so far (it writes one line per sample as it goes)."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("threshold")]


def start_device(binary: Path, samples: Path, out: Path, device_id: str, broker: BrokerConnection,
                 *extra: str) -> subprocess.Popen[str]:
    """The generated networked runner on ``samples`` as ``device_id``, over ``broker``; CSV to ``out``."""
    return subprocess.Popen([str(binary), str(samples), "--device-id", device_id, *broker.runner_args(), "-o",
                             str(out), *extra], stderr=subprocess.PIPE, text=True, env=SAN_ENV)


def finish_device(process: subprocess.Popen[str], timeout_s: float = 180) -> str:
    """Wait for a runner; it must exit 0. Its stderr."""
    _, stderr = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, stderr
    return stderr


def wait_for(predicate: object, timeout_s: float = 10.0, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(step_s)
    return False
