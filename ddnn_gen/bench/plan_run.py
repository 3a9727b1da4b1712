"""A plan (ddnngen plan -o) deployed for real and measured next to what the planner predicted.

The generated C device program, a private Mosquitto and one ddnn-server per location the plan uses (started
with ``--plan --location``, so they run exactly what the plan places there), with each hop's link emulated
(bench.link_emulator: the device's connection through the first hop's link, an edge's upstream connection
through the edge-cloud link). Measured per sample: latency as the device saw it (mean, p99), the bytes that
crossed each link both ways (everything MQTT sent, keep-alives and acknowledgements included), per-tier
compute and per-hop communication, which exit answered; predicted: the plan file's figures and the planner's
model re-evaluated on the same samples.
"""

from __future__ import annotations

import logging
import math
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddnn_gen.bench.demo import start_server
from ddnn_gen.bench.device_csv import HopTimes, read_rows
from ddnn_gen.bench.link_emulator import EmulatedLink
from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.device.samples import write_samples
from ddnn_gen.errors import DdnnError
from ddnn_gen.fold import exits
from ddnn_gen.model import datasets, evaluate
from ddnn_gen.model.modelfile import LoadedModel, load_model
from ddnn_gen.model.placement import Placement, PlanFile, read_plan
from ddnn_gen.plan import candidates
from ddnn_gen.plan.profiles import Link, TierTimes
from ddnn_gen.wire.broker import Broker

log = logging.getLogger(__name__)

BENCH_DEVICE = "plan-bench-device"
# The planner's "within" bar for its latency and byte predictions (issue 14): what `bench --plan` flags.
PREDICTION_TOLERANCE = 0.25


@dataclass
class PlanBench:
    model: str
    locations: tuple[str, ...]
    thresholds: tuple[float | None, ...]
    samples: int
    links: dict[str, tuple[float, float]]  # hop -> (rtt ms, Mbit/s) as emulated; empty: plain loopback
    planned: dict[str, Any]  # the plan file's own prediction (on the samples it was planned on)
    predicted_mean_ms: float  # the planner's model on these samples
    predicted_p99_ms: float
    predicted_hop_bytes: dict[str, float]
    mean_ms: float
    p99_ms: float
    hop_bytes: dict[str, float]  # measured, both directions, per sample
    accuracy: float
    expected_accuracy: float  # `ddnngen eval` at the plan's thresholds on these samples
    answered_by: dict[str, float]
    expected_answered_by: dict[str, float]
    same_exit_share: float  # samples whose answering exit equals eval's
    rates: dict[str, float]  # local / server / fallback / error as the device saw them
    times: HopTimes

    def ratio(self, measured: float, predicted: float) -> float:
        return measured / predicted if predicted else math.nan

    def within_tolerance(self) -> bool:
        ratios = [self.ratio(self.mean_ms, self.predicted_mean_ms)] + [
            self.ratio(self.hop_bytes.get(hop, 0.0), value) for hop, value in self.predicted_hop_bytes.items()]
        return all(abs(r - 1) <= PREDICTION_TOLERANCE for r in ratios)

    def table(self) -> str:
        links = ", ".join(f"{hop} {rtt:g} ms / {mbps:g} Mbit/s" for hop, (rtt, mbps) in self.links.items())
        thresholds = "/".join("off" if t is None else f"{t:.4g}" for t in self.thresholds)
        lines = [
            f"{self.model}: plan {' | '.join(self.locations)} at thresholds {thresholds}, {self.samples} samples, "
            + (f"links emulated: {links}" if links else "links: plain loopback"),
            f"{'':<28} {'predicted':>10} {'measured':>10} {'ratio':>6}",
            f"{'mean latency (ms)':<28} {self.predicted_mean_ms:10.3f} {self.mean_ms:10.3f} "
            f"{self.ratio(self.mean_ms, self.predicted_mean_ms):6.2f}",
            f"{'p99 latency (ms)':<28} {self.predicted_p99_ms:10.3f} {self.p99_ms:10.3f} "
            f"{self.ratio(self.p99_ms, self.predicted_p99_ms):6.2f}",
        ]
        for hop, value in self.predicted_hop_bytes.items():
            measured = self.hop_bytes.get(hop, 0.0)
            lines.append(f"{'bytes/sample ' + hop:<28} {value:10.1f} {measured:10.1f} "
                         f"{self.ratio(measured, value):6.2f}")
        lines.append(f"{'overall accuracy':<28} {100 * self.expected_accuracy:9.2f}% {100 * self.accuracy:9.2f}%")
        # A tier's name is the model's; where the plan put it may differ (both upper tiers on one edge).
        shares = ", ".join(f"{name}{'' if name == where else f' (run at the {where})'} {100 * share:.1f}% "
                           f"(eval {100 * self.expected_answered_by[name]:.1f}%)"
                           for (name, share), where in zip(self.answered_by.items(), self.locations))
        lines.append(f"answered by: {shares}; same exit as eval for {100 * self.same_exit_share:.1f}% of samples")
        t = self.times
        lines.append(f"mean per sample (us): T_Device {_us(t.t_device_us)}  T_Total {_us(t.t_total_us)}; reaching it: "
                     f"T_first-server {_us(t.t_first_server_us)}  T_upstream-server {_us(t.t_upstream_server_us)}; "
                     f"crossing it: T_Comm(first hop) {_us(t.t_comm_first_us)}  T_Comm(edge-cloud) "
                     f"{_us(t.t_comm_upstream_us)}")
        lines.append("device outcomes: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.rates.items()))
        verdict = "within" if self.within_tolerance() else "NOT within"
        lines.append(f"mean latency and bytes per hop are {verdict} {100 * PREDICTION_TOLERANCE:.0f}% of the "
                     "prediction")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["within_tolerance"] = self.within_tolerance()
        return out


def _reprediction(loaded: LoadedModel, outputs: evaluate.ExitOutputs, plan: PlanFile) -> candidates.Prediction:
    """The planner's model on the bench's samples, with the compute times and links the plan was made with."""
    if plan.device_us is None or plan.server_us is None:
        raise DdnnError(f"{plan.path}: the plan records no compute profile to predict with; write it again with "
                        "ddnngen plan -o")
    times = TierTimes(loaded.spec.name, loaded.content_hash, plan.device_us, server_us=list(plan.server_us),
                      hop_overhead_us=plan.hop_overhead_us)
    links = {hop: Link(rtt, mbps) for hop, (rtt, mbps) in plan.links.items()}
    return candidates.predict(loaded.spec, outputs, times, links, plan.placement.locations,
                              plan.placement.thresholds)


def run_plan(model_path: str | Path, plan_path: str | Path, count: int = 1000, data_dir: str | None = None,
             emulate_links: bool = True, workers: int = 1, timeout_ms: int | None = None,
             work_dir: str | Path | None = None) -> PlanBench:
    """Deploy and measure the plan at ``plan_path`` for the model at ``model_path`` on its first ``count`` test
    samples; ``work_dir`` keeps the device project, samples and the device's per-sample CSV."""
    loaded = load_model(model_path)
    spec = loaded.spec
    plan = read_plan(plan_path, spec, loaded.content_hash)
    placement: Placement = plan.placement
    hops = placement.hops()
    missing = [hop for hop in hops if hop not in plan.links]
    if missing:
        raise DdnnError(f"{plan_path}: no link figures for {', '.join(missing)}")
    data = datasets.load(spec.dataset, "test", data_dir).subset(count)
    outputs = exits.compute_outputs(loaded, data)
    effective = tuple(candidates.OFF if t is None else t for t in placement.thresholds)
    expected_exit = evaluate.answering_exit(outputs, effective)
    expected = evaluate.metrics_at(outputs, effective)
    predicted = _reprediction(loaded, outputs, plan)
    round_trips = sum(plan.links[hop][0] for hop in hops)
    timeout = timeout_ms if timeout_ms is not None else int(2000 + 10 * round_trips)
    device_threshold = placement.device_threshold
    with tempfile.TemporaryDirectory(prefix="ddnn-plan-bench-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        compile_c(model_path, work / "device")
        # -O3 as the planner's device profile was measured (plan.profiles.measure).
        binary = toolchain.build_project(work / "device", target="net", opt="-O3")
        samples = work / "samples.ddns"
        write_samples(samples, data.images, data.labels)
        results = work / "results.csv"
        broker = Broker().start()
        links: dict[str, EmulatedLink] = {}
        servers: list[subprocess.Popen[str]] = []
        try:
            for hop in hops:
                rtt, mbps = plan.links[hop] if emulate_links else (0.0, None)
                links[hop] = EmulatedLink(broker.host, broker.port, rtt, mbps).start()
            connection = broker.connection()
            for location in reversed(placement.server_locations()):  # the tier above first: an edge needs it
                extra = ["--plan", str(plan_path), "--location", location]
                if placement.server(location).role == "edge":
                    extra += ["--upstream", links["edge-cloud"].address,
                              "--upstream-timeout-ms", str(max(1000, timeout // 2))]
                servers.append(start_server(connection, Path(model_path), workers, *extra))
            command = [str(binary), str(samples), "--device-id", BENCH_DEVICE, "--broker", links[hops[0]].address,
                       "--timeout-ms", str(timeout), "-o", str(results)]
            if device_threshold is not None:
                command += ["--threshold", repr(device_threshold)]
            if placement.server_only:
                command.append("--server-only")
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                raise DdnnError(f"the device program failed ({run.returncode}):\n{run.stderr}")
            log.info("%s", run.stderr.strip())
            measured_bytes = {hop: (link.bytes_up + link.bytes_down) / len(data) for hop, link in links.items()}
        finally:
            for process in servers:
                process.terminate()
                process.wait(30)
            for link in links.values():
                link.close()
            broker.cleanup()
        rows = read_rows(results)
    if len(rows) != len(data):
        raise DdnnError(f"the device program answered {len(rows)} of {len(data)} samples")
    final = np.array([int(r["final_class"]) for r in rows])
    answered = np.array([int(r["answered_by"]) for r in rows])
    sources = np.array([r["source"] for r in rows])
    times = HopTimes.from_rows(rows)
    names = [tier.name for tier in spec.tiers]
    return PlanBench(
        model=spec.name, locations=placement.locations, thresholds=placement.thresholds, samples=len(rows),
        links={hop: plan.links[hop] for hop in hops} if emulate_links else {},
        planned=plan.predicted, predicted_mean_ms=predicted.mean_ms, predicted_p99_ms=predicted.p99_ms,
        predicted_hop_bytes=predicted.hop_bytes,
        mean_ms=times.t_total_us / 1e3, p99_ms=times.p99_total_us / 1e3, hop_bytes=measured_bytes,
        accuracy=float((final == data.labels).mean()), expected_accuracy=expected.overall_accuracy,
        answered_by={name: float(np.mean(answered == index)) for index, name in enumerate(names)},
        expected_answered_by={name: float(np.mean(expected_exit == index)) for index, name in enumerate(names)},
        same_exit_share=float(np.mean(answered == expected_exit)),
        rates={name: float((sources == name).mean()) for name in ("local", "server", "fallback", "error")},
        times=times,
    )


def _us(value: float) -> str:
    """A mean over no samples (a hop no sample crossed) reads as '-' rather than nan."""
    return "-" if math.isnan(value) else f"{value:.1f}"
