"""The threshold controller under a load ramp, controller off vs on in one run, on one machine:

simulated devices (open loop, ddnn_gen/bench/load_ramp.py) -> a real Mosquitto -> a real ddnn-server (its
CPU limited by a cgroup quota so the devices can overload it), the shipped Fashion-MNIST model with a
calibration curve measured on the test set. First the server's capacity is measured (every sample offloaded,
closed loop, as many in flight as it takes); then the offered load (requests/s the devices would send at the
model's stored threshold) steps 0.5x -> 3x -> 0.5x that capacity, once with the threshold fixed and once
with `ddnngen control`'s LiveController keeping the p99 round trip under a target.

Prints per phase, side by side: p99 round trip (whole phase and after the settling time), requests lost
(no answer within the device's timeout: must be 0 with the controller on), requests answered busy, the
accuracy the thresholds used give (calibration curve, per sample) vs at the original threshold; the settling
time after each step. Writes a JSON of the figures and a PNG (offered load, p99, threshold over time).

Usage: python bench/bench_control.py [--model models/fmnist_32.npz] [--server-cores 0.25] [--target-p99-ms 300]
       [--max-load 0.8] [--phases 15,30,30] [--plot docs/img/bench_control.png] [--out bench/out/control]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as ddnn-server does; must precede numpy

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddnn_gen.bench.load_ramp import CpuQuota, PacedFleet, Sample, calibrated_copy, percentile_ms
from ddnn_gen.device.simulated import precomputed, run_devices
from ddnn_gen.fold.program import fold
from ddnn_gen.fold.reference import exit_decision, run_device
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.ops.controller import Curve, ThresholdController
from ddnn_gen.ops.live import LiveController
from ddnn_gen.wire import codec, mqtt_client, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.connection import BrokerConnection

log = logging.getLogger("bench_control")
REPO = Path(__file__).resolve().parent.parent
SERVER_MAIN = "from ddnn_server.cli import main; main()"
BIN_S = 1.0  # the plot's and the settling rule's time resolution


@dataclass
class Phase:
    load: float  # offered load, x capacity
    seconds: float


class Server:
    """ddnn-server in its own process (in the CPU quota), stderr kept; ``start`` waits for its ready line."""

    def __init__(self, broker: str, model: Path, quota: CpuQuota, max_queue: int) -> None:
        self.args = [sys.executable, "-c", SERVER_MAIN, "--broker", broker, "--models", str(model), "--workers", "1",
                     "--telemetry-interval", "0.5", "--max-queue", str(max_queue), "-v"]
        self.quota = quota
        self.lines: list[str] = []
        self.ready = threading.Event()

    def start(self) -> Server:
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.quota.add(self.process.pid)
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.process.kill()
            raise RuntimeError("ddnn-server did not start:\n" + "".join(self.lines))
        return self

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "ddnn-server: ready" in line:
                self.ready.set()

    def stop(self) -> None:
        self.process.terminate()
        if self.process.wait(60) != 0:
            raise RuntimeError("ddnn-server did not stop cleanly:\n" + "".join(self.lines[-20:]))


def _set_threshold(connection: BrokerConnection, model_hash: bytes, value: float | None) -> None:
    """The retained model-wide threshold (None clears it), as `ddnngen threshold set|clear` does."""
    client = mqtt_client.Client(f"bench-control-{os.getpid()}", connection)
    client.connect(connection.host, connection.port)
    client.loop_start()
    payload = b"" if value is None else codec.encode_threshold(value)
    client.publish(topics.threshold_topic(model_hash), payload, qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def _bins(samples: list[Sample], start: float, end: float) -> list[dict[str, float]]:
    edges = np.arange(start, end + 1e-9, BIN_S)
    rows = []
    for lo in edges[:-1]:
        inside = [s for s in samples if lo <= s.sent < lo + BIN_S]
        answered = _round_trips(inside)
        rows.append({"t": lo - start, "samples": len(inside), "p99_ms": percentile_ms(answered),
                     "threshold": float(np.mean([s.threshold for s in inside])) if inside else math.nan,
                     "busy": sum(s.source == "busy" for s in inside),
                     "lost": sum(s.source == "fallback" for s in inside)})
    return rows


def _round_trips(samples: list[Sample]) -> list[float]:
    """Round trips of the offloaded samples that were answered, and of the lost ones (as long as the device
    waited: at least its timeout), so a server that answers nothing in time shows a p99 of the timeout
    rather than none. Busy answers (UNAVAILABLE, fast) are counted apart."""
    return [s.round_trip_s for s in samples if s.source in ("server", "fallback")]


def _fine(row: dict[str, float], target_ms: float) -> bool:
    return (math.isnan(row["p99_ms"]) or row["p99_ms"] <= target_ms) and not row["busy"] and not row["lost"]


def _settling(bins: list[dict[str, float]], begin: float, end: float, target_ms: float) -> tuple[float, int]:
    """Seconds after ``begin`` until the first 1 s bin with its p99 under the target, no request answered
    busy and none lost (the phase's length when none is); and how many bins after that are not."""
    inside = [b for b in bins if begin <= b["t"] < end - 1e-9]
    for i, row in enumerate(inside):
        if _fine(row, target_ms):
            return row["t"] - begin, sum(not _fine(later, target_ms) for later in inside[i:])
    return end - begin, 0


def run_ramp(connection: BrokerConnection, program: object, model_hash: bytes, part: object, n_samples: int,
             devices: int, sample_rate: float, phases: list[Phase], live: LiveController | None,
             timeout_s: float) -> tuple[list[Sample], float]:
    schedule = np.cumsum([0.0] + [p.seconds for p in phases])
    started = time.monotonic()

    def rate() -> float:
        elapsed = time.monotonic() - started
        phase = int(np.searchsorted(schedule, elapsed, side="right")) - 1
        return sample_rate * phases[min(phase, len(phases) - 1)].load

    fleet = PacedFleet(connection, program, model_hash, part, n_samples, devices, rate,  # type: ignore[arg-type]
                       timeout_s=timeout_s)
    fleet.start()
    if live is not None:
        live.start()
    started = time.monotonic()
    time.sleep(float(schedule[-1]))
    if live is not None:
        live.stop()
    return fleet.stop(), started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models/fmnist_32.npz"))
    parser.add_argument("--server-cores", type=float, default=0.25, help="CPU quota of the server process")
    parser.add_argument("--target-p99-ms", type=float, default=300.0,
                        help="the p99 round trip to stay under (what the controller keeps in p99 mode)")
    parser.add_argument("--max-load", type=float, default=None,
                        help="load mode: the controller keeps the load under this share of the measured capacity "
                             "(the p99 target is then only reported against)")
    parser.add_argument("--phases", default="15,30,30", help="seconds at 0.5x, 3x, 0.5x the capacity")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--interval", type=float, default=1.0, help="controller interval, s")
    parser.add_argument("--t-min", type=float, default=None, help="default: the model's stored threshold")
    parser.add_argument("--t-max", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="device reply timeout")
    parser.add_argument("--max-queue", type=int, default=64, help="server queue per model")
    parser.add_argument("--out", default=str(REPO / "bench/out/control"))
    parser.add_argument("--plot", default=str(REPO / "docs/img/bench_control.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ddnn_gen.ops.live").setLevel(logging.WARNING)  # the decisions are in the JSON
    seconds = [float(s) for s in args.phases.split(",")]
    phases = [Phase(0.5, seconds[0]), Phase(3.0, seconds[1]), Phase(0.5, seconds[2])]

    data = datasets.load("fashion-mnist", "test")
    work = Path(tempfile.mkdtemp(prefix="bench-control-"))
    model_path = calibrated_copy(args.model, data, work / Path(args.model).name)
    loaded = load_model(model_path)
    curve = Curve.from_calibration(loaded.spec.calibration)
    program = fold(loaded)
    device = run_device(program, data.images)
    part = precomputed(device.split_words, device.entropy, device.local_class)
    t0 = program.threshold
    onward0 = float(np.mean(~exit_decision(device.entropy, t0)))
    quota = CpuQuota(args.server_cores)
    results: dict[str, object] = {"model": loaded.spec.name, "threshold": t0, "onward_at_threshold": onward0,
                                  "target_p99_ms": args.target_p99_ms, "max_load": args.max_load,
                                  "server_cores": args.server_cores if quota.available else None,
                                  "phases": [p.__dict__ for p in phases]}
    with Broker() as broker:
        connection = broker.connection()
        server = Server(broker.address, model_path, quota, args.max_queue).start()
        try:
            log.info("measuring capacity (every sample offloaded, closed loop)")
            report = run_devices(connection, program, loaded.hash_bytes, device.split_words, device.entropy,
                                 device.local_class, args.devices, 400, timeout_s=30.0, all_to_server=True,
                                 window=8, telemetry_interval_s=0)
            capacity = report.count("server") / report.wall_s
            log.info("capacity %.0f requests/s (%d of %d answered)", capacity, report.count("server"),
                     len(report.outcomes))
            results["capacity_rps"] = capacity
            sample_rate = capacity / onward0
            runs: dict[str, dict[str, object]] = {}
            for mode in ("off", "on"):
                _set_threshold(connection, loaded.hash_bytes, None)
                time.sleep(1.0)
                live = None
                if mode == "on":
                    t_min = t0 if args.t_min is None else args.t_min
                    controller = ThresholdController(curve, capacity, t0, t_min=t_min, t_max=args.t_max,
                                                     max_load=args.max_load,
                                                     target_p99_ms=None if args.max_load else args.target_p99_ms)
                    live = LiveController(connection, loaded.hash_bytes, controller, args.interval)
                log.info("controller %s: offered load %s x %.0f requests/s", mode,
                         " -> ".join(f"{p.load}" for p in phases), capacity)
                samples, started = run_ramp(connection, program, loaded.hash_bytes, part, len(data), args.devices,
                                            sample_rate, phases, live, args.timeout_s)
                runs[mode] = _summary(samples, started, phases, args.target_p99_ms, curve, t0, live)
            _set_threshold(connection, loaded.hash_bytes, None)
        finally:
            server.stop()
            quota.remove()
    results["runs"] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_control.json").write_text(json.dumps(results, indent=1, default=float))
    _print(results)
    _plot(results, Path(args.plot))


def _summary(samples: list[Sample], started: float, phases: list[Phase], target_ms: float, curve: Curve,
             t0: float, live: LiveController | None) -> dict[str, object]:
    total = sum(p.seconds for p in phases)
    bins = _bins(samples, started, started + total)
    rows = []
    begin = 0.0
    for phase in phases:
        end = begin + phase.seconds
        inside = [s for s in samples if begin <= s.sent - started < end]
        settle, over = _settling(bins, begin, end, target_ms)
        answered = _round_trips(inside)
        after = _round_trips([s for s in inside if s.sent - started >= begin + settle])
        rows.append({"load": phase.load, "samples": len(inside), "offloaded": sum(s.source != "local" for s in inside),
                     "p99_ms": percentile_ms(answered), "p99_settled_ms": percentile_ms(after), "settling_s": settle,
                     "seconds_over_after_settling": over,
                     "lost": sum(s.source == "fallback" for s in inside),
                     "busy": sum(s.source == "busy" for s in inside),
                     "errors": sum(s.source == "error" for s in inside),
                     "threshold_end": bins[int(end / BIN_S) - 1]["threshold"] if bins else math.nan,
                     "accuracy": float(np.mean([curve.accuracy_at(s.threshold) for s in inside])) if inside
                     else math.nan,
                     "accuracy_original": curve.accuracy_at(t0)})
        begin = end
    decisions = [] if live is None else [{"time": at, "sample_rate": seen.sample_rate, "onward": seen.onward_share,
                                          "p99_ms": seen.p99_ms, "threshold": d.threshold, "reason": d.reason}
                                         for at, seen, d in live.decisions]
    return {"phases": rows, "bins": bins, "decisions": decisions, "lost": sum(r["lost"] for r in rows),
            "accuracy": float(np.mean([curve.accuracy_at(s.threshold) for s in samples])) if samples else math.nan}


def _print(results: dict[str, object]) -> None:
    runs = results["runs"]
    assert isinstance(runs, dict)
    print(f"\n{results['model']}: capacity {results['capacity_rps']:.0f} req/s (server CPU quota "
          f"{results['server_cores']} cores), original threshold {results['threshold']:.4f} "
          f"({100 * results['onward_at_threshold']:.1f} % offloaded), target p99 {results['target_p99_ms']} ms, "
          + (f"controller keeps the load under {results['max_load']} x capacity" if results["max_load"]
             else "controller keeps the p99 under it"))
    print("p99 of the offloaded requests' round trips (lost ones at the time the device waited); on, settled: "
          "after the settling time; over: 1 s bins over the target (or with busy/lost) after settling")
    print(f"{'phase':>8} | {'p99 off ms':>10} {'p99 on ms':>10} {'ratio':>6} | {'on, settled':>11} {'settle s':>8} "
          f"{'over':>4} | "
          f"{'lost off':>8} {'lost on':>7} | {'busy off':>8} {'busy on':>7} | {'thr on':>6} | {'acc off %':>9} "
          f"{'acc on %':>8}")
    for off, on in zip(runs["off"]["phases"], runs["on"]["phases"]):
        ratio = on["p99_ms"] / off["p99_ms"] if off["p99_ms"] else math.nan
        print(f"{off['load']:>7}x | {off['p99_ms']:>10.1f} {on['p99_ms']:>10.1f} {ratio:>6.2f} | "
              f"{on['p99_settled_ms']:>11.1f} {on['settling_s']:>8.1f} {on['seconds_over_after_settling']:>4} | "
              f"{off['lost']:>8} {on['lost']:>7} | "
              f"{off['busy']:>8} {on['busy']:>7} | {on['threshold_end']:>6.3f} | {100 * off['accuracy']:>9.2f} "
              f"{100 * on['accuracy']:>8.2f}")
    print(f"overall expected accuracy (calibration curve): controller on {100 * runs['on']['accuracy']:.2f} %, "
          f"at the original threshold {100 * runs['off']['accuracy']:.2f} %; lost: off {runs['off']['lost']}, "
          f"on {runs['on']['lost']}")


def _plot(results: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    assert isinstance(runs, dict)
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    phases = results["phases"]
    assert isinstance(phases, list)
    edges = np.cumsum([0.0] + [p["seconds"] for p in phases])
    for ax in axes:
        for edge in edges[1:-1]:
            ax.axvline(edge, color="grey", linewidth=0.8, linestyle=":")
    axes[0].step(edges, [phases[0]["load"]] + [p["load"] for p in phases], where="pre", color="black")
    axes[0].set_ylabel("offered load\n(x capacity)")
    for mode, colour in (("off", "tab:red"), ("on", "tab:blue")):
        bins = runs[mode]["bins"]
        t = [b["t"] + BIN_S / 2 for b in bins]
        axes[1].plot(t, [b["p99_ms"] for b in bins], color=colour, label=f"controller {mode}")
        axes[2].plot(t, [b["threshold"] for b in bins], color=colour, label=f"controller {mode}")
    axes[1].axhline(results["target_p99_ms"], color="black", linestyle="--", linewidth=0.8, label="target")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("p99 round trip, ms\n(per 1 s)")
    axes[1].legend(loc="upper right")
    axes[2].set_ylabel("device-exit\nthreshold")
    axes[2].set_xlabel("time, s")
    axes[2].legend(loc="upper right")
    fig.suptitle(f"{results['model']}: load ramp 0.5x -> 3x -> 0.5x of {results['capacity_rps']:.0f} req/s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log.info("plot: %s", path)


if __name__ == "__main__":
    main()
