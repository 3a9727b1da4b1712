/* BConv: binary convolution on packed activations, XOR + popcount.
 *
 * S = n_valid_taps * IC - 2 * popcount(a ^ w) summed over in-bounds taps only: a zero-padded
 * tap contributes 0 to a +-1 convolution, so it is skipped rather than matched against.
 *
 * Weights are (KH, KW, in_words, OC): for one tap and input word, the words of consecutive
 * output channels are contiguous. Per output pixel and block of <= 64 output channels the
 * block's popcount accumulators stay in registers; each tap broadcasts one input word and
 * XORs it with the block's weight words, popcount, add: with AVX-512 VPOPCNTDQ that is 8
 * channels per instruction, with NEON CNT 2. Interior pixels take a copy of the loop with
 * constant tap bounds, border pixels one with the clipped bounds. Header-only, instantiated
 * per layer with constant shapes (DDNN_INLINE). */
#ifndef DDNN_BCONV_H
#define DDNN_BCONV_H

#include "ddnn_pool.h"
#include "ddnn_popcount.h"
#include "ddnn_types.h"

typedef struct {
    ddnn_conv_shape shape;
    const ddnn_word *weights; /* packed (KH, KW, in_words, OC) */
} ddnn_bconv_layer;

/* Sums of output channels [c0, c0 + n) at one pixel over taps [ky_lo, ky_hi) x [kx_lo, kx_hi). */
DDNN_INLINE void ddnn_bconv_pixel(const ddnn_bconv_layer *layer, const ddnn_word *input, int iy0, int ix0,
                                  int ky_lo, int ky_hi, int kx_lo, int kx_hi, int c0, int n, int32_t *restrict dst)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int words = sh->in_words, oc = sh->out_c, k = sh->ksize;
    const int32_t valid = (int32_t)(ky_hi - ky_lo) * (kx_hi - kx_lo) * sh->in_c;
    ddnn_popacc acc[DDNN_OC_BLOCK];
    int ky, kx, i, c;
    for (c = 0; c < n; ++c)
        acc[c] = 0;
    for (ky = ky_lo; ky < ky_hi; ++ky) {
        for (kx = kx_lo; kx < kx_hi; ++kx) {
            const ddnn_word *px = input + ((size_t)(iy0 + ky) * sh->in_w + (ix0 + kx)) * words;
            const ddnn_word *w = layer->weights + (size_t)(ky * k + kx) * words * oc + c0;
            for (i = 0; i < words; ++i) {
                const ddnn_word a = px[i];
                const ddnn_word *restrict w_i = w + (size_t)i * oc;
                for (c = 0; c < n; ++c)
                    acc[c] += (ddnn_popacc)ddnn_popcount(a ^ w_i[c]);
            }
        }
    }
    for (c = 0; c < n; ++c)
        dst[c] = valid - 2 * (int32_t)acc[c];
}

/* Convolution output row cy: conv_w * out_c int32, channel-last. */
DDNN_INLINE void ddnn_bconv_row(const ddnn_bconv_layer *layer, const ddnn_word *input, int cy, int32_t *row)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int k = sh->ksize, s = sh->stride, p = sh->pad, oc = sh->out_c;
    const int iy0 = cy * s - p;
    const int ky_lo = ddnn_imax(0, -iy0), ky_hi = ddnn_imin(k, sh->in_h - iy0);
    int ox, c0;
    for (ox = 0; ox < sh->conv_w; ++ox) {
        const int ix0 = ox * s - p;
        const int kx_lo = ddnn_imax(0, -ix0), kx_hi = ddnn_imin(k, sh->in_w - ix0);
        for (c0 = 0; c0 < oc; c0 += DDNN_OC_BLOCK) {
            const int n = ddnn_imin(DDNN_OC_BLOCK, oc - c0);
            int32_t *dst = row + (size_t)ox * oc + c0;
            if (ky_lo == 0 && ky_hi == k && kx_lo == 0 && kx_hi == k)
                ddnn_bconv_pixel(layer, input, iy0, ix0, 0, k, 0, k, c0, n, dst);
            else
                ddnn_bconv_pixel(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, c0, n, dst);
        }
    }
}

/* input: packed (in_h, in_w, in_words); out: packed (out_h, out_w, out_words);
 * scratch: DDNN_POOL_SCRATCH(pool_k, conv_w, out_c) int32. */
DDNN_INLINE void ddnn_bconv(const ddnn_bconv_layer *layer, const ddnn_word *input, ddnn_word *out, int32_t *scratch)
{
    const ddnn_conv_shape *sh = &layer->shape;
    int oy, lo, hi, next = 0;
    for (oy = 0; oy < sh->out_h; ++oy) {
        ddnn_pool_window(sh, oy, &lo, &hi);
        for (next = ddnn_imax(next, lo); next < hi; ++next)
            ddnn_bconv_row(layer, input, next, ddnn_pool_ring_row(sh, scratch, next));
        ddnn_pool_emit(sh, scratch, lo, hi, out + (size_t)oy * sh->out_w * sh->out_words);
    }
}

#endif
