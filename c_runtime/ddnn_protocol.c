#include "ddnn_protocol.h"

#include <string.h>

static void put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    int i;
    for (i = 0; i < 4; ++i)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
    int i;
    for (i = 0; i < 8; ++i)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t get_u64(const uint8_t *p)
{
    return (uint64_t)get_u32(p) | ((uint64_t)get_u32(p + 4) << 32);
}

int ddnn_device_id_valid(const char *id)
{
    size_t i;
    if (id == NULL || id[0] == '\0')
        return 0;
    for (i = 0; id[i] != '\0'; ++i) {
        const char c = id[i];
        const int alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (i >= DDNN_DEVICE_ID_MAX || !(alnum || (i > 0 && (c == '_' || c == '.' || c == '-'))))
            return 0;
    }
    return 1;
}

size_t ddnn_request_size(size_t n_words)
{
    return DDNN_REQUEST_HEADER_BYTES + 8 * n_words;
}

/* Same rule as codec.view_fields_problem in Python. */
static int view_fields_valid(const ddnn_request_header *header)
{
    const unsigned count = header->view_count;
    if (count > DDNN_MAX_VIEWS || (count > 1 && header->event_id == 0))
        return 0;
    return header->view_index < (count > 1 ? count : 1u);
}

/* The 64-byte header; 0 when the view fields are invalid or the element count does not fit. */
static int put_header(const ddnn_request_header *header, int packing, uint16_t split_layer, size_t n_elements,
                      uint8_t *out)
{
    if (!view_fields_valid(header) || n_elements > 0xffffffffu)
        return 0;
    memset(out, 0, DDNN_REQUEST_HEADER_BYTES);
    memcpy(out, "DDNQ", 4);
    out[4] = DDNN_PROTOCOL_VERSION;
    out[5] = (uint8_t)packing;
    put_u16(out + 6, DDNN_REQUEST_HEADER_BYTES);
    memcpy(out + 8, header->model_hash, DDNN_WIRE_HASH_BYTES);
    put_u16(out + 24, split_layer);
    put_u16(out + 26, header->channels);
    put_u16(out + 28, header->height);
    put_u16(out + 30, header->width);
    put_u64(out + 32, header->request_id);
    put_u64(out + 40, header->device_time_us);
    put_u32(out + 48, (uint32_t)n_elements);
    put_u64(out + 52, header->event_id);
    out[60] = header->view_index;
    out[61] = header->view_count;
    /* bytes 62..63 reserved (zero) */
    return 1;
}

size_t ddnn_request_encode(const ddnn_request_header *header, const uint64_t *words, size_t n_words, uint8_t *out,
                           size_t out_len)
{
    const size_t total = ddnn_request_size(n_words);
    size_t i;
    if (out_len < total || !put_header(header, DDNN_PACKING_BITS_U64, header->split_layer, n_words, out))
        return 0;
    for (i = 0; i < n_words; ++i)
        put_u64(out + DDNN_REQUEST_HEADER_BYTES + 8 * i, words[i]);
    return total;
}

size_t ddnn_request_dense_size(uint16_t channels, uint16_t height, uint16_t width)
{
    return DDNN_REQUEST_HEADER_BYTES + ((size_t)channels * height * width + 7) / 8;
}

size_t ddnn_request_encode_dense(const ddnn_request_header *header, const uint64_t *words, size_t n_words,
                                 uint8_t *out, size_t out_len)
{
    const size_t per_pixel = ((size_t)header->channels + 63) / 64;
    const size_t pixels = (size_t)header->height * header->width;
    const size_t total = ddnn_request_dense_size(header->channels, header->height, header->width);
    const size_t payload = total - DDNN_REQUEST_HEADER_BYTES;
    uint8_t *body = out + DDNN_REQUEST_HEADER_BYTES;
    uint64_t acc = 0; /* the next bits of the stream, LSB first; `fill` of them are valid */
    unsigned fill = 0;
    size_t pixel, w, pos = 0;
    if (n_words != pixels * per_pixel || out_len < total ||
        !put_header(header, DDNN_PACKING_BITS_DENSE, header->split_layer, payload, out))
        return 0;
    for (pixel = 0; pixel < pixels; ++pixel) {
        for (w = 0; w < per_pixel; ++w) {
            /* The pixel's last word holds 1..64 channels; its padding bits are dropped, not trusted. */
            const unsigned n = w + 1 < per_pixel ? 64u : (unsigned)(header->channels - 64 * w);
            const uint64_t v = n < 64 ? words[pixel * per_pixel + w] & ((UINT64_C(1) << n) - 1)
                                      : words[pixel * per_pixel + w];
            acc |= v << fill;
            if (fill + n >= 64) {
                put_u64(body + pos, acc);
                pos += 8;
                /* The bits of v that did not fit (none when fill == 0: a shift by 64 is undefined). */
                acc = fill ? v >> (64 - fill) : 0;
                fill = fill + n - 64;
            } else {
                fill += n;
            }
        }
    }
    for (; pos < payload; ++pos, acc >>= 8)
        body[pos] = (uint8_t)acc;
    return total;
}

size_t ddnn_request_encode_raw(const ddnn_request_header *header, const uint8_t *pixels, size_t n_bytes, uint8_t *out,
                               size_t out_len)
{
    const size_t total = DDNN_REQUEST_HEADER_BYTES + n_bytes;
    if (out_len < total || !put_header(header, DDNN_PACKING_RAW_U8, DDNN_RAW_SPLIT_LAYER, n_bytes, out))
        return 0;
    memcpy(out + DDNN_REQUEST_HEADER_BYTES, pixels, n_bytes);
    return total;
}

size_t ddnn_request_sums_size(size_t n_classes)
{
    return DDNN_REQUEST_HEADER_BYTES + 4 * n_classes;
}

/* The two scores-first messages belong to a multi-view event (codec._scores_first_problem). */
static int scores_first_header_valid(const ddnn_request_header *header)
{
    return header->view_count > 1 && header->event_id != 0;
}

size_t ddnn_request_encode_sums(const ddnn_request_header *header, const int32_t *sums, size_t n_classes, uint8_t *out,
                                size_t out_len)
{
    const size_t total = ddnn_request_sums_size(n_classes);
    ddnn_request_header shaped;
    size_t k;
    if (n_classes == 0 || n_classes > 0xffffu || out_len < total || !scores_first_header_valid(header))
        return 0;
    shaped = *header;
    shaped.channels = (uint16_t)n_classes;
    shaped.height = shaped.width = 1;
    if (!put_header(&shaped, DDNN_PACKING_EXIT_SUMS, header->split_layer, n_classes, out))
        return 0;
    for (k = 0; k < n_classes; ++k)
        put_u32(out + DDNN_REQUEST_HEADER_BYTES + 4 * k, (uint32_t)sums[k]);
    return total;
}

size_t ddnn_request_encode_no_features(const ddnn_request_header *header, uint8_t *out, size_t out_len)
{
    ddnn_request_header empty;
    if (out_len < DDNN_REQUEST_HEADER_BYTES || !scores_first_header_valid(header))
        return 0;
    empty = *header;
    empty.channels = empty.height = empty.width = 0;
    if (!put_header(&empty, DDNN_PACKING_NO_FEATURES, header->split_layer, 0, out))
        return 0;
    return DDNN_REQUEST_HEADER_BYTES;
}

size_t ddnn_feature_request_encode(const ddnn_feature_request *request, uint8_t *out, size_t out_len)
{
    if (out_len < DDNN_FEATURE_REQUEST_BYTES || request->event_id == 0 || request->request_id == 0)
        return 0;
    memcpy(out, "DDNF", 4);
    out[4] = DDNN_PROTOCOL_VERSION;
    out[5] = 0;
    put_u16(out + 6, DDNN_FEATURE_REQUEST_BYTES);
    memcpy(out + 8, request->model_hash, DDNN_WIRE_HASH_BYTES);
    put_u64(out + 24, request->event_id);
    put_u64(out + 32, request->request_id);
    return DDNN_FEATURE_REQUEST_BYTES;
}

int ddnn_feature_request_decode(const uint8_t *data, size_t len, ddnn_feature_request *request)
{
    if (len != DDNN_FEATURE_REQUEST_BYTES)
        return DDNN_FEATURES_BAD_LENGTH;
    if (memcmp(data, "DDNF", 4) != 0)
        return DDNN_FEATURES_BAD_MAGIC;
    if (data[4] != DDNN_PROTOCOL_VERSION)
        return DDNN_FEATURES_BAD_VERSION;
    if (data[5] != 0 || get_u16(data + 6) != DDNN_FEATURE_REQUEST_BYTES || get_u64(data + 24) == 0 ||
        get_u64(data + 32) == 0)
        return DDNN_FEATURES_MALFORMED;
    memcpy(request->model_hash, data + 8, DDNN_WIRE_HASH_BYTES);
    request->event_id = get_u64(data + 24);
    request->request_id = get_u64(data + 32);
    return DDNN_FEATURES_OK;
}

int ddnn_reply_decode(const uint8_t *data, size_t len, ddnn_reply *reply)
{
    size_t n_top, message_len, expected, i, keep;
    if (len < DDNN_REPLY_HEADER_BYTES || memcmp(data, "DDNR", 4) != 0 || data[4] != DDNN_PROTOCOL_VERSION)
        return -1;
    n_top = get_u16(data + 6);
    message_len = get_u16(data + 38);
    expected = DDNN_REPLY_HEADER_BYTES + 8 * n_top + message_len;
    if (len != expected)
        return -1;
    reply->status = data[5];
    reply->request_id = get_u64(data + 8);
    reply->class_id = (int32_t)get_u32(data + 16);
    reply->server_us = get_u32(data + 20);
    reply->queue_us = get_u32(data + 24);
    reply->upstream_us = get_u32(data + 28);
    reply->upstream_server_us = get_u32(data + 32);
    reply->answered_by = data[36];
    reply->flags = data[37];
    reply->n_top = (uint16_t)(n_top < DDNN_REPLY_TOP_MAX ? n_top : DDNN_REPLY_TOP_MAX);
    for (i = 0; i < reply->n_top; ++i) {
        const uint8_t *entry = data + DDNN_REPLY_HEADER_BYTES + 8 * i;
        uint32_t bits = get_u32(entry + 4);
        reply->top_class[i] = get_u16(entry);
        memcpy(&reply->top_prob[i], &bits, sizeof(float));
    }
    keep = message_len < DDNN_REPLY_MESSAGE_MAX - 1 ? message_len : DDNN_REPLY_MESSAGE_MAX - 1;
    memcpy(reply->message, data + expected - message_len, keep);
    reply->message[keep] = '\0';
    return 0;
}

const char *ddnn_status_name(int status)
{
    static const char *const names[] = {"OK", "MALFORMED", "BAD_MAGIC", "BAD_VERSION", "UNKNOWN_MODEL",
                                        "SHAPE_MISMATCH", "TOO_LARGE", "NON_FINITE", "INTERNAL", "UNAVAILABLE"};
    if (status < 0 || status >= (int)(sizeof(names) / sizeof(names[0])))
        return "UNKNOWN";
    return names[status];
}
