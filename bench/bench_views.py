"""What a multi-view camera sends first, measured (issue 15, docs/views.md): "features at once" (each camera's
split with its request) against "scores first, features on demand" (each camera's local-exit sums; the splits
only of the events the aggregated local exit is not confident about), side by side in one run.

For each aggregated-local-exit threshold (the model's stored one, and those that make the local exit answer
the given shares of the events) one Mosquitto and one ``ddnn-server --role aggregator`` (its own process, the
threshold applied live through the retained ``ddnn/threshold/<model>``) serve both modes in turn. The K
simulated cameras (each running its view's generated C through the cffi binding, as in tests/test_views_net.py)
reach the broker through a loopback relay (ddnn_gen/bench/link_emulator.py) that counts every byte both ways:
the uplink and downlink per event are TCP payload bytes on the cameras' link (MQTT framing, PUBACKs and
keep-alives included), less what the same cameras spend connecting and disconnecting with no event (measured
by a run of zero events). ``--rtt-ms`` adds a round-trip delay to that link (the cameras' first hop), where the
second phase's extra round trip shows.

Latency per event: the slowest of its K cameras' round trips (sent to answered), mean and p99, and the p50 of
the events answered by the local exit and by tier 1 apart.

Usage: nice python bench/bench_views.py [--model models/views/fmnist_views_16.npz] [--events 1000]
                                        [--local-share 0.3 --local-share 0.85] [--rtt-ms 0 --rtt-ms 20]
                                        [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as ddnn-server does; must precede numpy

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ddnn_gen.bench.link_emulator import EmulatedLink
from ddnn_gen.device import c_binding
from ddnn_gen.device.simulated import DevicePart, SimReport, simulate_views
from ddnn_gen.fold.views import ViewAggregator, ViewRuns
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.spec import exit_decision
from ddnn_gen.model.views import extract_views
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.connection import BrokerConnection
from ddnn_gen.wire.retained import publish_retained

log = logging.getLogger("bench_views")
REPO = Path(__file__).resolve().parent.parent
MODES = ("features at once", "scores first")
DEADLINE_MS = 2000.0  # as the acceptance tests: only a live camera's late view would wait it


@dataclasses.dataclass
class Row:
    threshold: float
    rtt_ms: float
    mode: str
    local_share: float  # events answered by the aggregated local exit
    up_b: float  # wire bytes per event, cameras -> broker
    down_b: float  # wire bytes per event, broker -> cameras
    app_up_b: float  # application bytes the cameras published per event
    feature_requests: float  # per event
    mean_ms: float
    p99_ms: float
    p50_local_ms: float
    p50_tier1_ms: float
    matches_eval: bool  # class and answering exit equal the evaluation's, event by event


@contextmanager
def aggregator_process(broker: Broker, model: Path, threshold: float) -> Iterator[None]:
    """``ddnn-server --role aggregator`` with ``threshold`` applied (retained before it starts, then confirmed
    by its log line)."""
    loaded = load_model(model)
    topic = topics.threshold_topic(loaded.hash_bytes)
    publish_retained(broker.connection(), topic, codec.encode_threshold(threshold))
    process = subprocess.Popen([sys.executable, "-c", "from ddnn_server.cli import main; main()", "--broker",
                                broker.address, "--models", str(model), "--role", "aggregator", "--workers", "2",
                                "--event-deadline-ms", str(DEADLINE_MS), "-v"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    ready, applied = threading.Event(), threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "ddnn-server: ready" in line:
                ready.set()
            if f"threshold on {topic} now {threshold!r}" in line:
                applied.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not (ready.wait(60) and applied.wait(30)):
            raise RuntimeError("the aggregator did not start with the threshold:\n" + "".join(lines))
        yield
    finally:
        process.terminate()
        process.wait(30)


def per_event(report: SimReport, n_events: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each event's (class, answering exit, slowest camera's round trip ms); class -1 where a camera of the event
    got no answer (so it cannot equal the evaluation's)."""
    classes, exits, rtt = np.full(n_events, -1), np.full(n_events, -1), np.zeros(n_events)
    failed = np.zeros(n_events, dtype=bool)
    for outcome in report.outcomes:
        failed[outcome.index] |= outcome.source != "server"
        classes[outcome.index], exits[outcome.index] = outcome.final_class, outcome.answered_by
        rtt[outcome.index] = max(rtt[outcome.index], outcome.t_round_trip_us / 1000)
    classes[failed] = -1
    return classes, exits, rtt


def measure(connection: BrokerConnection, aggregator: ViewAggregator, parts: list[DevicePart], n_events: int,
            rtt_ms: float, scores_first: bool, first_event_id: int, prefix: str,
            expected: tuple[np.ndarray, np.ndarray]) -> dict[str, float | bool]:
    model_hash = aggregator.loaded.hash_bytes
    with EmulatedLink(connection.host, connection.port, rtt_ms) as link:
        via = dataclasses.replace(connection, host="127.0.0.1", port=link.port)
        options = {"timeout_s": 10.0, "scores_first": scores_first, "telemetry_interval_s": 0.0}
        simulate_views(via, aggregator.programs, model_hash, parts, 0, device_prefix=prefix, **options)
        idle_up, idle_down = link.bytes_up, link.bytes_down
        report = simulate_views(via, aggregator.programs, model_hash, parts, n_events, device_prefix=prefix,
                                first_event_id=first_event_id, **options)
        time.sleep(0.3)  # the last PUBACKs and DISCONNECTs through the relay
        up, down = link.bytes_up - 2 * idle_up, link.bytes_down - 2 * idle_down
    classes, exits, rtt = per_event(report, n_events)
    return {"local_share": float(np.mean(exits == 0)), "up_b": up / n_events, "down_b": down / n_events,
            "app_up_b": report.bytes_sent / n_events, "feature_requests": report.feature_requests / n_events,
            "mean_ms": float(rtt.mean()), "p99_ms": float(np.percentile(rtt, 99)),
            "p50_local_ms": float(np.median(rtt[exits == 0])) if np.any(exits == 0) else float("nan"),
            "p50_tier1_ms": float(np.median(rtt[exits == 1])) if np.any(exits == 1) else float("nan"),
            "matches_eval": bool(np.array_equal(classes, expected[0]) and np.array_equal(exits, expected[1]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "views" / "fmnist_views_16.npz")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--local-share", type=float, action="append",
                        help="also the threshold at which the aggregated local exit answers this share of the "
                             "events (default 0.3 and 0.85)")
    parser.add_argument("--rtt-ms", type=float, action="append", help="the cameras' link (default 0 and 20)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    shares = args.local_share or [0.3, 0.85]
    rtts = args.rtt_ms or [0.0, 20.0]

    aggregator = ViewAggregator(load_model(args.model))
    test = datasets.load("fashion-mnist", "test")
    images, labels = test.images[:args.events], test.labels[:args.events]
    runs: ViewRuns = aggregator.run_devices(images)
    outputs = aggregator.outputs(runs, labels)
    parts = [c_binding.load(program).answers(crop)
             for program, crop in zip(aggregator.programs, extract_views(aggregator.views, images))]
    finite = np.sort(outputs.entropy[np.isfinite(outputs.entropy)])
    thresholds = [float(aggregator.loaded.spec.thresholds[0])]
    thresholds += [round(float(finite[min(len(finite) - 1, int(share * len(finite)))]), 4) for share in shares]

    rows: list[Row] = []
    run = 0
    for threshold in thresholds:
        local = exit_decision(outputs.entropy, threshold)
        expected = (np.where(local, outputs.local_class, outputs.final_class), np.where(local, 0, 1))
        with Broker() as broker, aggregator_process(broker, args.model, threshold):
            for rtt_ms in rtts:
                for mode in MODES:
                    run += 1
                    figures = measure(broker.connection(), aggregator, parts, args.events, rtt_ms,
                                      mode == "scores first", run * 10_000_000 + 1, f"b{run}c", expected)
                    rows.append(Row(threshold, rtt_ms, mode, **figures))  # type: ignore[arg-type]
                    log.info("%s", rows[-1])
    print(f"\n{aggregator.loaded.spec.name}, K = {aggregator.count}, {args.events} Fashion-MNIST test events")
    print("| threshold | link RTT | mode | local exit | uplink B/event | downlink B/event | app uplink B/event | "
          "feature requests/event | mean ms | p99 ms | p50 local ms | p50 tier 1 ms | = eval |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.threshold:.4f} | {row.rtt_ms:.0f} ms | {row.mode} | {100 * row.local_share:.1f} % | "
              f"{row.up_b:.0f} | {row.down_b:.0f} | {row.app_up_b:.0f} | {row.feature_requests:.2f} | "
              f"{row.mean_ms:.1f} | {row.p99_ms:.1f} | {row.p50_local_ms:.1f} | {row.p50_tier1_ms:.1f} | "
              f"{'yes' if row.matches_eval else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(row) for row in rows], indent=1))
    return 0 if all(row.matches_eval for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
