#include "ddnn_runner_common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ddnn_exit.h"

int ddnn_parse_long(const char *text, long min, long max, long *value)
{
    char *end;
    long parsed;
    errno = 0;
    parsed = strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno != 0 || parsed < min || parsed > max)
        return 0;
    *value = parsed;
    return 1;
}

void ddnn_sleep_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int ddnn_write_split(FILE *out, const uint64_t *words, int n_words)
{
    unsigned char bytes[8];
    int w, b;
    for (w = 0; w < n_words; ++w) {
        for (b = 0; b < 8; ++b)
            bytes[b] = (unsigned char)(words[w] >> (8 * b));
        if (fwrite(bytes, 1, 8, out) != 8)
            return -1;
    }
    return 0;
}

void ddnn_runner_options_init(ddnn_runner_options *options, const ddnn_model *model)
{
    memset(options, 0, sizeof(*options));
    options->threshold = model->default_threshold;
    options->repeat = 1;
}

int ddnn_runner_option(const char *program, int argc, char **argv, int *i, ddnn_runner_options *options)
{
    const char *arg = argv[*i];
    const int has_value = *i + 1 < argc;
    if (strcmp(arg, "-o") == 0 && has_value) {
        options->csv_path = argv[++*i];
    } else if (strcmp(arg, "--split") == 0 && has_value) {
        options->split_path = argv[++*i];
    } else if (strcmp(arg, "--threshold") == 0 && has_value) {
        const char *text = argv[++*i];
        if (!ddnn_threshold_parse(text, strlen(text), &options->threshold)) {
            fprintf(stderr, "%s: --threshold needs a number in [0, 1], got '%s'\n", program, text);
            return 2;
        }
    } else if (strcmp(arg, "--repeat") == 0 && has_value) {
        const char *text = argv[++*i];
        if (!ddnn_parse_long(text, 1, 1000000L, &options->repeat)) {
            fprintf(stderr, "%s: --repeat needs a positive integer, got '%s'\n", program, text);
            return 2;
        }
    } else if (strcmp(arg, "--bench") == 0) {
        options->bench = 1;
    } else if (arg[0] != '-' && options->samples_path == NULL) {
        options->samples_path = arg;
    } else {
        return 0;
    }
    return 1;
}

int ddnn_runner_open_samples(const char *program, const ddnn_model *model, const char *path, ddnn_samples *samples)
{
    char err[512];
    if (ddnn_samples_open(samples, path, (uint32_t)model->input_h, (uint32_t)model->input_w, (uint32_t)model->input_c,
                          err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: %s\n", program, err);
        return 1;
    }
    return 0;
}

int ddnn_runner_open_outputs(const char *program, const ddnn_runner_options *options, FILE **csv, FILE **split)
{
    *csv = stdout;
    *split = NULL;
    if (options->csv_path != NULL && (*csv = fopen(options->csv_path, "w")) == NULL) {
        *csv = stdout;
        fprintf(stderr, "%s: cannot write %s\n", program, options->csv_path);
        return 1;
    }
    if (options->split_path != NULL && (*split = fopen(options->split_path, "wb")) == NULL) {
        fprintf(stderr, "%s: cannot write %s\n", program, options->split_path);
        return 1;
    }
    fprintf(*csv, "index,label,class,entropy,exit_local\n");
    return 0;
}

int ddnn_runner_write_sample(const char *program, const ddnn_runner_options *options, const ddnn_model *model,
                             FILE *csv, FILE *split, uint32_t index, int32_t label, const ddnn_result *result)
{
    fprintf(csv, "%lu,%ld,%ld,%.17g,%d\n", (unsigned long)index, (long)label, (long)result->class_id,
            result->entropy, result->exit_local);
    if (split != NULL && ddnn_write_split(split, result->split, model->split_words) != 0) {
        fprintf(stderr, "%s: cannot write %s\n", program, options->split_path);
        return 1;
    }
    return 0;
}

void ddnn_runner_bench_report(const ddnn_model *model, const uint64_t *stage_ns, uint64_t infer_ns, uint64_t n_timed,
                              const char *extra, const char *const *placement)
{
    uint64_t stages_total = 0;
    int i;
    fprintf(stderr, "bench model=%s samples=%lu%s\n", model->name, (unsigned long)n_timed, extra);
    for (i = 0; i < model->n_stages; ++i) {
        fprintf(stderr, "stage %s us_per_sample=%.3f\n", model->stage_names[i], stage_ns[i] / 1e3 / n_timed);
        if (placement != NULL)
            fprintf(stderr, "placement %s %s\n", model->stage_names[i], placement[i]);
        stages_total += stage_ns[i];
    }
    fprintf(stderr, "stages_total us_per_sample=%.3f\n", stages_total / 1e3 / n_timed);
    fprintf(stderr, "total us_per_sample=%.3f\n", infer_ns / 1e3 / n_timed);
}

int ddnn_runner_close_outputs(const char *program, const ddnn_runner_options *options, FILE *csv, FILE *split,
                              int status)
{
    if (split != NULL && fclose(split) != 0) {
        fprintf(stderr, "%s: cannot write %s\n", program, options->split_path);
        status = 1;
    }
    if (csv != stdout && fclose(csv) != 0) {
        fprintf(stderr, "%s: cannot write %s\n", program, options->csv_path);
        status = 1;
    }
    if (csv == stdout && fflush(stdout) != 0)
        status = 1;
    return status;
}
