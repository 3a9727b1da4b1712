"""What the planner knows about the machines and links: per-tier compute times and per-hop link figures.

Compute times are measured on this host (the generated C's own --bench figures for the device tier; the
servers' real code paths at batch 1 for the upper tiers) or read from a JSON file recorded elsewhere (a
board's `ddnn_device --bench` output turned into a profile). Link profiles are the user's: round trip and
bandwidth of each hop.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import chainer
import numpy as np
from threadpoolctl import threadpool_limits

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.device.samples import write_samples
from ddnn_gen.errors import DdnnError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import fold
from ddnn_gen.fold.reference import split_to_server_input
from ddnn_gen.model.links import input_to_float
from ddnn_gen.model.modelfile import LoadedModel

log = logging.getLogger(__name__)

PROFILE_FORMAT = "ddnn-profile"


class PlanError(DdnnError):
    """A profile or link description is unusable, or no plan meets the constraints."""


@dataclass(frozen=True)
class Link:
    """One hop: round trip (ms) and bandwidth (megabit/s) between two locations."""

    rtt_ms: float
    mbps: float

    def transfer_us(self, request_bytes: float, reply_bytes: float) -> float:
        """A request/reply pair over this hop: the round trip plus both messages at the link's rate."""
        return self.rtt_ms * 1e3 + (request_bytes + reply_bytes) * 8.0 / self.mbps


def parse_link(text: str) -> tuple[str, Link]:
    """``device-edge=RTT_MS:MBPS`` (also device-cloud, edge-cloud)."""
    name, _, value = text.partition("=")
    rtt, _, mbps = value.partition(":")
    if name not in ("device-edge", "device-cloud", "edge-cloud"):
        raise PlanError(f"link {text!r}: the hop must be device-edge, device-cloud or edge-cloud")
    try:
        link = Link(float(rtt), float(mbps))
    except ValueError as error:
        raise PlanError(f"link {text!r}: expected HOP=RTT_MS:MBPS, e.g. device-edge=2:50") from error
    if not (link.rtt_ms >= 0 and link.mbps > 0):
        raise PlanError(f"link {text!r}: the round trip must be >= 0 ms and the bandwidth > 0 Mbit/s")
    return name, link


@dataclass
class TierTimes:
    """Compute per sample (us) of every tier where it may run: ``device`` (tier 0 only, the generated C),
    ``server`` (any tier, as ddnn-server runs it: binary tiers with the bitwise reference, float tiers with
    Chainer at batch 1; tier 0 there means the raw-input path)."""

    model: str
    content_hash: str
    device_us: float
    device_stage_us: dict[str, float] = field(default_factory=dict)
    server_us: list[float] = field(default_factory=list)
    source: str = "measured on this host"
    device_ram_bytes: int = 0
    device_flash_bytes: int = 0
    # A request and its reply through the broker beyond the link (measure_hop_overhead_us), per hop crossed.
    hop_overhead_us: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def read(cls, path: str | Path, loaded: LoadedModel) -> TierTimes:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PlanError(f"{path}: not a readable profile ({error})") from error
        if raw.get("format") != PROFILE_FORMAT or raw.get("version") != 1:
            raise PlanError(f"{path}: not a {PROFILE_FORMAT} version 1 file")
        if raw.get("content_hash") != loaded.content_hash:
            raise PlanError(f"{path}: recorded for model {raw.get('model')} ({str(raw.get('content_hash'))[:12]}), "
                            f"not {loaded.spec.name} ({loaded.content_hash[:12]})")
        fields = {key: raw[key] for key in cls.__dataclass_fields__ if key in raw}
        times = cls(**fields)
        if len(times.server_us) != len(loaded.spec.tiers):
            raise PlanError(f"{path}: {len(times.server_us)} server tier times for {len(loaded.spec.tiers)} tiers")
        return times


def _median_us(run: Any, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e6)
    return float(np.median(samples))


def measure(loaded: LoadedModel, images_u8: np.ndarray, repeats: int = 30) -> TierTimes:
    """Time every tier on this host: the device tier as the generated C (its runner's --bench), every tier
    as ddnn-server runs it, one sample at a time."""
    from ddnn_gen.codegen.c_target import memory_plan

    spec, model = loaded.spec, loaded.model
    program = fold(loaded) if spec.tiers[0].binary and len(spec.tiers) > 1 else None
    device_us, stages = 0.0, {}
    if program is not None:
        with tempfile.TemporaryDirectory(prefix="ddnn-profile-") as tmp:
            compile_c(program, tmp, measure_code=False)
            binary = toolchain.build_project(tmp, opt="-O3")
            samples = Path(tmp) / "samples.ddns"
            write_samples(samples, images_u8, np.zeros(len(images_u8), dtype=np.int32))
            bench = toolchain.run_runner(binary, samples, bench=True, repeat=3).bench
        device_us = bench["total"]
        stages = {key: value for key, value in bench.items() if key not in ("total", "stages_total")}
    server_us = []
    x = input_to_float(images_u8[:1], spec.input.scale)
    # One BLAS thread, as ddnn-server runs (server/__init__.py): BLAS threads spinning against busy cores
    # make batch-1 times both slower and far noisier than what the server sees.
    with chainer.using_config("train", False), chainer.no_backprop_mode(), threadpool_limits(1):
        outputs = model.run_tiers(x).tier_outputs
        split = reference.run_device(program, images_u8[:1]).split_words if program is not None else None
        below = program  # the binary tier whose packed split the next tier receives, if any
        for tier_index, tier in enumerate(spec.tiers):
            if tier.binary and tier_index > 0:
                edge = fold(loaded, tier=tier_index)
                server_us.append(_median_us(lambda edge=edge, split=split: reference.run_device(edge, split),
                                            repeats))
                split = reference.run_device(edge, split).split_words
                below = edge
            elif tier_index > 0 and below is not None and spec.tiers[tier_index - 1].binary:
                # As a server receives it: the packed split unpacked to +-1, then the tier.
                server_us.append(_median_us(
                    lambda i=tier_index, p=below, s=split: model.run_tiers(split_to_server_input(p, s), i, i + 1),
                    repeats))
            else:
                tier_input = x if tier_index == 0 else outputs[tier_index - 1]
                server_us.append(_median_us(lambda i=tier_index, h=tier_input: model.run_tiers(h, i, i + 1),
                                            repeats))
    plan = memory_plan(program) if program is not None else None
    return TierTimes(spec.name, loaded.content_hash, device_us, stages, server_us,
                     device_ram_bytes=plan.ram_bytes if plan else 0,
                     device_flash_bytes=program.weight_bytes if program else 0,
                     hop_overhead_us=measure_hop_overhead_us(loaded, images_u8))


SERVER_MAIN = "from ddnn_server.cli import main; main()"


def measure_hop_overhead_us(loaded: LoadedModel, images_u8: np.ndarray, repeats: int = 60) -> float:
    """What one hop costs beyond the link and the server's compute on this host: a device's request round trip
    through a private Mosquitto and a real ddnn-server (one worker) serving ``loaded``, minus the compute the
    reply reports (broker, client libraries, the server's intake, queue and reply, thread wake-ups). 0 when
    it cannot be measured here (no Mosquitto, or a model without a binary device tier)."""
    from ddnn_gen.device.simulated import SimDevice, split_header
    from ddnn_gen.wire.broker import Broker, BrokerError

    spec = loaded.spec
    if not (spec.tiers[0].binary and len(spec.tiers) > 1):
        return 0.0
    program = fold(loaded)
    splits = reference.run_device(program, images_u8[:repeats]).split_words
    try:
        broker = Broker().start()
    except (BrokerError, OSError) as error:
        log.warning("no broker to measure the per-hop messaging overhead (%s); counting it as 0", error)
        return 0.0
    server = device = None
    try:
        connection = broker.connection()
        server = subprocess.Popen([sys.executable, "-c", SERVER_MAIN, *connection.runner_args(), "--models",
                                   loaded.path, "--workers", "1", "--from-tier", "1"], stderr=subprocess.PIPE,
                                  text=True)
        assert server.stderr is not None
        for line in server.stderr:
            if "ddnn-server: ready" in line:
                break
        else:
            log.warning("ddnn-server did not start; counting the messaging overhead as 0")
            return 0.0
        threading.Thread(target=server.stderr.read, daemon=True).start()
        device = SimDevice("ddnn-profile", connection, loaded.hash_bytes, timeout_s=5.0).start()
        overheads = []
        for index in range(len(splits)):
            header = split_header(program, loaded.hash_bytes, device.next_request_id())
            reply, round_trip_us = device.request(header, splits[index])
            if reply is None or reply.status != 0:
                log.warning("the profiling server did not answer (%s); counting the messaging overhead as 0",
                            "no reply" if reply is None else f"status {reply.status}")
                return 0.0
            overheads.append(round_trip_us - reply.server_us)
        # The first requests pay for connections settling; the median of the rest is the steady cost.
        steady = overheads[len(overheads) // 10:]
        return float(np.median(steady)) if steady else 0.0
    finally:
        if device is not None:
            device.stop()
        if server is not None:
            server.terminate()
            server.wait(30)
        broker.cleanup()
