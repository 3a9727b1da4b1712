"""What the server measures while it runs, recorded once per answered request and read two ways: Prometheus
series (``--metrics-port``, prometheus_client) and the telemetry window that ``ddnn/server/<id>/telemetry``
publishes every few seconds (rates and percentiles since the previous message).

Label values are only ever the names of the models this server loaded, the status names of the wire
protocol and tier indices: nothing a request carries becomes a label, so hostile traffic cannot grow the
number of series. Requests whose model is not known yet (rejected before the lookup) count under ``-``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ddnn_gen.errors import DdnnError
from ddnn_gen.wire.codec import Reply, Status

log = logging.getLogger(__name__)
request_log = logging.getLogger("ddnn_server.requests")  # one line per request (--log-format json)

NO_MODEL = "-"
# Seconds: from a fraction of a millisecond (a small batch on a fast CPU) to the device's usual timeouts.
TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
WINDOW_SAMPLES = 20000  # latencies kept per telemetry window (a uniform reservoir beyond that)


def _batch_buckets(max_batch: int) -> tuple[float, ...]:
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(float(size))
        size *= 2
    return (*buckets, float(max_batch))


class _Reservoir:
    """A uniform sample of at most ``size`` values (Algorithm R): percentiles over a window of any rate
    without unbounded memory."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.values: list[float] = []
        self.seen = 0
        self._rng = rng

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.seen)
            if slot < self.size:
                self.values[slot] = value

    def percentiles_ms(self) -> dict[str, float | None]:
        if not self.values:
            return {"p50": None, "p99": None}
        p50, p99 = np.percentile(np.asarray(self.values) * 1000.0, [50, 99])
        return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


@dataclass
class _Window:
    started: float
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> status -> requests
    answered_by: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> tier -> requests
    batches: int = 0
    batched: int = 0
    max_batch: int = 0
    busy_s: float = 0.0  # worker time spent in forward passes


class RequestMetrics:
    """Thread-safe: the network thread and every worker record here."""

    def __init__(self, max_batch: int, queue_depth: Callable[[], int], workers: int,
                 log_requests: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.workers = max(1, workers)
        self.log_requests = log_requests
        self._queue_depth = queue_depth
        self.requests = Counter("ddnn_requests", "Requests answered (or dropped), by model and reply status",
                                ["model", "status"], registry=self.registry)
        self.answered_by = Counter("ddnn_answered_by", "OK replies by the tier whose exit gave the class",
                                   ["model", "tier"], registry=self.registry)
        self.service = Histogram("ddnn_service_seconds", "Forward-pass time of the request's batch",
                                 ["model"], buckets=TIME_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("ddnn_queue_wait_seconds", "Time a request waited for a worker",
                                    ["model"], buckets=TIME_BUCKETS, registry=self.registry)
        self.latency = Histogram("ddnn_server_latency_seconds", "Receipt of a request to its reply being sent",
                                 ["model"], buckets=TIME_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("ddnn_batch_size", "Requests per forward pass",
                                    buckets=_batch_buckets(max_batch), registry=self.registry)
        self.depth = Gauge("ddnn_queue_depth", "Requests waiting for a worker", registry=self.registry)
        self.depth.set_function(lambda: float(queue_depth()))
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._window = _Window(time.monotonic())
        self._service_ms = _Reservoir(WINDOW_SAMPLES, self._rng)
        self._latency_ms = _Reservoir(WINDOW_SAMPLES, self._rng)
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the measurement
        self._http: Any = None

    # ---- recording -----------------------------------------------------------------------------------

    def reply(self, model: str, device_id: str, status: Status, received: float, service_us: int = 0,
              queue_us: int = 0, answered_by: int | None = None) -> None:
        """One reply sent (OK or an error status). ``received``: time.monotonic() when the request arrived."""
        self._record(model, status, [(device_id, received, service_us, queue_us, answered_by)])

    def replies_ok(self, model: str, replies: Sequence[tuple[Any, str, Reply]]) -> None:
        """A batch's OK replies (incoming with its ``received`` time, device id, reply): what :meth:`reply`
        records for each, with the label look-ups and the lock once per batch."""
        self._record(model, Status.OK, [(device_id, incoming.received, reply.server_us, reply.queue_us,
                                         reply.answered_by) for incoming, device_id, reply in replies])

    def _record(self, model: str, status: Status,
                sent: Sequence[tuple[str, float, int, int, int | None]]) -> None:
        """Replies of one model and status: (device id, received, service us, queue us, answered by) each."""
        if not sent:
            return
        now = time.monotonic()
        latencies = [max(0.0, now - received) for _, received, _, _, _ in sent]
        ok = status == Status.OK
        self.requests.labels(model, status.name).inc(len(sent))
        tiers: dict[str, int] = {}
        if ok:
            service, queue_wait, latency = (self.service.labels(model), self.queue_wait.labels(model),
                                            self.latency.labels(model))
            for (_, _, service_us, queue_us, answered_by), latency_s in zip(sent, latencies):
                service.observe(service_us / 1e6)
                queue_wait.observe(queue_us / 1e6)
                latency.observe(latency_s)
                if answered_by is not None:
                    tiers[str(answered_by)] = tiers.get(str(answered_by), 0) + 1
            for tier, n in tiers.items():
                self.answered_by.labels(model, tier).inc(n)
        with self._lock:
            per_model = self._window.counts.setdefault(model, {})
            per_model[status.name] = per_model.get(status.name, 0) + len(sent)
            if ok:
                for (_, _, service_us, _, _), latency_s in zip(sent, latencies):
                    self._service_ms.add(service_us / 1e6)
                    self._latency_ms.add(latency_s)
                if tiers:
                    answered = self._window.answered_by.setdefault(model, {})
                    for tier, n in tiers.items():
                        answered[tier] = answered.get(tier, 0) + n
        if self.log_requests:
            for (device_id, _, service_us, queue_us, answered_by), latency_s in zip(sent, latencies):
                request_log.info("request", extra={"ddnn": {
                    "model": model, "device": device_id, "status": status.name,
                    "latency_ms": round(latency_s * 1e3, 3), "service_ms": service_us / 1e3, "queue_ms": queue_us / 1e3,
                    **({"answered_by": answered_by} if ok and answered_by is not None else {})}})

    def dropped(self) -> None:
        """A request acknowledged without a reply (its topic names no device to answer)."""
        self.requests.labels(NO_MODEL, "DROPPED").inc()
        with self._lock:
            per_model = self._window.counts.setdefault(NO_MODEL, {})
            per_model["DROPPED"] = per_model.get("DROPPED", 0) + 1

    def batch(self, size: int, busy_s: float) -> None:
        self.batch_size.observe(size)
        with self._lock:
            self._window.batches += 1
            self._window.batched += size
            self._window.max_batch = max(self._window.max_batch, size)
            self._window.busy_s += busy_s

    # ---- reading -------------------------------------------------------------------------------------

    def take_window(self) -> dict[str, object]:
        """The figures since the previous call (telemetry payload body), and a new window."""
        now = time.monotonic()
        with self._lock:
            window, self._window = self._window, _Window(now)
            service, latency = self._service_ms, self._latency_ms
            self._service_ms, self._latency_ms = _Reservoir(WINDOW_SAMPLES, self._rng), _Reservoir(WINDOW_SAMPLES,
                                                                                                    self._rng)
        span = max(1e-6, now - window.started)
        return {
            "interval_s": round(span, 3),
            "rps": {model: {status: round(n / span, 3) for status, n in statuses.items()}
                    for model, statuses in window.counts.items()},
            "answered_by": window.answered_by,
            "queue_depth": int(self._queue_depth()),
            "batch": {"count": window.batches, "mean": round(window.batched / window.batches, 3) if window.batches
                      else 0.0, "max": window.max_batch},
            # Share of the workers' time spent computing: served rate / busy share estimates the capacity.
            "busy": round(min(1.0, window.busy_s / (span * self.workers)), 4),
            "service_ms": service.percentiles_ms(),
            "latency_ms": latency.percentiles_ms(),
            "cpu_percent": round(self._process.cpu_percent(None), 1),
        }

    # ---- exposition ----------------------------------------------------------------------------------

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Expose /metrics on ``address:port`` (prometheus_client's own HTTP server, in a daemon thread)."""
        try:
            self._http = start_http_server(port, addr=address, registry=self.registry)
        except OSError as error:  # port taken, address not local: say so instead of a traceback
            raise DdnnError(f"cannot expose metrics on {address}:{port}: {error.strerror or error}") from error
        log.info("metrics on http://%s:%d/metrics", address, port)

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5.0)
            self._http = None
