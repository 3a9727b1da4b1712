/* The interface between a generated OpenCL host program (<name>_ocl_model.c, --target opencl) and the
 * model-agnostic OpenCL runner (ddnn_runner_ocl.c): one const descriptor, `const ddnn_ocl_model
 * <name>_ocl_model`, with the C model it extends, its batch entry points and its static batch
 * buffers (sized for max_batch samples by the generator). */
#ifndef DDNN_OCL_API_H
#define DDNN_OCL_API_H

#include <stdint.h>

#include "ddnn_model_api.h"

typedef struct {
    const ddnn_model *model;         /* shapes, names, the C entry points, the threshold default */
    int max_batch;                   /* largest batch infer_batch takes (static buffers) */
    const char *const *placement;    /* per stage: "opencl" or "c" */
    /* platform/device: index or part of the name; NULL -> DDNN_OCL_PLATFORM / DDNN_OCL_DEVICE, else
     * the first. 0, or -1 after printing why. */
    int (*init)(const char *platform, const char *device, int max_batch, int verbose);
    /* n samples (n * input_bytes HWC); results[i].split/logits stay valid until the next call.
     * stage_ns: NULL, or n_stages counters to which each stage's time is added. 0 or -1. */
    int (*infer_batch)(const uint8_t *inputs_hwc, int n, double threshold, ddnn_result *results, uint64_t *stage_ns);
    void (*release)(void);
    const char *(*device_name)(void);
    uint8_t *inputs;                 /* max_batch * input_bytes */
    int32_t *labels;                 /* max_batch */
    ddnn_result *results;            /* max_batch */
} ddnn_ocl_model;

#endif
