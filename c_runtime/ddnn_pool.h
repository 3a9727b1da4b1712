/* Convolution -> max-pool -> folded BN+sign -> packed bits, computing every convolution
 * output exactly once (no recomputation under overlapping pool windows). */
#ifndef DDNN_POOL_H
#define DDNN_POOL_H

#include "ddnn_types.h"

/* Computes convolution output row `conv_row` of `layer`: conv_w * out_c int32, either
 * channel-last (row[x * out_c + c], DDNN_ROW_HWC) or planar (row[c * conv_w + x], DDNN_ROW_PLANAR),
 * whichever lets the layer's inner loop vectorise. */
typedef void (*ddnn_conv_row_fn)(const void *layer, const void *input, int conv_row, int32_t *row);

/* int32 scratch a layer needs: pool_k ring rows plus one row for the vertical max. */
#define DDNN_POOL_SCRATCH(pool_k, conv_w, out_c) (((pool_k) + 1) * (conv_w) * (out_c))

typedef enum { DDNN_ROW_HWC = 0, DDNN_ROW_PLANAR = 1 } ddnn_row_layout;

void ddnn_conv_pool_threshold(const ddnn_conv_shape *shape, const void *layer, const void *input,
                              ddnn_conv_row_fn row_fn, ddnn_row_layout layout, ddnn_word *out, int32_t *scratch);

#endif
