"""Scores first on a real Mosquitto with real Fashion-MNIST (docs/views.md): four simulated cameras (each
running its view's generated C through the cffi binding) send their local exit's integer sums; ``ddnn-server
--role aggregator`` answers confident events from them and fetches the splits of the others. Every event is
answered, class and answering exit equal the evaluation's event by event, as with features at once (which the
same aggregator still takes); a camera killed between the phases costs its view, not the deadline; a camera
that no longer holds a split says so and the aggregator proceeds; hostile sums and feature answers get clear
errors."""

from __future__ import annotations

import logging

import numpy as np
from net_harness import RawClient
from test_views_net import DEADLINE_MS, _expected, _per_event, aggregating, scene  # noqa: F401 (a fixture)

from ddnn_gen.device.simulated import no_features_request, simulate_views, split_header, sums_header
from ddnn_gen.fold import reference
from ddnn_gen.fold.views import ViewAggregator, ViewRuns
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.codec import FeatureRequest, Packing, RequestHeader, Status

log = logging.getLogger(__name__)

N_EVENTS = 1000
KILLED_VIEW = 2


def test_scores_first_answers_every_event_as_the_evaluation(scene: tuple) -> None:  # noqa: F811
    aggregator, runs, labels, parts = scene
    model_hash = aggregator.loaded.hash_bytes
    want_classes, want_exits = _expected(aggregator, aggregator.outputs(runs, labels))
    with aggregating(DEADLINE_MS) as (broker, _):
        report = simulate_views(broker.connection(), aggregator.programs, model_hash, parts, N_EVENTS,
                                timeout_s=10.0, scores_first=True, device_prefix="sf")
        # The same aggregator takes features at once from other cameras (the mode is the cameras' choice).
        features = simulate_views(broker.connection(), aggregator.programs, model_hash, parts, 100, timeout_s=10.0,
                                  first_event_id=10_000_001, device_prefix="fa")
    assert len(report.outcomes) == aggregator.count * N_EVENTS
    classes, exits, rtt = _per_event(report, N_EVENTS, aggregator.count)
    assert np.array_equal(exits, want_exits), np.flatnonzero(exits != want_exits)[:20]
    assert np.array_equal(classes, want_classes), np.flatnonzero(classes != want_classes)[:20]
    # Exactly the unconfident events' splits were asked for, from every camera, and every one was held.
    assert report.feature_requests == aggregator.count * int(np.sum(want_exits == 1)) and report.withheld == 0
    split_bytes = len(codec.encode_request(split_header(aggregator.programs[0], model_hash, 1, 1, 0, 4),
                                           runs.splits[0, 0]))
    sums_bytes = codec.REQUEST_HEADER_BYTES + 4 * aggregator.loaded.spec.n_classes
    assert report.bytes_sent == aggregator.count * (N_EVENTS * sums_bytes + int(np.sum(want_exits == 1)) * split_bytes)
    f_classes, f_exits, _ = _per_event(features, 100, aggregator.count)
    assert np.array_equal(f_classes, want_classes[:100]) and np.array_equal(f_exits, want_exits[:100])
    log.info("scores first: %d events, %.1f%% at the aggregated local exit, %.1f B uplink per event, round trip "
             "p50 %.1f ms (local exit %.1f ms, tier 1 %.1f ms)", N_EVENTS, 100 * np.mean(exits == 0),
             report.bytes_sent / N_EVENTS, np.median(rtt), np.median(rtt[exits == 0]), np.median(rtt[exits == 1]))


def test_a_camera_killed_between_the_phases_costs_only_its_view(scene: tuple) -> None:  # noqa: F811
    aggregator, runs, labels, parts = scene
    n_events = 400
    _, all_exits = _expected(aggregator, aggregator.outputs(runs, labels))
    dies = int(np.flatnonzero(all_exits[200:] == 1)[0]) + 200  # an event whose splits are asked for
    with aggregating(DEADLINE_MS) as (broker, _):
        report = simulate_views(broker.connection(), aggregator.programs, aggregator.loaded.hash_bytes, parts,
                                n_events, timeout_s=10.0, first_event_id=3_000_001, device_prefix="sk",
                                scores_first=True, dies_between={KILLED_VIEW: dies})
    assert len(report.outcomes) == aggregator.count * n_events - (n_events - dies)
    classes, exits, rtt = _per_event(report, n_events, aggregator.count)
    rest = tuple(view for view in range(aggregator.count) if view != KILLED_VIEW)
    all_classes, _ = _expected(aggregator, aggregator.outputs(runs, labels))
    missing = aggregator.outputs(runs, labels, rest)
    missing_classes, missing_exits = _expected(aggregator, missing)
    assert np.array_equal(classes[:dies], all_classes[:dies]) and np.array_equal(exits[:dies], all_exits[:dies])
    # The event it died in: its sums decided (not confident with all four), tier 1 ran on the three splits.
    assert (exits[dies], classes[dies]) == (1, missing.final_class[dies])
    after = slice(dies + 1, n_events)
    assert np.array_equal(classes[after], missing_classes[after]) and np.array_equal(exits[after], missing_exits[after])
    # Its will made the view absent: neither the second phase nor later events waited the deadline for it.
    assert rtt[dies] < DEADLINE_MS and float(np.median(rtt[after])) < DEADLINE_MS / 10
    log.info("camera %d killed between the phases of event %d: that event in %.0f ms, the next %d events p50 "
             "%.1f ms", KILLED_VIEW, dies, rtt[dies], n_events - dies - 1, np.median(rtt[after]))


def test_a_camera_without_the_split_says_so_and_the_aggregator_proceeds(scene: tuple) -> None:  # noqa: F811
    aggregator, runs, labels, parts = scene
    n_events = 200
    with aggregating(DEADLINE_MS) as (broker, _):
        report = simulate_views(broker.connection(), aggregator.programs, aggregator.loaded.hash_bytes, parts,
                                n_events, timeout_s=10.0, first_event_id=4_000_001, device_prefix="sn",
                                scores_first=True, keep_events=[16, 0, 16, 16])
    classes, exits, rtt = _per_event(report, n_events, aggregator.count)
    everyone = aggregator.outputs(runs, labels)
    without = aggregator.outputs(runs, labels, (0, 2, 3))
    local, _ = _expected(aggregator, everyone)
    want = np.where(exits == 0, local[:n_events], without.final_class[:n_events])
    assert np.array_equal(exits, _expected(aggregator, everyone)[1][:n_events])
    assert np.array_equal(classes, want)
    assert report.withheld == int(np.sum(exits == 1)) > 0
    assert float(np.median(rtt[exits == 1])) < DEADLINE_MS / 10  # NO_FEATURES, not the second deadline


def test_hostile_sums_and_feature_answers_get_clear_errors(scene: tuple) -> None:  # noqa: F811
    """Sums that no exit can produce, a wrong class count, a NO_FEATURES nobody asked for, a split under another
    request id, a second copy of a split: each answered (an error naming it) or, for a late copy, acknowledged
    only; a camera that never answers its feature request hears the local exit's answer, marked fallback, at
    the second deadline."""
    aggregator, runs, _, _ = scene
    with aggregating(300, "--feature-deadline-ms", "300") as (broker, _):
        _hostile(broker, aggregator, runs)


def _hostile(broker: Broker, aggregator: ViewAggregator, runs: ViewRuns) -> None:
    model_hash, program = aggregator.loaded.hash_bytes, aggregator.programs[0]
    n = int(np.prod(program.exit.in_hwc))
    bad = RawClient(broker.connection(), "hostile-sf")
    assert bad.subscribe(topics.feature_request_topic(bad.device_id)).startswith("Granted")
    topic = topics.request_topic(model_hash, bad.device_id)

    def sums(request_id: int, event_id: int, values: np.ndarray) -> bytes:
        return codec.encode_request(sums_header(program, model_hash, request_id, event_id, 0, 4),
                                    values.astype(np.int32))

    def split(request_id: int, event_id: int, scene_index: int) -> bytes:
        return codec.encode_request(split_header(program, model_hash, request_id, event_id, 0, 4),
                                    runs.splits[0, scene_index])

    def expect(request_id: int, status: Status, text: str = "") -> codec.Reply:
        reply = bad.next_reply(10.0)
        assert reply is not None and (reply.request_id, reply.status) == (request_id, status), reply
        assert text in reply.message, reply.message
        return reply

    def feature_request() -> FeatureRequest:
        for _ in range(100):
            got, payload = bad.messages.get(timeout=10.0)
            if got == topics.feature_request_topic(bad.device_id):
                return codec.decode_feature_request(payload)
        raise AssertionError("no feature request")

    # Scenes whose view 0 alone is not confident: the aggregator, at the deadline, asks for view 0's split.
    alone = aggregator.local_exit_batch(runs.logits, np.eye(4, dtype=bool)[[0] * runs.logits.shape[1]])
    first, second = np.flatnonzero(~alone.exits)[:2]
    try:
        bad.publish(topic, sums(1, 50, np.full(10, n + 2)))  # beyond what n binary inputs can sum to
        expect(1, Status.MALFORMED, "exit sums")
        bad.publish(topic, sums(2, 50, np.full(10, n - 1)))  # the wrong parity
        expect(2, Status.MALFORMED, "parity")
        short = RequestHeader(model_hash, program.split_layer, 9, 1, 1, 3, 0, Packing.EXIT_SUMS, 50, 0, 4)
        bad.publish(topic, codec.encode_request(short, np.zeros(9, np.int32)))
        expect(3, Status.SHAPE_MISMATCH, "classes")
        bad.publish(topic, no_features_request(program, 0, 4, FeatureRequest(model_hash, 51, 4)))
        expect(4, Status.MALFORMED, "no feature request")
        real = reference.exit_sums(program.exit, runs.splits[0, first][None])[0]
        bad.publish(topic, sums(10, 60, real))
        asked = feature_request()
        assert (asked.model_hash, asked.event_id, asked.request_id) == (model_hash, 60, 10)
        bad.publish(topic, split(11, 60, first))  # not the request id of its sums
        expect(11, Status.MALFORMED, "asked no features")
        bad.publish(topic, split(10, 60, first))
        answer = expect(10, Status.OK)
        assert answer.answered_by == 1 and not answer.fallback
        assert answer.class_id == int(aggregator.outputs(runs, np.zeros(runs.logits.shape[1], int), (0,))
                                      .final_class[first])
        bad.publish(topic, split(10, 60, first))  # a second copy: acknowledged, no reply
        # Never answering the feature request: the local exit's answer at the second deadline, marked fallback.
        bad.publish(topic, sums(20, 61, reference.exit_sums(program.exit, runs.splits[0, second][None])[0]))
        assert feature_request().event_id == 61
        fallback = expect(20, Status.OK)
        assert fallback.fallback and fallback.answered_by == 0 and fallback.class_id == int(alone.classes[second])
        assert bad.next_reply(1.0) is None
    finally:
        bad.close()
