/* The interface between a generated model and everything that is not generated: the runners
 * (ddnn_runner*.c), the Python binding (ddnn_gen/device/c_binding.py) and a firmware that links
 * several models.
 *
 * A generated model <name> exports <name>_infer() and <name>_infer_timed() (declared in its
 * <name>_model.h) and one const descriptor, `const ddnn_model <name>_model`, that says everything a
 * model-agnostic caller needs: shapes, classes, default threshold, stage names, the two entry
 * points, and the model's own static I/O buffers, whose sizes the generator fixed. Nothing here
 * allocates. Every model's code and buffers are its own, so models do not share state; one model is
 * not reentrant (its activations are static). */
#ifndef DDNN_MODEL_API_H
#define DDNN_MODEL_API_H

#include <stddef.h>
#include <stdint.h>

/* What one inference returns. logits, split and sums point into the model's static buffers and stay
 * valid until the model's next call. */
typedef struct {
    int32_t class_id;        /* local-exit argmax (Big-Little: the class it names, -1 for "other") */
    double entropy;          /* normalized entropy of the local exit */
    int exit_local;          /* 1 if entropy <= threshold (finite) */
    const double *logits;    /* n_classes */
    const uint64_t *split;   /* split_words packed words, (H, W, words) little-endian */
    const int32_t *sums;     /* n_classes: the exit's integer sums S_k (logits[k] = scale[k] * S_k + offset[k]),
                              * what a scores-first camera sends (docs/views.md) */
} ddnn_result;

typedef void (*ddnn_infer_fn)(const uint8_t *input_hwc, double threshold, ddnn_result *result);
/* Adds each stage's wall time in ns to stage_ns[n_stages]. */
typedef void (*ddnn_infer_timed_fn)(const uint8_t *input_hwc, double threshold, ddnn_result *result,
                                    uint64_t *stage_ns);

typedef struct {
    const char *name;
    const uint8_t *hash;             /* 32 bytes: sha256 content hash; the wire carries the first 16 */
    int input_h, input_w, input_c;
    size_t input_bytes;              /* input_h * input_w * input_c uint8, HWC */
    int split_h, split_w, split_c;
    int split_words;                 /* split_h * split_w * words_for(split_c) */
    int split_layer;                 /* number of device layers: the first server layer */
    int n_classes;
    double default_threshold;
    int n_stages;                    /* device layers + the exit */
    const char *const *stage_names;  /* n_stages */
    const char *const *class_names;  /* n_classes */
    size_t arena_bytes;              /* static RAM of infer: activations + scratch */
    size_t weight_bytes;             /* const weights, thresholds, exit parameters */
    ddnn_infer_fn infer;
    ddnn_infer_timed_fn infer_timed;
    /* The model's I/O buffers for callers that cannot size arrays from the model at compile time
     * (the runners): a sample is read into `input`, a request encoded into `request` (room for the
     * larger of a split request and a raw-input request), stage times summed in `stage_ns`. */
    uint8_t *input;                  /* input_bytes */
    uint8_t *request;                /* request_bytes */
    size_t request_bytes;
    uint64_t *stage_ns;              /* n_stages */
    /* Big-Little (a little net on the device for a few priority classes, a big net on the server reading the
     * raw input): the exit's n_classes outputs are the priority classes + "other", result.class_id is the
     * class a priority output names (-1 for "other"), and exit_local holds only for a priority class. */
    int n_answer_classes;            /* classes a server's answer ranges over (n_classes unless Big-Little) */
    int offload_raw;                 /* 1: an offloaded sample sends its raw input (packing 3), not the split */
} ddnn_model;

/* Runs `model` on n images (n * input_bytes, contiguous) and stores per sample the class, entropy,
 * exit decision (0/1) and split words (n * split_words, NULL to skip); logits (n * n_classes) when
 * not NULL. One call for a whole batch keeps a foreign-function caller's per-sample cost to this
 * loop. Not reentrant, as the model. */
void ddnn_infer_batch(const ddnn_model *model, const uint8_t *inputs, size_t n, double threshold, int32_t *class_id,
                      double *entropy, uint8_t *exit_local, uint64_t *split_words, double *logits);

#endif
