/* See ddnn_pahoc_core.h. */
#include "ddnn_pahoc_core.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int64_t ddnn_pahoc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void ddnn_pahoc_deadline_in(struct timespec *ts, int timeout_ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec += 1;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Copies the config's strings into one owned block (the caller's buffers die with its call). */
static int own_strings(ddnn_pahoc_core *core)
{
    const char **fields[] = {&core->config.uri, &core->config.client_id, &core->config.username,
                             &core->config.password, &core->config.ca_file, &core->config.cert_file,
                             &core->config.key_file, &core->config.status_topic};
    size_t total = 0, i, at = 0;

    for (i = 0; i < sizeof fields / sizeof fields[0]; ++i)
        if (*fields[i] != NULL)
            total += strlen(*fields[i]) + 1;
    core->strings = malloc(total + 1);
    if (core->strings == NULL)
        return -1;
    for (i = 0; i < sizeof fields / sizeof fields[0]; ++i)
        if (*fields[i] != NULL) {
            size_t n = strlen(*fields[i]) + 1;
            memcpy(core->strings + at, *fields[i], n);
            *fields[i] = core->strings + at;
            at += n;
        }
    return 0;
}

int ddnn_pahoc_core_init(ddnn_pahoc_core *core, const ddnn_pahoc_config *config, char *error, size_t error_len)
{
    pthread_condattr_t clock_attr;

    if (config->uri == NULL || config->client_id == NULL || config->queue_capacity == 0 ||
        config->max_topic_bytes == 0 || config->max_topic_bytes > DDNN_PAHOC_TOPIC_LIMIT ||
        config->max_inflight < 1 || config->max_inflight > 65535 || config->max_buffered < 1 ||
        config->receive_maximum < 1 || config->receive_maximum > 65535 ||
        config->keep_oversized_bytes > config->max_payload_bytes || config->keepalive_s < 0 ||
        config->keepalive_s > 65535 || config->session_expiry_s < 0) {
        snprintf(error, error_len, "invalid MQTT transport configuration");
        return -1;
    }
    if ((config->cert_file == NULL) != (config->key_file == NULL) ||
        (config->password != NULL && config->username == NULL)) {
        snprintf(error, error_len, "a client certificate needs its key, a password its user name");
        return -1;
    }
    core->config = *config;
    if (own_strings(core) != 0 || (core->ring = calloc(config->queue_capacity, sizeof *core->ring)) == NULL) {
        free(core->strings);
        core->strings = NULL;
        snprintf(error, error_len, "out of memory");
        return -1;
    }
    pthread_mutex_init(&core->lock, NULL);
    pthread_condattr_init(&clock_attr);
    pthread_condattr_setclock(&clock_attr, CLOCK_MONOTONIC);
    pthread_cond_init(&core->changed, &clock_attr);
    pthread_condattr_destroy(&clock_attr);
    return 0;
}

void ddnn_pahoc_core_free(ddnn_pahoc_core *core)
{
    for (; core->count > 0; --core->count, core->head = (core->head + 1) % core->config.queue_capacity)
        free(core->ring[core->head].data);
    pthread_cond_destroy(&core->changed);
    pthread_mutex_destroy(&core->lock);
    free(core->ring);
    free(core->strings);
}

ddnn_pahoc_slot *ddnn_pahoc_core_tail(ddnn_pahoc_core *core)
{
    if (core->count == core->config.queue_capacity)
        return NULL;
    return &core->ring[(core->head + core->count) % core->config.queue_capacity];
}

int ddnn_pahoc_core_copy(ddnn_pahoc_core *core, int max_messages, int64_t *records, uint8_t *buffer,
                         size_t buffer_len, void (*on_taken)(void *context, const ddnn_pahoc_slot *slot),
                         void *context)
{
    size_t used = 0;
    int taken = 0;

    while (taken < max_messages && core->count > 0) {
        ddnn_pahoc_slot *s = &core->ring[core->head];
        size_t size = s->topic_len + s->payload_len;
        int64_t *r = records + (size_t)taken * DDNN_PAHOC_FIELDS;
        if (size > buffer_len - used)
            break;
        memcpy(buffer + used, s->data, size);
        r[DDNN_PAHOC_TOPIC_OFFSET] = (int64_t)used;
        r[DDNN_PAHOC_TOPIC_LEN] = (int64_t)s->topic_len;
        r[DDNN_PAHOC_PAYLOAD_OFFSET] = (int64_t)(used + s->topic_len);
        r[DDNN_PAHOC_PAYLOAD_LEN] = (int64_t)s->payload_len;
        r[DDNN_PAHOC_WIRE_LEN] = (int64_t)s->wire_len;
        r[DDNN_PAHOC_ARRIVED_NS] = s->arrived_ns;
        r[DDNN_PAHOC_QOS] = s->qos;
        used += size;
        if (on_taken != NULL)
            on_taken(context, s);
        free(s->data);
        s->data = NULL;
        core->head = (core->head + 1) % core->config.queue_capacity;
        --core->count;
        ++taken;
    }
    return taken;
}

int ddnn_pahoc_core_wait_for(ddnn_pahoc_core *core, const int *flag, int value, int timeout_ms)
{
    struct timespec deadline;
    ddnn_pahoc_deadline_in(&deadline, timeout_ms);
    while (*flag != value && !core->interrupted &&
           pthread_cond_timedwait(&core->changed, &core->lock, &deadline) != ETIMEDOUT) {
    }
    return *flag == value;
}

int ddnn_pahoc_core_wait_ready(ddnn_pahoc_core *core, int timeout_ms)
{
    int ready;
    pthread_mutex_lock(&core->lock);
    ready = ddnn_pahoc_core_wait_for(core, &core->stats.subscribed, 1, timeout_ms);
    pthread_mutex_unlock(&core->lock);
    return ready;
}

size_t ddnn_pahoc_core_problem(ddnn_pahoc_core *core, char *out, size_t out_len)
{
    size_t n;
    pthread_mutex_lock(&core->lock);
    n = strlen(core->problem);
    if (out_len > 0) {
        n = n < out_len - 1 ? n : out_len - 1;
        memcpy(out, core->problem, n);
        out[n] = '\0';
    }
    pthread_mutex_unlock(&core->lock);
    return n;
}

void ddnn_pahoc_core_interrupt(ddnn_pahoc_core *core)
{
    pthread_mutex_lock(&core->lock);
    core->interrupted = 1;
    pthread_cond_broadcast(&core->changed);
    pthread_mutex_unlock(&core->lock);
}

int ddnn_pahoc_core_wait_published(ddnn_pahoc_core *core, int timeout_ms)
{
    struct timespec deadline;
    int done;

    ddnn_pahoc_deadline_in(&deadline, timeout_ms);
    pthread_mutex_lock(&core->lock);
    while (core->stats.connected && core->stats.completed + core->stats.failed < core->stats.published &&
           pthread_cond_timedwait(&core->changed, &core->lock, &deadline) != ETIMEDOUT) {
    }
    done = !core->stats.connected || core->stats.completed + core->stats.failed >= core->stats.published;
    pthread_mutex_unlock(&core->lock);
    return done;
}

void ddnn_pahoc_core_get_stats(ddnn_pahoc_core *core, ddnn_pahoc_stats *out)
{
    pthread_mutex_lock(&core->lock);
    *out = core->stats;
    out->queued = (int)core->count;
    pthread_mutex_unlock(&core->lock);
}
