/* Population count of 64-bit words: the only arithmetic binary layers need.
 *
 * Two layers of API. ddnn_popcount() counts one word (the scalar path, and the reference every
 * vector path is tested against). The ddnn_pv_* functions count DDNN_PV_WORDS words at once,
 * lane by lane (lane j of a vector is word j), in the best instruction set the build has, picked
 * at compile time from the compiler's predefined macros:
 *
 *   DDNN_SIMD_AVX512   __AVX512F__ + __AVX512VPOPCNTDQ__: VPOPCNTQ, 8 words per zmm, 64-bit counts
 *   DDNN_SIMD_AVX2     __AVX2__: VPSHUFB nibble table (Mula), 4 words per ymm, 8-bit counts per byte
 *   DDNN_SIMD_NEON     __ARM_NEON (aarch64; armhf with -mfpu=neon): CNT/VCNT, 2 words per q, 8-bit
 *   DDNN_SIMD_SCALAR   none of those, or forced with -DDDNN_FORCE_SCALAR: ddnn_popcount() per word
 *
 * All paths compute the same integers (exact counts), so they are interchangeable bit for bit;
 * tests/test_c_simd.py builds each one this host can run (ARM under qemu) against the reference.
 *
 * The 8-bit paths count into bytes: a byte gains at most 8 per step, so a "narrow" accumulator
 * takes DDNN_PV_NARROW_STEPS = 31 steps (31 * 8 = 248 <= 255) before ddnn_pvw_add() must widen
 * it. Harley-Seal carry-save adders (bench/limits.c) gain AVX2 only a few per cent over the
 * VPSHUFB table even on runs of 16 vectors, and a 3x3 BConv pixel gives each lane 9 steps, too few
 * to pay for the tree's final popcounts; with AVX-512 (VPTERNLOG adders) they lose to VPOPCNTQ. */
#ifndef DDNN_POPCOUNT_H
#define DDNN_POPCOUNT_H

#include "ddnn_types.h"

#if defined(DDNN_FORCE_SCALAR)
#define DDNN_SIMD_SCALAR 1
#elif defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define DDNN_SIMD_AVX512 1
#elif defined(__AVX2__)
#define DDNN_SIMD_AVX2 1
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
#define DDNN_SIMD_NEON 1
#else
#define DDNN_SIMD_SCALAR 1
#endif

#if defined(DDNN_SIMD_AVX512) || defined(DDNN_SIMD_AVX2)
#include <immintrin.h>
#elif defined(DDNN_SIMD_NEON)
#include <arm_neon.h>
#endif

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

/* Accumulator of popcounts inside one output pixel on the scalar path. 64-bit where words are
 * native, so an auto-vectorised popcount adds straight in without a narrowing step; 32-bit
 * elsewhere. Either way it never overflows: |S| < 2^24 (checked by the compiler). */
#if UINTPTR_MAX > 0xffffffffu
typedef uint64_t ddnn_popacc;
#else
typedef uint32_t ddnn_popacc;
#endif

/* ---- vector paths ----------------------------------------------------------------------
 * ddnn_pv is DDNN_PV_WORDS lanes of popcounts in the path's narrow counters, ddnn_pvw the same
 * lanes widened to at least 32 bits:
 *   ddnn_pv_zero(), ddnn_pvw_zero()  all lanes 0
 *   ddnn_pv_load(w, n)               words w[0 .. min(n, DDNN_PV_WORDS)), the other lanes 0 (n >= 1);
 *                                    reads no word past w[n - 1]
 *   ddnn_pv_broadcast(a)             a in every lane
 *   ddnn_pv_step(acc, a, w)          acc + popcount(a ^ w) per lane; at most DDNN_PV_NARROW_STEPS
 *                                    steps on one narrow accumulator before ddnn_pvw_add()
 *   ddnn_pvw_add(wide, acc)          wide + acc per lane
 *   ddnn_pvw_dots(wide, valid, dst, n)  dst[j] = valid - 2 * lane j for j < n <= DDNN_PV_WORDS
 *   ddnn_pvw_sum(wide)               sum of the lanes */
#if defined(DDNN_SIMD_AVX512)
#define DDNN_SIMD_PATH "avx512-vpopcntdq"
#define DDNN_PV_WORDS 8
#define DDNN_PV_NARROW_STEPS 0x3fffffff /* 64-bit lanes: the narrow counters are already wide */
typedef __m512i ddnn_pv;
typedef __m512i ddnn_pvw;

static inline ddnn_pv ddnn_pv_zero(void) { return _mm512_setzero_si512(); }
static inline ddnn_pvw ddnn_pvw_zero(void) { return _mm512_setzero_si512(); }
static inline ddnn_pv ddnn_pv_broadcast(ddnn_word a) { return _mm512_set1_epi64((long long)a); }
static inline ddnn_pv ddnn_pv_load(const ddnn_word *w, int n)
{
    /* The masked load suppresses faults (and reads) on the lanes past n. */
    return n >= 8 ? _mm512_loadu_si512((const void *)w) : _mm512_maskz_loadu_epi64((__mmask8)((1u << n) - 1u), w);
}
static inline ddnn_pv ddnn_pv_step(ddnn_pv acc, ddnn_pv a, ddnn_pv w)
{
    return _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(a, w)));
}
static inline ddnn_pvw ddnn_pvw_add(ddnn_pvw wide, ddnn_pv acc) { return _mm512_add_epi64(wide, acc); }
static inline void ddnn_pvw_dots(ddnn_pvw wide, int32_t valid, int32_t *dst, int n)
{
    const __m256i dots = _mm256_sub_epi32(_mm256_set1_epi32(valid), _mm256_slli_epi32(_mm512_cvtepi64_epi32(wide), 1));
    int32_t part[8];
    int j;
    if (n >= 8) {
        _mm256_storeu_si256((__m256i *)(void *)dst, dots);
        return;
    }
    _mm256_storeu_si256((__m256i *)(void *)part, dots);
    for (j = 0; j < n; ++j)
        dst[j] = part[j];
}
static inline uint32_t ddnn_pvw_sum(ddnn_pvw wide) { return (uint32_t)_mm512_reduce_add_epi64(wide); }
/* Bit j set where valid - 2 * lane j >= th[j], j < n <= 8: the output bits straight from the counts,
 * compared in 64-bit lanes (no int32 round trip through memory). Reads no th past th[n - 1]. */
static inline unsigned ddnn_pvw_at_least(ddnn_pvw wide, int32_t valid, const int32_t *th, int n)
{
    const __mmask8 lanes = n >= 8 ? (__mmask8)0xff : (__mmask8)((1u << n) - 1u);
    const __m512i sums = _mm512_sub_epi64(_mm512_set1_epi64(valid), _mm512_slli_epi64(wide, 1));
    const __m512i t = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(_mm512_maskz_loadu_epi32(lanes, th)));
    return _mm512_mask_cmpge_epi64_mask(lanes, sums, t);
}

#elif defined(DDNN_SIMD_AVX2)
#define DDNN_SIMD_PATH "avx2-pshufb"
#define DDNN_PV_WORDS 4
#define DDNN_PV_NARROW_STEPS 31
typedef __m256i ddnn_pv;  /* 32 byte counts */
typedef __m256i ddnn_pvw; /* 4 x 64-bit counts */

static inline ddnn_pv ddnn_pv_zero(void) { return _mm256_setzero_si256(); }
static inline ddnn_pvw ddnn_pvw_zero(void) { return _mm256_setzero_si256(); }
static inline ddnn_pv ddnn_pv_broadcast(ddnn_word a) { return _mm256_set1_epi64x((long long)a); }
static inline ddnn_pv ddnn_pv_load(const ddnn_word *w, int n)
{
    /* VPMASKMOVQ does not touch the lanes whose mask bit is clear. */
    const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);
    return n >= 4 ? _mm256_loadu_si256((const __m256i *)(const void *)w)
                  : _mm256_maskload_epi64((const long long *)(const void *)w,
                                          _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), lanes));
}
static inline ddnn_pv ddnn_pv_step(ddnn_pv acc, ddnn_pv a, ddnn_pv w)
{
    /* Bits set in each nibble, looked up 32 nibbles at a time (the table repeats per 128-bit half). */
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i x = _mm256_xor_si256(a, w);
    const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(x, low));
    const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
    return _mm256_add_epi8(acc, _mm256_add_epi8(lo, hi));
}
static inline ddnn_pvw ddnn_pvw_add(ddnn_pvw wide, ddnn_pv acc)
{
    /* VPSADBW against zero sums each 64-bit lane's 8 byte counts into that lane. */
    return _mm256_add_epi64(wide, _mm256_sad_epu8(acc, _mm256_setzero_si256()));
}
static inline void ddnn_pvw_dots(ddnn_pvw wide, int32_t valid, int32_t *dst, int n)
{
    const __m128i counts =
        _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(wide, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)));
    const __m128i dots = _mm_sub_epi32(_mm_set1_epi32(valid), _mm_slli_epi32(counts, 1));
    int32_t part[4];
    int j;
    if (n >= 4) {
        _mm_storeu_si128((__m128i *)(void *)dst, dots);
        return;
    }
    _mm_storeu_si128((__m128i *)(void *)part, dots);
    for (j = 0; j < n; ++j)
        dst[j] = part[j];
}
static inline uint32_t ddnn_pvw_sum(ddnn_pvw wide)
{
    const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    return (uint32_t)_mm_cvtsi128_si32(_mm_add_epi64(half, _mm_unpackhi_epi64(half, half)));
}

#elif defined(DDNN_SIMD_NEON)
#define DDNN_SIMD_PATH "neon-cnt"
#define DDNN_PV_WORDS 2
#define DDNN_PV_NARROW_STEPS 31
typedef uint8x16_t ddnn_pv;  /* 16 byte counts */
typedef uint32x4_t ddnn_pvw; /* 32-bit counts, lane j's count in 32-bit lanes 2j and 2j+1 (summed) */

static inline ddnn_pv ddnn_pv_zero(void) { return vdupq_n_u8(0); }
static inline ddnn_pvw ddnn_pvw_zero(void) { return vdupq_n_u32(0); }
static inline ddnn_pv ddnn_pv_broadcast(ddnn_word a) { return vreinterpretq_u8_u64(vdupq_n_u64(a)); }
static inline ddnn_pv ddnn_pv_load(const ddnn_word *w, int n)
{
    return n >= 2 ? vreinterpretq_u8_u64(vld1q_u64(w)) : vreinterpretq_u8_u64(vcombine_u64(vld1_u64(w), vdup_n_u64(0)));
}
static inline ddnn_pv ddnn_pv_step(ddnn_pv acc, ddnn_pv a, ddnn_pv w) { return vaddq_u8(acc, vcntq_u8(veorq_u8(a, w))); }
static inline ddnn_pvw ddnn_pvw_add(ddnn_pvw wide, ddnn_pv acc)
{
    /* Pairwise widening adds: bytes -> 16-bit -> accumulated into 32-bit (VPADAL). */
    return vpadalq_u16(wide, vpaddlq_u8(acc));
}
static inline void ddnn_pvw_dots(ddnn_pvw wide, int32_t valid, int32_t *dst, int n)
{
    const uint32x2_t counts = vmovn_u64(vpaddlq_u32(wide));
    const int32x2_t dots = vsub_s32(vdup_n_s32(valid), vshl_n_s32(vreinterpret_s32_u32(counts), 1));
    if (n >= 2)
        vst1_s32(dst, dots);
    else
        dst[0] = vget_lane_s32(dots, 0);
}
static inline uint32_t ddnn_pvw_sum(ddnn_pvw wide)
{
    const uint64x2_t pairs = vpaddlq_u32(wide);
    return (uint32_t)(vgetq_lane_u64(pairs, 0) + vgetq_lane_u64(pairs, 1));
}

#else
#define DDNN_SIMD_PATH "scalar"
#endif

/* Mismatching bits between a and w over n words: a dot product over n_valid values is
 * n_valid - 2 * mismatches. */
static inline int32_t ddnn_mismatches(const ddnn_word *a, const ddnn_word *w, int n)
{
    int32_t count = 0;
    int i = 0;
#if !defined(DDNN_SIMD_SCALAR)
    ddnn_pv acc = ddnn_pv_zero();
    ddnn_pvw wide = ddnn_pvw_zero();
    int steps = 0;
    for (; i + DDNN_PV_WORDS <= n; i += DDNN_PV_WORDS) {
        acc = ddnn_pv_step(acc, ddnn_pv_load(a + i, DDNN_PV_WORDS), ddnn_pv_load(w + i, DDNN_PV_WORDS));
        if (++steps == DDNN_PV_NARROW_STEPS) {
            wide = ddnn_pvw_add(wide, acc);
            acc = ddnn_pv_zero();
            steps = 0;
        }
    }
    /* Both partial loads zero the lanes past n, whose XOR then counts nothing. */
    if (i < n)
        acc = ddnn_pv_step(acc, ddnn_pv_load(a + i, n - i), ddnn_pv_load(w + i, n - i));
    (void)count;
    return (int32_t)ddnn_pvw_sum(ddnn_pvw_add(wide, acc));
#else
    for (; i < n; ++i)
        count += ddnn_popcount(a[i] ^ w[i]);
    return count;
#endif
}

#endif
