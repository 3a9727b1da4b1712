/* Local exit: binary linear -> logits in double -> normalized entropy -> exit decision. */
#ifndef DDNN_EXIT_H
#define DDNN_EXIT_H

#include "ddnn_types.h"

typedef struct {
    const char *name;
    int in_words;
    int32_t n_valid;
    int n_classes;
    const ddnn_word *weights;  /* packed (K, H, W, words) */
    const double *scale;       /* logits[k] = scale[k] * S_k + offset[k] */
    const double *offset;
} ddnn_exit_layer;

/* Entropy of softmax(logits) divided by log(K), via log-sum-exp; NaN if any logit is not finite. */
double ddnn_normalized_entropy(const double *logits, int n_classes);

/* exp and log from IEEE +, -, *, / and bit manipulation only (fdlibm's algorithms, < 1 ulp): the same
 * bits on every target and in the NumPy reference (ddnn_gen.fold.reference.exp_ieee, log_ieee). */
double ddnn_exp(double x);
double ddnn_log(double x);

/* Index of the largest logit, ties to the lowest index; a NaN counts as largest (as numpy.argmax). */
int32_t ddnn_argmax(const double *logits, int n_classes);

/* Answer locally iff the entropy is finite and <= threshold. */
int ddnn_exit_decision(double entropy, double threshold);

/* Longest threshold text (digits, point, exponent) ddnn_threshold_parse reads. */
#define DDNN_THRESHOLD_TEXT_MAX 63

/* Reads a threshold from `len` bytes of text (not NUL-terminated; a NUL inside is invalid): a plain
 * decimal with optional exponent and surrounding blanks, a value in [0, 1]. The same grammar and range
 * as ddnn_gen/model/spec.py (parse_threshold_text). Returns 1 and sets *value, or 0 leaving it untouched. */
int ddnn_threshold_parse(const char *text, size_t len, double *value);

/* Fills logits (n_classes doubles), returns the class; *entropy and *exit_local set. */
int32_t ddnn_exit(const ddnn_exit_layer *layer, const ddnn_word *input, double threshold, double *logits,
                  double *entropy, int *exit_local);

/* The exit's integer sums S_k (n_classes int32): the binary dot products of the split with each class's
 * weights, before the affine map to logits. */
void ddnn_exit_sums(const ddnn_exit_layer *layer, const ddnn_word *input, int32_t *sums);

/* ddnn_exit from the exit's integer sums S_k (n_classes) computed elsewhere (the OpenCL exit kernel). */
int32_t ddnn_exit_from_sums(const ddnn_exit_layer *layer, const int32_t *sums, double threshold, double *logits,
                            double *entropy, int *exit_local);

#endif
