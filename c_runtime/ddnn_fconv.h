/* FConv: the first layer, a +-1-weight convolution on the raw uint8 input, integer sums.
 *
 * S = sum over in-bounds taps of w * x with x the raw pixel (0..255) and w = +-1; zero padding
 * is a skipped tap. |S| <= 255 * taps * in_c. When that bound fits in int16 (taps * in_c <= 128,
 * e.g. 3x3 on RGB; DDNN_FCONV_NARROW) the sums run in int16 lanes, twice as many per vector
 * instruction, and are widened once per pixel; otherwise in int32. Both are exact, so the choice
 * only changes speed. The narrow path reads int16 weights that each call first widens from the
 * int8 array into a small RAM buffer (k*k*in_c*out_c values), so the hot loop does no
 * per-tap sign extension.
 *
 * Loop order: per output pixel and block of <= 64 output channels, the block's accumulators
 * stay in registers while every tap broadcasts one pixel byte against the tap's contiguous
 * weights of the block (weights (KH, KW, IC, OC), the innermost loop over output channels).
 * Interior pixels take a copy of the loop with constant tap bounds (no per-tap checks), border
 * pixels one with the clipped bounds. Header-only, instantiated per layer (DDNN_INLINE). */
#ifndef DDNN_FCONV_H
#define DDNN_FCONV_H

#include "ddnn_pool.h"
#include "ddnn_types.h"

typedef struct {
    ddnn_conv_shape shape;
    /* +-1 as int8 in (KH, KW, IC, OC) order (the OpenCL FConv kernel reads the same array). */
    const int8_t *weights;
    int16_t *weights16;       /* RAM copy for the narrow path (NULL when not narrow) */
} ddnn_fconv_layer;

/* Whether |S| <= 255 * k * k * in_c fits in int16; the compiler sizes weights16 by the same rule. */
#define DDNN_FCONV_NARROW(ksize, in_c) (255 * (ksize) * (ksize) * (in_c) <= 32767)

/* Sums of output channels [c0, c0 + n) at one pixel over taps [ky_lo, ky_hi) x [kx_lo, kx_hi). */
DDNN_INLINE void ddnn_fconv_pixel16(const ddnn_fconv_layer *layer, const uint8_t *input, int iy0, int ix0,
                                    int ky_lo, int ky_hi, int kx_lo, int kx_hi, int c0, int n,
                                    int32_t *restrict dst)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int in_c = sh->in_c, oc = sh->out_c, k = sh->ksize;
    int16_t acc[DDNN_OC_BLOCK];
    int ky, kx, ic, c;
    for (c = 0; c < n; ++c)
        acc[c] = 0;
    for (ky = ky_lo; ky < ky_hi; ++ky) {
        for (kx = kx_lo; kx < kx_hi; ++kx) {
            const uint8_t *px = input + ((size_t)(iy0 + ky) * sh->in_w + (ix0 + kx)) * in_c;
            const int16_t *w = layer->weights16 + (size_t)(ky * k + kx) * in_c * oc + c0;
            for (ic = 0; ic < in_c; ++ic) {
                const int16_t x = px[ic];
                const int16_t *restrict w_ic = w + (size_t)ic * oc;
                for (c = 0; c < n; ++c)
                    acc[c] = (int16_t)(acc[c] + w_ic[c] * x);
            }
        }
    }
    for (c = 0; c < n; ++c)
        dst[c] = acc[c];
}

DDNN_INLINE void ddnn_fconv_pixel32(const ddnn_fconv_layer *layer, const uint8_t *input, int iy0, int ix0,
                                    int ky_lo, int ky_hi, int kx_lo, int kx_hi, int c0, int n,
                                    int32_t *restrict dst)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int in_c = sh->in_c, oc = sh->out_c, k = sh->ksize;
    int32_t acc[DDNN_OC_BLOCK];
    int ky, kx, ic, c;
    for (c = 0; c < n; ++c)
        acc[c] = 0;
    for (ky = ky_lo; ky < ky_hi; ++ky) {
        for (kx = kx_lo; kx < kx_hi; ++kx) {
            const uint8_t *px = input + ((size_t)(iy0 + ky) * sh->in_w + (ix0 + kx)) * in_c;
            const int8_t *w = layer->weights + (size_t)(ky * k + kx) * in_c * oc + c0;
            for (ic = 0; ic < in_c; ++ic) {
                const int32_t x = px[ic];
                const int8_t *restrict w_ic = w + (size_t)ic * oc;
                for (c = 0; c < n; ++c)
                    acc[c] += w_ic[c] * x;
            }
        }
    }
    for (c = 0; c < n; ++c)
        dst[c] = acc[c];
}

/* Convolution output row cy: conv_w * out_c int32, channel-last. */
DDNN_INLINE void ddnn_fconv_row(const ddnn_fconv_layer *layer, const uint8_t *input, int cy, int32_t *row)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int k = sh->ksize, s = sh->stride, p = sh->pad, oc = sh->out_c;
    const int narrow = DDNN_FCONV_NARROW(k, sh->in_c);
    const int iy0 = cy * s - p;
    const int ky_lo = ddnn_imax(0, -iy0), ky_hi = ddnn_imin(k, sh->in_h - iy0);
    int ox, c0;
    for (ox = 0; ox < sh->conv_w; ++ox) {
        const int ix0 = ox * s - p;
        const int kx_lo = ddnn_imax(0, -ix0), kx_hi = ddnn_imin(k, sh->in_w - ix0);
        const int interior = ky_lo == 0 && ky_hi == k && kx_lo == 0 && kx_hi == k;
        for (c0 = 0; c0 < oc; c0 += DDNN_OC_BLOCK) {
            const int n = ddnn_imin(DDNN_OC_BLOCK, oc - c0);
            int32_t *dst = row + (size_t)ox * oc + c0;
            if (narrow && interior)
                ddnn_fconv_pixel16(layer, input, iy0, ix0, 0, k, 0, k, c0, n, dst);
            else if (narrow)
                ddnn_fconv_pixel16(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, c0, n, dst);
            else if (interior)
                ddnn_fconv_pixel32(layer, input, iy0, ix0, 0, k, 0, k, c0, n, dst);
            else
                ddnn_fconv_pixel32(layer, input, iy0, ix0, ky_lo, ky_hi, kx_lo, kx_hi, c0, n, dst);
        }
    }
}

/* input: uint8 (in_h, in_w, in_c); out: packed (out_h, out_w, out_words);
 * scratch: DDNN_POOL_SCRATCH(pool_k, conv_w, out_c) int32. */
DDNN_INLINE void ddnn_fconv(const ddnn_fconv_layer *layer, const uint8_t *input, ddnn_word *out, int32_t *scratch)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int narrow = DDNN_FCONV_NARROW(sh->ksize, sh->in_c);
    int oy, lo, hi, next = 0;
    if (narrow) {
        const int n = sh->ksize * sh->ksize * sh->in_c * sh->out_c;
        int i;
        for (i = 0; i < n; ++i)
            layer->weights16[i] = layer->weights[i];
    }
    for (oy = 0; oy < sh->out_h; ++oy) {
        ddnn_pool_window(sh, oy, &lo, &hi);
        for (next = ddnn_imax(next, lo); next < hi; ++next)
            ddnn_fconv_row(layer, input, next, ddnn_pool_ring_row(sh, scratch, next));
        ddnn_pool_emit(sh, scratch, lo, hi, out + (size_t)oy * sh->out_w * sh->out_words);
    }
}

#endif
