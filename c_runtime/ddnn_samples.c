#include "ddnn_samples.h"

#include <string.h>

static uint32_t le32(const unsigned char *b)
{
    return (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
}

static int fail(ddnn_samples *samples, char *err, size_t err_len, const char *path, const char *what)
{
    snprintf(err, err_len, "%s: %s", path, what);
    if (samples->file != NULL)
        fclose(samples->file);
    samples->file = NULL;
    return -1;
}

int ddnn_samples_open(ddnn_samples *samples, const char *path, uint32_t h, uint32_t w, uint32_t c, char *err,
                      size_t err_len)
{
    unsigned char header[DDNN_SAMPLES_HEADER_BYTES];
    char what[200];
    long size;
    uint64_t expected;

    memset(samples, 0, sizeof(*samples));
    samples->file = fopen(path, "rb");
    if (samples->file == NULL)
        return fail(samples, err, err_len, path, "cannot open sample file");
    if (fread(header, 1, sizeof(header), samples->file) != sizeof(header))
        return fail(samples, err, err_len, path, "too short for a sample file header (24 bytes)");
    if (memcmp(header, "DDNS", 4) != 0)
        return fail(samples, err, err_len, path, "not a ddnn sample file (magic is not DDNS)");
    if (le32(header + 4) != DDNN_SAMPLES_VERSION) {
        snprintf(what, sizeof(what), "sample file version %lu is not supported (this runner reads 1)",
                 (unsigned long)le32(header + 4));
        return fail(samples, err, err_len, path, what);
    }
    samples->count = le32(header + 8);
    samples->height = le32(header + 12);
    samples->width = le32(header + 16);
    samples->channels = le32(header + 20);
    if (samples->height != h || samples->width != w || samples->channels != c) {
        snprintf(what, sizeof(what), "samples are %lux%lux%lu (HxWxC) but the model expects %lux%lux%lu",
                 (unsigned long)samples->height, (unsigned long)samples->width, (unsigned long)samples->channels,
                 (unsigned long)h, (unsigned long)w, (unsigned long)c);
        return fail(samples, err, err_len, path, what);
    }
    if (fseek(samples->file, 0, SEEK_END) != 0 || (size = ftell(samples->file)) < 0)
        return fail(samples, err, err_len, path, "cannot determine the file size");
    expected = DDNN_SAMPLES_HEADER_BYTES + (uint64_t)samples->count * (4u + (uint64_t)h * w * c);
    if ((uint64_t)size != expected) {
        snprintf(what, sizeof(what), "file is %ld bytes but a header announcing %lu samples of %lux%lux%lu needs %llu",
                 size, (unsigned long)samples->count, (unsigned long)h, (unsigned long)w, (unsigned long)c,
                 (unsigned long long)expected);
        return fail(samples, err, err_len, path, what);
    }
    if (fseek(samples->file, DDNN_SAMPLES_HEADER_BYTES, SEEK_SET) != 0)
        return fail(samples, err, err_len, path, "cannot seek past the header");
    return 0;
}

int ddnn_samples_next(ddnn_samples *samples, int32_t *label, uint8_t *pixels)
{
    unsigned char raw[4];
    const size_t n_pixels = (size_t)samples->height * samples->width * samples->channels;
    if (samples->file == NULL)
        return -1;
    if (samples->next >= samples->count)
        return 0;
    if (fread(raw, 1, 4, samples->file) != 4 || fread(pixels, 1, n_pixels, samples->file) != n_pixels)
        return -1;
    *label = (int32_t)le32(raw);
    ++samples->next;
    return 1;
}

int ddnn_samples_rewind(ddnn_samples *samples)
{
    if (samples->file == NULL || fseek(samples->file, DDNN_SAMPLES_HEADER_BYTES, SEEK_SET) != 0)
        return -1;
    samples->next = 0;
    return 0;
}

void ddnn_samples_close(ddnn_samples *samples)
{
    if (samples->file != NULL)
        fclose(samples->file);
    samples->file = NULL;
}
