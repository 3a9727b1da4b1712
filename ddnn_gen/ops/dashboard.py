"""The operator's live view (``ddnngen dashboard --http PORT``): an aiohttp page fed by server-sent events from
the fleet's MQTT telemetry and status, the controller's retained state (its target and recent decisions),
and the model-wide retained thresholds; forms set a device's, a model's or an edge tier's retained threshold
and the controller's target. Given the model files (``--model``), it shows the accuracy their calibration
curves (``ddnngen calibrate``) expect at the thresholds in force, model-wide and per device.

What it shows comes from the network and is validated as any reader does (wire/telemetry.py; status payloads
are ``online``/``offline`` under a valid id). The page renders every value as text (never as HTML), so a
hostile id or name could not script it even if one got past validation. Setting a threshold takes a JSON
POST: a page on another origin cannot send one without a CORS preflight this server never grants, so a
browser visiting a hostile site cannot steer the fleet through the operator's open dashboard. The page binds
to loopback by default; what it may publish is what its broker credentials (the operator role) may.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ddnn_gen.model.modelfile import load_model
from ddnn_gen.ops.controller import Curve
from ddnn_gen.ops.subscriber import OperatorClient
from ddnn_gen.wire import codec, telemetry, topics
from ddnn_gen.wire.connection import BrokerConnection, BrokerError

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 1.0
STATUS_SUBSCRIPTIONS = (f"{topics.TOPIC_ROOT}/status/+", f"{topics.TOPIC_ROOT}/server/+/status")
MODEL_THRESHOLDS = f"{topics.TOPIC_ROOT}/threshold/+"  # the model-wide retained values
TIER_THRESHOLDS = f"{topics.TOPIC_ROOT}/tier-threshold/#"  # server tiers' retained values, model-wide and per device


@dataclass(frozen=True)
class ModelInfo:
    """A model the operator gave the dashboard: its key, name, the file's threshold, its calibration curve."""

    key: str
    name: str
    default_threshold: float
    curve: Curve | None  # None: the file has no calibration curve, so no expected accuracy


def model_info(path: str | Path) -> ModelInfo:
    """What the dashboard needs of a model file: key, name, stored threshold, calibration curve (if any)."""
    loaded = load_model(path)
    curve = Curve.from_calibration(loaded.spec.calibration) if loaded.spec.calibration else None
    return ModelInfo(topics.model_key(loaded.hash_bytes), loaded.spec.name, loaded.spec.thresholds[0], curve)


def _expected(curve: Curve | None, threshold: float | None) -> tuple[float | None, float | None]:
    """(accuracy, share offloaded) the calibration curve gives at ``threshold``; Nones when unknown."""
    if curve is None or threshold is None:
        return None, None
    return curve.accuracy_at(threshold), curve.onward_at(threshold)


def _is_key(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


@dataclass
class _Device:
    online: bool | None = None
    body: dict[str, Any] | None = None
    seen: float = 0.0
    # Counters when the device's threshold last changed: the exit rate shown is the one at the current threshold.
    base_samples: int = 0
    base_local: int = 0


@dataclass
class FleetState:
    """Thread-safe: the MQTT thread writes, the page's event streams read."""

    devices: dict[str, _Device] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    controls: dict[str, dict[str, Any]] = field(default_factory=dict)  # model key -> the controller's state
    model_thresholds: dict[str, float] = field(default_factory=dict)  # model key -> retained model-wide value
    # (model key, tier, device id or None for model-wide) -> the retained value on ddnn/tier-threshold/...
    tier_thresholds: dict[tuple[str, int, str | None], float] = field(default_factory=dict)
    tier_controls: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)  # a tier's controller
    rejected: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def receive(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if parts[1:2] == ["status"] or (len(parts) == 4 and parts[1] == "server" and parts[3] == "status"):
            self._status(parts, payload)
            return
        if parts[1:2] == ["threshold"]:
            self._model_threshold(parts, payload)
            return
        if parts[1:2] == ["tier-threshold"]:
            self._tier_threshold(parts, payload)
            return
        if parts[1:2] == ["control"]:
            self._control(topic, payload)
            return
        try:
            message = telemetry.parse(topic, payload)
        except telemetry.TelemetryError as error:
            with self._lock:
                self.rejected += 1
            log.debug("ignoring telemetry: %s", error)
            return
        with self._lock:
            if message.kind == "server":
                self.servers.setdefault(message.source, {"online": None})["body"] = message.body
                return
            device = self.devices.setdefault(message.source, _Device())
            body = message.body
            old = device.body
            if old is None or old["threshold"] != body["threshold"] or body["samples"] < old["samples"]:
                device.base_samples, device.base_local = body["samples"], body["local"]
            device.body, device.seen = body, time.time()

    def _reject(self, why: str) -> None:
        with self._lock:
            self.rejected += 1
        log.debug("ignoring: %s", why)

    def _model_threshold(self, parts: list[str], payload: bytes) -> None:
        if len(parts) != 3 or not _is_key(parts[2]):
            self._reject(f"not a model-wide threshold topic: {'/'.join(parts)[:120]!r}")
            return
        self._retain(self.model_thresholds, parts[2], payload)  # cleared: the model file's applies

    def _tier_threshold(self, parts: list[str], payload: bytes) -> None:
        tiers = {str(t) for t in range(1, topics.MAX_TIER + 1)}
        if (len(parts) not in (4, 5) or not _is_key(parts[2]) or parts[3] not in tiers
                or (len(parts) == 5 and not topics.valid_device_id(parts[4]))):
            self._reject(f"not a tier threshold topic: {'/'.join(parts)[:120]!r}")
            return
        self._retain(self.tier_thresholds, (parts[2], int(parts[3]), parts[4] if len(parts) == 5 else None), payload)

    def _retain(self, values: dict[Any, float], where: Any, payload: bytes) -> None:
        """A retained threshold arrived for ``where``: an empty one clears it, an invalid one is refused."""
        value = codec.decode_threshold(payload) if payload else None
        if payload and value is None:
            self._reject(f"invalid threshold {payload[:64]!r}")
            return
        with self._lock:
            if value is None:
                values.pop(where, None)
            else:
                values[where] = value

    def _control(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained state
        try:
            key, body = telemetry.parse_state(topic, payload)
        except telemetry.TelemetryError as error:
            self._reject(str(error))
            return
        routed = topics.parse_control_tier_topic(topic)
        tier = routed[2] if routed else 0
        with self._lock:
            last = self.tier_controls.get((key, tier), {}) if tier else self.controls.get(key, {})
            if body.get("status") == "offline":
                # The controller stopped or died: keep its last state on the page, marked offline.
                body = {**last, "status": "offline", "offline_since": body["time"]}
            if tier:
                self.tier_controls[(key, tier)] = body
            else:
                self.controls[key] = body

    def _tier_rows(self) -> list[dict[str, Any]]:
        """Each model's server-tier thresholds (lock held): what is retained, model-wide and per device, and
        what each server running that tier's exit reports applying (its telemetry)."""
        rows: dict[tuple[str, int, str | None], dict[str, Any]] = {}

        def row(key: str, tier: int, device: str | None) -> dict[str, Any]:
            info = self.models.get(key)
            control = self.tier_controls.get((key, tier)) if device is None else None
            return rows.setdefault((key, tier, device), {
                "model": key, "name": info.name if info else None, "tier": tier, "device": device, "retained": None,
                "applied": {}, "control": control})

        for (key, tier, device), value in self.tier_thresholds.items():
            row(key, tier, device)["retained"] = value
        for server_id, server in self.servers.items():
            body = server.get("body") or {}
            for name, applied in (body.get("tier_thresholds") or {}).items():
                key = body["models"].get(name)
                if key is None:
                    continue
                in_force = applied["model"] if applied["model"] is not None else applied["default"]
                row(key, applied["tier"], None)["applied"][server_id] = in_force
                for device, value in applied["devices"].items():
                    row(key, applied["tier"], device)["applied"][server_id] = value
        for (key, tier), _ in self.tier_controls.items():
            row(key, tier, None)
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], k[2] or ""))]

    def _status(self, parts: list[str], payload: bytes) -> None:
        if payload not in (b"online", b"offline"):
            with self._lock:
                self.rejected += 1
            return
        online = payload == b"online"
        with self._lock:
            if len(parts) == 3 and parts[1] == "status" and topics.valid_device_id(parts[2]):
                self.devices.setdefault(parts[2], _Device()).online = online
            elif len(parts) == 4 and parts[1] == "server" and topics.valid_device_id(parts[2]):
                self.servers.setdefault(parts[2], {"online": None})["online"] = online

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            devices = []
            for device_id, device in sorted(self.devices.items()):
                body = device.body or {}
                since = body.get("samples", 0) - device.base_samples
                local = body.get("local", 0) - device.base_local
                total = body.get("samples", 0)
                info = self.models.get(body.get("model") or "")
                accuracy, onward = _expected(info.curve if info else None, body.get("threshold"))
                control = self.controls.get(body.get("model") or "") or {}
                controlled = (control.get("devices") or {}).get(device_id)
                chosen = body.get("thresholds") or {}
                source = ("device" if chosen.get("device") is not None else "model"
                          if chosen.get("model") is not None else "default" if body else None)
                if (source == "device" and controlled is not None and control.get("status") != "offline"
                        and abs(controlled["threshold"] - chosen["device"]) < 1e-6):
                    source = "controller"  # its own retained value, the one the running controller set
                devices.append({
                    "expected_accuracy": accuracy, "expected_offload": onward,
                    "id": device_id, "online": device.online, "model": body.get("model"),
                    "threshold": body.get("threshold"), "samples": total,
                    "local_rate": body.get("local", 0) / total if total else None,
                    "offload_rate": body.get("offloaded", 0) / total if total else None,
                    "fallback": body.get("fallback"), "errors": body.get("error"),
                    "samples_at_threshold": since, "local_rate_at_threshold": local / since if since else None,
                    "rtt_p99_ms": (body.get("rtt_ms") or {}).get("p99"), "age_s": time.time() - device.seen
                    if device.body else None, "threshold_from": source})
            servers = []
            for server_id, server in sorted(self.servers.items()):
                body = server.get("body") or {}
                rps = sum(sum(by_status.values()) for by_status in body.get("rps", {}).values())
                servers.append({"id": server_id, "online": server["online"], "rps": rps,
                                "queue_depth": body.get("queue_depth"), "busy": body.get("busy"),
                                "latency_p99_ms": (body.get("latency_ms") or {}).get("p99"),
                                "service_p99_ms": (body.get("service_ms") or {}).get("p99"),
                                "cpu_percent": body.get("cpu_percent"), "models": body.get("models", {})})
            models = []
            for key in sorted(set(self.models) | set(self.controls) | set(self.model_thresholds)):
                info = self.models.get(key)
                retained = self.model_thresholds.get(key)
                threshold = retained if retained is not None else info.default_threshold if info else None
                accuracy, onward = _expected(info.curve if info else None, threshold)
                models.append({"key": key, "name": info.name if info else None, "threshold": threshold,
                               "source": "retained" if retained is not None else "model file" if info else None,
                               "expected_accuracy": accuracy, "expected_offload": onward,
                               "control": self.controls.get(key)})
            tier_controls = []
            for (key, tier), body in sorted(self.tier_controls.items()):
                info = self.models.get(key)
                tier_controls.append({"key": key, "name": info.name if info else None, "tier": tier, "control": body})
            return {"time": time.time(), "devices": devices, "servers": servers, "models": models,
                    "tier_thresholds": self._tier_rows(), "tier_controls": tier_controls, "rejected": self.rejected}


class Dashboard:
    """The MQTT side (subscriptions, threshold publishes) and the HTTP side (page, events, form) of the view."""

    def __init__(self, connection: BrokerConnection, models: tuple[ModelInfo, ...] = ()) -> None:
        self.connection = connection
        self.state = FleetState(models={info.key: info for info in models})
        self._client = OperatorClient(connection, "dashboard",
                                      (*topics.TELEMETRY_SUBSCRIPTIONS, *STATUS_SUBSCRIPTIONS, MODEL_THRESHOLDS,
                                       TIER_THRESHOLDS, topics.CONTROL_STATE_SUBSCRIPTION,
                                       topics.CONTROL_TIER_STATE_SUBSCRIPTION), self.state.receive)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def set_threshold(self, model_key: str, device_id: str | None, value: float | None, tier: int | None = None) -> str:
        """Publish (retained) or clear a device exit's threshold (``tier`` None) or a server tier's; the topic
        it went to."""
        model_hash = bytes.fromhex(model_key)
        topic = (topics.threshold_topic(model_hash, device_id) if tier is None
                 else topics.tier_threshold_topic(model_hash, tier, device_id))
        return self._publish(topic, b"" if value is None else codec.encode_threshold(value))

    def set_target(self, model_key: str, target: dict[str, float], tier: int = 0) -> str:
        """Publish the retained target of the controller of a model's exit ``tier`` (0: the devices', else a
        server tier's: ``ddnngen control --tier``); the topic it went to."""
        return self._publish(topics.control_target_topic(bytes.fromhex(model_key), tier), telemetry.encode(target))

    def _publish(self, topic: str, payload: bytes) -> str:
        if not self._client.publish_retained(topic, payload, wait_s=10.0):
            raise BrokerError(f"dashboard: not connected to the broker; {topic} not set")
        log.info("dashboard: %s = %s", topic, payload.decode() or "(cleared)")
        return topic

    # ---- HTTP ----------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4096)
        app.router.add_get("/", self._page)
        app.router.add_get("/events", self._events)
        app.router.add_get("/api/state", self._state)
        app.router.add_post("/api/threshold", self._threshold)
        app.router.add_post("/api/target", self._target)
        return app

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                                "style-src 'unsafe-inline'"})

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.snapshot(), dumps=_dumps)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for snapshot in self._snapshots():
            try:
                await response.write(f"data: {_dumps(snapshot)}\n\n".encode())
            except (ConnectionResetError, RuntimeError):  # the page went away
                break
        return response

    async def _snapshots(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield self.state.snapshot()
            await asyncio.sleep(PUSH_INTERVAL_S)

    async def _threshold(self, request: web.Request) -> web.Response:
        """{"model": key, "device": id or null, "tier": null (the device exit) or 1..7 (a server tier's),
        "value": [0, 1] or null to clear}."""
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        model_key, device_id, value, tier = body.get("model"), body.get("device"), body.get("value"), body.get("tier")
        if not _valid_key(model_key):
            return _problem(400, "model: 32 lower-case hex digits (the model key)")
        if device_id is not None and (not isinstance(device_id, str) or not topics.valid_device_id(device_id)):
            return _problem(400, f"device: {topics.DEVICE_ID_RULE}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0.0 <= value <= 1.0):
            return _problem(400, "value: a number in [0, 1], or null to clear")
        if tier is not None and (isinstance(tier, bool) or not isinstance(tier, int)
                                 or not 1 <= tier <= topics.MAX_TIER):
            return _problem(400, f"tier: a server tier 1..{topics.MAX_TIER}, or null for the device exit")
        topic = await asyncio.get_running_loop().run_in_executor(
            None, self.set_threshold, model_key, device_id, None if value is None else float(value), tier)
        return web.json_response({"topic": topic, "value": value})

    async def _target(self, request: web.Request) -> web.Response:
        """{"model": key, "target": {"max_load": F} or {"target_p99_ms": X} (telemetry.TARGET_SCHEMA), "tier":
        absent or null (the devices' exit) or 1..7 (a server tier's controller)}."""
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        model_key, tier = body.get("model"), body.get("tier")
        if not _valid_key(model_key) or not {"model", "target"} <= set(body) <= {"model", "target", "tier"}:
            return _problem(400, "expected {model: the model key (32 lower-case hex digits), target: {...}, "
                                 "optionally tier}")
        if tier is not None and (isinstance(tier, bool) or not isinstance(tier, int)
                                 or not 1 <= tier <= topics.MAX_TIER):
            return _problem(400, f"tier: a server tier 1..{topics.MAX_TIER}, or null for the devices' exit")
        try:
            target = telemetry.check_target(body["target"])
        except telemetry.TelemetryError as error:
            return _problem(400, f"{error} (give max_load in [{telemetry.MAX_LOAD[0]}, {telemetry.MAX_LOAD[1]}] "
                                 f"or target_p99_ms in [{telemetry.TARGET_P99_MS[0]}, {telemetry.TARGET_P99_MS[1]}])")
        topic = await asyncio.get_running_loop().run_in_executor(None, self.set_target, model_key, target, tier or 0)
        return web.json_response({"topic": topic, "target": target})

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self, port: int, address: str = "127.0.0.1", timeout_s: float = 10.0) -> Dashboard:
        self._client.start(timeout_s)
        started = threading.Event()
        problem: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._runner = web.AppRunner(self.app())
            try:
                loop.run_until_complete(self._runner.setup())
                loop.run_until_complete(web.TCPSite(self._runner, address, port).start())
            except OSError as error:
                problem.append(error)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="ddnn-dashboard", daemon=True)
        self._thread.start()
        started.wait(timeout_s)
        if problem:
            self.stop()
            raise BrokerError(f"dashboard: cannot listen on {address}:{port}: {problem[0]}")
        self.url = f"http://{address}:{port}/"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._client.stop()


def _dumps(value: object) -> str:
    return json.dumps(value, default=float, allow_nan=False)


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _valid_key(value: object) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: refused as not JSON, never read as a value


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the problem to answer (a browser on another origin cannot send JSON
    without a preflight this server never grants)."""
    if request.content_type != "application/json":
        return _problem(415, "send JSON")
    try:
        body = json.loads(await request.text(), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError):
        return _problem(400, "not JSON")
    if not isinstance(body, dict):
        return _problem(400, "expected an object")
    return body


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ddnngen fleet</title>
<style>
body { font-family: sans-serif; margin: 1.5em; } table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; } th { background: #eee; }
td.id { text-align: left; font-family: monospace; } .offline { color: #999; } .online { color: #070; }
input.threshold { width: 5em; }
</style></head>
<body>
<h1>ddnngen fleet</h1>
<p id="status">connecting...</p>
<h2>Servers</h2>
<table id="servers"><thead><tr><th>server</th><th>status</th><th>req/s</th><th>queue</th><th>busy</th>
<th>p99 latency ms</th><th>p99 service ms</th><th>CPU %</th></tr></thead><tbody></tbody></table>
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th><th>key</th><th>threshold in force</th><th>from</th>
<th>expected accuracy %</th><th>expected offloaded %</th><th>set model threshold</th>
<th>set edge tier threshold</th></tr></thead><tbody></tbody></table>
<h2>Server tiers' thresholds</h2>
<table id="tiers"><thead><tr><th>model</th><th>tier</th><th>for</th><th>retained</th>
<th>applied by (server: value)</th><th>controller</th></tr></thead><tbody></tbody></table>
<h2>Controller</h2>
<div id="controls"></div>
<h2>Devices</h2>
<table id="devices"><thead><tr><th>device</th><th>status</th><th>threshold</th><th>samples</th><th>local exit %</th>
<th>offloaded %</th><th>fallback</th><th>errors</th><th>local exit % at this threshold</th>
<th>samples at this threshold</th><th>p99 RTT ms</th><th>expected accuracy %</th><th>threshold from</th>
<th>set threshold</th></tr>
</thead><tbody></tbody></table>
<script>
"use strict";
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;  // text, never HTML: ids and names come from the network
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function num(value, digits) { return value === null || value === undefined ? "-" : Number(value).toFixed(digits); }
function pct(value) { return value === null || value === undefined ? "-" : (100 * value).toFixed(2); }
function state(online) { return online === null ? "?" : online ? "online" : "offline"; }
const editing = {};
function post(url, body) {
  // The server validates every field; the page only forwards what the operator typed.
  return fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
    .then(r => r.json()).then(answer => {
      document.getElementById("status").textContent = answer.error ? "refused: " + answer.error
        : "set " + answer.topic + " = " + JSON.stringify(answer.value ?? answer.target);
      return answer;
    });
}
function typed(text) { return text.trim() === "" ? null : Number(text); }
function setThreshold(device, model) {
  const input = document.getElementById("input-" + device);
  post("/api/threshold", {model: model, device: device, value: typed(input.value)})
    .then(() => { delete editing[device]; });
}
function input(id, placeholder) {
  const element = document.createElement("input");
  element.id = id; element.className = "threshold"; element.placeholder = placeholder;
  return element;
}
function button(id, text, action) {
  const element = document.createElement("button");
  element.id = id; element.textContent = text; element.addEventListener("click", action);
  return element;
}
function target(t) {
  if (!t) return "-";
  return t.max_load !== undefined ? "load under " + t.max_load + " of capacity"
                                  : "p99 under " + t.target_p99_ms + " ms";
}
function renderModels(models) {
  const body = document.querySelector("#models tbody");
  for (const m of models) {
    let row = document.getElementById("model-" + m.key);
    if (!row) {
      row = document.createElement("tr");
      row.id = "model-" + m.key;
      for (let i = 0; i < 6; i++) cell(row, "");
      const own = document.createElement("td");
      own.append(input("model-input-" + m.key, "0..1"), button("model-set-" + m.key, "set", () =>
        post("/api/threshold", {model: m.key, device: null, value: typed(
          document.getElementById("model-input-" + m.key).value)})));
      const tier = document.createElement("td");
      const tierInput = input("tier-number-" + m.key, "tier"); tierInput.value = "1";
      tier.append(tierInput, input("tier-input-" + m.key, "0..1"), button("tier-set-" + m.key, "set", () =>
        post("/api/threshold", {model: m.key, device: null, tier: typed(tierInput.value),
                                value: typed(document.getElementById("tier-input-" + m.key).value)})));
      row.append(own, tier);
      body.appendChild(row);
    }
    const values = [m.name ?? "-", m.key, num(m.threshold, 4), m.source ?? "-", pct(m.expected_accuracy),
                    pct(m.expected_offload)];
    const names = ["name", "key", "threshold", "source", "expected-accuracy", "expected-offload"];
    values.forEach((v, i) => { const td = row.children[i]; td.textContent = v; td.dataset.field = names[i]; });
    row.children[1].className = "id";
    row.children[2].dataset.value = m.threshold === null ? "" : String(m.threshold);  // full precision, for tests
    renderControl(m);
  }
}
function renderTiers(rows) {
  const body = document.querySelector("#tiers tbody");
  body.replaceChildren();
  for (const t of rows) {
    const row = document.createElement("tr");
    row.id = "tier-" + t.model + "-" + t.tier + "-" + (t.device ?? "model");
    cell(row, t.name ?? t.model, "id"); cell(row, String(t.tier));
    cell(row, t.device ?? "all devices", t.device ? "id" : "");
    const retained = cell(row, num(t.retained, 4));
    retained.dataset.field = "retained";
    retained.dataset.value = t.retained === null ? "" : String(t.retained);  // full precision, for tests
    const servers = Object.keys(t.applied).sort();
    const applied = cell(row, servers.map(s => s + ": " + num(t.applied[s], 4)).join(", ") || "-");
    applied.dataset.field = "applied";
    applied.dataset.value = JSON.stringify(t.applied);
    const c = t.control;
    cell(row, c ? (c.status === "offline" ? "offline" : "threshold " + num(c.threshold, 4)) : "-");
    body.appendChild(row);
  }
}
function renderControl(m) {
  // m.tier: absent or 0 for the devices' exit's controller, else a server tier's (ddnngen control --tier).
  const box = document.getElementById("controls");
  const id = m.key + (m.tier ? "-t" + m.tier : "");
  let section = document.getElementById("control-" + id);
  if (!m.control) return;
  if (!section) {
    section = document.createElement("div");
    section.id = "control-" + id;
    const title = document.createElement("h3");
    title.textContent = (m.name ?? m.key) + (m.tier ? ", tier " + m.tier + "'s exit" : "");
    const line = document.createElement("p"); line.className = "target";
    const form = document.createElement("p");
    const kind = document.createElement("select"); kind.id = "target-kind-" + id;
    for (const [value, label] of [["max_load", "max load (share of capacity)"], ["target_p99_ms", "p99 ms"]]) {
      const option = document.createElement("option"); option.value = value; option.textContent = label;
      kind.appendChild(option);
    }
    form.append("new target: ", kind, input("target-input-" + id, "value"), button("target-set-" + id, "set",
      () => post("/api/target", {model: m.key, tier: m.tier || null, target: {[kind.value]: typed(
        document.getElementById("target-input-" + id).value)}})));
    const table = document.createElement("table"); table.className = "decisions";
    const head = document.createElement("tr");
    for (const h of ["time", "samples/s", "offloaded %", "p99 ms", "threshold", "predicted req/s", "allowed req/s",
                     "expected accuracy %", "reason", "target"]) {
      const th = document.createElement("th"); th.textContent = h; head.appendChild(th);
    }
    table.append(document.createElement("thead"), document.createElement("tbody"));
    table.tHead.appendChild(head);
    const liveness = document.createElement("p"); liveness.className = "liveness";
    const perDevice = document.createElement("table"); perDevice.className = "per-device";
    section.append(title, liveness, line, form, perDevice, table);
    box.appendChild(section);
  }
  const c = m.control;
  const liveness = section.querySelector("p.liveness");
  const offline = c.status === "offline";
  liveness.textContent = offline ? "controller offline since " +
    new Date(1000 * c.offline_since).toISOString().slice(11, 19) + " (its last state below)" : "controller online";
  liveness.className = "liveness " + (offline ? "offline" : "online");
  liveness.dataset.status = offline ? "offline" : "online";
  const line = section.querySelector("p.target");
  line.textContent = "target: " + target(c.target) + "; capacity " + num(c.capacity, 1) + " req/s; threshold " +
    num(c.threshold, 4) + " in [" + (c.t_min ?? "-") + ", " + (c.t_max ?? "-") + "]";
  line.dataset.target = JSON.stringify(c.target ?? null);
  const perDevice = section.querySelector("table.per-device");
  perDevice.replaceChildren();
  const controlled = Object.entries(c.devices ?? {}).sort((a, b) => a[0] < b[0] ? -1 : 1);
  if (controlled.length) {
    const head = document.createElement("tr");
    for (const h of ["device", "threshold set", "samples/s", "onward vs curve"]) {
      const th = document.createElement("th"); th.textContent = h; head.appendChild(th);
    }
    perDevice.appendChild(head);
  }
  for (const [id, d] of controlled) {
    const row = document.createElement("tr"); row.className = "controlled"; row.dataset.device = id;
    cell(row, id, "id"); cell(row, num(d.threshold, 4)).dataset.value = String(d.threshold);
    cell(row, num(d.sample_rate, 1)); cell(row, num(d.correction, 2));
    perDevice.appendChild(row);
  }
  const rows = section.querySelector("tbody");
  rows.replaceChildren();
  for (const d of (c.decisions ?? []).slice().reverse()) {  // newest first
    const row = document.createElement("tr"); row.className = "decision";
    for (const v of [new Date(1000 * d.time).toISOString().slice(11, 19), num(d.sample_rate, 0), pct(d.onward_share),
                     num(d.p99_ms, 1), num(d.threshold, 4), num(d.predicted_load, 1), num(d.allowed_load, 1),
                     pct(d.expected_accuracy), d.reason, target(d.target)]) cell(row, v);
    row.dataset.allowed = String(d.allowed_load);
    rows.appendChild(row);
  }
}
function render(snapshot) {
  const servers = document.querySelector("#servers tbody");
  servers.replaceChildren();
  for (const s of snapshot.servers) {
    const row = document.createElement("tr");
    row.id = "server-" + s.id;
    cell(row, s.id, "id"); cell(row, state(s.online), state(s.online));
    cell(row, num(s.rps, 1)).className = "rps"; cell(row, num(s.queue_depth, 0)); cell(row, pct(s.busy));
    cell(row, num(s.latency_p99_ms, 1)); cell(row, num(s.service_p99_ms, 2)); cell(row, num(s.cpu_percent, 0));
    servers.appendChild(row);
  }
  const devices = document.querySelector("#devices tbody");
  for (const d of snapshot.devices) {
    let row = document.getElementById("device-" + d.id);
    if (!row) {
      row = document.createElement("tr");
      row.id = "device-" + d.id;
      for (let i = 0; i < 13; i++) cell(row, "");
      const form = document.createElement("td");
      const input = document.createElement("input");
      input.id = "input-" + d.id; input.className = "threshold"; input.placeholder = "0..1";
      input.addEventListener("input", () => { editing[d.id] = true; });
      const button = document.createElement("button");
      button.id = "set-" + d.id; button.textContent = "set";
      button.addEventListener("click", () => setThreshold(d.id, row.dataset.model));
      form.append(input, button);
      row.appendChild(form);
      devices.appendChild(row);
    }
    row.dataset.model = d.model || "";
    const values = [d.id, state(d.online), num(d.threshold, 4), d.samples, pct(d.local_rate), pct(d.offload_rate),
                    d.fallback ?? "-", d.errors ?? "-", pct(d.local_rate_at_threshold), d.samples_at_threshold,
                    num(d.rtt_p99_ms, 1), pct(d.expected_accuracy), d.threshold_from ?? "-"];
    const names = ["id", "status", "threshold", "samples", "local", "offloaded", "fallback", "errors",
                   "local-at-threshold", "samples-at-threshold", "rtt", "expected-accuracy", "threshold-from"];
    values.forEach((v, i) => { const td = row.children[i]; td.textContent = v; td.dataset.field = names[i]; });
    row.children[0].className = "id";
    row.children[1].className = state(d.online);
  }
  renderModels(snapshot.models);
  renderTiers(snapshot.tier_thresholds);
  for (const t of snapshot.tier_controls) renderControl(t);
  document.getElementById("status").dataset.updated = snapshot.time;
  if (document.getElementById("status").textContent === "connecting...")
    document.getElementById("status").textContent = "live";
}
new EventSource("/events").onmessage = event => render(JSON.parse(event.data));
</script>
</body></html>
"""
