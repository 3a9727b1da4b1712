"""Offline tests of "exit scores first, features on demand" (docs/views.md): the wire messages (exit sums,
NO_FEATURES, the aggregator's feature request), the camera's bounded feature buffer, the event table's second
phase, and the answers against the Python evaluation of the shipped multi-view model. No MQTT here; the same on
a real Mosquitto is tests/test_views_net.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ddnn_gen.device.features import FeatureBuffer
from ddnn_gen.device.simulated import no_features_request, sums_header
from ddnn_gen.fold import reference
from ddnn_gen.fold.views import ViewAggregator
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire import codec, deployment, topics
from ddnn_gen.wire.codec import FeatureRequest, Packing, ProtocolError, RequestHeader, Status
from ddnn_server.aggregator import Event, EventAnswer, EventTable, ViewRequest, answer_events, check_sums
from ddnn_server.store import serve

VIEWS_MODEL = Path(__file__).resolve().parent.parent / "models" / "views" / "fmnist_views_16.npz"
HASH = bytes(range(16))
N_EVENTS = 300


def _sums(event_id: int, view: int, request_id: int = 7) -> ViewRequest:
    header = RequestHeader(HASH, 2, 10, 1, 1, request_id, 0, Packing.EXIT_SUMS, event_id, view, 4)
    return ViewRequest(header, np.zeros(10, np.int32), None)


def _split(event_id: int, view: int, request_id: int = 7) -> ViewRequest:
    header = RequestHeader(HASH, 2, 32, 5, 5, request_id, 0, Packing.BITS_U64, event_id, view, 4)
    return ViewRequest(header, np.zeros((5, 5, 1), np.uint64), None)


def _none(event_id: int, view: int, request_id: int = 7) -> ViewRequest:
    header = RequestHeader(HASH, 2, 0, 0, 0, request_id, 0, Packing.NO_FEATURES, event_id, view, 4)
    return ViewRequest(header, np.zeros(0, np.uint8), None)


def _add(table: EventTable, request: ViewRequest, now: float = 0.0):  # type: ignore[no-untyped-def]
    return table.add(HASH, 4, request, f"cam{request.header.view_index}", now=now)


def _status(call: object) -> Status:
    with pytest.raises(ProtocolError) as error:
        call()  # type: ignore[operator]
    return error.value.status


LOCAL = EventAnswer(3, np.zeros(10), 0, (0, 1, 2, 3), needs_features=True, scores_first=True)


# ---- wire ----------------------------------------------------------------------------------------------------

def test_exit_sums_round_trip_and_cost_64_plus_4_bytes_a_class() -> None:
    sums = np.arange(-5, 5, dtype=np.int32) * 2 + 1
    header = RequestHeader(HASH, 2, 10, 1, 1, 9, 0, Packing.EXIT_SUMS, 42, 1, 4)
    data = codec.encode_request(header, sums)
    assert len(data) == codec.REQUEST_HEADER_BYTES + 40
    decoded = codec.decode_request(data)
    assert decoded.header == header and decoded.payload.dtype == np.int32
    assert np.array_equal(decoded.payload, sums)


def test_no_features_is_a_bare_header() -> None:
    header = RequestHeader(HASH, 2, 0, 0, 0, 9, 0, Packing.NO_FEATURES, 42, 3, 4)
    data = codec.encode_request(header, np.zeros(0, np.uint8))
    assert len(data) == codec.REQUEST_HEADER_BYTES and codec.decode_request(data).header == header


@pytest.mark.parametrize("header", [
    RequestHeader(HASH, 2, 10, 1, 1, 9, 0, Packing.EXIT_SUMS, 0, 0, 0),  # not part of an event
    RequestHeader(HASH, 2, 10, 5, 5, 9, 0, Packing.EXIT_SUMS, 42, 0, 4),  # sums are C x 1 x 1
    RequestHeader(HASH, 2, 1, 1, 1, 9, 0, Packing.NO_FEATURES, 42, 0, 4),  # NO_FEATURES is 0/0/0
    RequestHeader(HASH, 2, 0, 0, 0, 9, 0, Packing.NO_FEATURES, 1, 0, 1),  # single view
])
def test_scores_first_headers_that_break_the_rules_are_malformed(header: RequestHeader) -> None:
    payload = np.zeros(header.payload_words, np.int32 if header.packing == Packing.EXIT_SUMS else np.uint8)
    body = np.ascontiguousarray(payload).tobytes()
    raw = bytearray(codec.encode_request(RequestHeader(HASH, 2, 10, 1, 1, 9, 0, Packing.EXIT_SUMS, 42, 0, 4),
                                         np.zeros(10, np.int32)))
    # Hand-made bytes (encode_request refuses some of these): the decoder must say MALFORMED, not misparse.
    head = codec._REQUEST.pack(codec.REQUEST_MAGIC, codec.PROTOCOL_VERSION, int(header.packing), 64, HASH, 2,
                               header.channels, header.height, header.width, 9, 0, header.payload_words,
                               header.event_id, header.view_index, header.view_count, 0)
    raw = bytearray(head + body)
    assert _status(lambda: codec.decode_request(bytes(raw))) == Status.MALFORMED


def test_exit_sums_of_a_wrong_length_are_malformed() -> None:
    data = codec.encode_request(RequestHeader(HASH, 2, 10, 1, 1, 9, 0, Packing.EXIT_SUMS, 42, 0, 4),
                                np.zeros(10, np.int32))
    assert _status(lambda: codec.decode_request(data[:-4])) == Status.MALFORMED
    assert _status(lambda: codec.decode_request(data + b"\0\0\0\0")) == Status.MALFORMED


def test_feature_request_round_trip_and_strict_decoding() -> None:
    request = FeatureRequest(HASH, 2**63 + 5, 77)
    data = codec.encode_feature_request(request)
    assert len(data) == codec.FEATURE_REQUEST_BYTES == 40 and data[:4] == b"DDNF"
    assert codec.decode_feature_request(data) == request
    assert _status(lambda: codec.decode_feature_request(data[:4] + b"\x02" + data[5:])) == Status.BAD_VERSION
    for bad in (data[:-1], data + b"\0", b"DDNQ" + data[4:], data[:5] + b"\x01" + data[6:],  # reserved set
                data[:24] + bytes(8) + data[32:], data[:32] + bytes(8)):  # event id 0, request id 0
        assert _status(lambda bad=bad: codec.decode_feature_request(bad)) in (Status.MALFORMED, Status.BAD_MAGIC)
    with pytest.raises(ValueError):
        codec.encode_feature_request(FeatureRequest(HASH, 0, 1))


def test_a_v3_reader_without_scores_first_would_refuse_the_packing_by_name() -> None:
    """What an aggregator of before scores first answers to exit sums: its decoder knew packings 1-4 only, and
    an unknown packing is MALFORMED naming it (the same check refuses packing 7 today)."""
    data = bytearray(codec.encode_request(RequestHeader(HASH, 2, 10, 1, 1, 9, 0, Packing.EXIT_SUMS, 42, 0, 4),
                                          np.zeros(10, np.int32)))
    data[5] = 7
    with pytest.raises(ProtocolError, match="unknown packing 7"):
        codec.decode_request(bytes(data))


def test_feature_topics_and_their_rules() -> None:
    assert topics.feature_request_topic("cam2") == "ddnn/features/cam2"
    with pytest.raises(topics.DeviceIdError):
        topics.feature_request_topic("cam/+")
    device = {(rule.acltype, rule.topic) for rule in deployment.rules_for("cam2", "device")}
    server = {(rule.acltype, rule.topic) for rule in deployment.rules_for("srv1", "server")}
    assert {("subscribeLiteral", "ddnn/features/cam2"), ("publishClientReceive", "ddnn/features/cam2")} <= device
    assert not any(kind == "publishClientSend" and "features" in topic for kind, topic in device)
    assert ("publishClientSend", "ddnn/features/+") in server


# ---- the camera's buffer ----------------------------------------------------------------------------------

def test_the_feature_buffer_holds_the_last_events_and_answers_the_rest_no_features() -> None:
    buffer = FeatureBuffer(HASH, lambda request: b"none:%d" % request.event_id, capacity=2)
    for event in (1, 2, 3):
        buffer.keep(event, 100 + event, b"split%d" % event)
    assert len(buffer) == 2
    assert buffer.answer(FeatureRequest(HASH, 3, 103)) == b"split3"
    assert buffer.answer(FeatureRequest(HASH, 3, 103)) == b"none:3"  # answered once: forgotten
    assert buffer.answer(FeatureRequest(HASH, 1, 101)) == b"none:1"  # the oldest was dropped
    assert buffer.answer(FeatureRequest(HASH, 2, 999)) == b"none:2"  # not the request id of its sums
    assert buffer.answer(FeatureRequest(bytes(16), 2, 102)) is None  # another model's: nothing to say
    assert (buffer.answered, buffer.withheld, buffer.ignored) == (1, 3, 1)
    assert buffer.answer(FeatureRequest(HASH, 2, 102)) == b"split2"
    empty = FeatureBuffer(HASH, lambda request: b"none", capacity=0)
    empty.keep(1, 1, b"split")
    assert empty.answer(FeatureRequest(HASH, 1, 1)) == b"none"


def test_no_features_answer_decodes_with_the_request_ids(views_model: ViewAggregator) -> None:
    data = no_features_request(views_model.programs[1], 1, 4, FeatureRequest(HASH, 42, 9))
    header = codec.decode_request_header(data)
    assert (header.packing, header.event_id, header.request_id, header.view_index) == (Packing.NO_FEATURES, 42, 9, 1)


# ---- the event table ------------------------------------------------------------------------------------

def test_unconfident_sums_fetch_the_splits_and_close_when_all_are_in() -> None:
    table = EventTable(deadline_s=1.0, feature_deadline_s=0.5)
    for view in range(3):
        assert _add(table, _sums(9, view)).event is None
    event = _add(table, _sums(9, 3)).event
    assert event is not None and event.scores_first and not event.fetching
    assert table.fetch(event, LOCAL, now=1.0) is False
    assert len(table) == 0 and table.next_deadline() == pytest.approx(1.5)
    for view in (0, 2, 1):
        assert _add(table, _split(9, view), 1.1).event is None
    done = _add(table, _none(9, 3), 1.2).event
    assert done is event and done.split_views == (0, 1, 2) and done.fetching
    assert table.answered(done, EventAnswer(4, np.zeros(10), 1, (0, 1, 2, 3), scores_first=True)) == []
    # The answer is remembered: a late copy of a split asked for is stale (acked, no reply).
    assert _add(table, _split(9, 3), 2.0).stale


def test_the_second_deadline_answers_with_the_splits_that_came() -> None:
    table = EventTable(deadline_s=1.0, feature_deadline_s=0.5)
    for view in range(4):
        event = _add(table, _sums(5, view)).event
    assert event is not None and not table.fetch(event, LOCAL, now=2.0)
    _add(table, _split(5, 1), 2.1)
    assert table.expire(now=2.49) == []
    (closed,) = table.expire(now=2.5)
    assert closed.split_views == (1,)


def test_a_camera_dead_between_the_phases_is_not_waited_for() -> None:
    table = EventTable(deadline_s=1.0)
    for view in range(4):
        event = _add(table, _sums(5, view)).event
    assert event is not None and not table.fetch(event, LOCAL, now=0.0)
    for view in (0, 1, 3):
        assert _add(table, _split(5, view), 0.1).event is None
    (ready,) = table.device_status("cam2", b"offline", now=0.2)
    assert ready is event and ready.split_views == (0, 1, 3)
    # The next event is whole without the dead camera; its fetch waits for the live ones, and is ready once
    # they are dead too (nothing left to wait for).
    for view in (0, 1, 3):
        closed = _add(table, _sums(6, view)).event
    assert closed is not None and sorted(closed.views) == [0, 1, 3]
    assert table.fetch(closed, LOCAL, now=1.0) is False
    assert table.device_status("cam0", b"offline") == [] and table.device_status("cam1", b"offline") == []
    (ready,) = table.device_status("cam3", b"offline")
    assert ready.key == (HASH, 6) and ready.split_views == ()
    for view in (0, 1, 3):
        table.device_status(f"cam{view}", b"online")
    table.device_status("cam2", b"offline")
    for view in range(4):
        closed = _add(table, _sums(7, view), 2.0).event
    table.device_status("cam0", b"offline")
    table.device_status("cam1", b"offline")
    table.device_status("cam3", b"offline")
    assert closed is not None and table.fetch(closed, LOCAL, now=2.0) is True  # every camera already dead


def test_hostile_feature_answers_are_rejected_clearly() -> None:
    table = EventTable(deadline_s=1.0)
    assert _status(lambda: _add(table, _none(3, 0))) == Status.MALFORMED  # nothing asked
    for view in range(3):
        _add(table, _sums(3, view))
    # One event's views agree on what they send first.
    assert _status(lambda: _add(table, _split(3, 3))) == Status.MALFORMED
    _add(table, _split(4, 0))
    assert _status(lambda: _add(table, _sums(4, 1))) == Status.MALFORMED
    event = _add(table, _sums(3, 3)).event
    assert event is not None
    # Closed, not fetched yet: no split may come (no request went out).
    assert _status(lambda: _add(table, _none(3, 1))) == Status.MALFORMED
    table.fetch(event, LOCAL, now=0.0)
    assert _status(lambda: _add(table, _split(3, 1, request_id=8))) == Status.MALFORMED  # another request id
    _add(table, _split(3, 1))
    assert _status(lambda: _add(table, _split(3, 1))) == Status.MALFORMED  # twice
    assert _status(lambda: _add(table, _none(3, 1))) == Status.MALFORMED
    assert _status(lambda: table.add(HASH, 4, _split(3, 2), "cam1", now=0.0)) == Status.MALFORMED  # cam1 is view 1
    assert _status(lambda: _add(table, _sums(3, 2))) == Status.MALFORMED  # its sums again: a duplicate


def test_fetching_events_count_towards_the_open_bound_and_drain() -> None:
    table = EventTable(deadline_s=1.0, max_open=1)
    for view in range(4):
        event = _add(table, _sums(1, view)).event
    assert event is not None
    table.fetch(event, LOCAL, now=0.0)
    assert _status(lambda: _add(table, _sums(2, 0))) == Status.UNAVAILABLE
    assert table.drain() == [event]


# ---- answers against the evaluation ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def views_model() -> ViewAggregator:
    return ViewAggregator(load_model(VIEWS_MODEL))


def test_sums_are_checked_against_the_views_exit(views_model: ViewAggregator) -> None:
    header = sums_header(views_model.programs[0], HASH, 1, 5, 0, 4)
    n = int(np.prod(views_model.programs[0].exit.in_hwc))
    check_sums(views_model, header, np.full(10, n, np.int32))
    for bad in (n + 2, -n - 2, n - 1):
        assert _status(lambda bad=bad: check_sums(views_model, header, np.full(10, bad, np.int32))) == Status.MALFORMED
    served = serve(views_model.loaded, "aggregator")
    served.check(sums_header(views_model.programs[0], HASH, 1, 5, 0, 4))
    wrong = RequestHeader(HASH, served.split_layer, 9, 1, 1, 1, 0, Packing.EXIT_SUMS, 5, 0, 4)
    assert _status(lambda: served.check(wrong)) == Status.SHAPE_MISMATCH


def test_scores_first_answers_as_the_evaluation_does(views_model: ViewAggregator,
                                                      fmnist_test: datasets.Dataset) -> None:
    """Sums first, then the splits of every view that sent sums (some withheld): the local exit's decision from
    the sums equals the evaluation's on recomputed sums, and tier 1 on the splits that came equals the
    evaluation with those views present."""
    images, labels = fmnist_test.images[:N_EVENTS], fmnist_test.labels[:N_EVENTS]
    runs = views_model.run_devices(images)
    rng = np.random.default_rng(1)
    events = []
    for index in range(N_EVENTS):
        event = Event((HASH, index + 1), 4, 0.0, scores_first=True)
        for view in range(4):
            sums = reference.exit_sums(views_model.programs[view].exit, runs.splits[view, index][None])[0]
            header = sums_header(views_model.programs[view], HASH, 1, index + 1, view, 4)
            event.views[view] = ViewRequest(header, sums.astype(np.int32), None)
        events.append(event)
    first = answer_events(views_model, events)
    local = views_model.local_exit_batch(runs.logits, np.ones((N_EVENTS, 4), bool))
    assert [answer.needs_features for answer in first] == (~local.exits).tolist()
    assert all(a.class_id == int(c) for a, c in zip(first, local.classes))
    unsure = [i for i, answer in enumerate(first) if answer.needs_features]
    withheld = {i: int(rng.integers(0, 4)) for i in unsure[::3]}
    for i in unsure:
        events[i].local = first[i]
        for view in range(4):
            if withheld.get(i) == view:
                events[i].features[view] = _none(i + 1, view, 1)
            else:
                header = RequestHeader(HASH, 2, 32, 5, 5, 1, 0, Packing.BITS_U64, i + 1, view, 4)
                events[i].features[view] = ViewRequest(header, runs.splits[view, i], None)
    second = answer_events(views_model, [events[i] for i in unsure])
    for i, answer in zip(unsure, second):
        views = tuple(v for v in range(4) if withheld.get(i) != v)
        want = views_model.outputs(runs, labels, views).final_class[i]
        assert (answer.answered_by, answer.class_id, answer.needs_features) == (1, int(want), False), i
    assert len(unsure) > 30 and len(withheld) > 10
    # No split came at all: the local exit's answer, marked fallback.
    events[unsure[0]].features = {view: _none(unsure[0] + 1, view, 1) for view in range(4)}
    (fallback,) = answer_events(views_model, [events[unsure[0]]])
    assert fallback.fallback and fallback.answered_by == 0 and fallback.class_id == first[unsure[0]].class_id


def test_a_split_after_a_confident_scores_first_answer_is_a_duplicate_not_stale() -> None:
    """No feature request went out for an event its sums answered: a split for it is no late answer to one."""
    table = EventTable(deadline_s=1.0)
    for view in range(4):
        event = _add(table, _sums(8, view)).event
    assert event is not None
    table.answered(event, EventAnswer(1, np.zeros(10), 0, (0, 1, 2, 3), scores_first=True))
    assert _status(lambda: _add(table, _split(8, 2))) == Status.MALFORMED
    assert _status(lambda: _add(table, _none(8, 2))) == Status.MALFORMED
