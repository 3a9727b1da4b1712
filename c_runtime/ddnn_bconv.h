/* BConv: binary convolution on packed activations, XOR + popcount. */
#ifndef DDNN_BCONV_H
#define DDNN_BCONV_H

#include "ddnn_types.h"

typedef struct {
    ddnn_conv_shape shape;
    const ddnn_word *weights; /* packed (OC, KH, KW, in_words) */
} ddnn_bconv_layer;

/* input: packed (in_h, in_w, in_words); out: packed (out_h, out_w, out_words);
 * scratch: DDNN_POOL_SCRATCH(pool_k, conv_w, out_c) int32. */
void ddnn_bconv(const ddnn_bconv_layer *layer, const ddnn_word *input, ddnn_word *out, int32_t *scratch);

#endif
