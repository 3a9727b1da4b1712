/* The arithmetic mirrors ddnn_gen.fold.reference.normalized_entropy operation by operation (same order of
 * sums, the same exp and log), so every target agrees bit for bit with the reference and with each
 * other. exp and log are written here with IEEE double +, -, *, / and exact bit manipulation only: the C
 * library's exp/log differ between platforms in the last bits (glibc on x86-64 vs armhf did on one
 * CIFAR-10 sample in 1000), and a sample whose entropy sits within those ulps of the threshold would
 * exit differently on the device than `ddnngen eval` says. Build with -ffp-contract=off: a fused
 * multiply-add would round differently. */
#include "ddnn_exit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ddnn_blinear.h"

/* fdlibm's constants (e_exp.c, e_log.c): ln 2 split so that k * LN2_HI is exact for |k| < 2^11. */
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#define INV_LN2 1.44269504088896338700e+00
#define EXP_P1 1.66666666666666019037e-01
#define EXP_P2 -2.77777777770155933842e-03
#define EXP_P3 6.61375632143793436117e-05
#define EXP_P4 -1.65339022054652515390e-06
#define EXP_P5 4.13813679705723846039e-08
#define LOG_LG1 6.666666666666735130e-01
#define LOG_LG2 3.999999999940941908e-01
#define LOG_LG3 2.857142874366239149e-01
#define LOG_LG4 2.222219843214978396e-01
#define LOG_LG5 1.818357216161805012e-01
#define LOG_LG6 1.531383769920937332e-01
#define LOG_LG7 1.479819860511658591e-01
#define SQRT2 1.41421356237309504880

static double from_bits(uint64_t bits)
{
    double value;
    memcpy(&value, &bits, sizeof(value));
    return value;
}

static uint64_t to_bits(double value)
{
    uint64_t bits;
    memcpy(&bits, &value, sizeof(bits));
    return bits;
}

/* 2^k for -1022 <= k <= 1023, exactly. */
static double pow2(int k)
{
    return from_bits((uint64_t)(k + 1023) << 52);
}

double ddnn_exp(double x)
{
    double hi, lo, r, t, c, y;
    int k;
    if (x != x)
        return x;
    if (x > 709.782712893383973096)
        return INFINITY;
    if (x < -745.133219101941108420)
        return 0.0;
    /* x = k ln2 + r, |r| <= ln2 / 2; the conversion truncates, so round half away from zero first. */
    k = (int)(x * INV_LN2 + (x < 0.0 ? -0.5 : 0.5));
    hi = x - (double)k * LN2_HI;
    lo = (double)k * LN2_LO;
    r = hi - lo;
    /* exp(r) = 1 + r + r c / (2 - c), c = r - r^2 (P1 + r^2 (P2 + ...)): a Remez fit, error < 2^-59. */
    t = r * r;
    c = r - t * (EXP_P1 + t * (EXP_P2 + t * (EXP_P3 + t * (EXP_P4 + t * EXP_P5))));
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi);
    /* Scale by 2^k in steps whose factors are normal numbers, so only the last product rounds. */
    if (k > 1023)
        return y * pow2(k - 1) * 2.0;
    if (k < -1021)
        return y * pow2(k + 1000) * pow2(-1000);
    return y * pow2(k);
}

double ddnn_log(double x)
{
    double f, s, z, w, t1, t2, r, hfsq, m, dk;
    uint64_t bits;
    int k;
    if (x != x || x < 0.0)
        return NAN;
    if (x == 0.0)
        return -INFINITY;
    if (x == INFINITY)
        return x;
    bits = to_bits(x);
    k = 0;
    if ((bits >> 52) == 0) { /* subnormal: scale into the normal range first (exact) */
        x *= 18014398509481984.0; /* 2^54 */
        bits = to_bits(x);
        k = -54;
    }
    /* x = m 2^k with m in [1, 2), then in [sqrt(2)/2, sqrt(2)); f = m - 1 is exact (Sterbenz). */
    k += (int)(bits >> 52) - 1023;
    m = from_bits((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
    if (m > SQRT2) {
        m = m * 0.5;
        k += 1;
    }
    f = m - 1.0;
    dk = (double)k;
    /* log(1 + f) = 2 atanh(s), s = f / (2 + f), as a polynomial in s^2 (fdlibm's Lg1..Lg7). */
    s = f / (2.0 + f);
    z = s * s;
    w = z * z;
    t1 = w * (LOG_LG2 + w * (LOG_LG4 + w * LOG_LG6));
    t2 = z * (LOG_LG1 + w * (LOG_LG3 + w * (LOG_LG5 + w * LOG_LG7)));
    r = t2 + t1;
    hfsq = 0.5 * f * f;
    return dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f);
}

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
        total += ddnn_exp(logits[k] - peak);
    log_total = ddnn_log(total);
    /* exp is recomputed rather than stored: it is deterministic and saves a K-sized buffer. A term whose
     * exp underflowed to 0 adds nothing (p log p -> 0; it also avoids 0 * -inf on an overflowed gap). */
    for (k = 0; k < n_classes; ++k) {
        const double e = ddnn_exp(logits[k] - peak);
        if (e > 0.0)
            entropy -= (e / total) * ((logits[k] - peak) - log_total);
    }
    return entropy / ddnn_log((double)n_classes);
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

/* logits[k] = scale[k] * S_k + offset[k] in double: the one place the exit's affine map is written. */
static double exit_logit(const ddnn_exit_layer *layer, int k, int32_t sum)
{
    return layer->scale[k] * (double)sum + layer->offset[k];
}

static int32_t exit_answer(const ddnn_exit_layer *layer, const double *logits, double threshold, double *entropy,
                           int *exit_local)
{
    *entropy = ddnn_normalized_entropy(logits, layer->n_classes);
    *exit_local = ddnn_exit_decision(*entropy, threshold);
    return ddnn_argmax(logits, layer->n_classes);
}

int32_t ddnn_exit_from_sums(const ddnn_exit_layer *layer, const int32_t *sums, double threshold, double *logits,
                            double *entropy, int *exit_local)
{
    int k;
    for (k = 0; k < layer->n_classes; ++k)
        logits[k] = exit_logit(layer, k, sums[k]);
    return exit_answer(layer, logits, threshold, entropy, exit_local);
}

static int32_t exit_sum(const ddnn_exit_layer *layer, const ddnn_word *input, int k)
{
    return ddnn_binary_dot(input, layer->weights + (size_t)k * layer->in_words, layer->in_words, layer->n_valid);
}

void ddnn_exit_sums(const ddnn_exit_layer *layer, const ddnn_word *input, int32_t *sums)
{
    int k;
    for (k = 0; k < layer->n_classes; ++k)
        sums[k] = exit_sum(layer, input, k);
}

int32_t ddnn_exit(const ddnn_exit_layer *layer, const ddnn_word *input, double threshold, double *logits,
                  double *entropy, int *exit_local)
{
    int k;
    for (k = 0; k < layer->n_classes; ++k)
        logits[k] = exit_logit(layer, k, exit_sum(layer, input, k));
    return exit_answer(layer, logits, threshold, entropy, exit_local);
}
