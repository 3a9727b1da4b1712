/* Standalone OpenCL runner `ddnn_device_ocl`: reads a sample file (ddnngen export-samples), runs the
 * device part in batches and writes the same CSV (and split file) as the C runner. Model-agnostic:
 * the Makefile names the descriptor with -DDDNN_RUNNER_OCL_MODEL=<name>_ocl_model. */
#include <stdio.h>
#include <string.h>

#include "ddnn_ocl_api.h"
#include "ddnn_runner_common.h"
#include "ddnn_samples.h"
#include "ddnn_timer.h"

#ifndef DDNN_RUNNER_OCL_MODEL
#error "compile with -DDDNN_RUNNER_OCL_MODEL=<name>_ocl_model (the generated Makefile does)"
#endif
extern const ddnn_ocl_model DDNN_RUNNER_OCL_MODEL;

#define PROGRAM "ddnn_device_ocl"

static void usage(FILE *out, const ddnn_ocl_model *ocl)
{
    fprintf(out,
            "usage: ddnn_device_ocl SAMPLES [-o RESULTS.csv] [--threshold T] [--split FILE] [--batch N]\n"
            "                       [--platform P] [--device D] [--bench] [--repeat N] [--verbose]\n"
            "  Runs the device part of %s on every sample of SAMPLES with OpenCL.\n"
            "  -o FILE        CSV index,label,class,entropy,exit_local (default: stdout)\n"
            "  --threshold T  local-exit entropy threshold (default %.17g)\n"
            "  --split FILE   also write each sample's split activations (%d little-endian uint64)\n"
            "  --batch N      samples per OpenCL launch, 1..%d (default 1: per-sample latency)\n"
            "  --platform P   OpenCL platform: index or part of its name (default $DDNN_OCL_PLATFORM, else 0)\n"
            "  --device D     OpenCL device: index or part of its name (default $DDNN_OCL_DEVICE, else 0)\n"
            "  --bench        print per-layer and total time per sample to stderr\n"
            "  --repeat N     with --bench, run the whole file N times (default 1)\n",
            ocl->model->name, ocl->model->default_threshold, ocl->model->split_words, ocl->max_batch);
}

/* Reads up to `batch` samples; returns how many, or -1 on a read error. */
static int read_batch(const ddnn_ocl_model *ocl, ddnn_samples *samples, int batch)
{
    int n = 0, got = 1;
    while (n < batch && (got = ddnn_samples_next(samples, &ocl->labels[n],
                                                 ocl->inputs + (size_t)n * ocl->model->input_bytes)) == 1)
        ++n;
    return got < 0 ? -1 : n;
}

int main(int argc, char **argv)
{
    const ddnn_ocl_model *ocl = &DDNN_RUNNER_OCL_MODEL;
    const ddnn_model *model = ocl->model;
    const char *platform = NULL, *device = NULL;
    ddnn_runner_options options;
    int verbose = 0, initialised = 0;
    long batch = 1, rep;
    FILE *csv = stdout, *split = NULL;
    ddnn_samples samples;
    char extra[320];
    uint64_t infer_ns = 0, n_timed = 0;
    int i, status = 0;

    ddnn_runner_options_init(&options, model);
    memset(model->stage_ns, 0, sizeof(uint64_t) * (size_t)model->n_stages);
    for (i = 1; i < argc; ++i) {
        const int has_value = i + 1 < argc;
        int taken;
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout, ocl);
            return 0;
        } else if (strcmp(argv[i], "--platform") == 0 && has_value) {
            platform = argv[++i];
        } else if (strcmp(argv[i], "--device") == 0 && has_value) {
            device = argv[++i];
        } else if (strcmp(argv[i], "--batch") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 1, ocl->max_batch, &batch)) {
                fprintf(stderr, PROGRAM ": --batch needs an integer in 1..%d, got '%s'\n", ocl->max_batch, argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--verbose") == 0) {
            verbose = 1;
        } else if ((taken = ddnn_runner_option(PROGRAM, argc, argv, &i, &options)) != 1) {
            if (taken == 2)
                return 2;
            fprintf(stderr, PROGRAM ": unexpected argument '%s'\n", argv[i]);
            usage(stderr, ocl);
            return 2;
        }
    }
    if (options.samples_path == NULL) {
        usage(stderr, ocl);
        return 2;
    }
    if (ddnn_runner_open_samples(PROGRAM, model, options.samples_path, &samples) != 0)
        return 1;
    if (ocl->init(platform, device, (int)batch, verbose) != 0) {
        status = 1;
        goto done;
    }
    initialised = 1;
    if (ddnn_runner_open_outputs(PROGRAM, &options, &csv, &split) != 0) {
        status = 1;
        goto done;
    }
    for (rep = 0; rep < (options.bench ? options.repeat : 1); ++rep) {
        uint32_t index = 0;
        int n;
        if (rep > 0 && ddnn_samples_rewind(&samples) != 0) {
            fprintf(stderr, PROGRAM ": %s: cannot rewind\n", options.samples_path);
            status = 1;
            goto done;
        }
        while ((n = read_batch(ocl, &samples, (int)batch)) > 0) {
            if (options.bench) {
                uint64_t start;
                /* The first launch of each kernel includes driver work (PoCL compiles the
                 * work-group function then); keep it out of the timings. */
                if (n_timed == 0 && ocl->infer_batch(ocl->inputs, n, options.threshold, ocl->results, NULL) != 0) {
                    status = 1;
                    goto done;
                }
                start = ddnn_now_ns();
                if (ocl->infer_batch(ocl->inputs, n, options.threshold, ocl->results, NULL) != 0) {
                    status = 1;
                    goto done;
                }
                infer_ns += ddnn_now_ns() - start;
                n_timed += (uint64_t)n;
                if (ocl->infer_batch(ocl->inputs, n, options.threshold, ocl->results, model->stage_ns) != 0) {
                    status = 1;
                    goto done;
                }
            } else if (ocl->infer_batch(ocl->inputs, n, options.threshold, ocl->results, NULL) != 0) {
                status = 1;
                goto done;
            }
            if (rep == 0) {
                for (i = 0; i < n; ++i) {
                    if (ddnn_runner_write_sample(PROGRAM, &options, model, csv, split, index + (uint32_t)i,
                                                 ocl->labels[i], &ocl->results[i]) != 0) {
                        status = 1;
                        goto done;
                    }
                }
            }
            index += (uint32_t)n;
        }
        if (n < 0) {
            fprintf(stderr, PROGRAM ": %s: read error at sample %lu\n", options.samples_path, (unsigned long)index);
            status = 1;
            goto done;
        }
    }
    if (options.bench && n_timed > 0) {
        snprintf(extra, sizeof(extra), " batch=%ld device=%s", batch, ocl->device_name());
        ddnn_runner_bench_report(model, model->stage_ns, infer_ns, n_timed, extra, ocl->placement);
    }
done:
    if (initialised)
        ocl->release();
    ddnn_samples_close(&samples);
    return ddnn_runner_close_outputs(PROGRAM, &options, csv, split, status);
}
