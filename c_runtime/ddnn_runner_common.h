/* What the runners (ddnn_runner.c, ddnn_runner_net.c, ddnn_runner_ocl.c) share: number parsing,
 * the options of the sample-file runners, the per-sample CSV row and split file, the --bench report
 * and closing the outputs. POSIX hosts only (the runners are Linux programs; a firmware links just
 * the model and ddnn_model_api.c). */
#ifndef DDNN_RUNNER_COMMON_H
#define DDNN_RUNNER_COMMON_H

#include <stdint.h>
#include <stdio.h>

#include "ddnn_model_api.h"
#include "ddnn_samples.h"

/* A whole base-10 long in [min, max] (no trailing text, no overflow). 1 and *value set, else 0. */
int ddnn_parse_long(const char *text, long min, long max, long *value);

/* Sleeps ms milliseconds, resuming after signals. */
void ddnn_sleep_ms(long ms);

/* Writes n_words words as little-endian uint64 (the --split file). 0, or -1 on a write error. */
int ddnn_write_split(FILE *out, const uint64_t *words, int n_words);

/* Options of the sample-file runners (ddnn_device, ddnn_device_ocl). */
typedef struct {
    const char *samples_path, *csv_path, *split_path;
    double threshold;
    int bench;
    long repeat;
} ddnn_runner_options;

void ddnn_runner_options_init(ddnn_runner_options *options, const ddnn_model *model);

/* Takes argv[*i] if it is one of the shared options (-o, --split, --threshold, --repeat, --bench, the
 * samples path), advancing *i past its value. Returns 1 when taken, 0 when it is not a shared option
 * (the caller's own, or unexpected), 2 after printing "<program>: ..." for a bad value. */
int ddnn_runner_option(const char *program, int argc, char **argv, int *i, ddnn_runner_options *options);

/* Opens a sample file whose samples must have the model's input shape. 0, or 1 after printing why not. */
int ddnn_runner_open_samples(const char *program, const ddnn_model *model, const char *path, ddnn_samples *samples);

/* Opens options->csv_path (stdout when NULL) and options->split_path (none when NULL), writes the CSV
 * header. 0, or 1 after printing which file could not be written. */
int ddnn_runner_open_outputs(const char *program, const ddnn_runner_options *options, FILE **csv, FILE **split);

/* One CSV row index,label,class,entropy,exit_local (entropy %.17g) and, when split is open, the
 * sample's split words. 0, or 1 after printing that the split file could not be written. */
int ddnn_runner_write_sample(const char *program, const ddnn_runner_options *options, const ddnn_model *model,
                             FILE *csv, FILE *split, uint32_t index, int32_t label, const ddnn_result *result);

/* The --bench report on stderr: a "bench model=NAME samples=N<extra>" line, one line per stage (and
 * its placement when placement is not NULL), the stages' sum and the whole inference's time. */
void ddnn_runner_bench_report(const ddnn_model *model, const uint64_t *stage_ns, uint64_t infer_ns, uint64_t n_timed,
                              const char *extra, const char *const *placement);

/* Closes the outputs (flushes stdout). Returns status, or 1 when a file could not be written. */
int ddnn_runner_close_outputs(const char *program, const ddnn_runner_options *options, FILE *csv, FILE *split,
                              int status);

#endif
