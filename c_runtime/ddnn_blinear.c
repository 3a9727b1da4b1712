#include "ddnn_blinear.h"

#include "ddnn_popcount.h"

int32_t ddnn_binary_dot(const ddnn_word *input, const ddnn_word *row, int n_words, int32_t n_valid)
{
    return n_valid - 2 * ddnn_mismatches(input, row, n_words);
}

void ddnn_blinear(const ddnn_blinear_layer *layer, const ddnn_word *input, ddnn_word *out)
{
    int o, w;
    for (w = 0; w < layer->out_words; ++w)
        out[w] = 0;
    for (o = 0; o < layer->out_c; ++o) {
        const int32_t s = ddnn_binary_dot(input, layer->weights + (size_t)o * layer->in_words, layer->in_words,
                                          layer->n_valid);
        if ((s >= layer->threshold[o]) != (layer->flip[o] != 0))
            out[o / DDNN_WORD_BITS] |= (ddnn_word)1 << (o % DDNN_WORD_BITS);
    }
}
