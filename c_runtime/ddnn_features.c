#include "ddnn_features.h"

#include <pthread.h>
#include <string.h>

/* Slot i owns pool bytes [i * slot_bytes, (i + 1) * slot_bytes): fixed slots, so nothing fragments. The slots
 * form a ring in the order kept; `order[k]` is the slot kept k-th oldest of the `count` held, order[count ..
 * capacity - 1] the free ones. One more slot, `outgoing`, is in no ring position: the split being sent lives
 * there, so the device thread keeps new splits while the answering thread publishes (a publish may wait on the
 * network) without either touching the other's bytes. `sending` makes answers take turns on it. */
static struct {
    pthread_mutex_t lock, sending;
    size_t capacity, slot_bytes, count, outgoing;
    size_t order[DDNN_FEATURES_MAX_EVENTS];
    uint64_t event_id[DDNN_FEATURES_MAX_EVENTS + 1], request_id[DDNN_FEATURES_MAX_EVENTS + 1];
    size_t len[DDNN_FEATURES_MAX_EVENTS + 1];
    uint8_t pool[DDNN_FEATURES_POOL_BYTES];
} held = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, {0}, {0}, {0}, {0}, {0}};

size_t ddnn_features_capacity_for(size_t request_bytes)
{
    /* One slot of the pool is the outgoing one. */
    const size_t fit = request_bytes > 0 && DDNN_FEATURES_POOL_BYTES / request_bytes > 0
                           ? DDNN_FEATURES_POOL_BYTES / request_bytes - 1
                           : 0;
    return fit < DDNN_FEATURES_MAX_EVENTS ? fit : DDNN_FEATURES_MAX_EVENTS;
}

int ddnn_features_init(size_t capacity, size_t request_bytes)
{
    size_t i;
    if (capacity > ddnn_features_capacity_for(request_bytes))
        return -1;
    pthread_mutex_lock(&held.lock);
    held.capacity = capacity;
    held.slot_bytes = request_bytes;
    held.count = 0;
    for (i = 0; i < DDNN_FEATURES_MAX_EVENTS; ++i)
        held.order[i] = i;
    held.outgoing = capacity; /* slots 0 .. capacity - 1 take turns in the ring */
    pthread_mutex_unlock(&held.lock);
    return 0;
}

/* Position in `order` of event_id's slot, or count when not held. Called locked. */
static size_t find(uint64_t event_id)
{
    size_t k;
    for (k = 0; k < held.count && held.event_id[held.order[k]] != event_id; ++k)
        ;
    return k;
}

/* Drops order[k], keeping the rest in age order; its slot goes to the free end. Called locked. */
static void forget(size_t k)
{
    const size_t slot = held.order[k];
    memmove(held.order + k, held.order + k + 1, (held.count - k - 1) * sizeof(held.order[0]));
    held.order[--held.count] = slot;
}

void ddnn_features_keep(uint64_t event_id, uint64_t request_id, const uint8_t *request, size_t len)
{
    size_t slot, k;
    pthread_mutex_lock(&held.lock);
    if (held.capacity == 0 || len > held.slot_bytes) {
        pthread_mutex_unlock(&held.lock);
        return;
    }
    k = find(event_id);
    if (k < held.count)
        forget(k);
    if (held.count == held.capacity)
        forget(0);
    slot = held.order[held.count++];
    held.event_id[slot] = event_id;
    held.request_id[slot] = request_id;
    held.len[slot] = len;
    memcpy(held.pool + slot * held.slot_bytes, request, len);
    pthread_mutex_unlock(&held.lock);
}

int ddnn_features_answer(uint64_t event_id, uint64_t request_id, ddnn_features_send_fn send, void *context,
                         int *sent)
{
    size_t k, slot, len;
    pthread_mutex_lock(&held.sending);
    pthread_mutex_lock(&held.lock);
    k = find(event_id);
    if (k == held.count || held.request_id[held.order[k]] != request_id) {
        pthread_mutex_unlock(&held.lock);
        pthread_mutex_unlock(&held.sending);
        return 0;
    }
    /* The split's slot becomes the outgoing one and the last outgoing slot takes its place among the free. */
    slot = held.order[k];
    len = held.len[slot];
    forget(k); /* once: a second request for it is answered NO_FEATURES, as the Python buffer does */
    held.order[held.count] = held.outgoing;
    held.outgoing = slot;
    pthread_mutex_unlock(&held.lock);
    *sent = send(held.pool + slot * held.slot_bytes, len, context);
    pthread_mutex_unlock(&held.sending);
    return 1;
}

size_t ddnn_features_held(void)
{
    size_t count;
    pthread_mutex_lock(&held.lock);
    count = held.count;
    pthread_mutex_unlock(&held.lock);
    return count;
}
