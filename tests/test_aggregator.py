"""Offline tests of the aggregator role's parts (server/aggregator.py): the event table's rules for hostile
input, deadlines and late views, and the answers of gathered events against the Python evaluation of the
shipped multi-view model with the same views present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ddnn_gen.errors import ModelFileError
from ddnn_gen.fold.views import ViewAggregator
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire.codec import Packing, ProtocolError, RequestHeader, Status
from ddnn_server.aggregator import Admission, Event, EventAnswer, EventTable, ViewRequest, answer_events
from ddnn_server.store import serve

VIEWS_MODEL = Path(__file__).resolve().parent.parent / "models" / "views" / "fmnist_views_16.npz"
HASH = bytes(range(16))
N_EVENTS = 400


def _add(table: EventTable, model_hash: bytes, request: ViewRequest, now: float, device: str | None = None
         ) -> Admission:
    """``table.add`` from camera ``cam<view index>`` unless ``device`` says otherwise."""
    return table.add(model_hash, 4, request, device or f"cam{request.header.view_index}", now=now)


def _request(event_id: int, view: int, count: int = 4, request_id: int = 1) -> ViewRequest:
    header = RequestHeader(HASH, 2, 32, 5, 5, request_id, 0, Packing.BITS_U64, event_id, view, count)
    return ViewRequest(header, np.zeros((5, 5, 1), np.uint64), None)


def _status(call: object) -> Status:
    with pytest.raises(ProtocolError) as error:
        call()  # type: ignore[operator]
    return error.value.status


def test_an_event_closes_when_its_last_view_arrives() -> None:
    table = EventTable(deadline_s=1.0)
    for view in (2, 0, 3):
        assert _add(table, HASH, _request(9, view), 0.0).event is None
    assert len(table) == 1
    done = _add(table, HASH, _request(9, 1), 0.5).event
    assert done is not None and sorted(done.views) == [0, 1, 2, 3] and len(table) == 0


def test_the_deadline_closes_an_event_with_the_views_present() -> None:
    table = EventTable(deadline_s=0.1)
    _add(table, HASH, _request(5, 1), 10.0)
    _add(table, HASH, _request(5, 3), 10.05)
    _add(table, HASH, _request(6, 0), 10.08)
    assert table.expire(now=10.099) == []
    assert table.next_deadline() == pytest.approx(10.1)
    expired = table.expire(now=10.1)
    assert [(event.key[1], sorted(event.views)) for event in expired] == [(5, [1, 3])]
    assert [event.key[1] for event in table.drain()] == [6] and len(table) == 0


def test_hostile_views_are_rejected_clearly() -> None:
    table = EventTable(deadline_s=1.0, max_open=2)
    _add(table, HASH, _request(1, 0), 0.0)
    # The same view twice, a view count that is not the model's, no event at all.
    assert _status(lambda: _add(table, HASH, _request(1, 0, request_id=2), 0.0)) == Status.MALFORMED
    assert _status(lambda: _add(table, HASH, _request(1, 1, count=3), 0.0)) == Status.MALFORMED
    assert _status(lambda: _add(table, HASH, _request(0, 0, count=0), 0.0)) == Status.MALFORMED
    # A flood of event ids: the table stays bounded, new events are refused as busy, open ones still fill.
    _add(table, HASH, _request(2, 0), 0.0)
    assert _status(lambda: _add(table, HASH, _request(3, 0), 0.0)) == Status.UNAVAILABLE
    assert len(table) == 2
    _add(table, HASH, _request(1, 1), 0.0)
    drained = table.drain()
    assert sorted(drained[0].views) == [0, 1]
    for event in drained:
        assert table.failed(event) == []  # not answered here: a view of event 1 may open it anew
    # The same event id under another model is another event.
    other = bytes(16)
    _add(table, other, _request(1, 0), 0.0)
    _add(table, HASH, _request(1, 0), 0.0)
    assert len(table) == 2


def test_a_device_speaks_for_one_view_only() -> None:
    """One camera filling in another's view of an event (or of a later one) is refused; another model, or a
    device forgotten past the bound, starts afresh."""
    table = EventTable(deadline_s=1.0, devices_kept=2)
    _add(table, HASH, _request(1, 2), 0.0, device="camX")
    assert _status(lambda: _add(table, HASH, _request(1, 3), 0.0, device="camX")) == Status.MALFORMED
    assert _status(lambda: _add(table, HASH, _request(2, 0), 0.0, device="camX")) == Status.MALFORMED
    _add(table, HASH, _request(2, 2), 0.0, device="camX")
    _add(table, bytes(16), _request(1, 0), 0.0, device="camX")
    _add(table, HASH, _request(3, 1), 0.0, device="camY")  # camX of HASH is now the oldest of two: forgotten
    _add(table, HASH, _request(3, 0), 0.0, device="camX")


def test_a_late_view_gets_its_events_answer_and_a_duplicate_does_not() -> None:
    table = EventTable(deadline_s=0.1, kept=2)
    _add(table, HASH, _request(7, 0), 0.0)
    (event,) = table.expire(now=1.0)
    answer = EventAnswer(3, np.zeros(10), 0, (0,))
    table.answered(event, answer)
    assert _add(table, HASH, _request(7, 2), 1.1).late_answer is answer
    assert _status(lambda: _add(table, HASH, _request(7, 0), 1.1)) == Status.MALFORMED
    # Bounded memory of answered events: the oldest is forgotten, its late view opens a new event.
    for event_id in (8, 9):
        table.answered(Event((HASH, event_id), 4, 0.0), answer)
    assert _add(table, HASH, _request(7, 3), 1.2).late_answer is None and len(table) == 1


def test_an_offline_device_costs_its_view_not_the_deadline() -> None:
    """A camera's will (offline) closes the open events that wait only for its view, at once, and later events
    no longer wait for it; a live camera's late view is still waited for up to the deadline; a birth (online)
    makes the view waited for again; a camera of another view, or of another model, is unaffected."""
    table = EventTable(deadline_s=2.0)
    for view in range(4):
        _add(table, HASH, _request(1, view), 0.0)  # binds cam0..cam3 to their views
    _add(table, HASH, _request(2, 0), 1.0)
    _add(table, HASH, _request(2, 1), 1.0)
    _add(table, HASH, _request(2, 3), 1.0)
    _add(table, HASH, _request(3, 0), 1.0)
    assert table.device_status("cam2", b"online") == []
    (ready,) = table.device_status("cam2", b"offline")
    assert ready.key == (HASH, 2) and sorted(ready.views) == [0, 1, 3]
    assert table.device_status("cam2", b"offline") == []  # the same will again (retained, redelivered)
    # Event 3 still lacks views 1 and 3 of live cameras: it waits, up to its deadline.
    assert len(table) == 1 and table.expire(now=2.9) == []
    _add(table, HASH, _request(3, 1), 1.5)
    assert table.expire(now=2.9) == [] and len(table) == 1
    done = _add(table, HASH, _request(3, 3), 2.0).event
    assert done is not None and sorted(done.views) == [0, 1, 3]
    # With cam2 offline, an event is whole without view 2, however its views arrive.
    for view in (3, 0):
        assert _add(table, HASH, _request(4, view), 3.0).event is None
    done = _add(table, HASH, _request(4, 1), 3.0).event
    assert done is not None and sorted(done.views) == [0, 1, 3]
    # A live camera's view late by less than the deadline is waited for.
    _add(table, HASH, _request(5, 0), 4.0)
    _add(table, HASH, _request(5, 1), 4.0)
    assert table.expire(now=5.9) == [] and len(table) == 1
    done = _add(table, HASH, _request(5, 3), 5.9).event
    assert done is not None
    # Another live camera late past the deadline: the deadline answers without it.
    _add(table, HASH, _request(6, 0), 6.0)
    _add(table, HASH, _request(6, 1), 6.0)
    (expired,) = table.expire(now=8.0)
    assert sorted(expired.views) == [0, 1]
    # Birth again: view 2 is waited for again.
    assert table.device_status("cam2", b"online") == []
    for view in (0, 1, 3):
        assert _add(table, HASH, _request(7, view), 9.0).event is None
    done = _add(table, HASH, _request(7, 2), 9.1).event
    assert done is not None and sorted(done.views) == [0, 1, 2, 3]
    # An empty retained status (cleared) is unknown: waited for, as online.
    table.device_status("cam2", b"offline")
    table.device_status("cam2", b"")
    for view in (0, 1, 3):
        assert _add(table, HASH, _request(8, view), 10.0).event is None
    assert len(table) == 1
    # Another model's view 2 has its own camera: cam2 of HASH going offline does not make it absent.
    other = bytes(16)
    for view in range(4):
        _add(table, other, _request(1, view), 11.0, device=f"other{view}")
    for view in (0, 1, 3):
        _add(table, other, _request(2, view), 11.0, device=f"other{view}")
    closed = table.device_status("cam2", b"offline")
    assert [event.key for event in closed] == [(HASH, 8)]
    assert len(table) == 1 and table.drain()[0].key == (other, 2)


def test_a_view_is_absent_only_when_every_device_sending_it_is_offline() -> None:
    """A replaced camera (a new id for the same view) keeps the view waited for while either is online."""
    table = EventTable(deadline_s=2.0)
    _add(table, HASH, _request(1, 2), 0.0, device="old2")
    _add(table, HASH, _request(2, 2), 0.0, device="new2")
    table.drain()
    for view in (0, 1, 3):
        _add(table, HASH, _request(3, view), 1.0)
    assert table.device_status("old2", b"offline") == []
    assert len(table) == 1
    (ready,) = table.device_status("new2", b"offline")
    assert ready.key == (HASH, 3)


def test_a_newcomers_birth_holds_absent_views_waited_for_one_deadline() -> None:
    """A device bound to no view that comes online may be an offline camera's replacement: until it sends
    its view (binding it) or a deadline has passed, views of offline devices are waited for."""
    table = EventTable(deadline_s=2.0)
    for view in range(4):
        _add(table, HASH, _request(1, view), 0.0)
    table.device_status("cam2", b"offline", now=1.0)
    table.device_status("cam2-new", b"online", now=1.0)
    for view in (0, 1, 3):
        assert _add(table, HASH, _request(2, view), 1.5).event is None
    assert table.expire(now=2.9) == [] and len(table) == 1
    # The newcomer never sent a view: a deadline after its birth, the event no longer waits for view 2.
    (ready,) = table.expire(now=3.0)
    assert ready.key == (HASH, 2) and sorted(ready.views) == [0, 1, 3]
    # Another newcomer that does send view 2: bound at once, and then it is simply a live camera.
    table.device_status("cam2-b", b"online", now=4.0)
    for view in (0, 1, 3):
        assert _add(table, HASH, _request(3, view), 4.0).event is None
    done = _add(table, HASH, _request(3, 2), 4.1, device="cam2-b").event
    assert done is not None and sorted(done.views) == [0, 1, 2, 3]


def test_a_view_arriving_while_its_event_is_answered_gets_that_answer() -> None:
    """Closed (here by the will of view 2's camera) but not answered yet: a view arriving then joins the event
    instead of opening a second one answered differently; a duplicate of it is refused; a failed event hands
    its joined views back to be told why."""
    table = EventTable(deadline_s=2.0)
    for view in range(4):
        _add(table, HASH, _request(1, view), 0.0)
    for view in (0, 1, 3):
        _add(table, HASH, _request(2, view), 0.5)
    (closed,) = table.device_status("cam2", b"offline", now=0.6)
    late = _request(2, 2, request_id=7)
    assert _add(table, HASH, late, 0.7) == Admission() and len(table) == 0
    assert _status(lambda: _add(table, HASH, _request(2, 2, request_id=8), 0.7)) == Status.MALFORMED
    assert table.answered(closed, EventAnswer(1, np.zeros(10), 0, (0, 1, 3))) == [late]
    table.device_status("cam2", b"online", now=0.9)
    for view in (0, 1, 3):
        _add(table, HASH, _request(3, view), 1.0)
    (closed,) = table.drain()
    joined = _request(3, 2, request_id=9)
    _add(table, HASH, joined, 1.1)
    assert table.failed(closed) == [joined]
    assert _add(table, HASH, _request(3, 2, request_id=10), 1.2).event is None and len(table) == 1


def test_hostile_status_messages_change_nothing() -> None:
    """Payloads other than online/offline, statuses of devices bound to no view, and bindings forgotten past
    the bound leave every event waiting."""
    table = EventTable(deadline_s=2.0, devices_kept=4)
    for view in range(4):
        _add(table, HASH, _request(1, view), 0.0)
    for view in (0, 1, 3):
        _add(table, HASH, _request(2, view), 0.0)
    for payload in (b"OFFLINE", b"offline\x00", b"offline " * 1000, b"\xff\xfe", b"0", b"false"):
        assert table.device_status("cam2", payload) == []
    assert table.device_status("stranger", b"offline") == []
    assert table.device_status("cam2x", b"offline") == []
    assert len(table) == 1
    # cam2 is forgotten (four newer devices): its will no longer means anything, and the counts stay sane.
    assert [_add(table, HASH, _request(3, view), 0.5, device=f"new{view}").event is None
            for view in range(4)] == [True, True, True, False]
    assert table.device_status("cam2", b"offline") == []
    assert len(table) == 1
    (ready,) = table.device_status("new2", b"offline")
    assert ready.key == (HASH, 2)


@pytest.fixture(scope="module")
def views_model() -> ViewAggregator:
    return ViewAggregator(load_model(VIEWS_MODEL))


def test_gathered_events_answer_as_the_evaluation_does(views_model: ViewAggregator,
                                                        fmnist_test: datasets.Dataset) -> None:
    """Events with every set of views present (drawn per event, as a running system sees them), answered in
    one batch: class and answering exit equal the evaluation's with that event's views present."""
    images, labels = fmnist_test.images[:N_EVENTS], fmnist_test.labels[:N_EVENTS]
    runs = views_model.run_devices(images)
    rng = np.random.default_rng(0)
    present = [tuple(sorted(rng.choice(4, rng.integers(1, 5), replace=False).tolist())) for _ in range(N_EVENTS)]
    present[:50] = [(0, 1, 2, 3)] * 50
    events = []
    for index, views in enumerate(present):
        event = Event((HASH, index + 1), 4, 0.0)
        for view in views:
            event.views[view] = ViewRequest(RequestHeader(HASH, 2, 32, 5, 5, 1, 0, Packing.BITS_U64, index + 1, view,
                                                          4), runs.splits[view, index], None)
        events.append(event)
    answers = answer_events(views_model, events)
    by_exit = {0: 0, 1: 0}
    for views in set(present):
        rows = [i for i, p in enumerate(present) if p == views]
        expected = views_model.outputs(runs, labels, views)
        local = views_model.local_exit_batch(runs.logits, np.isin(np.arange(4), views)[None].repeat(N_EVENTS, 0))
        for i in rows:
            want_exit = 0 if local.exits[i] else 1
            want_class = expected.local_class[i] if want_exit == 0 else expected.final_class[i]
            assert (answers[i].answered_by, answers[i].class_id) == (want_exit, int(want_class)), (i, views)
            assert answers[i].views == views
            by_exit[want_exit] += 1
    assert min(by_exit.values()) > 50, by_exit  # both exits answer a fair share


def test_only_an_aggregator_serves_a_multi_view_model(fmnist_model_path: Path) -> None:
    loaded = load_model(VIEWS_MODEL)
    with pytest.raises(ModelFileError, match="--role aggregator"):
        serve(loaded, "cloud")
    with pytest.raises(ModelFileError, match="multi-view models"):
        serve(load_model(fmnist_model_path), "aggregator")
    served = serve(loaded, "aggregator")
    assert served.role == "aggregator" and served.views is not None and served.split_chw == (32, 5, 5)
    bits = RequestHeader(loaded.hash_bytes, 2, 32, 5, 5, 1, 0, Packing.FLOAT32, 1, 0, 4)
    with pytest.raises(ProtocolError, match="bit-packed"):
        served.check(bits)
