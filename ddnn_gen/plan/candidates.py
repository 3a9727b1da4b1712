"""Candidate plans and their predicted accuracy, latency and bytes: Neurosurgeon/Edgent-style partitioning
with early exits, predicted from a real evaluation and measured compute times.

A plan puts every tier at a location (device, edge, cloud; never back down the hierarchy) and gives each
early exit at a cut (where the next tier runs elsewhere) a threshold; exits inside one location are off.
Each evaluated sample is answered by the first confident active exit; its latency is the compute of every
tier up to there where they run, plus a request/reply over every hop it crossed (round trip + both
messages at the link's rate + the messaging overhead through a broker measured on this host). Means, p99
and bytes per hop are over the evaluated samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ddnn_gen.model.evaluate import ExitOutputs, answering_exit, metrics_at
from ddnn_gen.model.placement import LOCATIONS, Placement, plan_dict, why_not_runnable
from ddnn_gen.model.spec import ModelSpec
from ddnn_gen.plan.profiles import Link, PlanError, TierTimes
from ddnn_gen.wire.codec import REPLY_HEADER_BYTES, REQUEST_HEADER_BYTES

# MQTT around a payload: fixed header, topic (ddnn/req/<32 hex>/<id>), packet id, properties length.
MQTT_OVERHEAD_BYTES = 64
REPLY_BYTES = REPLY_HEADER_BYTES + 3 * 8 + MQTT_OVERHEAD_BYTES  # the default top-3 reply
OFF = -1.0  # a threshold no entropy is below: the exit never answers
EXIT_RATE_STEPS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.95)


@dataclass(frozen=True)
class Prediction:
    locations: tuple[str, ...]
    thresholds: tuple[float | None, ...]  # per early exit; None where the exit is off
    accuracy: float
    mean_ms: float
    p99_ms: float
    hop_bytes: dict[str, float]  # "device-edge" -> bytes per sample (requests and replies), averaged
    exit_rates: tuple[float, ...]
    device_ram_bytes: int
    device_flash_bytes: int

    @property
    def uplink_bytes(self) -> float:
        """Bytes per sample leaving the device."""
        return sum(value for hop, value in self.hop_bytes.items() if hop.startswith("device-"))

    def label(self) -> str:
        return " | ".join(f"{loc}" for loc in self.locations)


def assignments(spec: ModelSpec) -> list[tuple[str, ...]]:
    """Every placement of the tiers, in order, that the product can run (model.placement.why_not_runnable)."""
    return [locations for locations in itertools.product(LOCATIONS, repeat=len(spec.tiers))
            if why_not_runnable(spec, locations) is None]


def _split_bytes(spec: ModelSpec, outputs: ExitOutputs, tier: int) -> int:
    """Payload of what tier ``tier`` sends on: its packed split (binary) or float32 values."""
    if tier == 0:
        return outputs.split_bytes
    if tier - 1 < len(outputs.edges):
        return outputs.edges[tier - 1].split_bytes
    raise PlanError(f"tier {tier} has no split")


def _hop(links: dict[str, Link], start: str, end: str) -> tuple[str, Link]:
    name = f"{start}-{end}"
    if name not in links:
        raise PlanError(f"the plan needs the {name} link; give --link {name}=RTT_MS:MBPS")
    return name, links[name]


def predict(spec: ModelSpec, outputs: ExitOutputs, times: TierTimes, links: dict[str, Link],
            locations: tuple[str, ...], thresholds: tuple[float | None, ...]) -> Prediction:
    n_tiers = len(spec.tiers)
    effective = tuple(OFF if t is None else t for t in thresholds)
    answered = answering_exit(outputs, effective)
    metrics = metrics_at(outputs, effective)
    n = len(answered)
    latency = np.zeros(n)
    hop_bytes: dict[str, float] = {}
    raw_bytes = REQUEST_HEADER_BYTES + int(np.prod(spec.input.shape)) + MQTT_OVERHEAD_BYTES
    if locations[0] != "device":  # the device uploads its raw input (the paper's server-only)
        name, link = _hop(links, "device", locations[0])
        latency += link.transfer_us(raw_bytes, REPLY_BYTES) + times.hop_overhead_us
        hop_bytes[name] = raw_bytes + REPLY_BYTES
    for tier in range(n_tiers):
        reaches = answered >= tier
        compute = times.device_us if locations[tier] == "device" else times.server_us[tier]
        latency += np.where(reaches, compute, 0.0)
        if tier + 1 < n_tiers and locations[tier + 1] != locations[tier]:
            crosses = answered > tier
            request = REQUEST_HEADER_BYTES + _split_bytes(spec, outputs, tier) + MQTT_OVERHEAD_BYTES
            name, link = _hop(links, locations[tier], locations[tier + 1])
            latency += np.where(crosses, link.transfer_us(request, REPLY_BYTES) + times.hop_overhead_us, 0.0)
            hop_bytes[name] = hop_bytes.get(name, 0.0) + float(crosses.mean()) * (request + REPLY_BYTES)
    on_device = locations[0] == "device"
    return Prediction(locations, thresholds, metrics.overall_accuracy, float(latency.mean()) / 1e3,
                      float(np.percentile(latency, 99)) / 1e3, hop_bytes, metrics.exit_rates,
                      times.device_ram_bytes if on_device else 0, times.device_flash_bytes if on_device else 0)


def _threshold_choices(entropy: np.ndarray, stored: float) -> list[float]:
    """The stored threshold, and the thresholds below which given shares of the samples' entropies lie."""
    finite = entropy[np.isfinite(entropy)]
    values = {0.0, round(float(stored), 6)}
    if len(finite):
        values.update(round(float(np.quantile(finite, rate)), 6) for rate in EXIT_RATE_STEPS[1:])
    return sorted(values)


def candidates(spec: ModelSpec, outputs: ExitOutputs, times: TierTimes, links: dict[str, Link]) -> list[Prediction]:
    """Every runnable placement with every combination of threshold choices at its cuts."""
    found = []
    for locations in assignments(spec):
        needed = {f"{a}-{b}" for a, b in zip(("device", *locations), locations) if a != b}
        if not needed <= set(links):
            continue
        per_exit: list[list[float | None]] = []
        for exit_index in range(len(spec.tiers) - 1):
            cut = locations[exit_index + 1] != locations[exit_index]
            per_exit.append(_threshold_choices(outputs.early_entropy[exit_index], spec.thresholds[exit_index])
                            if cut else [None])
        for thresholds in itertools.product(*per_exit):
            found.append(predict(spec, outputs, times, links, locations, thresholds))
    if not found:
        raise PlanError("no placement is possible with the links given; give at least --link device-cloud=...")
    return found


def choose(predictions: list[Prediction], max_mean_ms: float | None = None, min_accuracy: float | None = None,
           max_uplink_bytes: float | None = None) -> Prediction:
    """The best plan under the constraints: with an accuracy floor, the fastest plan above it (then the most
    accurate); without one, the most accurate plan within the latency and uplink limits (then the fastest)."""
    feasible = [p for p in predictions
                if (max_mean_ms is None or p.mean_ms <= max_mean_ms)
                and (min_accuracy is None or p.accuracy >= min_accuracy)
                and (max_uplink_bytes is None or p.uplink_bytes <= max_uplink_bytes)]
    if not feasible:
        limits = ", ".join(text for text, value in ((f"mean latency <= {max_mean_ms} ms", max_mean_ms),
                                                    (f"accuracy >= {min_accuracy}", min_accuracy),
                                                    (f"uplink <= {max_uplink_bytes} B", max_uplink_bytes))
                           if value is not None)
        best = max(predictions, key=lambda p: p.accuracy)
        raise PlanError(f"no plan meets {limits}; the most accurate one reaches {100 * best.accuracy:.2f}% at "
                        f"{best.mean_ms:.2f} ms mean and {best.uplink_bytes:.0f} B uplink per sample")
    if min_accuracy is not None:
        return min(feasible, key=lambda p: (p.mean_ms, -p.accuracy))
    return max(feasible, key=lambda p: (p.accuracy, -p.mean_ms))


def plan_json(spec: ModelSpec, content_hash: str, chosen: Prediction, links: dict[str, Link],
              times: TierTimes) -> dict[str, object]:
    """The plan file `ddnngen compile --plan`, `ddnn-server --plan` and `ddnngen bench --plan` read."""
    predicted = {"accuracy": chosen.accuracy, "mean_ms": chosen.mean_ms, "p99_ms": chosen.p99_ms,
                 "hop_bytes": chosen.hop_bytes, "uplink_bytes": chosen.uplink_bytes,
                 "exit_rates": list(chosen.exit_rates), "device_ram_bytes": chosen.device_ram_bytes,
                 "device_flash_bytes": chosen.device_flash_bytes}
    profile = {"source": times.source, "device_us": times.device_us, "server_us": times.server_us,
               "hop_overhead_us": times.hop_overhead_us}
    return plan_dict(spec, content_hash, Placement(chosen.locations, chosen.thresholds),
                     {name: (link.rtt_ms, link.mbps) for name, link in links.items()}, predicted, profile)
