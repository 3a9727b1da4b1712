"""Open-loop offered load for the controller bench and its test: simulated devices that classify samples at a
set rate whatever the server does (a camera does not wait for the cloud), offload what their live threshold
does not answer locally, and record every sample; plus the helpers the load-ramp bench needs (a calibrated
copy of a model, a CPU quota for the server, the capacity measurement).

Why a CPU quota: on a small machine the simulated devices, the broker and the server share the cores, and
the devices could not offer 3x the capacity of an unconstrained server. Under a cgroup quota the server is a
smaller machine (a fraction of a core), its capacity is measured the same way, and the devices have the
headroom to overload it. Without a writable cgroup the bench runs unconstrained and says so.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddnn_gen.device.simulated import DevicePart, Pending, SimDevice, split_header
from ddnn_gen.fold.program import DeviceProgram
from ddnn_gen.model.datasets import Dataset
from ddnn_gen.wire import codec
from ddnn_gen.wire.connection import BrokerConnection

log = logging.getLogger(__name__)

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1 cpu controller (v2: /sys/fs/cgroup with cpu.max)
CGROUP_V2 = Path("/sys/fs/cgroup")


@dataclass
class Sample:
    device_id: str
    sent: float  # time.monotonic() when classified
    source: str  # local | server | busy | error | fallback
    threshold: float
    round_trip_s: float = 0.0  # offloaded only
    index: int = -1  # the sample classified
    answered_by: int = 0  # the exit that answered: 0 the device's, else the reply's tier (OK replies)


class PacedFleet:
    """``n_devices`` SimDevices classifying ``rate()`` samples/s in total (read every tick, so the rate can
    step), each device a pacing thread and a waiting thread (replies are matched per device in send order,
    each with the device's timeout)."""

    def __init__(self, connection: BrokerConnection, program: DeviceProgram, model_hash: bytes, part: DevicePart,
                 n_samples: int, n_devices: int, rate: Callable[[], float], timeout_s: float = 5.0,
                 telemetry_interval_s: float = 0.5, prefix: str = "ramp") -> None:
        self.program, self.model_hash, self.part, self.n_samples = program, model_hash, part, n_samples
        self.rate = rate
        self.timeout_s = timeout_s
        self.devices = [SimDevice(f"{prefix}{d}", connection, model_hash, timeout_s, program.threshold,
                                  telemetry_interval_s=telemetry_interval_s) for d in range(n_devices)]
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> PacedFleet:
        for device in self.devices:
            device.start()
        for d, device in enumerate(self.devices):
            waiting: deque[tuple[int, Pending, float, float, int]] = deque()
            ready = threading.Semaphore(0)
            self._threads += [threading.Thread(target=self._pace, args=(d, device, waiting, ready), daemon=True),
                              threading.Thread(target=self._wait, args=(device, waiting, ready), daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Sample]:
        """Stop classifying, wait for every outstanding answer (or its timeout), stop the devices."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        for device in self.devices:
            device.stop()
        with self._lock:
            return list(self.samples)

    def _record(self, device: SimDevice, sample: Sample) -> None:
        if sample.source != "local":
            # Answered UNAVAILABLE (busy) is an error reply to the device: it answers with its local exit.
            device.note_answer("error" if sample.source == "busy" else sample.source, int(sample.round_trip_s * 1e6))
        with self._lock:
            self.samples.append(sample)

    def _pace(self, d: int, device: SimDevice, waiting: deque, ready: threading.Semaphore) -> None:
        n = len(self.devices)
        index, due = d, time.monotonic()
        while not self._stop.is_set():
            per_device = self.rate() / n
            if per_device <= 0:
                time.sleep(0.05)
                due = time.monotonic()
                continue
            now = time.monotonic()
            if due > now:
                time.sleep(min(due - now, 0.05))
                continue
            due = max(due, now - 0.5) + 1.0 / per_device  # behind by more than 0.5 s: that load is not offered
            sample = index % self.n_samples
            index += n
            threshold = device.threshold
            answer = self.part(sample, threshold)
            device.note_sample(answer.local_exit)
            if answer.local_exit:
                self._record(device, Sample(device.device_id, now, "local", threshold, index=sample))
                continue
            request_id = device.next_request_id()
            header = split_header(self.program, self.model_hash, request_id)
            pending = device.send(codec.encode_request(header, answer.split_words), request_id)
            waiting.append((request_id, pending, now, threshold, sample))
            ready.release()
        ready.release()  # wakes the waiter to see the stop

    def _wait(self, device: SimDevice, waiting: deque, ready: threading.Semaphore) -> None:
        while True:
            ready.acquire()
            if not waiting:
                if self._stop.is_set():
                    return
                continue
            request_id, pending, sent, threshold, sample = waiting.popleft()
            left = max(0.0, pending.sent + self.timeout_s - time.monotonic())
            reply = device.wait(request_id, pending, left)
            if reply is None:
                source, rtt = "fallback", time.monotonic() - pending.sent
            else:
                rtt = pending.received - pending.sent
                source = ("server" if reply.status == codec.Status.OK else
                          "busy" if reply.status == codec.Status.UNAVAILABLE else "error")
            answered_by = reply.answered_by if reply is not None and reply.status == codec.Status.OK else 0
            self._record(device, Sample(device.device_id, sent, source, threshold, rtt, sample, answered_by))


# ---- the server under a CPU quota --------------------------------------------------------------------------

class CpuQuota:
    """A cgroup giving the processes put in it ``cores`` of CPU time (CFS quota over a 10 ms period, so the
    throttling is fine-grained). ``available`` is False where no cgroup is writable."""

    PERIOD_US = 10000

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self.path: Path | None = None
        name = f"ddnn-bench-{os.getpid()}"
        quota = max(1000, int(cores * self.PERIOD_US))
        try:
            if (CGROUP_CPU / "cpu.cfs_quota_us").exists():
                path = CGROUP_CPU / name
                path.mkdir()
                (path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            elif (CGROUP_V2 / "cgroup.controllers").exists():
                path = CGROUP_V2 / name
                path.mkdir()
                (path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
            else:
                return
            self.path = path
        except OSError as error:
            log.warning("no CPU quota for the server (%s): it runs unconstrained", error)

    @property
    def available(self) -> bool:
        return self.path is not None

    def add(self, pid: int) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        if self.path is None:
            return
        for _ in range(50):  # the cgroup goes once its processes have exited
            try:
                self.path.rmdir()
                self.path = None
                return
            except OSError:
                time.sleep(0.1)
        log.warning("could not remove the cgroup %s", self.path)


def calibrated_copy(model_path: str | Path, data: Dataset, out: Path) -> Path:
    """``model_path`` with a calibration curve measured on ``data`` and its thresholds unchanged (what
    `ddnngen calibrate` stores; the wire hash is the same). A model that has one already is used as it is."""
    from ddnn_gen.fold.exits import compute_outputs
    from ddnn_gen.model.evaluate import calibration_curves
    from ddnn_gen.model.modelfile import load_model, save_model

    loaded = load_model(model_path)
    if loaded.spec.calibration is not None:
        return Path(model_path)
    outputs = compute_outputs(loaded, data)
    curves = calibration_curves(outputs, loaded.spec.thresholds, f"{data.name} {data.split}[:{len(data)}]")
    save_model(out, loaded.model, loaded.spec.with_calibration(curves))
    return out


def percentile_ms(values: Sequence[float], q: float = 99.0) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if len(values) else float("nan")
