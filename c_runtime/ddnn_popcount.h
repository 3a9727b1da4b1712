/* Population count of 64-bit words: the only arithmetic binary layers need. */
#ifndef DDNN_POPCOUNT_H
#define DDNN_POPCOUNT_H

#include "ddnn_types.h"

#if defined(__GNUC__) || defined(__clang__)
/* One instruction with -mpopcnt / -march=native on x86 and with NEON (cnt) on ARM; without
 * them GCC calls a libgcc helper, which is several times slower (see docs/c_target.md). */
static inline int ddnn_popcount(ddnn_word x) { return __builtin_popcountll(x); }
#else
/* Portable SWAR fallback (Hacker's Delight 5-2). */
static inline int ddnn_popcount(ddnn_word x)
{
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (int)((x * 0x0101010101010101ull) >> 56);
}
#endif

/* Accumulator of popcounts inside one output pixel. 64-bit where words are native, so a
 * vectorised popcount (AVX-512 VPOPCNTQ, 8 lanes of 64 bits) adds straight in without a
 * narrowing step; 32-bit elsewhere. Either way it never overflows: |S| < 2^24 (checked by
 * the compiler). */
#if UINTPTR_MAX > 0xffffffffu
typedef uint64_t ddnn_popacc;
#else
typedef uint32_t ddnn_popacc;
#endif

/* Mismatching bits between a and w over n words: a dot product over n_valid values is
 * n_valid - 2 * mismatches. */
static inline int32_t ddnn_mismatches(const ddnn_word *a, const ddnn_word *w, int n)
{
    int32_t count = 0;
    int i;
    for (i = 0; i < n; ++i)
        count += ddnn_popcount(a[i] ^ w[i]);
    return count;
}

#endif
