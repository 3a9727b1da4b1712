/* What both C sides of the server's C transports (ddnn_pahoc.h) share: the owned configuration, the bounded
 * queue of received messages and its lock, the counters, the readiness and delivery waits, and the copy of
 * a take's messages into the caller's buffer. ddnn_pahoc.c (on Paho C) and ddnn_mqtt_batch.c (the server's
 * own MQTT client) each embed one ddnn_pahoc_core as the first member of their client. */
#ifndef DDNN_PAHOC_CORE_H
#define DDNN_PAHOC_CORE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "ddnn_pahoc.h"

#define DDNN_PAHOC_PROBLEM_MAX 256
#define DDNN_PAHOC_TOPIC_LIMIT 65535 /* MQTT's own bound on a topic name */

typedef struct {
    uint8_t *data; /* topic, then the (possibly truncated) payload, one allocation */
    size_t topic_len, payload_len, wire_len;
    int64_t arrived_ns;
    int qos;
    uint16_t packet_id;  /* c-mqtt: the PUBACK it owes when taken */
    uint64_t connection; /* c-mqtt: the connection it came on (only that one can acknowledge it) */
} ddnn_pahoc_slot;

typedef struct {
    ddnn_pahoc_config config; /* its strings point into strings */
    char *strings;
    pthread_mutex_t lock;
    pthread_cond_t changed;   /* queue, readiness, delivery counters or interruption changed */
    ddnn_pahoc_slot *ring;
    size_t head, count;
    int interrupted;
    char problem[DDNN_PAHOC_PROBLEM_MAX];
    ddnn_pahoc_stats stats;
} ddnn_pahoc_core;

int64_t ddnn_pahoc_now_ns(void);
void ddnn_pahoc_deadline_in(struct timespec *ts, int timeout_ms);
/* Checks config, copies it and its strings, allocates the queue: 0, or -1 with a reason in error. */
int ddnn_pahoc_core_init(ddnn_pahoc_core *core, const ddnn_pahoc_config *config, char *error, size_t error_len);
/* Frees what init allocated and every message still queued. */
void ddnn_pahoc_core_free(ddnn_pahoc_core *core);
/* Lock held: the next free slot at the queue's tail (the caller fills it and counts it), NULL when full. */
ddnn_pahoc_slot *ddnn_pahoc_core_tail(ddnn_pahoc_core *core);
/* Lock held: up to max_messages queued messages into buffer and records (ddnn_pahoc_take's contract);
 * on_taken (may be NULL) sees each slot before it is freed. Returns how many. */
int ddnn_pahoc_core_copy(ddnn_pahoc_core *core, int max_messages, int64_t *records, uint8_t *buffer,
                         size_t buffer_len, void (*on_taken)(void *context, const ddnn_pahoc_slot *slot),
                         void *context);
/* Lock held: waits until *flag == value or timeout_ms passes; 1 when it does. */
int ddnn_pahoc_core_wait_for(ddnn_pahoc_core *core, const int *flag, int value, int timeout_ms);
int ddnn_pahoc_core_wait_ready(ddnn_pahoc_core *core, int timeout_ms);
size_t ddnn_pahoc_core_problem(ddnn_pahoc_core *core, char *out, size_t out_len);
void ddnn_pahoc_core_interrupt(ddnn_pahoc_core *core);
int ddnn_pahoc_core_wait_published(ddnn_pahoc_core *core, int timeout_ms);
void ddnn_pahoc_core_get_stats(ddnn_pahoc_core *core, ddnn_pahoc_stats *out);

#endif
