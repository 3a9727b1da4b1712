"""Where a model's tiers run (device, edge, cloud) and at which thresholds its exits answer: the plan file
`ddnngen plan` writes and `ddnngen compile --plan`, `ddnn-server --plan` and `ddnngen bench --plan` read.

A placement puts every tier at a location, never back down the hierarchy. Exits at a cut (the next tier
runs elsewhere) answer at their threshold; exits inside one location are off, since a server running
several tiers goes on to the last of them. Only placements the product can run are valid: the device runs
the binary device tier (the one compiled to C) or uploads its raw input to one server that runs the whole
model; an edge runs exactly one binary tier above the device (``ddnn-server --role edge``) with one
location above it for the rest (a cloud-role server with ``--from-tier``).

A plan file comes from a user's disk or another machine: every field is checked before anything runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddnn_gen.errors import DdnnError
from ddnn_gen.model.spec import ModelSpec, check_threshold

LOCATIONS = ("device", "edge", "cloud")
PLAN_FORMAT = "ddnn-plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 1 << 20


class PlacementError(DdnnError):
    """A plan file or placement that cannot run: unreadable, for another model, or not a valid placement."""


def why_not_runnable(spec: ModelSpec, locations: tuple[str, ...]) -> str | None:
    """None if the product can run ``locations`` (one per tier), else why not."""
    if len(locations) != len(spec.tiers):
        return f"{len(locations)} locations for {len(spec.tiers)} tiers"
    unknown = [loc for loc in locations if loc not in LOCATIONS]
    if unknown:
        return f"unknown location {unknown[0]!r}; locations are {', '.join(LOCATIONS)}"
    ranks = [LOCATIONS.index(loc) for loc in locations]
    if ranks != sorted(ranks):
        return "a tier runs below the one before it (locations go device, edge, cloud)"
    if "device" in locations[1:]:
        return "only the device tier runs on the device"
    if locations[0] == "device" and not (spec.tiers[0].binary and len(spec.tiers) > 1):
        return "the device tier runs on the device only when it is binary and has an exit"
    if locations[0] != "device" and len(set(locations)) > 1:
        return "a raw-input upload goes to one server running the whole model"
    rest = locations[1:]
    if locations[0] == "device" and len(set(rest)) > 1 and not (
            rest[0] != rest[1] and len(set(rest[1:])) == 1 and spec.tiers[1].binary):
        return "an edge runs exactly one binary tier, and one location above it runs the rest"
    return None


@dataclass(frozen=True)
class ServerPlacement:
    """What the ddnn-server at one location runs: its role, the tier it starts at, its exit's threshold."""

    location: str
    role: str  # "edge" or "cloud" (ddnn-server --role)
    from_tier: int  # the first tier it runs (1 also for a raw-input server: --from-tier)
    edge_threshold: float | None  # an edge's exit threshold; None for a cloud


@dataclass(frozen=True)
class Placement:
    locations: tuple[str, ...]
    thresholds: tuple[float | None, ...]  # per early exit; None where the exit is off (inside one location)

    @property
    def server_only(self) -> bool:
        """The device uploads its raw input (the paper's Server-only)."""
        return self.locations[0] != "device"

    @property
    def device_threshold(self) -> float | None:
        return None if self.server_only else self.thresholds[0]

    def server_locations(self) -> list[str]:
        """The locations a ddnn-server runs at, bottom up."""
        return [loc for loc in LOCATIONS if loc != "device" and loc in self.locations]

    def hops(self) -> list[str]:
        """The links a sample crosses on its way to the last tier, bottom up ("device-edge", ...)."""
        path = ["device", *self.server_locations()]
        return [f"{a}-{b}" for a, b in zip(path, path[1:])]

    def server(self, location: str) -> ServerPlacement:
        if location not in self.server_locations():
            raise PlacementError(f"the plan runs no server at {location!r}; it runs servers at "
                                 f"{', '.join(self.server_locations()) or 'no location'}")
        tiers = [index for index, loc in enumerate(self.locations) if loc == location]
        if self.server_only:
            return ServerPlacement(location, "cloud", 1, None)
        above = tiers[-1] + 1 < len(self.locations)
        if above:  # why_not_runnable allows this only for one binary edge tier
            return ServerPlacement(location, "edge", tiers[0], self.thresholds[tiers[0]])
        return ServerPlacement(location, "cloud", tiers[0], None)


def check_placement(spec: ModelSpec, locations: Any, thresholds: Any) -> Placement:
    """A placement of ``spec`` from untrusted values, or PlacementError."""
    if not isinstance(locations, (list, tuple)) or not all(isinstance(loc, str) for loc in locations):
        raise PlacementError(f"locations must be a list of {', '.join(LOCATIONS)}, got {locations!r:.80}")
    placed = tuple(locations)
    problem = why_not_runnable(spec, placed)
    if problem is not None:
        raise PlacementError(f"placement {' | '.join(placed)} of {spec.name} cannot run: {problem}")
    if not isinstance(thresholds, (list, tuple)) or len(thresholds) != len(spec.tiers) - 1:
        raise PlacementError(f"thresholds must be a list of {len(spec.tiers) - 1} (one per early exit; null where "
                             f"off), got {thresholds!r:.80}")
    checked: list[float | None] = []
    for index, value in enumerate(thresholds):
        cut = placed[index + 1] != placed[index]
        if value is None:
            if cut:
                raise PlacementError(f"exit {index} is at a cut ({placed[index]} -> {placed[index + 1]}): it needs "
                                     "a threshold")
            checked.append(None)
            continue
        # A planner's "never answers" marker (-1) is written as null; anything else must be a real threshold.
        checked.append(check_threshold(value, f"exit {index} threshold"))
    return Placement(placed, tuple(checked))


@dataclass(frozen=True)
class PlanFile:
    model: str
    content_hash: str
    placement: Placement
    links: dict[str, tuple[float, float]]  # hop -> (round trip ms, megabit/s)
    predicted: dict[str, Any]
    path: str = ""
    device_us: float | None = None  # the compute times the plan was made with (its profile), when recorded
    server_us: tuple[float, ...] | None = None
    hop_overhead_us: float = 0.0


def plan_dict(spec: ModelSpec, content_hash: str, placement: Placement, links: dict[str, tuple[float, float]],
              predicted: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    check_placement(spec, placement.locations, placement.thresholds)
    return {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "model": spec.name, "content_hash": content_hash,
        "locations": list(placement.locations), "thresholds": list(placement.thresholds),
        "exits": [tier.exit_name for tier in spec.tiers],
        "predicted": predicted,
        "links": {hop: {"rtt_ms": rtt, "mbps": mbps} for hop, (rtt, mbps) in links.items()},
        "profile": profile,
    }


def _link(hop: str, value: Any) -> tuple[float, float]:
    if hop not in ("device-edge", "device-cloud", "edge-cloud") or not isinstance(value, dict):
        raise PlacementError(f"link {hop!r:.40}: expected device-edge, device-cloud or edge-cloud with rtt_ms, mbps")
    rtt, mbps = value.get("rtt_ms"), value.get("mbps")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (rtt, mbps)) \
            or rtt < 0 or mbps <= 0:
        raise PlacementError(f"link {hop}: rtt_ms must be >= 0 and mbps > 0, got {value!r:.80}")
    return float(rtt), float(mbps)


def _read_raw(source: Path) -> dict[str, Any]:
    try:
        if source.stat().st_size > MAX_PLAN_BYTES:
            raise PlacementError(f"{source}: {source.stat().st_size} bytes is too large for a plan file")
        raw = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlacementError(f"{source}: not a readable plan file ({error})") from error
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise PlacementError(f"{source}: not a {PLAN_FORMAT} file (write one with `ddnngen plan ... -o`)")
    if raw.get("version") != PLAN_VERSION:
        raise PlacementError(f"{source}: plan version {raw.get('version')!r:.20}; this ddnngen reads "
                             f"version {PLAN_VERSION}")
    content_hash = raw.get("content_hash")
    if not isinstance(content_hash, str) or len(content_hash) != 64 or \
            any(c not in "0123456789abcdef" for c in content_hash):
        raise PlacementError(f"{source}: content_hash must be 64 lowercase hex digits")
    return raw


def plan_content_hash(path: str | Path) -> str:
    """The content hash of the model a plan file is for (to find that model among several)."""
    return str(_read_raw(Path(path))["content_hash"])


def read_plan(path: str | Path, spec: ModelSpec, content_hash: str) -> PlanFile:
    """The plan file at ``path``, checked, for the model ``spec`` with ``content_hash``."""
    source = Path(path)
    raw = _read_raw(source)
    if raw["content_hash"] != content_hash:
        raise PlacementError(f"{source}: the plan is for model {str(raw.get('model'))[:64]!r} "
                             f"({raw['content_hash'][:12]}), not {spec.name} ({content_hash[:12]}); plan this "
                             "model again (ddnngen plan)")
    links = raw.get("links", {})
    if not isinstance(links, dict):
        raise PlacementError(f"{source}: links must be an object")
    predicted = raw.get("predicted", {})
    try:
        placement = check_placement(spec, raw.get("locations"), raw.get("thresholds"))
    except DdnnError as error:
        raise PlacementError(f"{source}: {error}") from error
    device_us, server_us, overhead_us = _profile(source, raw.get("profile"), len(spec.tiers))
    return PlanFile(str(raw.get("model"))[:64], content_hash, placement,
                    {hop: _link(hop, value) for hop, value in links.items()},
                    predicted if isinstance(predicted, dict) else {}, str(source), device_us, server_us,
                    overhead_us)


def _time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _profile(source: Path, profile: Any, n_tiers: int) -> tuple[float | None, tuple[float, ...] | None, float]:
    if profile is None:
        return None, None, 0.0
    device_us = profile.get("device_us") if isinstance(profile, dict) else None
    server_us = profile.get("server_us") if isinstance(profile, dict) else None
    if not _time(device_us) or not isinstance(server_us, list) or len(server_us) != n_tiers \
            or not all(_time(v) for v in server_us):
        raise PlacementError(f"{source}: profile must give device_us and {n_tiers} server_us times (us, >= 0)")
    overhead_us = profile.get("hop_overhead_us", 0.0)
    if not _time(overhead_us):
        raise PlacementError(f"{source}: profile hop_overhead_us must be a time in us (>= 0)")
    return float(device_us), tuple(float(v) for v in server_us), float(overhead_us)
