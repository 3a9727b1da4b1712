"""Configuration (f) at run time (issue 15 with the N-tier spec): four cameras -> ``ddnn-server --role
aggregator`` (the local aggregator, and tier 1 as an edge: the OR of the views' split bits through a binary
tier with its own exit) -> a cloud running tier 2, on a real Mosquitto with real Fashion-MNIST. Every event is
answered by the exit the evaluation says (aggregated local, edge, cloud) with the evaluation's class, event by
event; the edge's threshold moves live; with the cloud gone, the events it would have answered get tier 1's
answer instead of being lost."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_tool
from net_harness import ServerProcess, wait_for

from ddnn_gen.cli import cli
from ddnn_gen.device import c_binding
from ddnn_gen.device.simulated import SimReport, simulate_views
from ddnn_gen.fold.views import ViewAggregator, ViewRuns
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import ExitOutputs
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.spec import exit_decision
from ddnn_gen.model.views import extract_views
from ddnn_gen.wire import topics
from ddnn_gen.wire.broker import Broker

log = logging.getLogger(__name__)

MODEL = Path(os.environ.get("DDNN_VIEWS3_MODEL", Path(__file__).resolve().parent.parent / "models" / "views"
                            / "fmnist_views3_16.npz"))
N_EVENTS = 1000
DEADLINE_MS = 2000.0  # bounds a live camera's late view on a loaded machine; no camera dies here
UPSTREAM_TIMEOUT_MS = 3000


@pytest.fixture(scope="module")
def scene(fmnist_test: datasets.Dataset) -> tuple[ViewAggregator, ViewRuns, np.ndarray, list]:
    return make_scene(fmnist_test)


def make_scene(fmnist_test: datasets.Dataset) -> tuple[ViewAggregator, ViewRuns, np.ndarray, list]:
    """The aggregator functions, the reference's runs of every view (what `ddnngen eval` computes), the labels,
    and each camera's device part: its view's generated C through the cffi binding."""
    aggregator = ViewAggregator(load_model(MODEL))
    images, labels = fmnist_test.images[:N_EVENTS], fmnist_test.labels[:N_EVENTS]
    crops = extract_views(aggregator.views, images)
    parts = [c_binding.load(program).answers(crop) for program, crop in zip(aggregator.programs, crops)]
    return aggregator, aggregator.run_devices(images), labels, parts


@contextlib.contextmanager
def tiers(with_cloud: bool = True, upstream_timeout_ms: int = UPSTREAM_TIMEOUT_MS
          ) -> Iterator[tuple[Broker, ServerProcess, ServerProcess | None]]:
    """A broker of its own, the aggregator, and (``with_cloud``) the cloud behind it on the same broker."""
    require_tool("mosquitto")
    with Broker() as broker:
        cloud = ServerProcess(broker.address, MODEL, workers=1).start() if with_cloud else None
        aggregator = ServerProcess(broker.address, MODEL, workers=2, server_id="agg-1", extra=[
            "--role", "aggregator", "--event-deadline-ms", str(DEADLINE_MS),
            "--upstream-timeout-ms", str(upstream_timeout_ms)]).start()
        try:
            yield broker, aggregator, cloud
        finally:
            assert aggregator.terminate() == 0, aggregator.output
            if cloud is not None:
                assert cloud.terminate() == 0, cloud.output


def expected(aggregator: ViewAggregator, outputs: ExitOutputs, edge_threshold: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(class, answering exit: 0 aggregated local, 1 edge, 2 cloud) of every event, as the evaluation says."""
    spec = aggregator.loaded.spec
    local = exit_decision(outputs.entropy, spec.thresholds[0])
    edge = outputs.edges[0]
    at_edge = ~local & exit_decision(edge.entropy, spec.thresholds[1] if edge_threshold is None else edge_threshold)
    exits = np.where(local, 0, np.where(at_edge, 1, 2))
    classes = np.where(local, outputs.local_class, np.where(at_edge, edge.classes, outputs.final_class))
    return classes, exits


def per_event(report: SimReport, n_events: int) -> tuple[np.ndarray, np.ndarray]:
    """Each event's (class, answering exit), checking every camera was answered, all of them alike."""
    seen: dict[int, set[tuple[int, int]]] = {}
    for outcome in report.outcomes:
        assert outcome.source == "server", outcome
        seen.setdefault(outcome.index, set()).add((outcome.final_class, outcome.answered_by))
    assert sorted(seen) == list(range(n_events))
    classes, exits = np.full(n_events, -1), np.full(n_events, -1)
    for event, answers in seen.items():
        assert len(answers) == 1, (event, answers)
        ((classes[event], exits[event]),) = answers
    assert report.duplicates == 0 and report.misrouted == 0
    return classes, exits


def run_events(broker: Broker, scene: tuple, n_events: int, first_event_id: int, prefix: str,
               scores_first: bool = False) -> SimReport:
    aggregator, _, _, parts = scene
    return simulate_views(broker.connection(), aggregator.programs, aggregator.loaded.hash_bytes, parts, n_events,
                          timeout_s=10.0, first_event_id=first_event_id, device_prefix=prefix,
                          scores_first=scores_first)


def test_model_has_three_tiers_whose_exits_all_answer(scene: tuple) -> None:
    aggregator, runs, labels, _ = scene
    assert [tier.kind for tier in aggregator.loaded.spec.tiers] == ["device", "edge", "cloud"]
    _, exits = expected(aggregator, aggregator.outputs(runs, labels))
    shares = [float(np.mean(exits == tier)) for tier in range(3)]
    assert all(share > 0.05 for share in shares), shares  # a test of three exits needs all three answering


@pytest.mark.parametrize("scores_first", [False, True], ids=["features-at-once", "scores-first"])
def test_events_answered_by_the_exit_and_class_eval_says(scene: tuple, scores_first: bool) -> None:
    """Cameras sending their splits at once, or their exit sums first and the splits on demand: the same
    answers, the evaluation's, event by event."""
    aggregator, runs, labels, _ = scene
    with tiers() as (broker, _, _):
        report = run_events(broker, scene, N_EVENTS, 1, "cam", scores_first)
    classes, exits = per_event(report, N_EVENTS)
    want_classes, want_exits = expected(aggregator, aggregator.outputs(runs, labels))
    assert np.array_equal(exits, want_exits), np.flatnonzero(exits != want_exits)[:20]
    assert np.array_equal(classes, want_classes), np.flatnonzero(classes != want_classes)[:20]
    log.info("%d events: exits local/edge/cloud %s, accuracy %.2f%%, %.1f s", N_EVENTS,
             [int(np.sum(exits == tier)) for tier in range(3)], 100 * np.mean(classes == labels), report.wall_s)


def test_a_live_edge_threshold_moves_the_aggregators_tier1_exit(scene: tuple) -> None:
    """`ddnngen threshold set MODEL V --tier edge` reaches tier 1 of the aggregator at run time."""
    aggregator, runs, labels, _ = scene
    outputs = aggregator.outputs(runs, labels)
    reaching = ~exit_decision(outputs.entropy, aggregator.loaded.spec.thresholds[0])
    old = aggregator.loaded.spec.thresholds[1]
    entropy = outputs.edges[0].entropy[reaching]
    new = float(np.quantile(entropy, 0.9 if np.mean(entropy <= old) < 0.5 else 0.1))
    n_events = 300
    with tiers() as (broker, aggregating, _):
        result = CliRunner().invoke(cli, ["threshold", "set", str(MODEL), repr(new), "--tier", "edge",
                                          "--broker", broker.address])
        assert result.exit_code == 0, result.output
        topic = topics.tier_threshold_topic(aggregator.loaded.hash_bytes, 1)
        assert wait_for(lambda: f"threshold on {topic} now {new!r}" in aggregating.output, timeout_s=30), \
            aggregating.output
        report = run_events(broker, scene, n_events, 3_000_001, "cam-e")
    classes, exits = per_event(report, n_events)
    want_classes, want_exits = expected(aggregator, outputs, new)
    assert np.array_equal(exits, want_exits[:n_events]), np.flatnonzero(exits != want_exits[:n_events])[:20]
    assert np.array_equal(classes, want_classes[:n_events])
    _, at_old = expected(aggregator, outputs)
    assert abs(float(np.mean(exits == 1)) - float(np.mean(at_old[:n_events] == 1))) > 0.05


def test_without_the_cloud_tier1_answers_what_would_have_gone_up(scene: tuple) -> None:
    """No cloud behind the aggregator: every event is still answered, those the cloud would have answered by
    tier 1's own exit once the upstream timeout passes (marked fallback), the rest as usual."""
    aggregator, runs, labels, _ = scene
    n_events = 60
    with tiers(with_cloud=False, upstream_timeout_ms=300) as (broker, aggregating, _):
        report = run_events(broker, scene, n_events, 4_000_001, "cam-c")
    classes, exits = per_event(report, n_events)
    outputs = aggregator.outputs(runs, labels)
    want_classes, want_exits = expected(aggregator, outputs)
    want_classes, want_exits = want_classes[:n_events], want_exits[:n_events]
    went_up = want_exits == 2
    assert went_up.any()
    assert np.array_equal(exits[~went_up], want_exits[~went_up])
    assert np.array_equal(classes[~went_up], want_classes[~went_up])
    assert np.all(exits[went_up] == 1)
    assert np.array_equal(classes[went_up], outputs.edges[0].classes[:n_events][went_up])
    assert f"{int(went_up.sum())} answered here as fallback" in aggregating.output, aggregating.output[-3000:]
