"""One table of vectors (tests/vectors/wire_and_text.json) run against both twins: the threshold text grammar
(Python parse_threshold_text, C ddnn_threshold_parse), the device-id rule (valid_device_id,
ddnn_device_id_valid) and the wire layouts (codec.encode_request vs ddnn_request_encode[_raw|_dense], codec.encode_reply
decoded by ddnn_reply_decode). The C side runs through the cffi binding of the runtime (device/c_binding.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require_tool

from ddnn_gen.device.c_binding import CRuntime
from ddnn_gen.device.features import FeatureBuffer
from ddnn_gen.errors import SpecError
from ddnn_gen.model.spec import parse_threshold_text
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.codec import FeatureRequest, Packing, RequestHeader

VECTORS = json.loads((Path(__file__).parent / "vectors" / "wire_and_text.json").read_text(encoding="utf-8"))


def _ids(key: str, field: str) -> list[str]:
    return [repr(item[field]) for item in VECTORS[key]]


@pytest.fixture(scope="module")
def runtime() -> CRuntime:
    require_tool("cc")
    return CRuntime()


def _python_threshold(raw: bytes) -> float | None:
    try:
        return parse_threshold_text(raw)
    except SpecError:
        return None


@pytest.mark.parametrize("vector", VECTORS["threshold_text"], ids=_ids("threshold_text", "text"))
def test_threshold_text(vector: dict[str, Any], runtime: CRuntime) -> None:
    raw = vector["text"].encode("utf-8")
    want = vector["value"]
    for side, got in (("python", _python_threshold(raw)), ("c", runtime.threshold_parse(raw))):
        if want is None:
            assert got is None, f"{side} accepted {raw!r} as {got!r}"
        else:
            # Exactly the double strtod and float() both round to.
            assert got is not None and got == want and math.copysign(1, got) == 1, (side, got)


def test_threshold_table_covers_the_length_limit() -> None:
    lengths = {len(item["text"].strip()): item["value"] is not None for item in VECTORS["threshold_text"]}
    assert lengths[63] is True and lengths[64] is False


@pytest.mark.parametrize("vector", VECTORS["device_id"], ids=_ids("device_id", "id"))
def test_device_id_rule(vector: dict[str, Any], runtime: CRuntime) -> None:
    raw = vector["id"].encode("utf-8")
    assert topics.valid_device_id(raw) is vector["valid"]
    assert topics.valid_device_id(vector["id"]) is vector["valid"]
    assert runtime.device_id_valid(raw) is vector["valid"]


def _views(vector: dict[str, Any]) -> tuple[int, int, int]:
    return vector["event_id"], vector["view_index"], vector["view_count"]


def _header(vector: dict[str, Any]) -> RequestHeader:
    return RequestHeader(bytes.fromhex(vector["model_hash"]), vector["split_layer"], vector["channels"],
                         vector["height"], vector["width"], vector["request_id"], vector["device_time_us"],
                         Packing[vector["packing"].upper()], *_views(vector))


@pytest.mark.parametrize("vector", VECTORS["requests"], ids=_ids("requests", "name"))
def test_request_bytes(vector: dict[str, Any], runtime: CRuntime) -> None:
    header = _header(vector)
    raw = header.packing == Packing.RAW_U8
    payload = np.array(vector["payload"], dtype=np.uint8 if raw else np.uint64)
    python = codec.encode_request(header, payload)
    args = (header.model_hash, header.channels, header.height, header.width, header.request_id, header.device_time_us)
    c = (runtime.request_encode_raw(*args, payload, _views(vector)) if raw
         else runtime.request_encode(header.model_hash, header.split_layer, *args[1:], payload, _views(vector),
                                     dense=header.packing == Packing.BITS_DENSE))
    assert python.hex() == vector["hex"]
    assert c is not None and c.hex() == vector["hex"]
    decoded = codec.decode_request(c)
    assert decoded.header == header
    assert np.array_equal(decoded.payload.ravel(), payload)


@pytest.mark.parametrize("vector", VECTORS["requests_refused"], ids=_ids("requests_refused", "name"))
def test_requests_refused_by_both(vector: dict[str, Any], runtime: CRuntime) -> None:
    words = np.zeros(1, dtype=np.uint64)
    header = RequestHeader(bytes(16), 1, 64, 1, 1, 1, 0, Packing.BITS_U64, *_views(vector))
    with pytest.raises(ValueError):
        codec.encode_request(header, words)
    assert runtime.request_encode(bytes(16), 1, 64, 1, 1, 1, 0, words, _views(vector)) is None
    assert runtime.request_encode(bytes(16), 1, 64, 1, 1, 1, 0, words, _views(vector), dense=True) is None
    assert runtime.request_encode_raw(bytes(16), 1, 1, 1, 1, 0, np.zeros(1, np.uint8), _views(vector)) is None


def test_dense_table_covers_odd_shapes() -> None:
    dense = [item for item in VECTORS["requests"] if item["packing"] == "bits_dense"]
    assert {item["channels"] % 64 for item in dense} >= {0, 1, 7, 33}
    assert any(item["height"] * item["width"] * item["channels"] % 8 for item in dense)


@pytest.mark.parametrize("channels", [1, 7, 32, 63, 64, 65, 130])
def test_dense_c_encoder_byte_equal_on_random_splits(channels: int, runtime: CRuntime) -> None:
    """ddnn_request_encode_dense (what the C device sends) gives codec.encode_request's bytes on random splits
    of every shape class, including words whose padding bits are set (neither side sends them)."""
    rng = np.random.default_rng(channels)
    for height, width in ((1, 1), (2, 3), (7, 7), (5, 5), (3, 1)):
        per_pixel = (channels + 63) // 64
        words = rng.integers(0, 2**63, (height, width, per_pixel), dtype=np.uint64) * np.uint64(2) + \
            rng.integers(0, 2, (height, width, per_pixel), dtype=np.uint64)
        request_id, device_time = int(rng.integers(1, 2**62)), int(rng.integers(0, 2**62))
        header = RequestHeader(bytes(range(16)), 3, channels, height, width, request_id, device_time,
                               Packing.BITS_DENSE)
        python = codec.encode_request(header, words)
        c = runtime.request_encode(header.model_hash, 3, channels, height, width, request_id, device_time, words,
                                   dense=True)
        assert c is not None and c == python, (height, width)
        assert len(c) == codec.REQUEST_HEADER_BYTES + (height * width * channels + 7) // 8
        spare = per_pixel * 64 - channels
        clean = words & np.uint64((1 << (64 - spare)) - 1) if spare else words
        clean[..., :-1] = words[..., :-1]
        np.testing.assert_array_equal(codec.decode_request(c).payload, clean)
    # A word count that is not H * W * ceil(C / 64) is refused, not read past.
    assert runtime.request_encode(bytes(16), 3, channels, 2, 2, 1, 0, np.zeros(3, np.uint64), dense=True) is None


@pytest.mark.parametrize("vector", VECTORS["replies"], ids=_ids("replies", "name"))
def test_reply_bytes(vector: dict[str, Any], runtime: CRuntime) -> None:
    reply = codec.Reply(vector["request_id"], codec.Status(vector["status"]), vector["class_id"],
                        tuple((int(c), float(p)) for c, p in vector["top_k"]), vector["server_us"], vector["queue_us"],
                        vector["message"], vector["upstream_us"], vector["upstream_server_us"], vector["answered_by"],
                        vector["flags"])
    data = codec.encode_reply(reply)
    assert data.hex() == vector["hex"]
    assert codec.decode_reply(data) == reply
    decoded = runtime.reply_decode(data)
    assert decoded is not None
    assert decoded == {"request_id": reply.request_id, "status": int(reply.status), "class_id": reply.class_id,
                       "server_us": reply.server_us, "queue_us": reply.queue_us, "upstream_us": reply.upstream_us,
                       "upstream_server_us": reply.upstream_server_us, "answered_by": reply.answered_by,
                       "flags": reply.flags, "top_k": list(reply.top_k), "message": reply.message}


@pytest.mark.parametrize("vector", VECTORS["replies_rejected"], ids=_ids("replies_rejected", "name"))
def test_replies_rejected_by_both(vector: dict[str, Any], runtime: CRuntime) -> None:
    data = bytes.fromhex(vector["hex"])
    with pytest.raises(codec.ProtocolError):
        codec.decode_reply(data)
    assert runtime.reply_decode(data) is None


# ---- scores first (docs/views.md): exit sums, NO_FEATURES, feature requests ------------------------------------

@pytest.mark.parametrize("n_classes", [1, 2, 10, 100])
def test_sums_and_no_features_c_encoders_byte_equal(n_classes: int, runtime: CRuntime) -> None:
    """ddnn_request_encode_sums / _no_features (what a scores-first C camera sends) give codec.encode_request's
    bytes, extreme sums included, and decode back to the same header and sums."""
    rng = np.random.default_rng(n_classes)
    model_hash = bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    for view_index, view_count in ((0, 2), (3, 4), (15, 16)):
        event_id, request_id = int(rng.integers(1, 2**63)), int(rng.integers(1, 2**63))
        device_time = int(rng.integers(0, 2**63))
        sums = rng.integers(-2**31, 2**31, n_classes, dtype=np.int64).astype(np.int32)
        sums[0] = np.iinfo(np.int32).min
        views = (event_id, view_index, view_count)
        header = RequestHeader(model_hash, 5, n_classes, 1, 1, request_id, device_time, Packing.EXIT_SUMS, *views)
        python = codec.encode_request(header, sums)
        c = runtime.request_encode_sums(model_hash, 5, request_id, device_time, sums, views)
        assert c is not None and c == python
        decoded = codec.decode_request(c)
        assert decoded.header == header and np.array_equal(decoded.payload, sums)
        empty = RequestHeader(model_hash, 5, 0, 0, 0, request_id, device_time, Packing.NO_FEATURES, *views)
        python = codec.encode_request(empty, np.zeros(0, np.uint8))
        c = runtime.request_encode_no_features(model_hash, 5, request_id, device_time, views)
        assert c is not None and c == python and len(c) == codec.REQUEST_HEADER_BYTES
        assert codec.decode_request(c).header == empty


@pytest.mark.parametrize("views", [(0, 0, 0), (7, 0, 1), (0, 0, 4), (7, 4, 4), (7, 0, 17)])
def test_scores_first_messages_outside_a_multi_view_event_refused_by_both(views: tuple[int, int, int],
                                                                          runtime: CRuntime) -> None:
    """Sums and NO_FEATURES belong to a multi-view event: neither twin writes one that the other would refuse."""
    sums = np.arange(10, dtype=np.int32)
    for header, payload in ((RequestHeader(bytes(16), 5, 10, 1, 1, 9, 0, Packing.EXIT_SUMS, *views), sums),
                            (RequestHeader(bytes(16), 5, 0, 0, 0, 9, 0, Packing.NO_FEATURES, *views),
                             np.zeros(0, np.uint8))):
        try:
            python: bytes | None = codec.encode_request(header, payload)
            codec.decode_request(python)
        except (ValueError, codec.ProtocolError):
            python = None
        assert python is None
    assert runtime.request_encode_sums(bytes(16), 5, 9, 0, sums, views) is None
    assert runtime.request_encode_no_features(bytes(16), 5, 9, 0, views) is None
    assert runtime.request_encode_sums(bytes(16), 5, 9, 0, np.zeros(0, np.int32), (7, 0, 4)) is None


def test_feature_request_c_twin(runtime: CRuntime) -> None:
    """ddnn_feature_request_encode/_decode against codec's: the same 40 bytes, and every hostile variant refused
    by both (C says why: 1 length, 2 magic, 3 version, 4 fields)."""
    request = FeatureRequest(bytes(range(16)), 2**64 - 1, 12345)
    python = codec.encode_feature_request(request)
    assert runtime.feature_request_encode(request.model_hash, request.event_id, request.request_id) == python
    assert runtime.feature_request_decode(python) == (0, (request.model_hash, request.event_id, request.request_id))
    assert runtime.feature_request_encode(bytes(16), 0, 1) is None
    assert runtime.feature_request_encode(bytes(16), 1, 0) is None

    def patched(offset: int, value: bytes) -> bytes:
        return python[:offset] + value + python[offset + len(value):]

    hostile = {b"": 1, python[:-1]: 1, python + b"\0": 1, bytes(4096): 1, patched(0, b"DDNQ"): 2,
               patched(4, b"\x02"): 3, patched(5, b"\x01"): 4, patched(6, b"\x29\x00"): 4, patched(24, bytes(8)): 4,
               patched(32, bytes(8)): 4}
    for data, reason in hostile.items():
        with pytest.raises(codec.ProtocolError):
            codec.decode_feature_request(data)
        assert runtime.feature_request_decode(data) == (reason, None), data.hex()


def test_c_split_buffer_keeps_and_forgets_as_the_python_one(runtime: CRuntime) -> None:
    """ddnn_features (the C camera's static ring of splits) against device/features.FeatureBuffer on one
    sequence: the last N events kept, a re-kept event replacing its split, a split handed out once, another
    request id or a forgotten event answered NO_FEATURES, capacity 0 keeping nothing, and a capacity beyond the
    pool refused."""
    size = 164
    most = runtime.lib.ddnn_features_capacity_for(size)
    # DDNN_FEATURES_MAX_EVENTS, DDNN_FEATURES_POOL_BYTES less the slot a split being sent is read from
    assert most == min(256, 65536 // size - 1)
    assert runtime.lib.ddnn_features_capacity_for(4096) == 15 and runtime.lib.ddnn_features_capacity_for(0) == 0
    assert runtime.lib.ddnn_features_capacity_for(65536) == 0 and runtime.lib.ddnn_features_capacity_for(65537) == 0
    assert not runtime.features_init(most + 1, size) and not runtime.features_init(16, 4096)
    for capacity in (0, 1, 3, 16):
        assert runtime.features_init(capacity, size)
        python = FeatureBuffer(bytes(16), lambda request: b"NO", capacity)
        rng = np.random.default_rng(capacity)
        for step in range(300):
            event, request_id = int(rng.integers(1, 8)), int(rng.integers(1, 4))
            if rng.random() < 0.6:
                split = bytes(rng.integers(0, 256, int(rng.integers(1, size + 1)), dtype=np.uint8))
                python.keep(event, request_id, split)
                runtime.features_keep(event, request_id, split)
            else:
                want = python.answer(FeatureRequest(bytes(16), event, request_id))
                got = runtime.features_take(event, request_id)
                assert got == (None if want == b"NO" else want), (capacity, step)
            assert runtime.lib.ddnn_features_held() == len(python)
