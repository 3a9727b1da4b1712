"""Wire format between devices and ``ddnn-server`` (see docs/protocol.md): pure bytes <-> records, no MQTT.

A request is a fixed 64-byte little-endian header followed by the split-layer activations, densely
(BITS_DENSE, what devices and edges send: the H*W*C bits, HWC order, LSB first) or exactly as the device
holds them (BITS_U64: HWC, channels packed into uint64 words, little-endian), or, for a server-only
request (packing RAW_U8, split layer 0), the raw uint8 HWC input image. Both bit packings decode to the
same uint64 words, so nothing after decode_payload knows which one travelled. A multi-view camera sending
"scores first" (docs/views.md) sends its exit sums (EXIT_SUMS, int32) instead, and its split only when an
aggregator's feature request (its own 40-byte message, FEATURES_MAGIC) asks (or NO_FEATURES when it no longer
holds it). A reply is a fixed 40-byte header, the top-k (class, probability) pairs and an optional utf-8 error
message.
The C twin is c_runtime/ddnn_protocol.{c,h}; both are tested against the same byte layouts.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

from ddnn_gen.errors import SpecError
from ddnn_gen.model.spec import check_threshold, parse_threshold_text

REQUEST_MAGIC = b"DDNQ"
REPLY_MAGIC = b"DDNR"
# 2: replies say which tier's exit answered and how long the tiers above took (device -> edge -> cloud).
# 3: the request header is 64 bytes: the device id left it (identity is the topic's), the event id and the
#    view index/count of a multi-view event (docs/views.md) took its place.
PROTOCOL_VERSION = 3
HASH_BYTES = 16

# magic, version, packing, header_len, model hash, split layer, C, H, W, request id, device time (us),
# payload words, event id, view index, view count, reserved
_REQUEST = struct.Struct("<4sBBH16sHHHHQQIQBBH")
REQUEST_HEADER_BYTES = _REQUEST.size  # 64: the payload starts 8-byte aligned
# Most views one event may have (view index < view count <= MAX_VIEWS): bounds what an aggregator holds.
MAX_VIEWS = 16

# magic, version, status, top-k count, request id, class, server compute us, queue wait us, upstream round
# trip us, upstream compute us, answering tier, flags, message length
_REPLY = struct.Struct("<4sBBHQiIIIIBBH")
REPLY_HEADER_BYTES = _REPLY.size  # 40
REPLY_FALLBACK = 0x01  # flags: a tier above did not answer in time, so this tier's own exit answered
_TOPK = struct.Struct("<Hxxf")

# The largest split this protocol carries (bit-packed): generous for any device tier, small enough
# that a single bad request cannot make a server allocate much.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES = REQUEST_HEADER_BYTES + MAX_PAYLOAD_BYTES


class Packing(enum.IntEnum):
    """How the payload holds the activations."""

    BITS_U64 = 1  # channels packed into little-endian uint64 words per pixel, bit 1 = +1, padding bits 0
    FLOAT32 = 2  # float32 HWC values (non-binary splits and tooling); must be finite
    RAW_U8 = 3  # server-only: the raw uint8 HWC input; split layer 0, the server runs the whole model
    BITS_DENSE = 4  # the H*W*C bits in HWC order, LSB first, ceil(H*W*C/8) bytes, unused bits of the last 0
    # Multi-view "scores first" (docs/views.md): a camera's local-exit integer sums (int32, C = classes,
    # H = W = 1), then, when the aggregator asks, its split (a bit packing) or NO_FEATURES (empty payload,
    # C = H = W = 0) when it no longer holds that event's split.
    EXIT_SUMS = 5
    NO_FEATURES = 6

    @property
    def bits(self) -> bool:
        """A bit packing: the decoded payload is the split's uint64 words (H, W, ceil(C/64))."""
        return self in (Packing.BITS_U64, Packing.BITS_DENSE)

    @property
    def scores_first(self) -> bool:
        """A scores-first message (exit sums, or the answer to a feature request that has no split)."""
        return self in (Packing.EXIT_SUMS, Packing.NO_FEATURES)

    @property
    def decoded(self) -> Packing:
        """The packing whose layout decode_payload returns (BITS_DENSE arrives as BITS_U64 words)."""
        return Packing.BITS_U64 if self == Packing.BITS_DENSE else self


# Split layer index of a RAW_U8 request: the server starts before the first device layer.
RAW_SPLIT_LAYER = 0
_ELEMENT_BYTES = {Packing.BITS_U64: 8, Packing.FLOAT32: 4, Packing.RAW_U8: 1, Packing.BITS_DENSE: 1,
                  Packing.EXIT_SUMS: 4, Packing.NO_FEATURES: 1}
# What encode_request takes: BITS_DENSE, too, is given the device's uint64 words and packs them itself.
_ELEMENT_DTYPE = {Packing.BITS_U64: "<u8", Packing.FLOAT32: "<f4", Packing.RAW_U8: "u1", Packing.BITS_DENSE: "<u8",
                  Packing.EXIT_SUMS: "<i4", Packing.NO_FEATURES: "u1"}


class Status(enum.IntEnum):
    """Reply status codes; the C twin mirrors these numbers in ddnn_protocol.h."""

    OK = 0
    MALFORMED = 1
    BAD_MAGIC = 2
    BAD_VERSION = 3
    UNKNOWN_MODEL = 4
    SHAPE_MISMATCH = 5
    TOO_LARGE = 6
    NON_FINITE = 7
    INTERNAL = 8
    UNAVAILABLE = 9


class ProtocolError(Exception):
    """A request or reply that cannot be decoded; ``status`` says which reply code it earns."""

    def __init__(self, status: Status, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id


@dataclass(frozen=True)
class RequestHeader:
    model_hash: bytes  # first 16 bytes of the model's sha256 content hash
    split_layer: int  # index of the first server layer == number of device layers
    channels: int
    height: int
    width: int
    request_id: int
    device_time_us: int = 0
    packing: Packing = Packing.BITS_U64
    event_id: int = 0  # the scene several devices captured (0: not part of a multi-view event)
    view_index: int = 0  # which of the event's views this device sends (< view_count)
    view_count: int = 0  # views of the event; 0 or 1 = a single-view request

    @property
    def multi_view(self) -> bool:
        return self.view_count > 1

    @property
    def words_per_pixel(self) -> int:
        return (self.channels + 63) // 64

    @property
    def payload_words(self) -> int:
        """Number of 64-bit (BITS_U64), 32-bit (FLOAT32) or 8-bit (RAW_U8, BITS_DENSE) elements the payload
        must hold."""
        if self.packing == Packing.BITS_U64:
            return self.height * self.width * self.words_per_pixel
        if self.packing == Packing.BITS_DENSE:
            return (self.height * self.width * self.channels + 7) // 8
        return self.height * self.width * self.channels  # NO_FEATURES: C = H = W = 0

    @property
    def payload_bytes(self) -> int:
        return self.payload_words * _ELEMENT_BYTES[self.packing]


@dataclass(frozen=True)
class Request:
    header: RequestHeader
    payload: np.ndarray  # uint64 (H, W, words) for both bit packings, float32 (H, W, C) or uint8 (H, W, C)


@dataclass(frozen=True)
class Reply:
    request_id: int
    status: Status
    class_id: int = -1
    top_k: tuple[tuple[int, float], ...] = ()
    server_us: int = 0  # compute of the answering (or relaying) server's own tier for this request's batch
    queue_us: int = 0
    message: str = ""
    upstream_us: int = 0  # how long that server waited for the tiers above it (0: it answered itself)
    upstream_server_us: int = 0  # compute of the tiers above, as they reported it
    answered_by: int = 0  # index of the tier whose exit gave the class (0 in error replies)
    flags: int = 0  # REPLY_FALLBACK

    @property
    def fallback(self) -> bool:
        return bool(self.flags & REPLY_FALLBACK)


def view_fields_problem(event_id: int, view_index: int, view_count: int) -> str:
    """Why (event id, view index, view count) is not a valid combination, or "" when it is."""
    if view_count > MAX_VIEWS:
        return f"view count {view_count} exceeds {MAX_VIEWS}"
    if view_count > 1 and event_id == 0:
        return f"a request of {view_count} views needs an event id"
    if view_index >= max(1, view_count):
        return f"view index {view_index} is not below the view count {view_count}"
    return ""


def encode_request(header: RequestHeader, payload: np.ndarray) -> bytes:
    """Header + payload bytes; ``payload`` is one sample's split (uint64 words, for either bit packing, or
    float32 values) or, for RAW_U8, its uint8 HWC input image."""
    body = np.ascontiguousarray(payload, dtype=_ELEMENT_DTYPE[header.packing]).tobytes()
    if header.packing == Packing.BITS_DENSE:
        words = header.height * header.width * header.words_per_pixel
        if len(body) != 8 * words:
            raise ValueError(f"payload has {len(body) // 8} words, C/H/W imply {words}")
        body = pack_dense(np.frombuffer(body, dtype="<u8"), header.channels)
    if len(body) != header.payload_bytes:
        raise ValueError(f"payload has {len(body)} bytes, header says {header.payload_bytes}")
    problem = view_fields_problem(header.event_id, header.view_index, header.view_count)
    if problem:
        raise ValueError(problem)
    head = _REQUEST.pack(REQUEST_MAGIC, PROTOCOL_VERSION, int(header.packing), REQUEST_HEADER_BYTES,
                         header.model_hash, header.split_layer, header.channels, header.height, header.width,
                         header.request_id, header.device_time_us, header.payload_words, header.event_id,
                         header.view_index, header.view_count, 0)
    return head + body


def peek_request_id(data: bytes) -> int:
    """Best-effort request id of a request too broken to decode, for its error reply (0 if none)."""
    if len(data) < REQUEST_HEADER_BYTES or data[:4] != REQUEST_MAGIC:
        return 0
    return int(_REQUEST.unpack_from(data)[9])


def decode_request_header(data: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> RequestHeader:
    """Validate and decode the header without touching the payload (size checked first)."""
    if len(data) > max_bytes:
        raise ProtocolError(Status.TOO_LARGE, f"request of {len(data)} bytes exceeds the {max_bytes}-byte limit",
                            peek_request_id(data))
    if len(data) < 4 or data[:4] != REQUEST_MAGIC:
        raise ProtocolError(Status.BAD_MAGIC, f"bad magic {bytes(data[:4])!r} (expected {REQUEST_MAGIC!r})")
    if len(data) < REQUEST_HEADER_BYTES:
        raise ProtocolError(Status.MALFORMED, f"request of {len(data)} bytes is shorter than its "
                            f"{REQUEST_HEADER_BYTES}-byte header")
    (_, version, packing, header_len, model_hash, split_layer, channels, height, width, request_id, device_time,
     payload_words, event_id, view_index, view_count, reserved) = _REQUEST.unpack_from(data)
    if version != PROTOCOL_VERSION:
        # The request id sits where v2 had it too, so an old device's error reply still matches its request.
        raise ProtocolError(Status.BAD_VERSION, f"protocol version {version} (this server speaks "
                            f"{PROTOCOL_VERSION})", request_id)
    if header_len != REQUEST_HEADER_BYTES:
        raise ProtocolError(Status.MALFORMED, f"header length {header_len} != {REQUEST_HEADER_BYTES}", request_id)
    if packing not in Packing._value2member_map_:
        raise ProtocolError(Status.MALFORMED, f"unknown packing {packing}", request_id)
    problem = view_fields_problem(event_id, view_index, view_count) or ("reserved bytes are not 0" if reserved else "")
    if problem:
        raise ProtocolError(Status.MALFORMED, problem, request_id)
    header = RequestHeader(model_hash, split_layer, channels, height, width, request_id, device_time,
                           Packing(packing), event_id, view_index, view_count)
    if header.packing == Packing.RAW_U8 and split_layer != RAW_SPLIT_LAYER:
        raise ProtocolError(Status.SHAPE_MISMATCH, f"a raw-input request starts at split layer {RAW_SPLIT_LAYER}, "
                            f"not {split_layer}", request_id)
    problem = _scores_first_problem(header)
    if problem:
        raise ProtocolError(Status.MALFORMED, problem, request_id)
    if min(channels, height, width) == 0 and header.packing != Packing.NO_FEATURES:
        raise ProtocolError(Status.SHAPE_MISMATCH, f"empty split shape C/H/W = {channels}/{height}/{width}",
                            request_id)
    if payload_words != header.payload_words:
        raise ProtocolError(Status.MALFORMED, f"header says {payload_words} payload words, C/H/W imply "
                            f"{header.payload_words}", request_id)
    if len(data) - REQUEST_HEADER_BYTES != header.payload_bytes:
        raise ProtocolError(Status.MALFORMED, f"payload has {len(data) - REQUEST_HEADER_BYTES} bytes, header "
                            f"says {header.payload_bytes}", request_id)
    return header


def _scores_first_problem(header: RequestHeader) -> str:
    """Why a scores-first message's header is not one, or ""."""
    if not header.packing.scores_first:
        return ""
    if not header.multi_view:
        return f"packing {int(header.packing)} ({header.packing.name}) belongs to a multi-view event"
    shape = (header.channels, header.height, header.width)
    if header.packing == Packing.EXIT_SUMS and (header.height, header.width) != (1, 1):
        return f"exit sums are C x 1 x 1, not C/H/W = {'/'.join(map(str, shape))}"
    if header.packing == Packing.NO_FEATURES and shape != (0, 0, 0):
        return f"a NO_FEATURES answer has C/H/W = 0/0/0, not {'/'.join(map(str, shape))}"
    return ""


def decode_payload(header: RequestHeader, data: bytes) -> np.ndarray:
    """The payload of an already validated request, checked for padding bits / non-finite values."""
    body = memoryview(data)[REQUEST_HEADER_BYTES:]
    if header.packing == Packing.BITS_DENSE:
        spare = 8 * header.payload_bytes - header.height * header.width * header.channels
        # As for BITS_U64: the stream's unused bits are zero; set ones mean a sender with another shape.
        if spare and body[-1] >> (8 - spare):
            raise ProtocolError(Status.SHAPE_MISMATCH, f"padding bits after the {header.height}x{header.width}x"
                                f"{header.channels} split are set", header.request_id)
        return unpack_dense(body, header.height, header.width, header.channels)
    if header.packing == Packing.BITS_U64:
        words = np.frombuffer(body, dtype="<u8").reshape(header.height, header.width, header.words_per_pixel)
        spare = header.words_per_pixel * 64 - header.channels
        # Padding bits are zero by definition of the layout; set ones mean a sender with another shape.
        if spare and np.any(words[..., -1] >> np.uint64(64 - spare)):
            raise ProtocolError(Status.SHAPE_MISMATCH, f"padding bits above channel {header.channels} are set",
                                header.request_id)
        return words
    if header.packing == Packing.RAW_U8:
        return np.frombuffer(body, dtype=np.uint8).reshape(header.height, header.width, header.channels)
    if header.packing == Packing.EXIT_SUMS:
        return np.frombuffer(body, dtype="<i4").astype(np.int32)  # (C,); their range is the model's to check
    if header.packing == Packing.NO_FEATURES:
        return np.zeros(0, dtype=np.uint8)
    values = np.frombuffer(body, dtype="<f4").reshape(header.height, header.width, header.channels)
    if not np.all(np.isfinite(values)):
        raise ProtocolError(Status.NON_FINITE, "payload holds non-finite values", header.request_id)
    return values


def pack_dense(words: np.ndarray, channels: int) -> bytes:
    """BITS_DENSE payload of one split given as uint64 words (any shape of (pixels * ceil(C/64)) words): its
    pixels' C channel bits one after the other, LSB first; the words' padding bits are dropped."""
    per_pixel = np.ascontiguousarray(words, dtype="<u8").view(np.uint8).reshape(-1, 8 * ((channels + 63) // 64))
    bits = np.unpackbits(per_pixel, axis=1, bitorder="little")[:, :channels]
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def unpack_dense(body: bytes | memoryview, height: int, width: int, channels: int) -> np.ndarray:
    """The uint64 words (H, W, ceil(C/64)) of a BITS_DENSE payload, padding bits 0: what BITS_U64 carries."""
    bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=height * width * channels, bitorder="little")
    per_word = (channels + 63) // 64
    padded = np.zeros((height * width, 64 * per_word), dtype=np.uint8)
    padded[:, :channels] = bits.reshape(height * width, channels)
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(height, width, per_word)


def decode_request(data: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> Request:
    header = decode_request_header(data, max_bytes)
    return Request(header, decode_payload(header, data))


# ---- feature requests (aggregator -> camera, scores first; docs/views.md) -------------------------------------

FEATURES_MAGIC = b"DDNF"
# magic, version, reserved, header length, model hash, event id, request id (the camera's exit-sums request)
_FEATURES = struct.Struct("<4sBBH16sQQ")
FEATURE_REQUEST_BYTES = _FEATURES.size  # 40


@dataclass(frozen=True)
class FeatureRequest:
    """The aggregator asks one camera for its split of one event: it was not confident on the exit sums."""

    model_hash: bytes
    event_id: int
    request_id: int  # the camera's exit-sums request of that event; its split goes back under the same id


def encode_feature_request(request: FeatureRequest) -> bytes:
    if len(request.model_hash) != HASH_BYTES or request.event_id == 0 or request.request_id == 0:
        raise ValueError("a feature request names a 16-byte model hash, an event id and a request id (never 0)")
    return _FEATURES.pack(FEATURES_MAGIC, PROTOCOL_VERSION, 0, FEATURE_REQUEST_BYTES, request.model_hash,
                          request.event_id, request.request_id)


def decode_feature_request(data: bytes) -> FeatureRequest:
    """ProtocolError for anything but an exact feature request of this protocol version."""
    if len(data) != FEATURE_REQUEST_BYTES or data[:4] != FEATURES_MAGIC:
        raise ProtocolError(Status.MALFORMED, f"not a feature request ({len(data)} bytes, magic "
                            f"{bytes(data[:4])!r})")
    _, version, reserved, header_len, model_hash, event_id, request_id = _FEATURES.unpack(data)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(Status.BAD_VERSION, f"feature request protocol version {version} (this device speaks "
                            f"{PROTOCOL_VERSION})")
    if reserved or header_len != FEATURE_REQUEST_BYTES or event_id == 0 or request_id == 0:
        raise ProtocolError(Status.MALFORMED, "feature request with reserved bits set, a wrong length field or a "
                            "zero event / request id")
    return FeatureRequest(model_hash, event_id, request_id)


def encode_reply(reply: Reply) -> bytes:
    message = reply.message.encode()[:1024]
    top = b"".join(_TOPK.pack(class_id, probability) for class_id, probability in reply.top_k)
    head = _REPLY.pack(REPLY_MAGIC, PROTOCOL_VERSION, int(reply.status), len(reply.top_k), reply.request_id,
                       reply.class_id, _u32(reply.server_us), _u32(reply.queue_us), _u32(reply.upstream_us),
                       _u32(reply.upstream_server_us), reply.answered_by & 0xFF, reply.flags & 0xFF, len(message))
    return head + top + message


def decode_reply(data: bytes) -> Reply:
    if len(data) < REPLY_HEADER_BYTES or data[:4] != REPLY_MAGIC:
        raise ProtocolError(Status.MALFORMED, f"not a reply ({len(data)} bytes)")
    (_, version, status, n_top, request_id, class_id, server_us, queue_us, upstream_us, upstream_server_us,
     answered_by, flags, message_len) = _REPLY.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(Status.BAD_VERSION, f"reply protocol version {version}")
    expected = REPLY_HEADER_BYTES + n_top * _TOPK.size + message_len
    if len(data) != expected:
        raise ProtocolError(Status.MALFORMED, f"reply has {len(data)} bytes, header implies {expected}")
    top_k = tuple(_TOPK.unpack_from(data, REPLY_HEADER_BYTES + i * _TOPK.size) for i in range(n_top))
    message = bytes(data[expected - message_len:]).decode(errors="replace")
    return Reply(request_id, Status(status) if status in Status._value2member_map_ else Status.INTERNAL,
                 class_id, tuple((int(c), float(p)) for c, p in top_k), server_us, queue_us, message, upstream_us,
                 upstream_server_us, answered_by, flags)


def _u32(value: int) -> int:
    return max(0, min(int(value), 0xFFFFFFFF))


def encode_threshold(value: float) -> bytes:
    """Thresholds travel as short ASCII decimals (spec.parse_threshold_text's grammar) so operators can also
    set them with mosquitto_pub; SpecError unless ``value`` is a valid threshold."""
    return repr(check_threshold(value)).encode()


def decode_threshold(payload: bytes) -> float | None:
    """The threshold in a retained message; None for an empty (cleared) or invalid one (callers keep their
    previous value for an invalid one and log it; an empty one clears)."""
    try:
        return parse_threshold_text(payload)
    except SpecError:
        return None
