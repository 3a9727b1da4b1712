/* BConv: binary convolution on packed activations, XOR + popcount.
 *
 * S = n_valid_taps * IC - 2 * popcount(a ^ w) summed over in-bounds taps only: a zero-padded
 * tap contributes 0 to a +-1 convolution, so it is skipped rather than matched against.
 *
 * Weights are (KH, KW, in_words, OC): for one tap and input word, the words of consecutive
 * output channels are contiguous. Per output pixel and block of <= 64 output channels the
 * block's popcount accumulators stay in registers; each tap broadcasts one input word and
 * XORs it with the block's weight words, popcount, add. The vector paths (ddnn_popcount.h)
 * do that DDNN_PV_WORDS channels per instruction: 8 with AVX-512 VPOPCNTQ, 4 with AVX2's
 * VPSHUFB table, 2 with NEON CNT; the scalar path one (or what the compiler vectorises).
 * Interior pixels take a copy of the loop with constant tap bounds, border pixels one with the
 * clipped bounds. Header-only, instantiated per layer with constant shapes (DDNN_INLINE). */
#ifndef DDNN_BCONV_H
#define DDNN_BCONV_H

#include "ddnn_pool.h"
#include "ddnn_popcount.h"
#include "ddnn_types.h"

typedef struct {
    ddnn_conv_shape shape;
    const ddnn_word *weights; /* packed (KH, KW, in_words, OC) */
} ddnn_bconv_layer;

/* The taps in bounds are walked as kernel rows ky in [ky_lo, ky_hi) and, in each, steps
 * j in [kx_lo * in_words, kx_hi * in_words): channel-last input makes a kernel row's taps
 * contiguous words (ddnn_bconv_in_row()[j]) and the (KH, KW, in_words, OC) weights make them
 * contiguous rows of OC words (ddnn_bconv_w_row() + j * OC). */
DDNN_INLINE const ddnn_word *ddnn_bconv_in_row(const ddnn_conv_shape *sh, const ddnn_word *input, int iy, int ix0)
{
    return input + ((size_t)iy * sh->in_w + ix0) * sh->in_words;
}

DDNN_INLINE const ddnn_word *ddnn_bconv_w_row(const ddnn_bconv_layer *layer, int ky)
{
    const ddnn_conv_shape *sh = &layer->shape;
    return layer->weights + (size_t)ky * sh->ksize * sh->in_words * sh->out_c;
}

#if defined(DDNN_SIMD_SCALAR)
/* Scalar path: sums of output channels [c0, c0 + n) at one pixel over taps [ky_lo, ky_hi) x
 * [kx_lo, kx_hi), one popcount per channel and step (the compiler may still vectorise it). */
DDNN_INLINE void ddnn_bconv_pixel(const ddnn_bconv_layer *layer, const ddnn_word *input, int iy0, int ix0,
                                  int ky_lo, int ky_hi, int kx_lo, int kx_hi, int c0, int n, int32_t *restrict dst)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int words = sh->in_words, oc = sh->out_c;
    const int32_t valid = (int32_t)(ky_hi - ky_lo) * (kx_hi - kx_lo) * sh->in_c;
    ddnn_popacc acc[DDNN_OC_BLOCK];
    int ky, j, c;
    for (c = 0; c < n; ++c)
        acc[c] = 0;
    for (ky = ky_lo; ky < ky_hi; ++ky) {
        const ddnn_word *in_row = ddnn_bconv_in_row(sh, input, iy0 + ky, ix0);
        const ddnn_word *w_row = ddnn_bconv_w_row(layer, ky) + c0;
        for (j = kx_lo * words; j < kx_hi * words; ++j) {
            const ddnn_word a = in_row[j];
            const ddnn_word *restrict w_j = w_row + (size_t)j * oc;
            for (c = 0; c < n; ++c)
                acc[c] += (ddnn_popacc)ddnn_popcount(a ^ w_j[c]);
        }
    }
    for (c = 0; c < n; ++c)
        dst[c] = valid - 2 * (int32_t)acc[c];
}
#else
/* Vector path: a group of DDNN_BCONV_VECS accumulators of DDNN_PV_WORDS channels each stays in
 * registers (64 channels on AVX-512, 32 on AVX2, 16 on NEON); a block of up to 64 output channels
 * is walked group by group, each over all taps (the taps' input words stay in L1). Two pixels
 * sharing each weight load (16 AVX-512 accumulators) measured 10-15 % slower than one: the loop is
 * bound by VPOPCNTQ, not by loads. */
#define DDNN_BCONV_VECS 8
#define DDNN_BCONV_GROUP (DDNN_BCONV_VECS * DDNN_PV_WORDS)

/* Steps [j_lo, j_hi) of kernel row ky against the group's weights: acc[v] += popcount(a ^ w)
 * for vectors v < vecs, the last holding `last` channels (its other lanes count garbage that is
 * never stored). */
DDNN_INLINE void ddnn_bconv_taps(const ddnn_bconv_layer *layer, const ddnn_word *input, int iy, int ix0, int ky,
                                 int j_lo, int j_hi, int g0, int vecs, int last, ddnn_pv *acc)
{
    const int oc = layer->shape.out_c;
    const ddnn_word *in_row = ddnn_bconv_in_row(&layer->shape, input, iy, ix0);
    const ddnn_word *w_row = ddnn_bconv_w_row(layer, ky) + g0;
    int j, v;
    for (j = j_lo; j < j_hi; ++j) {
        const ddnn_word *w_j = w_row + (size_t)j * oc;
        const ddnn_pv a = ddnn_pv_broadcast(in_row[j]);
        for (v = 0; v < vecs; ++v)
            acc[v] = ddnn_pv_step(acc[v], a, ddnn_pv_load(w_j + v * DDNN_PV_WORDS, v + 1 < vecs ? DDNN_PV_WORDS : last));
    }
}

/* Mismatch counts of output channels [g0, g0 + m) at one pixel over taps [ky_lo, ky_hi) x
 * [kx_lo, kx_hi), widened: wide[v] for the group's `vecs` vectors, the last holding `last` channels. */
DDNN_INLINE void ddnn_bconv_counts(const ddnn_bconv_layer *layer, const ddnn_word *input, int iy0, int ix0,
                                   int ky_lo, int ky_hi, int kx_lo, int kx_hi, int g0, int vecs, int last,
                                   ddnn_pvw *wide)
{
    const int words = layer->shape.in_words, k = layer->shape.ksize;
    ddnn_pv acc[DDNN_BCONV_VECS];
    int ky, v;
    for (v = 0; v < vecs; ++v)
        acc[v] = ddnn_pv_zero();
    if (k * k * words <= DDNN_PV_NARROW_STEPS) {
        /* A whole pixel's steps fit the narrow counters (always on AVX-512): widen once. */
        for (ky = ky_lo; ky < ky_hi; ++ky)
            ddnn_bconv_taps(layer, input, iy0 + ky, ix0, ky, kx_lo * words, kx_hi * words, g0, vecs, last, acc);
        for (v = 0; v < vecs; ++v)
            wide[v] = ddnn_pvw_add(ddnn_pvw_zero(), acc[v]);
    } else {
        /* Chunks of at most DDNN_PV_NARROW_STEPS steps, each widened into `wide`. */
        int j, chunk, steps = 0;
        for (v = 0; v < vecs; ++v)
            wide[v] = ddnn_pvw_zero();
        for (ky = ky_lo; ky < ky_hi; ++ky) {
            for (j = kx_lo * words; j < kx_hi * words; j += chunk) {
                chunk = ddnn_imin(kx_hi * words - j, DDNN_PV_NARROW_STEPS - steps);
                ddnn_bconv_taps(layer, input, iy0 + ky, ix0, ky, j, j + chunk, g0, vecs, last, acc);
                steps += chunk;
                if (steps == DDNN_PV_NARROW_STEPS) {
                    for (v = 0; v < vecs; ++v) {
                        wide[v] = ddnn_pvw_add(wide[v], acc[v]);
                        acc[v] = ddnn_pv_zero();
                    }
                    steps = 0;
                }
            }
        }
        for (v = 0; v < vecs; ++v)
            wide[v] = ddnn_pvw_add(wide[v], acc[v]);
    }
}

/* Sums of output channels [g0, g0 + m) (m <= DDNN_BCONV_GROUP) at one pixel over taps
 * [ky_lo, ky_hi) x [kx_lo, kx_hi), `valid` = taps in bounds * IC. */
DDNN_INLINE void ddnn_bconv_group(const ddnn_bconv_layer *layer, const ddnn_word *input, int iy0, int ix0,
                                  int ky_lo, int ky_hi, int kx_lo, int kx_hi, int g0, int m, int32_t valid,
                                  int32_t *restrict dst)
{
    const int vecs = (m + DDNN_PV_WORDS - 1) / DDNN_PV_WORDS, last = m - (vecs - 1) * DDNN_PV_WORDS;
    ddnn_pvw wide[DDNN_BCONV_VECS];
    int v;
    ddnn_bconv_counts(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, g0, vecs, last, wide);
    for (v = 0; v < vecs; ++v)
        ddnn_pvw_dots(wide[v], valid, dst + v * DDNN_PV_WORDS, v + 1 < vecs ? DDNN_PV_WORDS : last);
}

/* Sums of output channels [c0, c0 + n) (n <= DDNN_OC_BLOCK) at one pixel: full groups, then the rest. */
DDNN_INLINE void ddnn_bconv_pixel(const ddnn_bconv_layer *layer, const ddnn_word *input, int iy0, int ix0,
                                  int ky_lo, int ky_hi, int kx_lo, int kx_hi, int c0, int n, int32_t *restrict dst)
{
    const int32_t valid = (int32_t)(ky_hi - ky_lo) * (kx_hi - kx_lo) * layer->shape.in_c;
    int g = 0;
    for (; g + DDNN_BCONV_GROUP <= n; g += DDNN_BCONV_GROUP)
        ddnn_bconv_group(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, c0 + g, DDNN_BCONV_GROUP, valid,
                         dst + g);
    if (g < n)
        ddnn_bconv_group(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, c0 + g, n - g, valid, dst + g);
}

#if defined(DDNN_SIMD_AVX512) && defined(__AVX512BW__)
/* Without a pool (1/1/0) each sum meets its threshold right away: on AVX-512 the output word comes
 * from the counters by mask compares, with no int32 row stored and read back (the pooled path's
 * ring). A group is one output word here (DDNN_BCONV_GROUP = DDNN_OC_BLOCK = 64). */
#define DDNN_BCONV_DIRECT 1

/* Output word of channels [c0, c0 + n) (n <= 64) at one pixel. */
DDNN_INLINE ddnn_word ddnn_bconv_pixel_bits(const ddnn_bconv_layer *layer, const ddnn_word *input, int iy0, int ix0,
                                            int ky_lo, int ky_hi, int kx_lo, int kx_hi, int c0, int n)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int32_t valid = (int32_t)(ky_hi - ky_lo) * (kx_hi - kx_lo) * sh->in_c;
    const int vecs = (n + DDNN_PV_WORDS - 1) / DDNN_PV_WORDS, last = n - (vecs - 1) * DDNN_PV_WORDS;
    const __mmask64 flip_lanes = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
    const __m512i flip = _mm512_maskz_loadu_epi8(flip_lanes, sh->flip + c0);
    ddnn_pvw wide[DDNN_BCONV_VECS];
    ddnn_word bits = 0;
    int v;
    ddnn_bconv_counts(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, c0, vecs, last, wide);
    for (v = 0; v < vecs; ++v)
        bits |= (ddnn_word)ddnn_pvw_at_least(wide[v], valid, sh->threshold + c0 + v * DDNN_PV_WORDS,
                                             v + 1 < vecs ? DDNN_PV_WORDS : last)
                << (v * DDNN_PV_WORDS);
    return bits ^ (ddnn_word)_mm512_test_epi8_mask(flip, flip);
}

#endif
#endif


/* Convolution output row cy: conv_w * out_c int32 sums, channel-last, into `row`; or, where the path
 * thresholds straight from its counters (DDNN_BCONV_DIRECT, a layer without pool), out_w * out_words
 * output words into `bits` (row NULL). */
DDNN_INLINE void ddnn_bconv_row(const ddnn_bconv_layer *layer, const ddnn_word *input, int cy, int32_t *row,
                                ddnn_word *bits)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int k = sh->ksize, s = sh->stride, p = sh->pad, oc = sh->out_c;
    const int iy0 = cy * s - p;
    const int ky_lo = ddnn_imax(0, -iy0), ky_hi = ddnn_imin(k, sh->in_h - iy0);
    int ox, c0;
    (void)bits;
    for (ox = 0; ox < sh->conv_w; ++ox) {
        const int ix0 = ox * s - p;
        const int kx_lo = ddnn_imax(0, -ix0), kx_hi = ddnn_imin(k, sh->in_w - ix0);
        const int interior = ky_lo == 0 && ky_hi == k && kx_lo == 0 && kx_hi == k;
        for (c0 = 0; c0 < oc; c0 += DDNN_OC_BLOCK) {
            const int n = ddnn_imin(DDNN_OC_BLOCK, oc - c0);
#if defined(DDNN_BCONV_DIRECT)
            if (row == NULL) {
                ddnn_word *dst = bits + (size_t)ox * sh->out_words + c0 / DDNN_WORD_BITS;
                *dst = interior ? ddnn_bconv_pixel_bits(layer, input, iy0, ix0, 0, k, 0, k, c0, n)
                                : ddnn_bconv_pixel_bits(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, c0, n);
                continue;
            }
#endif
            if (interior)
                ddnn_bconv_pixel(layer, input, iy0, ix0, 0, k, 0, k, c0, n, row + (size_t)ox * oc + c0);
            else
                ddnn_bconv_pixel(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, c0, n, row + (size_t)ox * oc + c0);
        }
    }
}

/* input: packed (in_h, in_w, in_words); out: packed (out_h, out_w, out_words);
 * scratch: DDNN_POOL_SCRATCH(pool_k, conv_w, out_c) int32. */
DDNN_INLINE void ddnn_bconv(const ddnn_bconv_layer *layer, const ddnn_word *input, ddnn_word *out, int32_t *scratch)
{
    const ddnn_conv_shape *sh = &layer->shape;
    int oy, lo, hi, next = 0;
#if defined(DDNN_BCONV_DIRECT)
    if (sh->pool_k == 1 && sh->pool_s == 1 && sh->pool_p == 0) {
        for (oy = 0; oy < sh->out_h; ++oy)
            ddnn_bconv_row(layer, input, oy, NULL, out + (size_t)oy * sh->out_w * sh->out_words);
        return;
    }
#endif
    for (oy = 0; oy < sh->out_h; ++oy) {
        ddnn_pool_window(sh, oy, &lo, &hi);
        for (next = ddnn_imax(next, lo); next < hi; ++next)
            ddnn_bconv_row(layer, input, next, ddnn_pool_ring_row(sh, scratch, next), NULL);
        ddnn_pool_emit(sh, scratch, lo, hi, out + (size_t)oy * sh->out_w * sh->out_words);
    }
}

#endif
