/* A scores-first camera's memory of its last splits (docs/views.md); the Python twin is
 * ddnn_gen/device/features.py. The camera sends its local exit's sums first and keeps the event's encoded
 * split request here, ready for the aggregator's feature request. Bounded and static: the last `capacity`
 * events, in a pool of DDNN_FEATURES_POOL_BYTES (no allocation); past that the oldest is forgotten, and a
 * request for an event no longer held (or under another request id than its sums') is answered NO_FEATURES by
 * the caller, so the aggregator proceeds with the views it has instead of waiting its second deadline.
 * Thread-safe: the device thread keeps, ddnn_mqtt.c's answering thread answers. One buffer per process. */
#ifndef DDNN_FEATURES_H
#define DDNN_FEATURES_H

#include <stddef.h>
#include <stdint.h>

/* Bytes of the pool the kept split requests live in (a build may raise it with -DDDNN_FEATURES_POOL_BYTES=N). */
#ifndef DDNN_FEATURES_POOL_BYTES
#define DDNN_FEATURES_POOL_BYTES 65536
#endif
/* Most events kept, whatever their size. */
#define DDNN_FEATURES_MAX_EVENTS 256
/* Events kept by default (ddnn_gen.device.features.FEATURES_KEPT): a camera waits for each event's answer
 * before the next, so one is enough; the margin covers an aggregator asking late. */
#define DDNN_FEATURES_DEFAULT_EVENTS 16

/* Most events of `request_bytes` each the pool holds (at most DDNN_FEATURES_MAX_EVENTS): one slot fewer than
 * fit, the one a split being sent is read from. */
size_t ddnn_features_capacity_for(size_t request_bytes);

/* Empties the buffer and sets it to hold `capacity` events of at most `request_bytes` each. Returns 0, or -1
 * when they do not fit (capacity > ddnn_features_capacity_for(request_bytes)). Capacity 0 keeps nothing. */
int ddnn_features_init(size_t capacity, size_t request_bytes);

/* Holds a copy of `request` (len <= request_bytes), the split of event `event_id` whose sums went under
 * `request_id`, replacing that event's earlier split and forgetting the oldest past capacity. */
void ddnn_features_keep(uint64_t event_id, uint64_t request_id, const uint8_t *request, size_t len);

/* Consumer of a held split (the bytes are valid only during the call). Called without the buffer's lock, so
 * it may take its time (a publish) while ddnn_features_keep goes on; answers take turns. */
typedef int (*ddnn_features_send_fn)(const uint8_t *request, size_t len, void *context);

/* For a feature request of (event_id, request_id): if that split is held, calls send with it, forgets it and
 * returns 1 (send's result in *sent); else returns 0 (the caller answers NO_FEATURES). */
int ddnn_features_answer(uint64_t event_id, uint64_t request_id, ddnn_features_send_fn send, void *context,
                         int *sent);

/* Events held now. */
size_t ddnn_features_held(void);

#endif
