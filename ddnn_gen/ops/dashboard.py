"""The operator's live view (``ddnngen dashboard --http PORT``): an aiohttp page fed by server-sent events from
the fleet's MQTT telemetry and status, and a form that sets a device's (or a model's) retained threshold.

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
from typing import Any

from aiohttp import web

from ddnn_gen.ops.subscriber import OperatorClient
from ddnn_gen.wire import codec, telemetry, topics
from ddnn_gen.wire.connection import BrokerConnection, BrokerError

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 1.0
STATUS_SUBSCRIPTIONS = (f"{topics.TOPIC_ROOT}/status/+", f"{topics.TOPIC_ROOT}/server/+/status")


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
    rejected: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def receive(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if parts[1:2] == ["status"] or (len(parts) == 4 and parts[1] == "server" and parts[3] == "status"):
            self._status(parts, payload)
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
                devices.append({
                    "id": device_id, "online": device.online, "model": body.get("model"),
                    "threshold": body.get("threshold"), "samples": total,
                    "local_rate": body.get("local", 0) / total if total else None,
                    "offload_rate": body.get("offloaded", 0) / total if total else None,
                    "fallback": body.get("fallback"), "errors": body.get("error"),
                    "samples_at_threshold": since, "local_rate_at_threshold": local / since if since else None,
                    "rtt_p99_ms": (body.get("rtt_ms") or {}).get("p99"), "age_s": time.time() - device.seen
                    if device.body else None})
            servers = []
            for server_id, server in sorted(self.servers.items()):
                body = server.get("body") or {}
                rps = sum(sum(by_status.values()) for by_status in body.get("rps", {}).values())
                servers.append({"id": server_id, "online": server["online"], "rps": rps,
                                "queue_depth": body.get("queue_depth"), "busy": body.get("busy"),
                                "latency_p99_ms": (body.get("latency_ms") or {}).get("p99"),
                                "service_p99_ms": (body.get("service_ms") or {}).get("p99"),
                                "cpu_percent": body.get("cpu_percent"), "models": body.get("models", {})})
            return {"time": time.time(), "devices": devices, "servers": servers, "rejected": self.rejected}


class Dashboard:
    """The MQTT side (subscriptions, threshold publishes) and the HTTP side (page, events, form) of the view."""

    def __init__(self, connection: BrokerConnection) -> None:
        self.connection = connection
        self.state = FleetState()
        self._client = OperatorClient(connection, "dashboard",
                                      (*topics.TELEMETRY_SUBSCRIPTIONS, *STATUS_SUBSCRIPTIONS), self.state.receive)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def set_threshold(self, model_key: str, device_id: str | None, value: float | None) -> str:
        """Publish (retained) or clear a threshold; the topic it went to."""
        topic = topics.threshold_topic(bytes.fromhex(model_key), device_id)
        payload = b"" if value is None else codec.encode_threshold(value)
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
        if request.content_type != "application/json":
            return _problem(415, "send JSON")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _problem(400, "not JSON")
        if not isinstance(body, dict):
            return _problem(400, "expected an object")
        model_key, device_id, value = body.get("model"), body.get("device"), body.get("value")
        if not isinstance(model_key, str) or len(model_key) != 32 or any(c not in "0123456789abcdef"
                                                                         for c in model_key):
            return _problem(400, "model: 32 lower-case hex digits (the model key)")
        if device_id is not None and (not isinstance(device_id, str) or not topics.valid_device_id(device_id)):
            return _problem(400, f"device: {topics.DEVICE_ID_RULE}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0.0 <= value <= 1.0):
            return _problem(400, "value: a number in [0, 1], or null to clear")
        topic = await asyncio.get_running_loop().run_in_executor(
            None, self.set_threshold, model_key, device_id, None if value is None else float(value))
        return web.json_response({"topic": topic, "value": value})

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
<h2>Devices</h2>
<table id="devices"><thead><tr><th>device</th><th>status</th><th>threshold</th><th>samples</th><th>local exit %</th>
<th>offloaded %</th><th>fallback</th><th>errors</th><th>local exit % at this threshold</th>
<th>samples at this threshold</th><th>p99 RTT ms</th><th>set threshold</th></tr></thead><tbody></tbody></table>
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
function setThreshold(device, model) {
  const input = document.getElementById("input-" + device);
  const value = input.value.trim() === "" ? null : Number(input.value);
  fetch("/api/threshold", {method: "POST", headers: {"Content-Type": "application/json"},
                           body: JSON.stringify({model: model, device: device, value: value})})
    .then(r => r.json()).then(answer => {
      document.getElementById("status").textContent = answer.error ? "refused: " + answer.error
                                                                      : "set " + answer.topic + " = " + answer.value;
      delete editing[device];
    });
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
      for (let i = 0; i < 11; i++) cell(row, "");
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
                    num(d.rtt_p99_ms, 1)];
    const names = ["id", "status", "threshold", "samples", "local", "offloaded", "fallback", "errors",
                   "local-at-threshold", "samples-at-threshold", "rtt"];
    values.forEach((v, i) => { const td = row.children[i]; td.textContent = v; td.dataset.field = names[i]; });
    row.children[0].className = "id";
    row.children[1].className = state(d.online);
  }
  document.getElementById("status").dataset.updated = snapshot.time;
  if (document.getElementById("status").textContent === "connecting...")
    document.getElementById("status").textContent = "live";
}
new EventSource("/events").onmessage = event => render(JSON.parse(event.data));
</script>
</body></html>
"""
