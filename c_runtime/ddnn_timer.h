/* Monotonic wall clock in nanoseconds for --bench (POSIX clock_gettime, clock() elsewhere). */
#ifndef DDNN_TIMER_H
#define DDNN_TIMER_H

#include <stdint.h>
#include <time.h>

static inline uint64_t ddnn_now_ns(void)
{
#if defined(_POSIX_C_SOURCE) && _POSIX_C_SOURCE >= 199309L
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
#else
    return (uint64_t)((double)clock() * (1e9 / CLOCKS_PER_SEC));
#endif
}

#endif
