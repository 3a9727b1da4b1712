/* S = sum over in-bounds taps of w * x with x the raw pixel (0..255) and w = +-1; zero padding
 * is a skipped tap. |S| <= 255 * taps, checked by the compiler to stay far inside int32. */
#include "ddnn_fconv.h"

#include "ddnn_pool.h"

static void fconv_row(const void *layer_ptr, const void *input_ptr, int oy, int32_t *row)
{
    const ddnn_fconv_layer *layer = (const ddnn_fconv_layer *)layer_ptr;
    const ddnn_conv_shape *sh = &layer->shape;
    const uint8_t *input = (const uint8_t *)input_ptr;
    const int out_c = sh->out_c, in_c = sh->in_c, k = sh->ksize;
    const int iy0 = oy * sh->stride - sh->pad;
    int ox, ky, kx, ic, oc;

    for (ox = 0; ox < sh->conv_w; ++ox) {
        int32_t *restrict acc = row + ox * out_c;
        const int ix0 = ox * sh->stride - sh->pad;
        for (oc = 0; oc < out_c; ++oc)
            acc[oc] = 0;
        for (ky = 0; ky < k; ++ky) {
            const int iy = iy0 + ky;
            if (iy < 0 || iy >= sh->in_h)
                continue;
            for (kx = 0; kx < k; ++kx) {
                const int ix = ix0 + kx;
                const uint8_t *px;
                const int8_t *w;
                if (ix < 0 || ix >= sh->in_w)
                    continue;
                px = input + ((size_t)iy * sh->in_w + ix) * in_c;
                w = layer->weights + (size_t)(ky * k + kx) * in_c * out_c;
                for (ic = 0; ic < in_c; ++ic) {
                    const int32_t x = px[ic];
                    const int8_t *restrict w_ic = w + ic * out_c;
                    for (oc = 0; oc < out_c; ++oc)
                        acc[oc] += w_ic[oc] * x;
                }
            }
        }
    }
}

void ddnn_fconv(const ddnn_fconv_layer *layer, const uint8_t *input, ddnn_word *out, int32_t *scratch)
{
    ddnn_conv_pool_threshold(&layer->shape, layer, input, fconv_row, DDNN_ROW_HWC, out, scratch);
}
