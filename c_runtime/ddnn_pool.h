/* Convolution -> max-pool -> folded BN+sign -> packed bits, computing every convolution
 * output exactly once (no recomputation under overlapping pool windows).
 *
 * A layer's kernel walks output rows; for each it asks ddnn_pool_window which convolution
 * rows the pool window covers, computes the ones not yet in the ring of pool_k rows (each row
 * is conv_w * out_c int32 sums, channel-last: row[x * out_c + c]), then ddnn_pool_emit takes
 * the vertical and horizontal max and writes the packed output row. Rows no window covers
 * (pool stride > ksize) are never computed. Pool padding cells are skipped, which is the same
 * as padding with -inf: they never win. A layer without pool is pool 1/1/0.
 *
 * Header-only: instantiated per layer with constant shapes (see DDNN_INLINE). */
#ifndef DDNN_POOL_H
#define DDNN_POOL_H

#include <string.h>

#include "ddnn_popcount.h"
#include "ddnn_types.h"

/* int32 scratch a layer needs: pool_k ring rows plus one row for the vertical max. */
#define DDNN_POOL_SCRATCH(pool_k, conv_w, out_c) (((pool_k) + 1) * (conv_w) * (out_c))

DDNN_INLINE int ddnn_imax(int a, int b) { return a > b ? a : b; }
DDNN_INLINE int ddnn_imin(int a, int b) { return a < b ? a : b; }

/* Conv rows [*lo, *hi) under the pool window of output row oy. */
DDNN_INLINE void ddnn_pool_window(const ddnn_conv_shape *sh, int oy, int *lo, int *hi)
{
    *lo = ddnn_imax(oy * sh->pool_s - sh->pool_p, 0);
    *hi = ddnn_imin(oy * sh->pool_s - sh->pool_p + sh->pool_k, sh->conv_h);
}

DDNN_INLINE int32_t *ddnn_pool_ring_row(const ddnn_conv_shape *sh, int32_t *scratch, int conv_row)
{
    return scratch + (size_t)(conv_row % sh->pool_k) * sh->conv_w * sh->out_c;
}

/* One output word: bit j = (S_j >= threshold[j]) != flip[j] over n <= 64 channels. */
#if defined(DDNN_SIMD_AVX512) && defined(__AVX512BW__)
/* AVX-512: compares straight into mask registers, 16 channels each; flip's bytes tested into a
 * 64-bit mask. Lanes past n are masked off: nothing past n is read, their bits are 0. */
DDNN_INLINE ddnn_word ddnn_pack_block(const int32_t *restrict s, const int32_t *restrict th,
                                      const uint8_t *restrict flip, int n)
{
    const __mmask64 flip_lanes = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
    const __m512i f = _mm512_maskz_loadu_epi8(flip_lanes, flip);
    ddnn_word bits = 0;
    int g;
    for (g = 0; g < n; g += 16) {
        const __mmask16 lanes = n - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - g)) - 1u);
        const __m512i sv = _mm512_maskz_loadu_epi32(lanes, s + g), tv = _mm512_maskz_loadu_epi32(lanes, th + g);
        bits |= (ddnn_word)_mm512_mask_cmpge_epi32_mask(lanes, sv, tv) << g;
    }
    return bits ^ (ddnn_word)_mm512_test_epi8_mask(f, f);
}
#elif defined(DDNN_SIMD_AVX2)
/* AVX2: 8 channels per compare, their sign bits gathered by VMOVMSKPS; flip's bytes by
 * VPMOVMSKB. The tail past the last full 8 takes the scalar rule. */
DDNN_INLINE ddnn_word ddnn_pack_block(const int32_t *restrict s, const int32_t *restrict th,
                                      const uint8_t *restrict flip, int n)
{
    ddnn_word bits = 0;
    int g, j;
    for (g = 0; g + 8 <= n; g += 8) {
        const __m256i below = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(const void *)(th + g)),
                                                 _mm256_loadu_si256((const __m256i *)(const void *)(s + g)));
        const __m128i f = _mm_loadl_epi64((const __m128i *)(const void *)(flip + g));
        const unsigned ge = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(below)) & 0xffu;
        const unsigned flipped = (unsigned)_mm_movemask_epi8(_mm_cmpgt_epi8(f, _mm_setzero_si128())) & 0xffu;
        bits |= (ddnn_word)(ge ^ flipped) << g;
    }
    for (j = g; j < n; ++j)
        bits |= (ddnn_word)((s[j] >= th[j]) ^ (flip[j] != 0)) << j;
    return bits;
}
#else
/* The compares go to a byte per channel (a loop that vectorises); each 8 bytes of 0/1, read
 * as b0 + b1 << 8 + ... + b7 << 56, become 8 bits with one multiply: b_j * 2^(56 - 7j) lands on
 * bit 56 + j, and no partial product carries into bits 56..63 (checked for all 256 inputs). */
#define DDNN_PACK8_MAGIC 0x0102040810204080ull

DDNN_INLINE ddnn_word ddnn_pack_block(const int32_t *restrict s, const int32_t *restrict th,
                                      const uint8_t *restrict flip, int n)
{
    uint8_t m[DDNN_WORD_BITS];
    ddnn_word bits = 0;
    int j, g;
    for (j = 0; j < n; ++j)
        m[j] = (uint8_t)((s[j] >= th[j]) ^ flip[j]);
    for (; j % 8 != 0; ++j)
        m[j] = 0;
    for (g = 0; g < j / 8; ++g) {
        const uint8_t *b = m + 8 * g;
        const uint64_t x = (uint64_t)b[0] | (uint64_t)b[1] << 8 | (uint64_t)b[2] << 16 | (uint64_t)b[3] << 24
                           | (uint64_t)b[4] << 32 | (uint64_t)b[5] << 40 | (uint64_t)b[6] << 48 | (uint64_t)b[7] << 56;
        bits |= (ddnn_word)((x * DDNN_PACK8_MAGIC) >> 56) << (8 * g);
    }
    return bits;
}
#endif

/* Pools ring rows [lo, hi) and writes output row oy's out_w * out_words packed words. */
DDNN_INLINE void ddnn_pool_emit(const ddnn_conv_shape *sh, int32_t *scratch, int lo, int hi, ddnn_word *out_row)
{
    const int oc = sh->out_c, row_len = sh->conv_w * oc;
    int32_t *restrict vmax_buf = scratch + (size_t)sh->pool_k * row_len;
    const int32_t *vmax;
    int r, i, ox, x, c, c0;

    if (hi - lo == 1) {
        vmax = ddnn_pool_ring_row(sh, scratch, lo);
    } else {
        memcpy(vmax_buf, ddnn_pool_ring_row(sh, scratch, lo), (size_t)row_len * sizeof(int32_t));
        for (r = lo + 1; r < hi; ++r) {
            const int32_t *restrict row = ddnn_pool_ring_row(sh, scratch, r);
            for (i = 0; i < row_len; ++i)
                vmax_buf[i] = row[i] > vmax_buf[i] ? row[i] : vmax_buf[i];
        }
        vmax = vmax_buf;
    }
    for (ox = 0; ox < sh->out_w; ++ox) {
        const int x_lo = ddnn_imax(ox * sh->pool_s - sh->pool_p, 0);
        const int x_hi = ddnn_imin(ox * sh->pool_s - sh->pool_p + sh->pool_k, sh->conv_w);
        for (c0 = 0; c0 < oc; c0 += DDNN_OC_BLOCK) {
            const int n = ddnn_imin(DDNN_OC_BLOCK, oc - c0);
            const int32_t *s = vmax + (size_t)x_lo * oc + c0;
            int32_t best[DDNN_OC_BLOCK];
            if (x_hi - x_lo > 1) {
                for (c = 0; c < n; ++c)
                    best[c] = s[c];
                for (x = x_lo + 1; x < x_hi; ++x) {
                    const int32_t *restrict col = vmax + (size_t)x * oc + c0;
                    for (c = 0; c < n; ++c)
                        best[c] = col[c] > best[c] ? col[c] : best[c];
                }
                s = best;
            }
            out_row[(size_t)ox * sh->out_words + c0 / DDNN_WORD_BITS] =
                ddnn_pack_block(s, sh->threshold + c0, sh->flip + c0, n);
        }
    }
}

#endif
