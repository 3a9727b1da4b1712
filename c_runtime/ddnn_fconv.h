/* FConv: the first layer, a +-1-weight convolution on the raw uint8 input, integer sums. */
#ifndef DDNN_FCONV_H
#define DDNN_FCONV_H

#include "ddnn_types.h"

typedef struct {
    ddnn_conv_shape shape;
    /* +-1 as int8 in (KH, KW, IC, OC) order, so the innermost loop runs over output
     * channels and vectorises. */
    const int8_t *weights;
} ddnn_fconv_layer;

/* input: uint8 (in_h, in_w, in_c); out: packed (out_h, out_w, out_words);
 * scratch: DDNN_POOL_SCRATCH(pool_k, conv_w, out_c) int32. */
void ddnn_fconv(const ddnn_fconv_layer *layer, const uint8_t *input, ddnn_word *out, int32_t *scratch);

#endif
