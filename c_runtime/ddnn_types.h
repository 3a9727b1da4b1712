/* ddnngen C runtime: the one place the bit layout is defined (mirrored in ddnn_gen/fold/program.py).
 *
 * Activations are channel-last (H, W, C). Channels are packed into 64-bit words: bit i of
 * word w holds channel 64*w + i; bit 1 means +1, bit 0 means -1; unused high bits of the last
 * word are zero in activations and in weights, so XOR over them counts no mismatch.
 * A binary dot product over n valid values is therefore  n - 2 * popcount(a ^ w).
 */
#ifndef DDNN_TYPES_H
#define DDNN_TYPES_H

#include <stddef.h>
#include <stdint.h>

typedef uint64_t ddnn_word;
#define DDNN_WORD_BITS 64

/* The convolution kernels are static inline functions instantiated once per layer by the
 * generated <name>_model.c with a pointer to the layer's static const description, so the
 * compiler sees every shape as a constant: loops over output channels and taps get fixed trip
 * counts and unroll/vectorise. Forcing the inlining keeps that true at -O2 and -Os too. */
#if defined(__GNUC__) || defined(__clang__)
#define DDNN_INLINE static inline __attribute__((always_inline))
#else
#define DDNN_INLINE static inline
#endif

/* Output channels are computed in blocks of one output word, so each block's accumulators
 * are a fixed-size local array the compiler keeps in (vector) registers. */
#define DDNN_OC_BLOCK DDNN_WORD_BITS

/* Largest kernel side the convolution kernels keep per-tap tables for; the compiler rejects more. */
#define DDNN_MAX_KSIZE 11

/* Geometry and folded BN+sign of one convolution layer (FConv or BConv), with its optional
 * max-pool (a layer without pool is pool 1/1/0). Output bit of channel c:
 *     bit = (S >= threshold[c]) != flip[c]
 * where S is the integer pre-activation after pooling. */
typedef struct {
    const char *name;
    int in_h, in_w, in_c, in_words;
    int out_c, out_words;
    int ksize, stride, pad;
    int conv_h, conv_w;          /* convolution output, before pooling */
    int pool_k, pool_s, pool_p;
    int out_h, out_w;            /* after pooling */
    const int32_t *threshold;    /* (out_c,) */
    const uint8_t *flip;         /* (out_c,) 1 where BN gamma < 0 */
} ddnn_conv_shape;

#endif
