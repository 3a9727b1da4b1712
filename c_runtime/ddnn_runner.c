/* Standalone runner `ddnn_device`: reads a sample file (ddnngen export-samples), runs the device part
 * on every sample and writes one CSV row per sample. Model-agnostic: the project's Makefile names the
 * model's descriptor with -DDDNN_RUNNER_MODEL=<name>_model. */
#include <stdio.h>
#include <string.h>

#include "ddnn_model_api.h"
#include "ddnn_runner_common.h"
#include "ddnn_samples.h"
#include "ddnn_timer.h"

#ifndef DDNN_RUNNER_MODEL
#error "compile with -DDDNN_RUNNER_MODEL=<name>_model (the generated Makefile does)"
#endif
extern const ddnn_model DDNN_RUNNER_MODEL;

#define PROGRAM "ddnn_device"

static void usage(FILE *out, const ddnn_model *model)
{
    fprintf(out,
            "usage: ddnn_device SAMPLES [-o RESULTS.csv] [--threshold T] [--split FILE] [--bench] [--repeat N]\n"
            "  Runs the device part of %s on every sample of SAMPLES.\n"
            "  -o FILE        CSV index,label,class,entropy,exit_local (default: stdout)\n"
            "  --threshold T  local-exit entropy threshold (default %.17g)\n"
            "  --split FILE   also write each sample's split activations (%d little-endian uint64)\n"
            "  --bench        print per-layer and total time per sample to stderr\n"
            "  --repeat N     with --bench, run the whole file N times (default 1)\n",
            model->name, model->default_threshold, model->split_words);
}

int main(int argc, char **argv)
{
    const ddnn_model *model = &DDNN_RUNNER_MODEL;
    ddnn_runner_options options;
    FILE *csv = stdout, *split = NULL;
    ddnn_samples samples;
    ddnn_result result;
    uint64_t infer_ns = 0, n_timed = 0;
    long rep;
    int i, status = 0;

    ddnn_runner_options_init(&options, model);
    memset(model->stage_ns, 0, sizeof(uint64_t) * (size_t)model->n_stages);
    for (i = 1; i < argc; ++i) {
        int taken;
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout, model);
            return 0;
        }
        taken = ddnn_runner_option(PROGRAM, argc, argv, &i, &options);
        if (taken == 2)
            return 2;
        if (taken == 0) {
            fprintf(stderr, PROGRAM ": unexpected argument '%s'\n", argv[i]);
            usage(stderr, model);
            return 2;
        }
    }
    if (options.samples_path == NULL) {
        usage(stderr, model);
        return 2;
    }
    if (ddnn_runner_open_samples(PROGRAM, model, options.samples_path, &samples) != 0)
        return 1;
    if (ddnn_runner_open_outputs(PROGRAM, &options, &csv, &split) != 0) {
        status = 1;
        goto done;
    }
    for (rep = 0; rep < (options.bench ? options.repeat : 1); ++rep) {
        uint32_t index = 0;
        int32_t label;
        int got;
        if (rep > 0 && ddnn_samples_rewind(&samples) != 0) {
            fprintf(stderr, PROGRAM ": %s: cannot rewind\n", options.samples_path);
            status = 1;
            goto done;
        }
        while ((got = ddnn_samples_next(&samples, &label, model->input)) == 1) {
            if (options.bench) {
                const uint64_t start = ddnn_now_ns();
                model->infer(model->input, options.threshold, &result);
                infer_ns += ddnn_now_ns() - start;
                ++n_timed;
                model->infer_timed(model->input, options.threshold, &result, model->stage_ns);
            } else {
                model->infer(model->input, options.threshold, &result);
            }
            if (rep == 0 && ddnn_runner_write_sample(PROGRAM, &options, model, csv, split, index, label, &result)) {
                status = 1;
                goto done;
            }
            ++index;
        }
        if (got < 0) {
            fprintf(stderr, PROGRAM ": %s: read error at sample %lu\n", options.samples_path, (unsigned long)index);
            status = 1;
            goto done;
        }
    }
    if (options.bench && n_timed > 0)
        ddnn_runner_bench_report(model, model->stage_ns, infer_ns, n_timed, "", NULL);
done:
    ddnn_samples_close(&samples);
    return ddnn_runner_close_outputs(PROGRAM, &options, csv, split, status);
}
