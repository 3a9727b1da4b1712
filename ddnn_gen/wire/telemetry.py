"""Live telemetry over MQTT (docs/protocol.md, "Telemetry"): JSON a server publishes on
``ddnn/server/<server-id>/telemetry`` and a device on ``ddnn/device/<device-id>/telemetry``, and the one
function every reader validates them with.

Whoever reads telemetry (``ddnngen control``, the dashboard) takes it from the network, so it is hostile
until checked: at most MAX_TELEMETRY_BYTES, strict JSON (no NaN/Infinity), the schema below (closed objects,
bounded strings, numbers in range, a bounded number of models), and the id inside equal to the topic's (the
broker's rules tie a topic to the client's credentials; the payload cannot claim another identity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from ddnn_gen.errors import DdnnError
from ddnn_gen.wire import topics

TELEMETRY_VERSION = 1
MAX_TELEMETRY_BYTES = 16384
MAX_MODELS = 32  # per server message: more than any server loads, few enough to bound a reader's work

_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"}
_MODEL_NAME = "^[A-Za-z][A-Za-z0-9_]{0,62}$"  # spec names are C identifiers (model/spec.py)
_COUNTED_MODEL = "^(-|[A-Za-z][A-Za-z0-9_]{0,62})$"  # or "-": rejected before its model was known
_MODEL_KEY = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**53}
_RATE = {"type": "number", "minimum": 0, "maximum": 1e9}
_MS = {"type": ["number", "null"], "minimum": 0, "maximum": 1e9}
_PERCENTILES = {"type": "object", "additionalProperties": False, "required": ["p50", "p99"],
                "properties": {"p50": _MS, "p99": _MS}}
_THRESHOLD = {"type": "number", "minimum": 0, "maximum": 1}


def _per_model(values: dict[str, Any], keys: str) -> dict[str, Any]:
    inner = {"type": "object", "maxProperties": 32, "additionalProperties": False,
             "patternProperties": {keys: values}}
    return {"type": "object", "maxProperties": MAX_MODELS, "additionalProperties": False,
            "patternProperties": {_COUNTED_MODEL: inner}}


MAX_TIER_DEVICES = 64  # per-device tier thresholds in one server message (more: the first 64 by name)
_OPTIONAL_THRESHOLD = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_TIER_THRESHOLDS = {
    "type": "object", "additionalProperties": False, "required": ["tier", "default", "model", "devices"],
    "properties": {"tier": {"type": "integer", "minimum": 1, "maximum": topics.MAX_TIER},
                   "default": _THRESHOLD,  # the model file's, applied where nothing is retained
                   "model": _OPTIONAL_THRESHOLD,  # the retained model-wide value it applies (null: none)
                   "devices": {"type": "object", "maxProperties": MAX_TIER_DEVICES, "additionalProperties": False,
                               "patternProperties": {_ID["pattern"]: _THRESHOLD}}},
}

SERVER_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["v", "server", "time", "interval_s", "workers", "models", "rps", "answered_by", "queue_depth",
                 "batch", "busy", "service_ms", "latency_ms", "cpu_percent"],
    "properties": {
        "v": {"const": TELEMETRY_VERSION},
        "server": _ID,
        "time": {"type": "number", "minimum": 0},
        "interval_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
        "workers": {"type": "integer", "minimum": 1, "maximum": 4096},
        "models": {"type": "object", "maxProperties": MAX_MODELS, "additionalProperties": False,
                   "patternProperties": {_MODEL_NAME: _MODEL_KEY}},
        "rps": _per_model(_RATE, "^[A-Z_]{1,32}$"),
        "answered_by": _per_model(_COUNT, "^[0-7]$"),
        "queue_depth": _COUNT,
        "batch": {"type": "object", "additionalProperties": False, "required": ["count", "mean", "max"],
                  "properties": {"count": _COUNT, "mean": _RATE, "max": _COUNT}},
        "busy": {"type": "number", "minimum": 0, "maximum": 1},
        "service_ms": _PERCENTILES,
        "latency_ms": _PERCENTILES,
        "cpu_percent": {"type": "number", "minimum": 0, "maximum": 1e6},
        # Optional (older servers send neither): the request tier this server takes for each model, and the
        # thresholds it applies to the early exits it runs (edges, aggregators that are edges).
        "tiers": {"type": "object", "maxProperties": MAX_MODELS, "additionalProperties": False,
                  "patternProperties": {_MODEL_NAME: {"type": "integer", "minimum": 1, "maximum": topics.MAX_TIER}}},
        "tier_thresholds": {"type": "object", "maxProperties": MAX_MODELS, "additionalProperties": False,
                            "patternProperties": {_MODEL_NAME: _TIER_THRESHOLDS}},
    },
}

DEVICE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["v", "device", "model", "time", "samples", "local", "offloaded", "fallback", "error", "threshold",
                 "thresholds"],
    "properties": {
        "v": {"const": TELEMETRY_VERSION},
        "device": _ID,
        "model": _MODEL_KEY,
        "time": {"type": "number", "minimum": 0},
        "samples": _COUNT,  # counters since the device started
        "local": _COUNT,
        "offloaded": _COUNT,  # sent to the server: answered, fell back or got an error
        "fallback": _COUNT,
        "error": _COUNT,
        "threshold": _THRESHOLD,  # the one in use
        "thresholds": {"type": "object", "additionalProperties": False, "required": ["model", "device", "default"],
                       "properties": {"model": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                                      "device": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                                      "default": _THRESHOLD}},
        "rtt_ms": _PERCENTILES,  # round trips of the offloaded requests since the previous message
    },
}

_VALIDATORS = {"server": Draft202012Validator(SERVER_SCHEMA), "device": Draft202012Validator(DEVICE_SCHEMA)}
_ID_FIELD = {"server": "server", "device": "device"}


class TelemetryError(DdnnError, ValueError):
    """A telemetry message that is not one: too large, not JSON, off the schema, or claiming another id."""


@dataclass(frozen=True)
class Telemetry:
    kind: str  # "server" | "device"
    source: str  # its id (the topic's)
    body: dict[str, Any]


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _load(what: str, payload: bytes) -> Any:
    """Strict JSON of at most MAX_TELEMETRY_BYTES, else TelemetryError naming ``what``."""
    if len(payload) > MAX_TELEMETRY_BYTES:
        raise TelemetryError(f"{what}: {len(payload)} bytes, more than {MAX_TELEMETRY_BYTES}")
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise TelemetryError(f"{what}: not JSON: {str(error)[:120]}") from error


def _check(validator: Draft202012Validator, what: str, body: Any) -> None:
    problem = next(iter(validator.iter_errors(body)), None)
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path) or "message"
        raise TelemetryError(f"{what}: {where}: {problem.message[:160]}")


def parse(topic: str, payload: bytes) -> Telemetry:
    """The validated message on ``topic``, else TelemetryError saying why."""
    routed = topics.parse_telemetry_topic(topic)
    if routed is None:
        raise TelemetryError(f"{topic[:120]!r} is not a telemetry topic")
    kind, source = routed
    what = f"{kind} {source}"
    body = _load(what, payload)
    _check(_VALIDATORS[kind], what, body)
    if body[_ID_FIELD[kind]] != source:
        raise TelemetryError(f"{kind} {source}: the message claims id {body[_ID_FIELD[kind]]!r}")
    return Telemetry(kind, source, body)


# ---- the controller's topics: ddnn/control/<model>/target (operator) and .../state (ddnngen control) -------

MAX_DECISIONS = 20  # in one state message: the page's history, and a bound on a reader's work
TARGET_P99_MS = (0.1, 600000.0)  # the bounds `ddnngen control --target-p99-ms` accepts
MAX_LOAD = (0.01, 1.0)  # and --max-load's

TARGET_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["target_p99_ms"],
         "properties": {"target_p99_ms": {"type": "number", "minimum": TARGET_P99_MS[0],
                                          "maximum": TARGET_P99_MS[1]}}},
        {"type": "object", "additionalProperties": False, "required": ["max_load"],
         "properties": {"max_load": {"type": "number", "minimum": MAX_LOAD[0], "maximum": MAX_LOAD[1]}}},
    ],
}

_DECISION = {
    "type": "object", "additionalProperties": False,
    "required": ["time", "sample_rate", "onward_share", "p99_ms", "threshold", "predicted_load", "allowed_load",
                 "expected_accuracy", "reason", "target"],
    "properties": {
        "time": {"type": "number", "minimum": 0},
        "sample_rate": _RATE,  # samples/s the devices classified in the interval
        "onward_share": _THRESHOLD,  # the share of them they offloaded
        "p99_ms": _MS,
        "threshold": _THRESHOLD,  # chosen
        "predicted_load": _RATE,
        "allowed_load": _RATE,
        "expected_accuracy": _THRESHOLD,
        "reason": {"type": "string", "maxLength": 64},
        "target": TARGET_SCHEMA,  # the one this decision served
    },
}

MAX_STATE_DEVICES = 64  # per-device thresholds in one state message (more devices: the 64 busiest)

_CONTROLLED_DEVICE = {
    "type": "object", "additionalProperties": False, "required": ["threshold", "sample_rate", "correction"],
    "properties": {"threshold": _THRESHOLD,  # the device's own retained threshold, as the controller set it
                   "sample_rate": _RATE,  # samples/s it classifies (smoothed)
                   "correction": {"type": "number", "minimum": 0, "maximum": 100}},  # its onward share / curve's
}

RUNNING_STATE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["v", "model", "time", "target", "capacity", "threshold", "t_min", "t_max", "decisions"],
    "properties": {
        "v": {"const": TELEMETRY_VERSION},
        "model": _MODEL_KEY,
        "time": {"type": "number", "minimum": 0},
        "status": {"const": "online"},  # absent: online (what a controller before liveness sent)
        "target": TARGET_SCHEMA,
        # The exit it moves (absent: 0, the devices'); its load is the next tier's: for an edge tier's, the
        # requests reaching the edge are the "samples" of its decisions, those it sends on the onward share.
        "tier": {"type": "integer", "minimum": 0, "maximum": topics.MAX_TIER},
        "capacity": {"type": ["number", "null"], "minimum": 0, "maximum": 1e9},  # null: not estimated yet
        "threshold": _THRESHOLD,
        "t_min": _THRESHOLD,
        "t_max": _THRESHOLD,
        "decisions": {"type": "array", "maxItems": MAX_DECISIONS, "items": _DECISION},  # oldest first
        # Per-device control (`ddnngen control --per-device`): device id -> what the controller set for it.
        "devices": {"type": "object", "maxProperties": MAX_STATE_DEVICES, "additionalProperties": False,
                    "patternProperties": {_ID["pattern"]: _CONTROLLED_DEVICE}},
    },
}

# The controller's last will (and its clean-shutdown message): no controller runs for the model any more.
OFFLINE_STATE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["v", "model", "time", "status"],
    "properties": {"v": {"const": TELEMETRY_VERSION}, "model": _MODEL_KEY,
                   "time": {"type": "number", "minimum": 0},  # the will's: when the controller connected
                   "status": {"const": "offline"}},
}

STATE_SCHEMA: dict[str, Any] = {"oneOf": [RUNNING_STATE_SCHEMA, OFFLINE_STATE_SCHEMA]}


def offline_state(model: str, when: float) -> bytes:
    """The retained state that says no controller runs for ``model`` (a key): its will and its goodbye."""
    return encode({"v": TELEMETRY_VERSION, "model": model, "time": when, "status": "offline"})

_TARGET_VALIDATOR = Draft202012Validator(TARGET_SCHEMA)
_STATE_VALIDATOR = Draft202012Validator(STATE_SCHEMA)


def check_target(body: Any, what: str = "target") -> dict[str, float]:
    """``body`` if it is a valid target ({"target_p99_ms": X} or {"max_load": F}, in range), else
    TelemetryError; the dashboard's form and the controller use the same rule."""
    _check(_TARGET_VALIDATOR, what, body)
    return {key: float(value) for key, value in body.items()}


def parse_target(topic: str, payload: bytes) -> tuple[str, dict[str, float]]:
    """(model key, target) of a retained target message (any exit's controller), else TelemetryError."""
    routed = topics.parse_control_tier_topic(topic)
    if routed is None or routed[1] != "target":
        raise TelemetryError(f"{topic[:120]!r} is not a controller target topic")
    what = f"target for {routed[0]}"
    return routed[0], check_target(_load(what, payload), what)


def parse_state(topic: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    """(model key, state) of a controller's retained state message (any exit's), else TelemetryError. A
    running state's "tier" is the topic's (0 when absent from both)."""
    routed = topics.parse_control_tier_topic(topic)
    if routed is None or routed[1] != "state":
        raise TelemetryError(f"{topic[:120]!r} is not a controller state topic")
    what = f"control state for {routed[0]}" + (f" tier {routed[2]}" if routed[2] else "")
    body = _load(what, payload)
    _check(_STATE_VALIDATOR, what, body)
    if body["model"] != routed[0]:
        raise TelemetryError(f"{what}: the message claims model {body['model']!r}")
    if body.get("status") != "offline" and body.get("tier", 0) != routed[2]:
        raise TelemetryError(f"{what}: the message claims tier {body.get('tier', 0)!r}")
    return routed[0], body
