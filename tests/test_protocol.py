"""Offline tests of the wire format (ddnn_gen/wire/codec.py, wire/topics.py): byte layout, round trips, rejections."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ddnn_gen.fold.program import pack_bits
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.codec import Packing, ProtocolError, Reply, RequestHeader, Status

HASH = bytes(range(16))


def _header(channels: int = 33, height: int = 2, width: int = 3, packing: Packing = Packing.BITS_U64,
            request_id: int = 0x0102030405060708, views: tuple[int, int, int] = (0x1112131415161718, 2, 4)
            ) -> RequestHeader:
    return RequestHeader(HASH, 2, channels, height, width, request_id, 123456789, packing, *views)


def _bits(channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return pack_bits(rng.random((height, width, channels)) < 0.5)


def test_request_layout_is_fixed_little_endian() -> None:
    header = _header()
    data = codec.encode_request(header, _bits(33, 2, 3))
    assert codec.REQUEST_HEADER_BYTES == 64
    assert data[:4] == b"DDNQ" and data[4] == 3 and data[5] == Packing.BITS_U64
    assert struct.unpack_from("<H", data, 6)[0] == 64
    assert data[8:24] == HASH
    assert struct.unpack_from("<HHHH", data, 24) == (2, 33, 2, 3)
    assert struct.unpack_from("<QQI", data, 32) == (0x0102030405060708, 123456789, 2 * 3 * 1)
    assert struct.unpack_from("<QBBH", data, 52) == (0x1112131415161718, 2, 4, 0)
    assert b"dev" not in data  # identity is the topic's: no device id in the bytes
    assert len(data) == 64 + 2 * 3 * 1 * 8  # 33 channels fit one word


def test_single_view_request_has_zero_view_fields() -> None:
    data = codec.encode_request(_header(views=(0, 0, 0)), _bits(33, 2, 3))
    assert data[52:64] == bytes(12)
    assert not codec.decode_request(data).header.multi_view


@pytest.mark.parametrize("channels", [1, 31, 32, 33, 64, 65, 128])
def test_request_round_trip(channels: int) -> None:
    split = _bits(channels, 3, 2, seed=channels)
    decoded = codec.decode_request(codec.encode_request(_header(channels, 3, 2), split))
    assert decoded.header == _header(channels, 3, 2)
    np.testing.assert_array_equal(decoded.payload, split)


def test_float_packing_round_trip_and_non_finite() -> None:
    values = np.linspace(-1, 1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    header = _header(4, 2, 3, Packing.FLOAT32)
    np.testing.assert_array_equal(codec.decode_request(codec.encode_request(header, values)).payload, values)
    values[1, 2, 3] = np.nan
    with pytest.raises(ProtocolError) as error:
        codec.decode_request(codec.encode_request(header, values))
    assert error.value.status == Status.NON_FINITE and error.value.request_id == header.request_id


@pytest.mark.parametrize(("mutate", "status"), [
    (lambda d: d[:50], Status.MALFORMED),  # truncated header
    (lambda d: d[:-8], Status.MALFORMED),  # truncated payload
    (lambda d: d + b"\0" * 8, Status.MALFORMED),  # trailing bytes
    (lambda d: b"XXXX" + d[4:], Status.BAD_MAGIC),
    (lambda d: b"", Status.BAD_MAGIC),
    (lambda d: d[:4] + b"\x09" + d[5:], Status.BAD_VERSION),
    (lambda d: d[:5] + b"\x07" + d[6:], Status.MALFORMED),  # unknown packing
    (lambda d: d[:48] + struct.pack("<I", 5) + d[52:], Status.MALFORMED),  # word count disagrees
    (lambda d: d[:26] + struct.pack("<H", 0) + d[28:], Status.SHAPE_MISMATCH),  # C == 0
    (lambda d: d[:4] + b"\x02" + d[5:], Status.BAD_VERSION),  # a version-2 device
    (lambda d: d[:60] + b"\x04" + d[61:], Status.MALFORMED),  # view index 4 of 4
    (lambda d: d[:61] + b"\x11" + d[62:], Status.MALFORMED),  # 17 views
    (lambda d: d[:52] + bytes(8) + d[60:], Status.MALFORMED),  # 4 views without an event id
    (lambda d: d[:62] + b"\x01" + d[63:], Status.MALFORMED),  # reserved byte set
])
def test_bad_requests_are_rejected_with_a_status(mutate: object, status: Status) -> None:
    data = codec.encode_request(_header(), _bits(33, 2, 3))
    with pytest.raises(ProtocolError) as error:
        codec.decode_request(mutate(data))  # type: ignore[operator]
    assert error.value.status == status


def test_padding_bits_must_be_zero() -> None:
    split = _bits(33, 2, 3)
    split[1, 1, 0] |= np.uint64(1) << np.uint64(40)  # channel 40 does not exist
    with pytest.raises(ProtocolError) as error:
        codec.decode_request(codec.encode_request(_header(), split))
    assert error.value.status == Status.SHAPE_MISMATCH


def _dense_reference(bits: np.ndarray) -> bytes:
    """The dense layout written from its definition: bit p*C + c of the stream, LSB first, is channel c of
    pixel p (HWC order); the last byte's unused bits 0."""
    flat = bits.reshape(-1)
    out = bytearray((len(flat) + 7) // 8)
    for index in np.flatnonzero(flat):
        out[index // 8] |= 1 << (index % 8)
    return bytes(out)


@pytest.mark.parametrize("channels", [1, 7, 32, 63, 64, 65, 130])
@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 2), (5, 3), (7, 7)])
def test_dense_round_trip_to_the_same_words(channels: int, height: int, width: int) -> None:
    rng = np.random.default_rng(channels * 100 + height * 10 + width)
    bits = rng.random((height, width, channels)) < 0.5
    words = pack_bits(bits)
    header = _header(channels, height, width, Packing.BITS_DENSE)
    data = codec.encode_request(header, words)
    assert data[5] == Packing.BITS_DENSE and len(data) == 64 + (height * width * channels + 7) // 8
    assert struct.unpack_from("<I", data, 48)[0] == len(data) - 64  # the element count is the payload's bytes
    assert data[64:] == _dense_reference(bits)
    decoded = codec.decode_request(data)
    assert decoded.header == header and decoded.payload.dtype == np.dtype("<u8")
    # Downstream code sees exactly what packing 1 would have given it.
    np.testing.assert_array_equal(decoded.payload, words)
    np.testing.assert_array_equal(decoded.payload,
                                  codec.decode_request(codec.encode_request(_header(channels, height, width),
                                                                            words)).payload)


def test_dense_never_longer_and_equal_to_words_at_64_channels() -> None:
    words = _bits(64, 2, 3)
    dense = codec.encode_request(_header(64, 2, 3, Packing.BITS_DENSE), words)
    assert dense[64:] == codec.encode_request(_header(64, 2, 3), words)[64:]  # the same bytes when C % 64 == 0
    for channels in (1, 7, 32, 63, 65, 130):
        words = _bits(channels, 7, 7)
        assert (len(codec.encode_request(_header(channels, 7, 7, Packing.BITS_DENSE), words))
                < len(codec.encode_request(_header(channels, 7, 7), words)))


def test_dense_encoder_drops_padding_bits_of_the_words() -> None:
    split = _bits(33, 2, 3)
    dirty = split.copy()
    dirty[1, 1, 0] |= np.uint64(1) << np.uint64(40)  # channel 40 does not exist
    data = codec.encode_request(_header(packing=Packing.BITS_DENSE), dirty)
    np.testing.assert_array_equal(codec.decode_request(data).payload, split)


@pytest.mark.parametrize(("channels", "height", "width"), [(33, 2, 3), (7, 1, 1), (63, 3, 1), (1, 5, 3)])
def test_dense_padding_bits_set_is_a_shape_mismatch(channels: int, height: int, width: int) -> None:
    header = _header(channels, height, width, Packing.BITS_DENSE)
    data = codec.encode_request(header, _bits(channels, height, width))
    used = height * width * channels % 8
    assert used, "the shape must leave unused bits in the last byte"
    for bit in range(used, 8):
        bad = data[:-1] + bytes([data[-1] | 1 << bit])
        with pytest.raises(ProtocolError) as error:
            codec.decode_request(bad)
        assert error.value.status == Status.SHAPE_MISMATCH and error.value.request_id == header.request_id


@pytest.mark.parametrize("mutate", [
    lambda d: d[:-1],  # truncated by a byte
    lambda d: d[:64],  # no payload
    lambda d: d + b"\0",  # one byte too many
    lambda d: d + bytes(8 * 6 - 25),  # as long as the packing-1 payload of the same split
    lambda d: d[:48] + struct.pack("<I", 6) + d[52:],  # the packing-1 word count
])
def test_dense_truncated_or_oversized_is_malformed(mutate: object) -> None:
    data = codec.encode_request(_header(packing=Packing.BITS_DENSE), _bits(33, 2, 3))
    assert len(data) == 64 + 25
    with pytest.raises(ProtocolError) as error:
        codec.decode_request(mutate(data))  # type: ignore[operator]
    assert error.value.status == Status.MALFORMED


def test_dense_encode_rejects_a_wrong_word_count() -> None:
    with pytest.raises(ValueError):
        codec.encode_request(_header(packing=Packing.BITS_DENSE), _bits(33, 2, 2))
    with pytest.raises(ValueError):
        codec.encode_request(_header(65, 2, 3, Packing.BITS_DENSE), _bits(33, 2, 3))


def test_oversized_rejected_before_decoding() -> None:
    data = codec.encode_request(_header(), _bits(33, 2, 3)) + bytes(10_000_000)
    with pytest.raises(ProtocolError) as error:
        codec.decode_request_header(data, max_bytes=1 << 20)
    assert error.value.status == Status.TOO_LARGE
    assert error.value.request_id == 0x0102030405060708


def _expected_status(data: bytes) -> Status | None:
    """What the request layout (docs/protocol.md) says a request earns, written from the table, field by
    field, in the order the checks are documented; None for a request that decodes."""
    if len(data) < 4 or data[:4] != b"DDNQ":
        return Status.BAD_MAGIC
    if len(data) < 64:
        return Status.MALFORMED
    version, packing, header_len = data[4], data[5], int.from_bytes(data[6:8], "little")
    split_layer = int.from_bytes(data[24:26], "little")
    channels, height, width = (int.from_bytes(data[i:i + 2], "little") for i in (26, 28, 30))
    words = int.from_bytes(data[48:52], "little")
    event_id = int.from_bytes(data[52:60], "little")
    view_index, view_count, reserved = data[60], data[61], data[62:64]
    if version != 3:
        return Status.BAD_VERSION
    if header_len != 64 or packing not in (1, 2, 3, 4):
        return Status.MALFORMED
    if view_count > 16 or view_index >= max(1, view_count) or (view_count > 1 and event_id == 0):
        return Status.MALFORMED
    if reserved != bytes(2):
        return Status.MALFORMED
    if packing == 3 and split_layer != 0:
        return Status.SHAPE_MISMATCH
    if 0 in (channels, height, width):
        return Status.SHAPE_MISMATCH
    bits = height * width * channels
    elements = {1: height * width * ((channels + 63) // 64), 2: bits, 3: bits, 4: (bits + 7) // 8}[packing]
    if words != elements or len(data) - 64 != elements * {1: 8, 2: 4, 3: 1, 4: 1}[packing]:
        return Status.MALFORMED
    if packing == 4 and bits % 8 and data[-1] >> (bits % 8):
        return Status.SHAPE_MISMATCH
    if packing == 1 and channels % 64:
        last_words = np.frombuffer(data[64:], "<u8").reshape(height * width, -1)[:, -1]
        if np.any(last_words >> np.uint64(channels % 64)):
            return Status.SHAPE_MISMATCH
    if packing == 2 and not np.all(np.isfinite(np.frombuffer(data[64:], "<f4"))):
        return Status.NON_FINITE
    return None


def test_mutated_requests_get_the_status_the_layout_says() -> None:
    """Every byte of a valid request, mutated at random (thousands of cases), truncations and extensions:
    the decoder's verdict equals the one derived from the documented layout."""
    rng = np.random.default_rng(7)
    valid = codec.encode_request(_header(), _bits(33, 2, 3))
    raw = codec.encode_request(RequestHeader(HASH, 0, 1, 4, 4, 9, 0, Packing.RAW_U8),
                               np.arange(16, dtype=np.uint8).reshape(4, 4, 1))
    dense = codec.encode_request(_header(packing=Packing.BITS_DENSE), _bits(33, 2, 3))  # 198 bits: 2 unused
    seen: dict[Status | None, int] = {}
    for base in (valid, raw, dense):
        cases = [base[:cut] for cut in range(len(base))] + [base + bytes(extra) for extra in (1, 8, 100)]
        for _ in range(3000):
            mutated = bytearray(base)
            for position in rng.integers(0, len(base), rng.integers(1, 4)):
                mutated[position] = int(rng.integers(0, 256)) if rng.random() < 0.5 else mutated[position] ^ (
                    1 << int(rng.integers(0, 8)))
            cases.append(bytes(mutated))
        for data in cases:
            want = _expected_status(data)
            try:
                codec.decode_request(data)
                got = None
            except ProtocolError as error:
                got = error.status
            assert got == want, (data.hex(), got, want)
            seen[want] = seen.get(want, 0) + 1
    # The mutations reach every check, and most headers still decode.
    assert {Status.BAD_MAGIC, Status.BAD_VERSION, Status.MALFORMED, Status.SHAPE_MISMATCH, None} <= set(seen), seen


def test_random_bytes_never_decode() -> None:
    rng = np.random.default_rng(8)
    for length in [0, 1, 3, 4, 63, 64, 65, 200, 5000]:
        for _ in range(20):
            data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            if length >= 4 and rng.random() < 0.5:
                data = b"DDNQ" + data[4:]
            with pytest.raises(ProtocolError) as error:
                codec.decode_request(data)
            assert error.value.status == _expected_status(data)


@pytest.mark.parametrize("views", [(1, 4, 4), (1, 1, 0), (1, 0, 17), (0, 0, 4), (7, 2, 1)])
def test_encode_rejects_bad_view_fields(views: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        codec.encode_request(_header(views=views), _bits(33, 2, 3))


def test_encode_rejects_wrong_payload_and_device_id() -> None:
    with pytest.raises(ValueError):
        codec.encode_request(_header(), _bits(33, 2, 2))
    with pytest.raises(ValueError):
        topics.check_device_id("a/b")


def test_reply_round_trip_and_layout() -> None:
    reply = Reply(42, Status.OK, 7, ((7, 0.75), (2, 0.125)), server_us=1500, queue_us=300)
    data = codec.encode_reply(reply)
    assert data[:4] == b"DDNR" and len(data) == 40 + 2 * 8
    assert struct.unpack_from("<BBHQiIIIIBBH", data, 4) == (3, 0, 2, 42, 7, 1500, 300, 0, 0, 0, 0, 0)
    assert codec.decode_reply(data) == reply
    error = Reply(9, Status.UNKNOWN_MODEL, message="unknown model hash ab")
    assert codec.decode_reply(codec.encode_reply(error)) == error
    with pytest.raises(ProtocolError):
        codec.decode_reply(data[:-1])


def test_topics_and_thresholds() -> None:
    assert topics.request_topic(HASH, "cam-1") == "ddnn/req/000102030405060708090a0b0c0d0e0f/cam-1"
    assert topics.request_subscription(HASH, "g") == "$share/g/ddnn/req/000102030405060708090a0b0c0d0e0f/+"
    assert topics.parse_request_topic("ddnn/req/000102030405060708090a0b0c0d0e0f/cam-1") == (HASH.hex(), "cam-1", 1)
    assert topics.request_topic(HASH, "edge-3", tier=2) == "ddnn/req/000102030405060708090a0b0c0d0e0f/edge-3/t2"
    assert topics.parse_request_topic(topics.request_topic(HASH, "edge-3", tier=2)) == (HASH.hex(), "edge-3", 2)
    assert topics.request_subscription(HASH, "g", tier=2) == "$share/g/ddnn/req/000102030405060708090a0b0c0d0e0f/+/t2"
    assert (topics.tier_threshold_topic(HASH, 1, "cam-1")
            == "ddnn/tier-threshold/000102030405060708090a0b0c0d0e0f/1/cam-1")
    prefix = "ddnn/req/000102030405060708090a0b0c0d0e0f"
    for bad in (prefix, "ddnn/req/0001/cam", "ddnn/reply/x/y", prefix + "/a b", prefix + "/" + "x" * 33,
                prefix + "/cam/extra", prefix.upper() + "/cam", prefix + "/cam/t1", prefix + "/cam/t9",
                prefix + "/cam/t02x"):
        assert topics.parse_request_topic(bad) is None, bad
    assert topics.threshold_topic(HASH) == "ddnn/threshold/000102030405060708090a0b0c0d0e0f"
    assert topics.threshold_topic(HASH, "d7") == "ddnn/threshold/000102030405060708090a0b0c0d0e0f/d7"
    assert codec.decode_threshold(codec.encode_threshold(0.25)) == 0.25
    assert codec.decode_threshold(b"") is None
    assert codec.decode_threshold(b"nan") is None
    assert codec.decode_threshold(b"-1") is None
    with pytest.raises(ValueError):
        codec.encode_threshold(float("inf"))


def test_version_2_request_gets_bad_version_with_its_request_id() -> None:
    """An 88-byte v2 request (device id in the header) from a device not yet upgraded: BAD_VERSION, and the
    reply still carries its request id, which sits at offset 32 in both versions."""
    v2 = struct.pack("<4sBBH16sHHHHQQII32s", b"DDNQ", 2, 1, 88, HASH, 2, 33, 2, 3, 77, 0, 6, 0, b"cam1")
    with pytest.raises(ProtocolError) as error:
        codec.decode_request(v2 + _bits(33, 2, 3).tobytes())
    assert (error.value.status, error.value.request_id) == (Status.BAD_VERSION, 77)
