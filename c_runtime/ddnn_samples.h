/* Reader of the binary sample file written by `ddnngen export-samples`.
 *
 * Little-endian. Header (24 bytes): magic "DDNS", uint32 version (1), uint32 count,
 * uint32 height, uint32 width, uint32 channels. Then `count` records: int32 label followed
 * by height * width * channels uint8 pixels in HWC order. */
#ifndef DDNN_SAMPLES_H
#define DDNN_SAMPLES_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define DDNN_SAMPLES_VERSION 1u
#define DDNN_SAMPLES_HEADER_BYTES 24

typedef struct {
    FILE *file;
    uint32_t count, height, width, channels;
    uint32_t next; /* index of the next record */
} ddnn_samples;

/* Opens `path` and checks magic, version, shape (must equal h, w, c) and that the file size is
 * exactly header + count records. Returns 0, or -1 with a message in err. */
int ddnn_samples_open(ddnn_samples *samples, const char *path, uint32_t h, uint32_t w, uint32_t c, char *err,
                      size_t err_len);

/* Reads the next record into *label and pixels (h*w*c bytes). Returns 1, 0 at the end, -1 on error. */
int ddnn_samples_next(ddnn_samples *samples, int32_t *label, uint8_t *pixels);

/* Goes back to the first record. Returns 0, or -1 if the file cannot seek. */
int ddnn_samples_rewind(ddnn_samples *samples);

void ddnn_samples_close(ddnn_samples *samples);

#endif
