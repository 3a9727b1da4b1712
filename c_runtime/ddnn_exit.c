/* The arithmetic mirrors ddnn_gen.reference.normalized_entropy operation by operation (same
 * order of sums, exp/log from the C library), so host builds agree bit for bit. Build with
 * -ffp-contract=off: a fused multiply-add would round differently from the reference. */
#include "ddnn_exit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ddnn_blinear.h"

double ddnn_normalized_entropy(const double *logits, int n_classes)
{
    double peak, total = 0.0, log_total, entropy = 0.0;
    int k;
    for (k = 0; k < n_classes; ++k)
        if (!isfinite(logits[k]))
            return NAN;
    peak = logits[0];
    for (k = 1; k < n_classes; ++k)
        peak = logits[k] > peak ? logits[k] : peak;
    for (k = 0; k < n_classes; ++k)
        total += exp(logits[k] - peak);
    log_total = log(total);
    /* exp() is recomputed rather than stored: it is deterministic and saves a K-sized buffer. */
    for (k = 0; k < n_classes; ++k)
        entropy -= (exp(logits[k] - peak) / total) * ((logits[k] - peak) - log_total);
    return entropy / log((double)n_classes);
}

int32_t ddnn_argmax(const double *logits, int n_classes)
{
    int32_t best = 0;
    int k;
    if (isnan(logits[0]))
        return 0;
    for (k = 1; k < n_classes; ++k) {
        if (isnan(logits[k]))
            return k;
        if (logits[k] > logits[best])
            best = k;
    }
    return best;
}

int ddnn_exit_decision(double entropy, double threshold)
{
    return isfinite(entropy) && entropy <= threshold;
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static size_t digits(const char *text, size_t at, size_t end)
{
    size_t i = at;
    while (i < end && text[i] >= '0' && text[i] <= '9')
        ++i;
    return i - at;
}

int ddnn_threshold_parse(const char *text, size_t len, double *value)
{
    char number[DDNN_THRESHOLD_TEXT_MAX + 1];
    char *stop;
    size_t start = 0, end = len, i, whole, fraction = 0;
    double parsed;
    while (start < end && is_blank(text[start]))
        ++start;
    while (end > start && is_blank(text[end - 1]))
        --end;
    i = start;
    whole = digits(text, i, end);
    i += whole;
    if (i < end && text[i] == '.') {
        ++i;
        fraction = digits(text, i, end);
        i += fraction;
    }
    if (whole + fraction == 0)
        return 0;
    if (i < end && (text[i] == 'e' || text[i] == 'E')) {
        size_t exponent;
        ++i;
        if (i < end && (text[i] == '+' || text[i] == '-'))
            ++i;
        exponent = digits(text, i, end);
        if (exponent == 0)
            return 0;
        i += exponent;
    }
    if (i != end || end - start > DDNN_THRESHOLD_TEXT_MAX)
        return 0;
    memcpy(number, text + start, end - start);
    number[end - start] = '\0';
    parsed = strtod(number, &stop); /* the grammar is a subset of strtod's in the C locale */
    if (*stop != '\0' || !(parsed >= 0.0 && parsed <= 1.0))
        return 0;
    *value = parsed;
    return 1;
}

int32_t ddnn_exit(const ddnn_exit_layer *layer, const ddnn_word *input, double threshold, double *logits,
                  double *entropy, int *exit_local)
{
    int k;
    for (k = 0; k < layer->n_classes; ++k) {
        const int32_t s = ddnn_binary_dot(input, layer->weights + (size_t)k * layer->in_words, layer->in_words,
                                          layer->n_valid);
        logits[k] = layer->scale[k] * (double)s + layer->offset[k];
    }
    *entropy = ddnn_normalized_entropy(logits, layer->n_classes);
    *exit_local = ddnn_exit_decision(*entropy, threshold);
    return ddnn_argmax(logits, layer->n_classes);
}
