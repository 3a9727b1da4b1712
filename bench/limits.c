/* The XNOR-popcount limit of a build: how fast this CPU counts mismatching bits between 64-bit
 * words that sit in L1, written without the ddnngen runtime so that the limit does not inherit
 * the kernels' choices; and its int32 multiply-accumulate rate on FConv's loop shape (for the
 * device parts' bound). bench/bench_c.py compiles it with the same flags as the generated code.
 *
 * Work: PIXELS x WORDS = 589 824 words, as many as one BConv 64->64 3x3 layer on 32x32 (per
 * output pixel 9 taps x 64 output channels). Each "pixel" broadcasts one input word against the
 * same L1-resident WORDS weight words, the shape of BConv's inner loop; the next pixel takes the
 * next input word, so nothing is hoisted out of the outer loop. Counted is popcount(a ^ w): the
 * XNOR form 64 - popcount(a ^ w) differs by a constant per word and costs the same.
 *
 * Loops, each the best known way for its instruction set (the limit is the fastest that the
 * build has, scalar included):
 *   scalar          POPCNT per word, 4 accumulators, compiled without auto-vectorisation
 *   avx512          VPOPCNTQ on zmm, 4 accumulators (__AVX512F__ + __AVX512VPOPCNTDQ__)
 *   avx2-pshufb     VPSHUFB nibble table, byte counts widened by VPSADBW every 16 vectors (__AVX2__)
 *   avx2-harley-seal  Harley-Seal carry-save adders over 16 vectors, one VPSHUFB count per 16
 *                   (Mula, Kurz, Lemire, "Faster population counts using AVX2 instructions", 2018)
 *   neon            CNT on q registers, byte counts widened every 16 vectors (__ARM_NEON)
 *
 * FConv's limit, the same way: multiply-accumulates of uint8 pixels by +-1 int8 weights, per pixel
 * 27 taps (3x3 on RGB) x 64 output channels, 1024 pixels:
 *   int32           acc[oc] += w[oc] * x, vectorised by the compiler (the shape of FConv's loop)
 *   avx2-maddubs    VPMADDUBSW: 2 taps x 16 channels per instruction into int16 (exact: |S| <= 6885)
 *   avx-vnni        VPDPBUSD on ymm: 4 taps x 8 channels into int32 (__AVXVNNI__)
 *   avx512-vnni     VPDPBUSD on zmm: 4 taps x 16 channels into int32 (__AVX512VNNI__)
 * (taps padded with zero weights to a multiple of 2 or 4).
 *
 * Prints one line per loop: "loop NAME words=N best_s=T mean_s=T" over REPS timed runs, then
 * "best NAME" (the build's limit), a checksum that every loop must agree on, then
 * "macs NAME macs=N best_s=T mean_s=T" per MAC loop and "macs_check" (the loops agree). */
#define _POSIX_C_SOURCE 200112L
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) || defined(__ARM_NEON__)
#include <arm_neon.h>
#endif

#define PIXELS 1024
#define WORDS 576
#define REPS 50
#define OC 64
#define TAPS 27 /* 3x3 on RGB */

static uint64_t in_words[PIXELS];
static uint64_t weights[WORDS] __attribute__((aligned(64)));
#define TAPS4 28 /* TAPS rounded up to pairs and quads */
static int8_t mac_w[TAPS * OC];
static uint8_t mac_x[PIXELS * TAPS];
static int32_t mac_acc[OC];
/* The same weights for the 8-bit loops: [TAPS4 / 4][OC][4] (pairs: [TAPS4 / 2][OC][2]), zero past TAPS;
 * pixels padded to TAPS4 bytes. */
static int8_t mac_w4[TAPS4 * OC] __attribute__((aligned(64)));
static int8_t mac_w2[TAPS4 * OC] __attribute__((aligned(64)));
static uint8_t mac_x4[PIXELS * TAPS4 + 4];

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

__attribute__((noinline, optimize("no-tree-vectorize"))) static int64_t loop_scalar(void)
{
    int64_t total = 0;
    int p, i;
    for (p = 0; p < PIXELS; ++p) {
        const uint64_t a = in_words[p];
        int64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
        for (i = 0; i < WORDS; i += 4) {
            c0 += __builtin_popcountll(a ^ weights[i]);
            c1 += __builtin_popcountll(a ^ weights[i + 1]);
            c2 += __builtin_popcountll(a ^ weights[i + 2]);
            c3 += __builtin_popcountll(a ^ weights[i + 3]);
        }
        total += c0 + c1 + c2 + c3;
    }
    return total;
}

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
__attribute__((noinline)) static int64_t loop_avx512(void)
{
    int64_t total = 0;
    int p, i;
    for (p = 0; p < PIXELS; ++p) {
        const __m512i a = _mm512_set1_epi64((long long)in_words[p]);
        __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
        for (i = 0; i < WORDS; i += 32) {
            c0 = _mm512_add_epi64(c0, _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_load_si512(weights + i))));
            c1 = _mm512_add_epi64(c1, _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_load_si512(weights + i + 8))));
            c2 = _mm512_add_epi64(c2, _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_load_si512(weights + i + 16))));
            c3 = _mm512_add_epi64(c3, _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_load_si512(weights + i + 24))));
        }
        total += _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(c0, c1), _mm512_add_epi64(c2, c3)));
    }
    return total;
}
#endif

#if defined(__AVX2__)
static inline __m256i byte_counts(__m256i x)
{
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(x, low)),
                           _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), low)));
}

static inline int64_t lanes_sum(__m256i v)
{
    const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(_mm_add_epi64(half, _mm_unpackhi_epi64(half, half)));
}

#define W256(i) _mm256_load_si256((const __m256i *)(const void *)(weights + (i)))

__attribute__((noinline)) static int64_t loop_avx2_pshufb(void)
{
    int64_t total = 0;
    int p, i, j;
    for (p = 0; p < PIXELS; ++p) {
        const __m256i a = _mm256_set1_epi64x((long long)in_words[p]);
        __m256i wide = _mm256_setzero_si256();
        for (i = 0; i < WORDS; i += 64) { /* 8 vectors per byte accumulator: counts <= 64 */
            __m256i b0 = _mm256_setzero_si256(), b1 = b0;
            for (j = 0; j < 64; j += 8) {
                b0 = _mm256_add_epi8(b0, byte_counts(_mm256_xor_si256(a, W256(i + j))));
                b1 = _mm256_add_epi8(b1, byte_counts(_mm256_xor_si256(a, W256(i + j + 4))));
            }
            wide = _mm256_add_epi64(wide, _mm256_sad_epu8(_mm256_add_epi8(b0, b1), _mm256_setzero_si256()));
        }
        total += lanes_sum(wide);
    }
    return total;
}

/* Carry-save adder: (h, l) = the two-bit sum of a + b + c, bit by bit. */
#define CSA(h, l, a, b, c)                                                                                          \
    do {                                                                                                           \
        const __m256i u_ = _mm256_xor_si256(a, b), c_ = (c);                                                       \
        h = _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(u_, c_));                                     \
        l = _mm256_xor_si256(u_, c_);                                                                              \
    } while (0)

static inline __m256i lane_counts(__m256i x) { return _mm256_sad_epu8(byte_counts(x), _mm256_setzero_si256()); }

__attribute__((noinline)) static int64_t loop_avx2_harley_seal(void)
{
    int64_t total = 0;
    int p, i;
    for (p = 0; p < PIXELS; ++p) {
        const __m256i a = _mm256_set1_epi64x((long long)in_words[p]);
        __m256i count = _mm256_setzero_si256(), ones = count, twos = count, fours = count, eights = count;
        __m256i sixteens, twos_a, twos_b, fours_a, fours_b, eights_a, eights_b;
#define X(k) _mm256_xor_si256(a, W256(i + 4 * (k)))
        for (i = 0; i < WORDS; i += 64) {
            CSA(twos_a, ones, ones, X(0), X(1));
            CSA(twos_b, ones, ones, X(2), X(3));
            CSA(fours_a, twos, twos, twos_a, twos_b);
            CSA(twos_a, ones, ones, X(4), X(5));
            CSA(twos_b, ones, ones, X(6), X(7));
            CSA(fours_b, twos, twos, twos_a, twos_b);
            CSA(eights_a, fours, fours, fours_a, fours_b);
            CSA(twos_a, ones, ones, X(8), X(9));
            CSA(twos_b, ones, ones, X(10), X(11));
            CSA(fours_a, twos, twos, twos_a, twos_b);
            CSA(twos_a, ones, ones, X(12), X(13));
            CSA(twos_b, ones, ones, X(14), X(15));
            CSA(fours_b, twos, twos, twos_a, twos_b);
            CSA(eights_b, fours, fours, fours_a, fours_b);
            CSA(sixteens, eights, eights, eights_a, eights_b);
            count = _mm256_add_epi64(count, lane_counts(sixteens));
        }
#undef X
        count = _mm256_slli_epi64(count, 4);
        count = _mm256_add_epi64(count, _mm256_slli_epi64(lane_counts(eights), 3));
        count = _mm256_add_epi64(count, _mm256_slli_epi64(lane_counts(fours), 2));
        count = _mm256_add_epi64(count, _mm256_slli_epi64(lane_counts(twos), 1));
        count = _mm256_add_epi64(count, lane_counts(ones));
        total += lanes_sum(count);
    }
    return total;
}
#endif

#if defined(__ARM_NEON) || defined(__ARM_NEON__)
__attribute__((noinline)) static int64_t loop_neon(void)
{
    int64_t total = 0;
    int p, i, j;
    for (p = 0; p < PIXELS; ++p) {
        const uint8x16_t a = vreinterpretq_u8_u64(vdupq_n_u64(in_words[p]));
        uint64x2_t wide = vdupq_n_u64(0);
        for (i = 0; i < WORDS; i += 32) { /* 8 vectors per byte accumulator: counts <= 64 */
            uint8x16_t b0 = vdupq_n_u8(0), b1 = b0;
            for (j = 0; j < 32; j += 4) {
                b0 = vaddq_u8(b0, vcntq_u8(veorq_u8(a, vreinterpretq_u8_u64(vld1q_u64(weights + i + j)))));
                b1 = vaddq_u8(b1, vcntq_u8(veorq_u8(a, vreinterpretq_u8_u64(vld1q_u64(weights + i + j + 2)))));
            }
            wide = vpadalq_u32(wide, vpaddlq_u16(vpaddlq_u8(vaddq_u8(b0, b1))));
        }
        total += (int64_t)(vgetq_lane_u64(wide, 0) + vgetq_lane_u64(wide, 1));
    }
    return total;
}
#endif

/* FConv's inner loop shape: per pixel and tap, acc[oc] += w[oc] * x over 64 channels (vectorised
 * by the compiler as the generated int32 path is). */
__attribute__((noinline)) static int64_t int_macs(void)
{
    int64_t total = 0;
    int p, t, oc;
    for (p = 0; p < PIXELS; ++p) {
        for (oc = 0; oc < OC; ++oc)
            mac_acc[oc] = 0;
        for (t = 0; t < TAPS; ++t) {
            const int32_t x = mac_x[p * TAPS + t];
            for (oc = 0; oc < OC; ++oc)
                mac_acc[oc] += mac_w[t * OC + oc] * x;
        }
        for (oc = 0; oc < OC; ++oc)
            total += mac_acc[oc];
    }
    return total;
}

#if defined(__AVX2__)
static inline int64_t int32_lanes_sum(__m256i v)
{
    int32_t lanes[8];
    int64_t sum = 0;
    int i;
    _mm256_storeu_si256((__m256i *)(void *)lanes, v);
    for (i = 0; i < 8; ++i)
        sum += lanes[i];
    return sum;
}

/* int16 lanes: 16 channels per ymm, 4 ymm per 64 channels; each step two taps. */
__attribute__((noinline)) static int64_t macs_avx2_maddubs(void)
{
    int64_t total = 0;
    int p, t, v;
    for (p = 0; p < PIXELS; ++p) {
        __m256i acc[4], sum = _mm256_setzero_si256();
        const uint8_t *x = mac_x4 + p * TAPS4;
        for (v = 0; v < 4; ++v)
            acc[v] = _mm256_setzero_si256();
        for (t = 0; t < TAPS4; t += 2) {
            const __m256i a = _mm256_set1_epi16((short)(x[t] | x[t + 1] << 8));
            for (v = 0; v < 4; ++v)
                acc[v] = _mm256_add_epi16(acc[v], _mm256_maddubs_epi16(a, _mm256_load_si256(
                    (const __m256i *)(const void *)(mac_w2 + t * OC + 32 * v))));
        }
        for (v = 0; v < 4; ++v)
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(acc[v], _mm256_set1_epi16(1)));
        total += int32_lanes_sum(sum);
    }
    return total;
}
#endif

#if defined(__AVXVNNI__) || defined(__AVX512VNNI__)
static int32_t quad(const uint8_t *x)
{
    int32_t q;
    memcpy(&q, x, sizeof q);
    return q;
}
#endif

#if defined(__AVXVNNI__)
__attribute__((noinline)) static int64_t macs_avx_vnni(void)
{
    int64_t total = 0;
    int p, t, v;
    for (p = 0; p < PIXELS; ++p) {
        __m256i acc[8], sum = _mm256_setzero_si256();
        const uint8_t *x = mac_x4 + p * TAPS4;
        for (v = 0; v < 8; ++v)
            acc[v] = _mm256_setzero_si256();
        for (t = 0; t < TAPS4; t += 4) {
            const __m256i a = _mm256_set1_epi32(quad(x + t));
            for (v = 0; v < 8; ++v)
                acc[v] = _mm256_dpbusd_avx_epi32(acc[v], a, _mm256_load_si256(
                    (const __m256i *)(const void *)(mac_w4 + t * OC + 32 * v)));
        }
        for (v = 0; v < 8; ++v)
            sum = _mm256_add_epi32(sum, acc[v]);
        total += int32_lanes_sum(sum);
    }
    return total;
}
#endif

#if defined(__AVX512VNNI__)
__attribute__((noinline)) static int64_t macs_avx512_vnni(void)
{
    int64_t total = 0;
    int p, t, v;
    for (p = 0; p < PIXELS; ++p) {
        __m512i acc[4];
        const uint8_t *x = mac_x4 + p * TAPS4;
        for (v = 0; v < 4; ++v)
            acc[v] = _mm512_setzero_si512();
        for (t = 0; t < TAPS4; t += 4) {
            const __m512i a = _mm512_set1_epi32(quad(x + t));
            for (v = 0; v < 4; ++v)
                acc[v] = _mm512_dpbusd_epi32(acc[v], a, _mm512_load_si512(mac_w4 + t * OC + 64 * v));
        }
        total += _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]),
                                                          _mm512_add_epi32(acc[2], acc[3])));
    }
    return total;
}
#endif

typedef int64_t (*loop_fn)(void);

static void time_loop(loop_fn fn, double *best, double *mean)
{
    volatile int64_t sink = 0; /* keeps every timed call (the loops only read memory) */
    double sum = 0;
    int rep;
    *best = 1e30;
    for (rep = 0; rep < REPS; ++rep) {
        const double t0 = now();
        double t;
        sink += fn();
        t = now() - t0;
        *best = t < *best ? t : *best;
        sum += t;
    }
    *mean = sum / REPS;
}

int main(void)
{
    static const struct {
        const char *name;
        loop_fn fn;
    } loops[] = {
        {"scalar", loop_scalar},
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
        {"avx512", loop_avx512},
#endif
#if defined(__AVX2__)
        {"avx2-pshufb", loop_avx2_pshufb},
        {"avx2-harley-seal", loop_avx2_harley_seal},
#endif
#if defined(__ARM_NEON) || defined(__ARM_NEON__)
        {"neon", loop_neon},
#endif
    };
    const int n_loops = (int)(sizeof loops / sizeof loops[0]);
    uint64_t state = 88172645463325252ull;
    int64_t check = -1;
    double best_all = 1e30, best, mean;
    const char *best_name = "";
    int i, k;
    for (i = 0; i < PIXELS; ++i) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        in_words[i] = state;
        if (i < WORDS)
            weights[i] = state * 2654435761u;
    }
    for (i = 0; i < TAPS * OC; ++i)
        mac_w[i] = (int8_t)((i * 7919) % 3 == 0 ? -1 : 1);
    for (i = 0; i < PIXELS * TAPS; ++i)
        mac_x[i] = (uint8_t)(i * 31);
    for (k = 0; k < n_loops; ++k) {
        const int64_t result = loops[k].fn(); /* warm-up */
        if (check >= 0 && result != check) {
            fprintf(stderr, "loop %s counts %lld, not %lld\n", loops[k].name, (long long)result, (long long)check);
            return 1;
        }
        check = result;
        time_loop(loops[k].fn, &best, &mean);
        printf("loop %s words=%d best_s=%.9g mean_s=%.9g\n", loops[k].name, PIXELS * WORDS, best, mean);
        if (best < best_all) {
            best_all = best;
            best_name = loops[k].name;
        }
    }
    printf("best %s\ncheck %lld\n", best_name, (long long)check);
    for (i = 0; i < TAPS4 * OC; ++i) {
        const int t = i / OC, oc = i % OC; /* mac_w is [TAPS][OC] */
        const int8_t w = t < TAPS ? mac_w[t * OC + oc] : 0;
        mac_w4[(t / 4 * OC + oc) * 4 + t % 4] = w;
        mac_w2[(t / 2 * OC + oc) * 2 + t % 2] = w;
    }
    for (i = 0; i < PIXELS * TAPS4; ++i)
        mac_x4[i] = i % TAPS4 < TAPS ? mac_x[i / TAPS4 * TAPS + i % TAPS4] : 0;
    {
        static const struct {
            const char *name;
            loop_fn fn;
        } macs[] = {
            {"int32", int_macs},
#if defined(__AVX2__)
            {"avx2-maddubs", macs_avx2_maddubs},
#endif
#if defined(__AVXVNNI__)
            {"avx-vnni", macs_avx_vnni},
#endif
#if defined(__AVX512VNNI__)
            {"avx512-vnni", macs_avx512_vnni},
#endif
        };
        check = -1;
        for (k = 0; k < (int)(sizeof macs / sizeof macs[0]); ++k) {
            const int64_t result = macs[k].fn();
            if (check >= 0 && result != check) {
                fprintf(stderr, "macs %s sums %lld, not %lld\n", macs[k].name, (long long)result, (long long)check);
                return 1;
            }
            check = result;
            time_loop(macs[k].fn, &best, &mean);
            printf("macs %s macs=%d best_s=%.9g mean_s=%.9g\n", macs[k].name, PIXELS * TAPS * OC, best, mean);
        }
        printf("macs_check %lld\n", (long long)check);
    }
    return 0;
}
