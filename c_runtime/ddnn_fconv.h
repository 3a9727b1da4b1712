/* FConv: the first layer, a +-1-weight convolution on the raw uint8 input, integer sums.
 *
 * S = sum over in-bounds taps of w * x with x the raw pixel (0..255) and w = +-1; zero padding
 * is a skipped tap. |S| <= 255 * taps * in_c. When that bound fits in int16 (taps * in_c <= 128,
 * e.g. 3x3 on RGB; DDNN_FCONV_NARROW) the sums run in int16 lanes, twice as many per vector
 * instruction, and are widened once per pixel; otherwise in int32. Both are exact, so the choice
 * only changes speed. The narrow path reads int16 weights that each call first widens from the
 * int8 array into a small RAM buffer (k*k*in_c*out_c values), so the hot loop does no
 * per-tap sign extension; on AVX-512 VNNI (DDNN_FCONV_VNNI, below) the same buffer holds the
 * dot-product layout instead.
 *
 * Loop order: per output pixel and block of <= 64 output channels, the block's accumulators
 * stay in registers while every tap broadcasts one pixel byte against the tap's contiguous
 * weights of the block (weights (KH, KW, IC, OC), the innermost loop over output channels).
 * Interior pixels take a copy of the loop with constant tap bounds (no per-tap checks), border
 * pixels one with the clipped bounds. Header-only, instantiated per layer (DDNN_INLINE). */
#ifndef DDNN_FCONV_H
#define DDNN_FCONV_H

#include "ddnn_pool.h"
#include "ddnn_popcount.h"
#include "ddnn_types.h"

/* AVX-512 VNNI (VPDPBUSD: 4 uint8 pixels x 4 int8 weights summed into each of 16 int32 lanes) where
 * the build has it and does not force the scalar paths. */
#if !defined(DDNN_FORCE_SCALAR) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define DDNN_FCONV_VNNI 1
#endif

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

#if defined(DDNN_FCONV_VNNI)
/* The VNNI path walks a pixel's taps as kernel rows of k * in_c bytes (channel-last makes a row's taps
 * contiguous), cut into DDNN_FCONV_QUADS(k, in_c) groups of 4 (the last one padded with zero weights).
 * Its weights are [ky][group][OC][4] int8, rebuilt each call into the narrow path's RAM copy, which is
 * never smaller: k * 4 * ceil(k * in_c / 4) bytes <= 2 * k * k * in_c when k * in_c >= 2 (the
 * int16 path keeps 1x1 on one channel). A border pixel's rows are copied into a zero-padded patch
 * first: a clipped tap reads as 0, which is what a skipped tap adds. */
#define DDNN_FCONV_QUADS(ksize, in_c) (((ksize) * (in_c) + 3) / 4)
#define DDNN_FCONV_PATCH_BYTES 128 /* >= 4 * DDNN_FCONV_QUADS when narrow: k * in_c <= 128 */
#define DDNN_FCONV_USE_VNNI(ksize, in_c) (DDNN_FCONV_NARROW(ksize, in_c) && (ksize) * (in_c) >= 2)

DDNN_INLINE void ddnn_fconv_vnni_weights(const ddnn_fconv_layer *layer)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int k = sh->ksize, row = k * sh->in_c, quads = DDNN_FCONV_QUADS(k, sh->in_c), oc = sh->out_c;
    int8_t *dst = (int8_t *)(void *)layer->weights16;
    int ky, t, c;
    for (ky = 0; ky < k; ++ky)
        for (t = 0; t < 4 * quads; ++t) /* byte t of the row: tap kx = t / in_c, channel t % in_c */
            for (c = 0; c < oc; ++c)
                dst[(((size_t)ky * quads + t / 4) * oc + c) * 4 + t % 4] =
                    t < row ? layer->weights[((size_t)ky * row + t) * oc + c] : 0;
}

/* Sums of output channels [c0, c0 + n) at one pixel whose kernel row ky starts at rows + ky * stride,
 * over rows [ky_lo, ky_hi); each row is read as DDNN_FCONV_QUADS 4-byte groups. */
DDNN_INLINE void ddnn_fconv_pixel_vnni(const ddnn_fconv_layer *layer, const uint8_t *rows, size_t stride,
                                       int ky_lo, int ky_hi, int c0, int n, int32_t *restrict dst)
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int quads = DDNN_FCONV_QUADS(sh->ksize, sh->in_c), oc = sh->out_c;
    const int vecs = (n + 15) / 16, last = n - (vecs - 1) * 16;
    const __mmask16 last_lanes = last == 16 ? (__mmask16)0xffff : (__mmask16)((1u << last) - 1u);
    const int8_t *w = (const int8_t *)(const void *)layer->weights16;
    __m512i acc[DDNN_OC_BLOCK / 16];
    int ky, q, v;
    for (v = 0; v < vecs; ++v)
        acc[v] = _mm512_setzero_si512();
    for (ky = ky_lo; ky < ky_hi; ++ky) {
        for (q = 0; q < quads; ++q) {
            int32_t pixels;
            __m512i a;
            memcpy(&pixels, rows + ky * stride + 4 * q, sizeof pixels);
            a = _mm512_set1_epi32(pixels);
            for (v = 0; v < vecs; ++v) {
                const int8_t *w_v = w + (((size_t)ky * quads + q) * oc + c0 + 16 * v) * 4;
                acc[v] = _mm512_dpbusd_epi32(acc[v], a,
                                             _mm512_maskz_loadu_epi32(v + 1 < vecs ? (__mmask16)0xffff : last_lanes, w_v));
            }
        }
    }
    for (v = 0; v < vecs; ++v)
        _mm512_mask_storeu_epi32(dst + 16 * v, v + 1 < vecs ? (__mmask16)0xffff : last_lanes, acc[v]);
}

/* Convolution output row cy on the VNNI path. An interior pixel reads its rows from the input, the
 * bytes past a row's k * in_c meeting zero weights, unless the last group of its last row would read
 * past the image; that pixel and the border pixels (clipped taps) read a zero-padded patch. */
DDNN_INLINE void ddnn_fconv_row_vnni(const ddnn_fconv_layer *layer, const uint8_t *input, int cy, int32_t *row,
                                     uint8_t patch[][DDNN_FCONV_PATCH_BYTES])
{
    const ddnn_conv_shape *sh = &layer->shape;
    const int k = sh->ksize, s = sh->stride, p = sh->pad, oc = sh->out_c, in_c = sh->in_c;
    const size_t line = (size_t)sh->in_w * in_c, image = line * sh->in_h;
    const int iy0 = cy * s - p;
    const int ky_lo = ddnn_imax(0, -iy0), ky_hi = ddnn_imin(k, sh->in_h - iy0);
    int ox, c0, ky;
    for (ox = 0; ox < sh->conv_w; ++ox) {
        const int ix0 = ox * s - p;
        const int kx_lo = ddnn_imax(0, -ix0), kx_hi = ddnn_imin(k, sh->in_w - ix0);
        const size_t start = (size_t)iy0 * line + (size_t)ix0 * in_c; /* row 0's first byte (interior) */
        const int direct = ky_lo == 0 && ky_hi == k && kx_lo == 0 && kx_hi == k
                           && start + (size_t)(k - 1) * line + 4 * DDNN_FCONV_QUADS(k, in_c) <= image;
        if (!direct) {
            for (ky = ky_lo; ky < ky_hi; ++ky) {
                const uint8_t *src = input + (size_t)(iy0 + ky) * line + (size_t)ix0 * in_c;
                memset(patch[ky], 0, sizeof patch[ky]);
                memcpy(patch[ky] + kx_lo * in_c, src + kx_lo * in_c, (size_t)(kx_hi - kx_lo) * in_c);
            }
        }
        for (c0 = 0; c0 < oc; c0 += DDNN_OC_BLOCK) {
            const int n = ddnn_imin(DDNN_OC_BLOCK, oc - c0);
            int32_t *dst = row + (size_t)ox * oc + c0;
            if (direct)
                ddnn_fconv_pixel_vnni(layer, input + start, line, 0, k, c0, n, dst);
            else
                ddnn_fconv_pixel_vnni(layer, patch[0], DDNN_FCONV_PATCH_BYTES, ky_lo, ky_hi, c0, n, dst);
        }
    }
}
#endif

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
#if defined(DDNN_FCONV_VNNI)
    if (DDNN_FCONV_USE_VNNI(sh->ksize, sh->in_c)) {
        uint8_t patch[DDNN_MAX_KSIZE][DDNN_FCONV_PATCH_BYTES];
        ddnn_fconv_vnni_weights(layer);
        for (oy = 0; oy < sh->out_h; ++oy) {
            ddnn_pool_window(sh, oy, &lo, &hi);
            for (next = ddnn_imax(next, lo); next < hi; ++next)
                ddnn_fconv_row_vnni(layer, input, next, ddnn_pool_ring_row(sh, scratch, next), patch);
            ddnn_pool_emit(sh, scratch, lo, hi, out + (size_t)oy * sh->out_w * sh->out_words);
        }
        return;
    }
#endif
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
