/* S = n_valid_taps * IC - 2 * popcount(a ^ w) summed over in-bounds taps only: a zero-padded
 * tap contributes 0 to a +-1 convolution, so it is skipped rather than matched against.
 *
 * Loop order: for each output channel and kernel tap, one pass along the output row with the
 * weight word fixed. With stride 1 and <= 64 input channels the input words of consecutive
 * outputs are consecutive, so the pass is a plain a[x] ^ w -> popcount -> add over a row
 * (planar accumulators), which compilers vectorise (AVX-512 VPOPCNTQ, NEON CNT). */
#include "ddnn_bconv.h"

#include "ddnn_pool.h"
#include "ddnn_popcount.h"

static int imax(int a, int b) { return a > b ? a : b; }
static int imin(int a, int b) { return a < b ? a : b; }

/* Mismatch counts of one weight word against a contiguous run of n input words. */
static void accumulate_run(int32_t *restrict acc, const ddnn_word *restrict src, ddnn_word w, int n)
{
    int x;
    for (x = 0; x < n; ++x)
        acc[x] += ddnn_popcount(src[x] ^ w);
}

static void bconv_row(const void *layer_ptr, const void *input_ptr, int oy, int32_t *row)
{
    const ddnn_bconv_layer *layer = (const ddnn_bconv_layer *)layer_ptr;
    const ddnn_conv_shape *sh = &layer->shape;
    const ddnn_word *input = (const ddnn_word *)input_ptr;
    const int k = sh->ksize, s = sh->stride, p = sh->pad, words = sh->in_words, conv_w = sh->conv_w;
    const int iy0 = oy * s - p;
    const int ky_lo = imax(0, -iy0), ky_hi = imin(k, sh->in_h - iy0);
    int oc, ky, kx, i, ox;

    int ox_lo[DDNN_MAX_KSIZE], ox_hi[DDNN_MAX_KSIZE];

    /* Outputs whose tap kx is inside the image, 0 <= ox*s - p + kx < in_w, once per row. */
    for (kx = 0; kx < k; ++kx) {
        const int last = sh->in_w - 1 + p - kx;
        ox_lo[kx] = p - kx > 0 ? (p - kx + s - 1) / s : 0;
        ox_hi[kx] = last < 0 ? 0 : imin(conv_w, last / s + 1);
    }
    for (oc = 0; oc < sh->out_c; ++oc) {
        int32_t *acc = row + (size_t)oc * conv_w;
        const ddnn_word *filter = layer->weights + (size_t)oc * k * k * words;
        for (ox = 0; ox < conv_w; ++ox)
            acc[ox] = 0;
        for (ky = ky_lo; ky < ky_hi; ++ky) {
            const ddnn_word *in_row = input + (size_t)(iy0 + ky) * sh->in_w * words;
            const ddnn_word *w = filter + (size_t)ky * k * words;
            for (kx = 0; kx < k; ++kx, w += words) {
                const int lo = ox_lo[kx], hi = ox_hi[kx];
                if (lo >= hi)
                    continue;
                if (s == 1 && words == 1) {
                    accumulate_run(acc + lo, in_row + (lo + kx - p), w[0], hi - lo);
                } else {
                    for (i = 0; i < words; ++i)
                        for (ox = lo; ox < hi; ++ox)
                            acc[ox] += ddnn_popcount(in_row[(size_t)(ox * s + kx - p) * words + i] ^ w[i]);
                }
            }
        }
        for (ox = 0; ox < conv_w; ++ox) {
            const int ix0 = ox * s - p;
            const int32_t taps = (int32_t)(ky_hi - ky_lo) * (imin(k, sh->in_w - ix0) - imax(0, -ix0));
            acc[ox] = taps * sh->in_c - 2 * acc[ox];
        }
    }
}

void ddnn_bconv(const ddnn_bconv_layer *layer, const ddnn_word *input, ddnn_word *out, int32_t *scratch)
{
    ddnn_conv_pool_threshold(&layer->shape, layer, input, bconv_row, DDNN_ROW_PLANAR, out, scratch);
}
