/* The popcount paths' kernels against ddnn_popcount() word by word, on data the real-data tests rarely
 * produce: every bit mismatching (the 8-bit counters of AVX2 and NEON take 8 per byte and step, so a
 * pixel of more than 31 steps overflows them unless they widen in time) and random words, over odd
 * channel counts. Built and run by tests/test_c_simd.py once per path; prints "simd=PATH checks=N" and
 * exits 0, or prints the first difference and exits 1. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ddnn_bconv.h"
#include "ddnn_popcount.h"

#define MAX_WORDS 4096

static ddnn_word a_buf[MAX_WORDS], w_buf[MAX_WORDS];
static ddnn_word input[8 * 8 * 4], weights[5 * 5 * 4 * 130], out[8 * 8 * 3];
static int32_t sums[8 * 130], scratch[DDNN_POOL_SCRATCH(1, 8, 130)], threshold[130];
static uint8_t flip[130];
static uint64_t state = 88172645463325252ull;
static long checks;

static ddnn_word next_word(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

/* Word w of a channel vector of c channels: random or all ones, zero past channel c. */
static ddnn_word word_of(int c, int w, int all_ones)
{
    const int valid = c - 64 * w;
    const ddnn_word mask = valid >= 64 ? ~(ddnn_word)0 : (((ddnn_word)1 << valid) - 1);
    return (all_ones ? ~(ddnn_word)0 : next_word()) & mask;
}

static int check_mismatches(void)
{
    int n, i, all_ones;
    for (all_ones = 0; all_ones < 2; ++all_ones) {
        for (n = 1; n <= 300; ++n) {
            int32_t want = 0, got;
            for (i = 0; i < n; ++i) {
                a_buf[i] = all_ones ? ~(ddnn_word)0 : next_word();
                w_buf[i] = all_ones ? 0 : next_word();
                want += ddnn_popcount(a_buf[i] ^ w_buf[i]);
            }
            got = ddnn_mismatches(a_buf, w_buf, n);
            ++checks;
            if (got != want) {
                printf("ddnn_mismatches n=%d all_ones=%d: %d, want %d\n", n, all_ones, (int)got, (int)want);
                return 1;
            }
        }
    }
    return 0;
}

/* One BConv on an 8x8 input, no pool: every row's sums (ddnn_bconv_row) and the output bits (ddnn_bconv,
 * which on AVX-512 thresholds straight from the counters) against a scalar sum per channel and pixel. */
static int check_bconv(int in_c, int out_c, int k, int stride, int all_ones)
{
    const int in_words = (in_c + 63) / 64, out_words = (out_c + 63) / 64, pad = k / 2;
    const int conv = (8 + 2 * pad - k) / stride + 1;
    ddnn_bconv_layer layer;
    int i, y, x, c, ky, kx, j;
    for (i = 0; i < 8 * 8 * in_words; ++i)
        input[i] = word_of(in_c, i % in_words, all_ones);
    for (i = 0; i < k * k * in_words * out_c; ++i) /* (KH, KW, in_words, OC) */
        weights[i] = all_ones ? 0 : word_of(in_c, (i / out_c) % in_words, 0);
    for (c = 0; c < out_c; ++c) {
        threshold[c] = (int32_t)(next_word() % (2 * k * k * in_c + 1)) - k * k * in_c;
        flip[c] = (uint8_t)(next_word() & 1);
    }
    memset(&layer, 0, sizeof layer);
    layer.shape.name = "check";
    layer.shape.in_h = layer.shape.in_w = 8;
    layer.shape.in_c = in_c;
    layer.shape.in_words = in_words;
    layer.shape.out_c = out_c;
    layer.shape.out_words = out_words;
    layer.shape.ksize = k;
    layer.shape.stride = stride;
    layer.shape.pad = pad;
    layer.shape.conv_h = layer.shape.conv_w = layer.shape.out_h = layer.shape.out_w = conv;
    layer.shape.pool_k = layer.shape.pool_s = 1;
    layer.shape.threshold = threshold;
    layer.shape.flip = flip;
    layer.weights = weights;
    ddnn_bconv(&layer, input, out, scratch);
    for (y = 0; y < conv; ++y) {
        ddnn_bconv_row(&layer, input, y, sums, NULL);
        for (x = 0; x < conv; ++x) {
            for (c = 0; c < out_c; ++c) {
                int32_t want = 0;
                int bit;
                for (ky = 0; ky < k; ++ky) {
                    for (kx = 0; kx < k; ++kx) {
                        const int iy = y * stride - pad + ky, ix = x * stride - pad + kx;
                        if (iy < 0 || iy >= 8 || ix < 0 || ix >= 8)
                            continue;
                        want += in_c;
                        for (j = 0; j < in_words; ++j)
                            want -= 2 * ddnn_popcount(input[(iy * 8 + ix) * in_words + j]
                                                      ^ weights[((ky * k + kx) * in_words + j) * out_c + c]);
                    }
                }
                bit = (int)((out[(y * conv + x) * out_words + c / 64] >> (c % 64)) & 1);
                checks += 2;
                if (sums[x * out_c + c] != want || bit != ((want >= threshold[c]) != (flip[c] != 0))) {
                    printf("bconv in_c=%d out_c=%d k=%d stride=%d all_ones=%d pixel (%d,%d) channel %d: sum %d "
                           "bit %d, want %d\n", in_c, out_c, k, stride, all_ones, y, x, c, (int)sums[x * out_c + c],
                           bit, (int)want);
                    return 1;
                }
            }
        }
    }
    return 0;
}

int main(void)
{
    static const int channels[] = {1, 31, 32, 33, 63, 64, 65, 127, 128, 130};
    static const int in_channels[] = {1, 33, 64, 127, 200, 256};
    int a, b, k, all_ones;
    if (check_mismatches())
        return 1;
    for (all_ones = 0; all_ones < 2; ++all_ones)
        for (a = 0; a < (int)(sizeof in_channels / sizeof in_channels[0]); ++a)
            for (b = 0; b < (int)(sizeof channels / sizeof channels[0]); ++b)
                for (k = 1; k <= 5; k += 2)
                    if (check_bconv(in_channels[a], channels[b], k, 1 + (b % 2), all_ones))
                        return 1;
    printf("simd=%s checks=%ld\n", DDNN_SIMD_PATH, checks);
    return 0;
}
