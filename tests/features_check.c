/* Driver for tests/test_features_sanitized.py: ddnn_features.c's answer must not hold the buffer while its
 * consumer sends (a publish may wait on the network), and the split being sent must stay intact while the
 * device thread keeps new ones. The consumer lets another thread keep more splits than the buffer holds and
 * waits for it (at most 5 s), then checks the bytes it was handed. Prints OK, or what went wrong (exit 1). */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "ddnn_features.h"

#define CAPACITY 4
#define SPLIT_BYTES 64
#define KEPT_DURING_SEND (3 * CAPACITY)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int keeper_go, keeper_done;

static void *keeper(void *unused)
{
    uint8_t split[SPLIT_BYTES];
    uint64_t event;
    (void)unused;
    pthread_mutex_lock(&lock);
    while (!keeper_go)
        pthread_cond_wait(&changed, &lock);
    pthread_mutex_unlock(&lock);
    for (event = 100; event < 100 + KEPT_DURING_SEND; ++event) {
        memset(split, (int)(event & 0xff), sizeof split);
        ddnn_features_keep(event, 1, split, sizeof split);
    }
    pthread_mutex_lock(&lock);
    keeper_done = 1;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
    return NULL;
}

/* The consumer: a slow send, during which the device thread keeps splits. */
static int send_slowly(const uint8_t *request, size_t len, void *context)
{
    const uint8_t *want = (const uint8_t *)context;
    struct timespec until;
    int rc = 0;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 5;
    pthread_mutex_lock(&lock);
    keeper_go = 1;
    pthread_cond_broadcast(&changed);
    while (!keeper_done && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&changed, &lock, &until);
    pthread_mutex_unlock(&lock);
    if (rc == ETIMEDOUT) {
        printf("BLOCKED: keeping a split waited for the send\n");
        return 1;
    }
    if (len != SPLIT_BYTES || memcmp(request, want, len) != 0) {
        printf("CORRUPTED: the split being sent changed while others were kept\n");
        return 2;
    }
    return 0;
}

int main(void)
{
    uint8_t split[SPLIT_BYTES];
    pthread_t thread;
    int sent = -1;
    if (ddnn_features_init(CAPACITY, SPLIT_BYTES) != 0) {
        printf("INIT failed\n");
        return 1;
    }
    memset(split, 0xA5, sizeof split);
    ddnn_features_keep(1, 7, split, sizeof split);
    pthread_create(&thread, NULL, keeper, NULL);
    if (!ddnn_features_answer(1, 7, send_slowly, split, &sent)) {
        printf("NOT HELD: event 1\n");
        return 1;
    }
    pthread_join(thread, NULL);
    if (sent != 0)
        return 1;
    if (ddnn_features_held() != CAPACITY) {
        printf("HELD %lu, want %d\n", (unsigned long)ddnn_features_held(), CAPACITY);
        return 1;
    }
    printf("OK\n");
    return 0;
}
