/* S = n_valid_taps * IC - 2 * popcount(a ^ w) summed over in-bounds taps only: a zero-padded
 * tap contributes 0 to a +-1 convolution, so it is skipped rather than matched against. */
#include "ddnn_bconv.h"

#include "ddnn_pool.h"
#include "ddnn_popcount.h"

static void bconv_row(const void *layer_ptr, const void *input_ptr, int oy, int32_t *row)
{
    const ddnn_bconv_layer *layer = (const ddnn_bconv_layer *)layer_ptr;
    const ddnn_conv_shape *sh = &layer->shape;
    const ddnn_word *input = (const ddnn_word *)input_ptr;
    const int out_c = sh->out_c, words = sh->in_words, k = sh->ksize;
    const int filter_words = k * k * words;
    const int iy0 = oy * sh->stride - sh->pad;
    const ddnn_word *tap_in[DDNN_MAX_TAPS];
    int tap_w[DDNN_MAX_TAPS];
    int ox, ky, kx, oc, t;

    for (ox = 0; ox < sh->conv_w; ++ox) {
        const int ix0 = ox * sh->stride - sh->pad;
        int32_t *sums = row + ox * out_c;
        int n_taps = 0;
        int32_t n_valid;
        for (ky = 0; ky < k; ++ky) {
            const int iy = iy0 + ky;
            if (iy < 0 || iy >= sh->in_h)
                continue;
            for (kx = 0; kx < k; ++kx) {
                const int ix = ix0 + kx;
                if (ix < 0 || ix >= sh->in_w)
                    continue;
                tap_in[n_taps] = input + ((size_t)iy * sh->in_w + ix) * words;
                tap_w[n_taps] = (ky * k + kx) * words;
                ++n_taps;
            }
        }
        n_valid = (int32_t)n_taps * sh->in_c;
        if (words == 1) {
            /* The common case (<= 64 input channels): one word per tap, no inner loop. */
            ddnn_word a[DDNN_MAX_TAPS];
            for (t = 0; t < n_taps; ++t)
                a[t] = tap_in[t][0];
            for (oc = 0; oc < out_c; ++oc) {
                const ddnn_word *w = layer->weights + (size_t)oc * filter_words;
                int32_t mism = 0;
                for (t = 0; t < n_taps; ++t)
                    mism += ddnn_popcount(a[t] ^ w[tap_w[t]]);
                sums[oc] = n_valid - 2 * mism;
            }
        } else {
            for (oc = 0; oc < out_c; ++oc) {
                const ddnn_word *w = layer->weights + (size_t)oc * filter_words;
                int32_t mism = 0;
                for (t = 0; t < n_taps; ++t)
                    mism += ddnn_mismatches(tap_in[t], w + tap_w[t], words);
                sums[oc] = n_valid - 2 * mism;
            }
        }
    }
}

void ddnn_bconv(const ddnn_bconv_layer *layer, const ddnn_word *input, ddnn_word *out, int32_t *scratch)
{
    ddnn_conv_pool_threshold(&layer->shape, layer, input, bconv_row, out, scratch);
}
