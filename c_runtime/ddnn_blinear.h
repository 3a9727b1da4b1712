/* BLinear: binary fully-connected layer over the packed (H, W, words) input, BN+sign folded. */
#ifndef DDNN_BLINEAR_H
#define DDNN_BLINEAR_H

#include "ddnn_types.h"

typedef struct {
    const char *name;
    int in_words;                /* H * W * words_for(C) of the input */
    int32_t n_valid;             /* H * W * C */
    int out_c, out_words;
    const ddnn_word *weights;    /* packed (OUT, H, W, words), padding bits zero */
    const int32_t *threshold;    /* (out_c,) */
    const uint8_t *flip;         /* (out_c,) */
} ddnn_blinear_layer;

/* S_o = n_valid - 2 * popcount(x ^ w_o), the +-1 dot product of the input with row o. */
int32_t ddnn_binary_dot(const ddnn_word *input, const ddnn_word *row, int n_words, int32_t n_valid);

void ddnn_blinear(const ddnn_blinear_layer *layer, const ddnn_word *input, ddnn_word *out);

#endif
