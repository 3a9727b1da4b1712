"""Helpers for the networked tests: ddnn-server as a real subprocess, reference expectations."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import chainer
import numpy as np
from paho.mqtt.subscribeoptions import SubscribeOptions

from ddnn_gen.bench import procstat
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.fold.reference import DeviceResult, run_device, split_to_server_input
from ddnn_gen.model.modelfile import LoadedModel, load_model
from ddnn_gen.wire import codec, mqtt_client, topics

SERVER_MAIN = "from ddnn_server.cli import main; main()"


class ServerProcess:
    """``ddnn-server`` in its own process, stderr collected; ``start`` waits for its ready line."""

    def __init__(self, broker: str, models: str | Path, workers: int = 2, server_id: str | None = None,
                 extra: list[str] | None = None) -> None:
        self.args = [sys.executable, "-c", SERVER_MAIN, "--broker", broker, "--models", str(models),
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


class RawClient:
    """What no device would do: publish any bytes on any topic; replies to ``device_id`` read in order."""

    def __init__(self, host: str, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.replies: queue.Queue[bytes] = queue.Queue()
        self.disconnected = threading.Event()
        subscribed = threading.Event()
        self._client = mqtt_client.Client(f"raw-{device_id}-{os.getpid()}-{time.monotonic_ns() % 10**6}")
        self._client.on_message = lambda c, u, m: self.replies.put(m.payload)
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.on_disconnect = lambda *args: self.disconnected.set()
        self._client.connect(host, port)
        self._client.subscribe(topics.reply_topic(device_id), options=SubscribeOptions(qos=1))
        self._client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("no SUBACK for the raw client's reply topic")

    def publish(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1).wait_for_publish(5)

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


def wait_for(predicate: object, timeout_s: float = 10.0, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(step_s)
    return False
