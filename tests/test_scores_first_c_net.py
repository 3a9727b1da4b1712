"""Scores first with the generated C cameras (docs/views.md), on a real Mosquitto with real Fashion-MNIST: four
``ddnn_device_net --view-index I --view-count 4 --scores-first`` programs (each view's folded part, built with
ASan/UBSan) send their local exit's integer sums; ``ddnn-server --role aggregator`` answers the confident events
from them and asks the cameras for the splits of the others on ddnn/features/<id>. Every event is answered, class
and answering exit equal the evaluation's event by event, and the bytes the cameras published are what scores
first costs; a camera that keeps no splits answers NO_FEATURES and the aggregator proceeds; whatever else lands
on a camera's features topic is counted and ignored."""

from __future__ import annotations

import logging
import queue
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from net_harness import SAN_ENV, RawClient, device_rows, finish_device, start_device, wait_for
from test_views_net import DEADLINE_MS, _expected, aggregating, build_camera, scene  # noqa: F401 (a fixture)

from ddnn_gen.device.simulated import split_header
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.codec import FeatureRequest, Packing

log = logging.getLogger(__name__)

N_EVENTS = 1000
_FEATURES_LINE = re.compile(r"feature requests: answered (\d+), withheld (\d+), other model (\d+), refused (\d+), "
                            r"unsent (\d+)")


@pytest.fixture(scope="module")
def cameras(scene: tuple, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:  # noqa: F811
    """Each view's (ddnn_device_net built with sanitizers, its sample file of N_EVENTS crops), from the CLI."""
    require_tool("gcc")
    if not Path("/usr/include/MQTTClient.h").exists():
        pytest.skip("Paho C (libpaho-mqtt-dev) not installed")
    aggregator = scene[0]
    root = tmp_path_factory.mktemp("sf-c")
    return [build_camera(root, view, N_EVENTS) for view in range(aggregator.count)]


def _feature_counts(stderr: str) -> tuple[int, ...]:
    found = _FEATURES_LINE.findall(stderr)
    assert found, stderr
    return tuple(int(n) for n in found[-1])


def _published(observer: RawClient) -> dict[str, int]:
    """Bytes published per request topic, as the broker delivered them to a subscriber of ddnn/req/#."""
    sent: dict[str, int] = {}
    while True:
        try:
            topic, payload = observer.messages.get_nowait()
        except queue.Empty:
            return sent
        if topic.startswith("ddnn/req/"):
            sent[topic] = sent.get(topic, 0) + len(payload)


def test_scores_first_c_cameras_answer_every_event_as_the_evaluation(scene: tuple, cameras: list,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    aggregator, runs, labels, _ = scene
    model_hash = aggregator.loaded.hash_bytes
    binary, samples = cameras[0]
    for bad in (["--scores-first"], ["--view-index", "0", "--view-count", "4", "--keep-events", "4"],
                ["--view-index", "0", "--view-count", "4", "--scores-first", "--keep-events", "100000"],
                ["--view-index", "0", "--view-count", "4", "--scores-first", "--keep-events", "-1"]):
        run = subprocess.run([str(binary), str(samples), "--device-id", "c-bad", *bad], capture_output=True,
                             text=True, timeout=60, env=SAN_ENV)
        assert run.returncode == 2 and ("--scores-first" in run.stderr or "--keep-events" in run.stderr), \
            (bad, run.stderr)
    want_classes, want_exits = _expected(aggregator, aggregator.outputs(runs, labels))
    outs = [tmp_path / f"sf{view}.csv" for view in range(aggregator.count)]
    with aggregating(5000) as (broker, _):
        observer = RawClient(broker.connection(), "sf-observer")
        assert observer.subscribe("ddnn/req/#").startswith("Granted")
        try:
            running = [start_device(binary, samples, outs[view], f"c-sf{view}", broker.connection(), "--view-index",
                                    str(view), "--view-count", str(aggregator.count), "--timeout-ms", "20000",
                                    "--scores-first")
                       for view, (binary, samples) in enumerate(cameras)]
            stderr = [finish_device(camera, timeout_s=900) for camera in running]
            time.sleep(0.5)  # the last camera's last publish reaches the observer
            sent = _published(observer)
        finally:
            observer.close()
    unconfident = int(np.sum(want_exits == 1))
    for out, err in zip(outs, stderr):
        rows = device_rows(out)
        assert len(rows) == N_EVENTS and {row["source"] for row in rows} == {"server"}
        assert [int(row["final_class"]) for row in rows] == want_classes.tolist()
        assert [int(row["answered_by"]) for row in rows] == want_exits.tolist()
        # Exactly the unconfident events' splits were asked for, and every one was held.
        assert _feature_counts(err) == (unconfident, 0, 0, 0, 0)
    split_bytes = len(codec.encode_request(split_header(aggregator.programs[0], model_hash, 1, 1, 0, 4),
                                           runs.splits[0, 0]))
    sums_bytes = codec.REQUEST_HEADER_BYTES + 4 * aggregator.loaded.spec.n_classes
    for view in range(aggregator.count):
        assert sent[topics.request_topic(model_hash, f"c-sf{view}")] == N_EVENTS * sums_bytes + unconfident * \
            split_bytes, view
    rtt = np.max([[float(row["t_total_us"]) / 1000 for row in device_rows(out)] for out in outs], axis=0)
    log.info("C cameras, scores first: %d events, %.1f%% at the aggregated local exit, %.1f B uplink per event "
             "(features at once: %d B), round trip p50 %.1f ms (local exit %.1f ms, tier 1 %.1f ms)", N_EVENTS,
             100 * np.mean(want_exits == 0), sum(sent.values()) / N_EVENTS, aggregator.count * split_bytes,
             np.median(rtt), np.median(rtt[want_exits == 0]), np.median(rtt[want_exits == 1]))


def test_a_c_camera_without_splits_says_so_and_hostile_feature_requests_are_ignored(
        scene: tuple, cameras: list, tmp_path: Path) -> None:  # noqa: F811
    """View 1 keeps no splits (--keep-events 0): it answers each feature request NO_FEATURES and the aggregator
    runs tier 1 on the other three, without waiting its second deadline. Meanwhile view 0's features topic gets
    what no aggregator sends (wrong lengths, magic, version, zero ids, another model's request) and a valid
    request for an event it never held: the first are counted and ignored, the last answered NO_FEATURES; the
    camera keeps answering every event as before."""
    aggregator, runs, labels, _ = scene
    model_hash = aggregator.loaded.hash_bytes
    n_events = N_EVENTS
    outs = [tmp_path / f"sn{view}.csv" for view in range(aggregator.count)]
    valid = codec.encode_feature_request(FeatureRequest(model_hash, 999_999_999, 777))
    hostile = [b"", b"junk", valid[:-1], valid + b"\0", b"DDNQ" + valid[4:], valid[:4] + b"\x02" + valid[5:],
               valid[:5] + b"\x01" + valid[6:], valid[:24] + bytes(8) + valid[32:], valid[:32] + bytes(8)]
    other = codec.encode_feature_request(FeatureRequest(bytes(16), 5, 5))
    with aggregating(DEADLINE_MS) as (broker, _):
        bad = RawClient(broker.connection(), "sn-hostile")
        assert bad.subscribe(topics.request_topic(model_hash, "c-sn0")).startswith("Granted")
        try:
            running = [start_device(binary, samples, outs[view], f"c-sn{view}", broker.connection(), "--view-index",
                                    str(view), "--view-count", str(aggregator.count), "--timeout-ms", "20000",
                                    "--scores-first", "--keep-events", "0" if view == 1 else "16",
                                    "--first-event-id", "4000001")
                       for view, (binary, samples) in enumerate(cameras)]
            assert wait_for(lambda: device_rows(outs[0]) != [], 60)  # connected, subscribed, running
            for payload in [*hostile, other, valid]:
                assert bad.publish(topics.feature_request_topic("c-sn0"), payload) == "Success"
            stderr = [finish_device(camera, timeout_s=600) for camera in running]
            answers = []
            while not bad.messages.empty():
                topic, payload = bad.messages.get_nowait()
                if topic == topics.request_topic(model_hash, "c-sn0") and len(payload) == codec.REQUEST_HEADER_BYTES:
                    answers.append(codec.decode_request_header(payload))
        finally:
            bad.close()
    assert [(h.packing, h.event_id, h.request_id, h.view_index, h.view_count) for h in answers
            if h.request_id == 777] == [(Packing.NO_FEATURES, 999_999_999, 777, 0, 4)]
    everyone = aggregator.outputs(runs, labels)
    without = aggregator.outputs(runs, labels, (0, 2, 3))
    local, want_exits = _expected(aggregator, everyone)
    want_exits = want_exits[:n_events]
    want = np.where(want_exits == 0, local[:n_events], without.final_class[:n_events])
    unconfident = int(np.sum(want_exits == 1))
    rtt = []
    for out in outs:
        rows = device_rows(out)
        assert len(rows) == n_events and {row["source"] for row in rows} == {"server"}
        assert [int(row["answered_by"]) for row in rows] == want_exits.tolist()
        assert [int(row["final_class"]) for row in rows] == want.tolist()
        rtt.append([float(row["t_total_us"]) / 1000 for row in rows])
    assert _feature_counts(stderr[1]) == (0, unconfident, 0, 0, 0)
    assert _feature_counts(stderr[0]) == (unconfident, 1, 1, len(hostile), 0)
    slowest = np.max(rtt, axis=0)
    assert float(np.median(slowest[want_exits == 1])) < DEADLINE_MS / 10  # NO_FEATURES, not the second deadline
