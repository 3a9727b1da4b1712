/* Row-streaming max-pool: conv rows land in a ring of pool_k rows, each computed once when the
 * first pool window needs it. Rows no window covers (stride > ksize) are never computed.
 * Pool padding cells are skipped, which is the same as padding with -inf: they never win. */
#include "ddnn_pool.h"

#include <string.h>

static int imax(int a, int b) { return a > b ? a : b; }
static int imin(int a, int b) { return a < b ? a : b; }

static void threshold_pack(const ddnn_conv_shape *shape, const int32_t *vmax, int x_stride, int c_stride, int x_lo,
                           int x_hi, ddnn_word *out_px)
{
    const int out_c = shape->out_c;
    int c, w, x;
    for (w = 0; w < shape->out_words; ++w)
        out_px[w] = 0;
    for (c = 0; c < out_c; ++c) {
        const int32_t *column = vmax + c * c_stride;
        int32_t best = column[x_lo * x_stride];
        for (x = x_lo + 1; x < x_hi; ++x) {
            const int32_t v = column[x * x_stride];
            best = v > best ? v : best;
        }
        if ((best >= shape->threshold[c]) != (shape->flip[c] != 0))
            out_px[c / DDNN_WORD_BITS] |= (ddnn_word)1 << (c % DDNN_WORD_BITS);
    }
}

void ddnn_conv_pool_threshold(const ddnn_conv_shape *shape, const void *layer, const void *input,
                              ddnn_conv_row_fn row_fn, ddnn_row_layout layout, ddnn_word *out, int32_t *scratch)
{
    const int x_stride = layout == DDNN_ROW_PLANAR ? 1 : shape->out_c;
    const int c_stride = layout == DDNN_ROW_PLANAR ? shape->conv_w : 1;
    const int k = shape->pool_k, s = shape->pool_s, p = shape->pool_p;
    const int row_len = shape->conv_w * shape->out_c;
    int32_t *ring = scratch;
    int32_t *vmax_buf = scratch + k * row_len;
    int next_row = 0;
    int oy, ox, r, i;

    for (oy = 0; oy < shape->out_h; ++oy) {
        const int lo = imax(oy * s - p, 0);
        const int hi = imin(oy * s - p + k, shape->conv_h);
        const int32_t *vmax;
        if (next_row < lo)
            next_row = lo;
        for (; next_row < hi; ++next_row)
            row_fn(layer, input, next_row, ring + (next_row % k) * row_len);
        if (hi - lo == 1) {
            vmax = ring + (lo % k) * row_len;
        } else {
            memcpy(vmax_buf, ring + (lo % k) * row_len, (size_t)row_len * sizeof(int32_t));
            for (r = lo + 1; r < hi; ++r) {
                const int32_t *row = ring + (r % k) * row_len;
                for (i = 0; i < row_len; ++i)
                    vmax_buf[i] = row[i] > vmax_buf[i] ? row[i] : vmax_buf[i];
            }
            vmax = vmax_buf;
        }
        for (ox = 0; ox < shape->out_w; ++ox) {
            const int x_lo = imax(ox * s - p, 0);
            const int x_hi = imin(ox * s - p + k, shape->conv_w);
            threshold_pack(shape, vmax, x_stride, c_stride, x_lo, x_hi, out + ((size_t)oy * shape->out_w + ox) * shape->out_words);
        }
    }
}
