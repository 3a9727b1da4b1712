/* Drives c_runtime/ddnn_pahoc.c without Python, so ASan/UBSan see the shim and Paho's callbacks on their
 * own threads (under cffi the interpreter would have to be preloaded with the sanitizer runtime).
 * tests/test_pahoc_sanitized.py builds it with the sanitizers and plays the clients.
 *
 * Usage: pahoc_check URI PORT EXPECTED
 * Prints READY once subscribed to check/req/+; waits until EXPECTED messages were queued or dropped for
 * their topic; takes them in batches of at most BATCH, replying to check/rep/<last level> with the
 * (kept part of the) payload; prints each message, each batch size and the final counters; exits 0 only
 * when every call behaved as its header says. */
#include "ddnn_pahoc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_TOPIC 128
#define MAX_PAYLOAD 1000
#define KEEP_OVERSIZED 64
#define BATCH 4

static int fail(const char *what)
{
    fprintf(stderr, "pahoc_check: %s\n", what);
    return 1;
}

static void pause_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
    static uint8_t buffer[MAX_TOPIC + MAX_PAYLOAD];
    int64_t records[BATCH * DDNN_PAHOC_FIELDS];
    const char *subscriptions[] = {"check/req/+"};
    ddnn_pahoc_config config;
    ddnn_pahoc_stats stats;
    ddnn_pahoc *client;
    char error[256], problem[256];
    /* A batch's replies go out in one ddnn_pahoc_publish_many: topics and payloads packed one after the other. */
    char reply_topics[BATCH * (MAX_TOPIC + 16)];
    int64_t topic_offsets[BATCH], payload_offsets[BATCH + 1];
    int results[BATCH];
    uint8_t reply_payloads[sizeof buffer];
    int checked_bad_length = 0;
    long expected, handled = 0;
    int waited, n, i;

    if (argc != 4)
        return fail("usage: pahoc_check URI PORT EXPECTED");
    expected = strtol(argv[3], NULL, 10);
    memset(&config, 0, sizeof config);
    config.uri = argv[1];
    config.port = (int)strtol(argv[2], NULL, 10);
    config.client_id = "pahoc-check";
    config.clean_start = 1;
    config.receive_maximum = 64;
    config.keepalive_s = 30;
    config.max_inflight = 8;
    config.max_buffered = 64;
    config.status_topic = "check/status";
    config.queue_capacity = 32;
    config.max_topic_bytes = MAX_TOPIC;
    config.max_payload_bytes = MAX_PAYLOAD;
    config.keep_oversized_bytes = KEEP_OVERSIZED;

    config.max_topic_bytes = 0; /* refused, with a reason */
    if (ddnn_pahoc_create(&config, error, sizeof error) != NULL || strstr(error, "invalid") == NULL)
        return fail("an invalid configuration was accepted");
    config.max_topic_bytes = MAX_TOPIC;
    client = ddnn_pahoc_create(&config, error, sizeof error);
    if (client == NULL)
        return fail(error);
    if (ddnn_pahoc_start(client, subscriptions, 1) != 0)
        return fail("start failed");
    if (!ddnn_pahoc_wait_ready(client, 10000)) {
        ddnn_pahoc_problem(client, problem, sizeof problem);
        return fail(problem);
    }
    if (ddnn_pahoc_take(client, BATCH, 0, 0, records, buffer, sizeof buffer - 1) != -2)
        return fail("take accepted a buffer too small for the bounds");
    if (ddnn_pahoc_take(client, BATCH, 50, 0, records, buffer, sizeof buffer) != 0)
        return fail("take on an empty queue did not time out with 0");
    printf("READY\n");
    fflush(stdout);

    for (waited = 0;; waited += 10) {
        ddnn_pahoc_get_stats(client, &stats);
        if ((long)(stats.received + stats.dropped_topic + stats.dropped_full) >= expected)
            break;
        if (waited > 20000)
            return fail("the expected messages never arrived");
        pause_ms(10);
    }
    while (handled < (long)stats.received) {
        n = ddnn_pahoc_take(client, BATCH, 1000, 0, records, buffer, sizeof buffer);
        if (n <= 0)
            return fail("take returned nothing while messages were queued");
        printf("BATCH %d\n", n);
        payload_offsets[0] = 0;
        for (i = 0; i < n; ++i) {
            const int64_t *r = records + (size_t)i * DDNN_PAHOC_FIELDS;
            const char *topic = (const char *)buffer + r[DDNN_PAHOC_TOPIC_OFFSET];
            int topic_len = (int)r[DDNN_PAHOC_TOPIC_LEN];
            const char *last = topic + topic_len;
            while (last > topic && last[-1] != '/')
                --last;
            printf("MSG %.*s %lld %lld %lld\n", topic_len, topic, (long long)r[DDNN_PAHOC_PAYLOAD_LEN],
                   (long long)r[DDNN_PAHOC_WIRE_LEN], (long long)r[DDNN_PAHOC_QOS]);
            topic_offsets[i] = (int64_t)i * (MAX_TOPIC + 16);
            snprintf(reply_topics + topic_offsets[i], MAX_TOPIC + 16, "check/rep/%.*s",
                     (int)(topic + topic_len - last), last);
            memcpy(reply_payloads + payload_offsets[i], buffer + r[DDNN_PAHOC_PAYLOAD_OFFSET],
                   (size_t)r[DDNN_PAHOC_PAYLOAD_LEN]);
            payload_offsets[i + 1] = payload_offsets[i] + r[DDNN_PAHOC_PAYLOAD_LEN];
        }
        if (ddnn_pahoc_publish_many(client, reply_topics, topic_offsets, reply_payloads, payload_offsets, n, 1,
                                    results) != 0)
            return fail("publish refused");
        for (i = 0; i < n; ++i)
            if (results[i] != 0)
                return fail("publish_many: a taken message's result is not 0");
        if (!checked_bad_length) {
            /* A negative length is refused before Paho sees it, and counted as not taken. */
            int64_t bad_offsets[2] = {0, -1};
            checked_bad_length = 1;
            if (ddnn_pahoc_publish_many(client, reply_topics, topic_offsets, reply_payloads, bad_offsets, 1, 1,
                                        results) != 1 || results[0] == 0)
                return fail("publish_many took a message of negative length");
        }
        handled += n;
    }
    if (!ddnn_pahoc_wait_published(client, 10000))
        return fail("replies not delivered");
    if (!ddnn_pahoc_unsubscribe(client, subscriptions, 1, 5000))
        return fail("unsubscribe not confirmed");
    ddnn_pahoc_interrupt(client);
    if (ddnn_pahoc_take(client, BATCH, 1000, 0, records, buffer, sizeof buffer) != -1)
        return fail("take after interrupt did not return -1");
    ddnn_pahoc_get_stats(client, &stats);
    printf("STATS received=%llu dropped_full=%llu dropped_topic=%llu oversized=%llu published=%llu "
           "completed=%llu failed=%llu connects=%llu queued=%d\n",
           (unsigned long long)stats.received, (unsigned long long)stats.dropped_full,
           (unsigned long long)stats.dropped_topic, (unsigned long long)stats.oversized,
           (unsigned long long)stats.published, (unsigned long long)stats.completed,
           (unsigned long long)stats.failed, (unsigned long long)stats.connects, stats.queued);
    fflush(stdout);
    ddnn_pahoc_close(client, 2000);
    return 0;
}
