/* Device side of the ddnn-server wire protocol (docs/protocol.md); the Python twin is
 * ddnn_gen/wire/codec.py. Pure byte encoding: no MQTT, no allocation, explicit little-endian so
 * big-endian or strict-alignment targets produce the same bytes.
 *
 * Request = 64-byte header + the split activations, either densely (packing 4, what devices send:
 * the H*W*C bits in HWC order, LSB first, ceil(H*W*C / 8) bytes) or exactly as <name>_infer() leaves
 * them (packing 1: HWC, channels packed in uint64 words, little-endian), or, server-only, + the raw
 * uint8 HWC input (packing 3, split layer 0: the server runs the whole model). Reply = 32-byte header + top-k
 * (class, probability) pairs + optional utf-8 error message. */
#ifndef DDNN_PROTOCOL_H
#define DDNN_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

/* 2: replies say which tier answered and how long the tiers above took.
 * 3: 64-byte request header: no device id (identity is the topic's); event id, view index and count. */
#define DDNN_PROTOCOL_VERSION 3
#define DDNN_REQUEST_HEADER_BYTES 64
/* Most views of one multi-view event: view_index < view_count <= DDNN_MAX_VIEWS (0 or 1 = single view). */
#define DDNN_MAX_VIEWS 16
#define DDNN_REPLY_HEADER_BYTES 40
/* ddnn_reply.flags: a tier above did not answer in time, so the answering tier's own exit did. */
#define DDNN_REPLY_FALLBACK 0x01
#define DDNN_WIRE_HASH_BYTES 16
#define DDNN_DEVICE_ID_MAX 32
#define DDNN_PACKING_BITS_U64 1
#define DDNN_PACKING_RAW_U8 3
#define DDNN_PACKING_BITS_DENSE 4
/* Multi-view "scores first" (docs/views.md): the local exit's int32 sums (C = classes, H = W = 1) first, the
 * split only when the aggregator's feature request asks, or NO_FEATURES (C = H = W = 0, no payload) when this
 * camera no longer holds that event's split. */
#define DDNN_PACKING_EXIT_SUMS 5
#define DDNN_PACKING_NO_FEATURES 6
/* Feature request (aggregator -> camera on ddnn/features/<device>): "DDNF", version, reserved 0, length 40,
 * the model hash, the event id and the request id of the camera's exit sums (never 0). */
#define DDNN_FEATURE_REQUEST_BYTES 40
#define DDNN_RAW_SPLIT_LAYER 0
#define DDNN_REPLY_TOP_MAX 16
#define DDNN_REPLY_MESSAGE_MAX 256

/* Reply status codes (same numbers as protocol.Status in Python). */
enum ddnn_status {
    DDNN_STATUS_OK = 0,
    DDNN_STATUS_MALFORMED = 1,
    DDNN_STATUS_BAD_MAGIC = 2,
    DDNN_STATUS_BAD_VERSION = 3,
    DDNN_STATUS_UNKNOWN_MODEL = 4,
    DDNN_STATUS_SHAPE_MISMATCH = 5,
    DDNN_STATUS_TOO_LARGE = 6,
    DDNN_STATUS_NON_FINITE = 7,
    DDNN_STATUS_INTERNAL = 8,
    DDNN_STATUS_UNAVAILABLE = 9
};

typedef struct {
    uint8_t model_hash[DDNN_WIRE_HASH_BYTES];
    uint16_t split_layer; /* number of device layers: where the server resumes */
    uint16_t channels, height, width;
    uint64_t request_id;
    uint64_t device_time_us;
    uint64_t event_id;  /* the scene several devices captured; 0 = not part of a multi-view event */
    uint8_t view_index; /* this device's view of the event (< view_count) */
    uint8_t view_count; /* the event's views; 0 or 1 = single view */
} ddnn_request_header;

typedef struct {
    uint64_t request_id;
    int status; /* enum ddnn_status */
    int32_t class_id;
    uint32_t server_us, queue_us;  /* the answering server's own compute, and its queue wait */
    uint32_t upstream_us;          /* how long it waited for the tiers above (0 if it answered itself) */
    uint32_t upstream_server_us;   /* their compute */
    uint8_t answered_by;           /* index of the tier whose exit gave the class */
    uint8_t flags;                 /* DDNN_REPLY_FALLBACK */
    uint16_t n_top;
    uint16_t top_class[DDNN_REPLY_TOP_MAX];
    float top_prob[DDNN_REPLY_TOP_MAX];
    char message[DDNN_REPLY_MESSAGE_MAX]; /* NUL-terminated, possibly truncated */
} ddnn_reply;

/* 1 if `id` follows the device-id rule shared with ddnn_gen/wire/topics.py: 1..32 characters of
 * A-Z a-z 0-9 _ . - starting with a letter or digit (ids become topic names and ACL patterns). */
int ddnn_device_id_valid(const char *id);

/* Bytes of a request carrying `n_words` split words. */
size_t ddnn_request_size(size_t n_words);

/* Writes header + words into out. Returns the byte count, or 0 when out_len is too small or the
 * view fields are invalid (view_index >= max(1, view_count), view_count > DDNN_MAX_VIEWS, or several views
 * without an event id). */
size_t ddnn_request_encode(const ddnn_request_header *header, const uint64_t *words, size_t n_words, uint8_t *out,
                           size_t out_len);

/* Bytes of a dense (packing 4) request of a channels x height x width split: ceil(H*W*C / 8) + header. */
size_t ddnn_request_dense_size(uint16_t channels, uint16_t height, uint16_t width);

/* Dense request: writes header + the split's H*W*C bits (HWC order, channel c of pixel p is bit p*C + c
 * of the payload, LSB first; the last byte's unused bits 0) into out, read from `words` as <name>_infer()
 * leaves them (H, W, ceil(C/64) uint64 words; their padding bits are not sent). The shape is the header's
 * channels/height/width. Returns the byte count, or 0 as ddnn_request_encode, or when n_words is not
 * H * W * ceil(C / 64). */
size_t ddnn_request_encode_dense(const ddnn_request_header *header, const uint64_t *words, size_t n_words,
                                 uint8_t *out, size_t out_len);

/* Server-only request: writes header + the n_bytes uint8 HWC input pixels into out (the header's
 * split_layer is ignored and sent as DDNN_RAW_SPLIT_LAYER; channels/height/width are the input's).
 * Returns the byte count, or 0 as ddnn_request_encode. */
size_t ddnn_request_encode_raw(const ddnn_request_header *header, const uint8_t *pixels, size_t n_bytes, uint8_t *out,
                               size_t out_len);

/* Bytes of an exit-sums request of n_classes sums: header + 4 * n_classes. */
size_t ddnn_request_sums_size(size_t n_classes);

/* Scores first: writes header + the n_classes int32 exit sums (little-endian) into out; the header's channels
 * is taken as n_classes and height = width = 1. Returns the byte count, or 0 as ddnn_request_encode, or when the
 * header is not a multi-view one (view_count < 2: only an aggregator asks for features) or n_classes is 0 or
 * above 65535. */
size_t ddnn_request_encode_sums(const ddnn_request_header *header, const int32_t *sums, size_t n_classes, uint8_t *out,
                                size_t out_len);

/* Scores first: the 64-byte answer to a feature request for an event this camera no longer holds (packing 6,
 * C = H = W = 0, no payload); the header's event and request ids are the feature request's. Returns
 * DDNN_REQUEST_HEADER_BYTES, or 0 as ddnn_request_encode_sums. */
size_t ddnn_request_encode_no_features(const ddnn_request_header *header, uint8_t *out, size_t out_len);

typedef struct {
    uint8_t model_hash[DDNN_WIRE_HASH_BYTES];
    uint64_t event_id;
    uint64_t request_id; /* the camera's exit-sums request of that event; the split goes back under it */
} ddnn_feature_request;

/* Why a feature request was refused (0 = accepted); what a camera counts. */
enum ddnn_feature_refusal {
    DDNN_FEATURES_OK = 0,
    DDNN_FEATURES_BAD_LENGTH = 1,  /* not exactly DDNN_FEATURE_REQUEST_BYTES */
    DDNN_FEATURES_BAD_MAGIC = 2,
    DDNN_FEATURES_BAD_VERSION = 3,
    DDNN_FEATURES_MALFORMED = 4    /* reserved byte set, wrong length field, zero event or request id */
};

/* Writes the 40-byte feature request; 0 when an id is 0 (as codec.encode_feature_request refuses it). */
size_t ddnn_feature_request_encode(const ddnn_feature_request *request, uint8_t *out, size_t out_len);

/* Decodes a feature request exactly as codec.decode_feature_request: DDNN_FEATURES_OK and *request set, or the
 * refusal (request untouched). Whether it names this camera's model is the caller's to check. */
int ddnn_feature_request_decode(const uint8_t *data, size_t len, ddnn_feature_request *request);

/* Decodes a reply. Returns 0, or -1 if it is not a well-formed reply of this protocol version. */
int ddnn_reply_decode(const uint8_t *data, size_t len, ddnn_reply *reply);

const char *ddnn_status_name(int status);

#endif
