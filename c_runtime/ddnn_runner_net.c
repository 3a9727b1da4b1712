/* Networked runner `ddnn_device_net`. Runs the device part on every sample of a sample file
 * (ddnngen export-samples); a sample that is not confident enough is sent to ddnn-server over
 * MQTT and answered by the server, or, when no reply comes within --timeout-ms or the broker is
 * gone, by the local exit marked "fallback". Every sample gets exactly one CSV row.
 * Thresholds published on the retained threshold topics take effect between samples.
 * --server-only sends every raw input image instead (the paper's "Server-only" configuration: the
 * server runs the whole model); the device part then runs only as the fallback answer.
 * A Big-Little model (model->offload_raw) always sends the raw input: its big net on the server reads the image,
 * and its little net answers only for a priority class; a fallback for a sample the little net calls "other"
 * has class -1 (no class: the failure is reported, not hidden).
 * --scores-first (a camera of a multi-view model): each sample sends its local exit's integer sums first and
 * keeps its split (static ring, ddnn_features.h) for the aggregator's feature request, which the MQTT thread
 * answers with the split or NO_FEATURES (docs/views.md); the reply to the sums is the event's answer.
 * Model-agnostic: the Makefile names the model's descriptor with -DDDNN_RUNNER_MODEL=<name>_model. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ddnn_exit.h"
#include "ddnn_features.h"
#include "ddnn_model_api.h"
#include "ddnn_mqtt.h"
#include "ddnn_protocol.h"
#include "ddnn_runner_common.h"
#include "ddnn_samples.h"
#include "ddnn_timer.h"

#ifndef DDNN_RUNNER_MODEL
#error "compile with -DDDNN_RUNNER_MODEL=<name>_model (the generated Makefile does)"
#endif
extern const ddnn_model DDNN_RUNNER_MODEL;

/* Most classes a scores-first camera sends sums for (its sums request is built in a static buffer). */
#define SUMS_MAX_CLASSES 1024
static uint8_t sums_request[DDNN_REQUEST_HEADER_BYTES + 4 * SUMS_MAX_CLASSES];

static void usage(FILE *out, const ddnn_model *model)
{
    fprintf(out,
            "usage: ddnn_device_net SAMPLES --device-id ID [--broker HOST:PORT] [--timeout-ms N] [-o RESULTS.csv]\n"
            "                       [--threshold T] [--pace-ms N] [--connect-wait-ms N] [--server-only]\n"
            "                       [--telemetry-interval-ms N]\n"
            "                       [--view-index I --view-count K [--first-event-id N]\n"
            "                        [--scores-first [--keep-events N]]]\n"
            "                       [--tls] [--ca-file F] [--cert F --key F] [--username U --password-file F]\n"
            "  Classifies every sample of SAMPLES with %s, asking ddnn-server when the local\n"
            "  exit is not confident.\n"
            "  --device-id ID        unique device name (topics ddnn/reply/ID, ddnn/status/ID)\n"
            "  --broker HOST:PORT    MQTT broker (default 127.0.0.1:1883; port 8883 by default with TLS)\n"
            "  --timeout-ms N        wait at most N ms for a reply, then answer locally (default 1000)\n"
            "  -o FILE               CSV (default stdout): index,label,local_class,entropy,exit_local,final_class,\n"
            "                        source,t_device_us,t_server_us,t_total_us,threshold,answered_by,\n"
            "                        t_upstream_us,t_upstream_server_us,upstream_fallback\n"
            "  --threshold T         initial local-exit threshold (default %.17g); retained MQTT thresholds win\n"
            "  --pace-ms N           pause N ms between samples (demos, live threshold changes)\n"
            "  --connect-wait-ms N   wait up to N ms for the broker before the first sample (default 3000)\n"
            "  --telemetry-interval-ms N\n"
            "                        publish the counters on ddnn/device/ID/telemetry every N ms and at the end\n"
            "                        (default 2000; 0: never)\n"
            "  --server-only         send every raw input image; the server runs the whole model (local_class -1,\n"
            "                        entropy nan; the device part runs only for a fallback answer)\n"
            "  --view-index I --view-count K\n"
            "                        one camera of a multi-view model (docs/views.md): this program is view I's\n"
            "                        device part, SAMPLES are its crops; every sample is sent (the aggregator\n"
            "                        decides on all K views' exits), tagged with event id N + its index\n"
            "  --first-event-id N    event id of the first sample (default 1); the K cameras must agree\n"
            "  --scores-first        a camera sends its local exit's integer sums first and its split only when\n"
            "                        the aggregator's feature request asks (ddnn/features/ID)\n"
            "  --keep-events N       scores first: splits of the last N events kept for feature requests (default\n"
            "                        %d, or what fits; at most %lu for this model: a %d-byte static pool)\n",
            model->name, model->default_threshold, DDNN_FEATURES_DEFAULT_EVENTS,
            (unsigned long)ddnn_features_capacity_for(ddnn_request_dense_size(
                (uint16_t)model->split_c, (uint16_t)model->split_h, (uint16_t)model->split_w)),
            DDNN_FEATURES_POOL_BYTES);
    ddnn_mqtt_usage(out);
}

static int parse_broker(const char *text, char *host, size_t host_len, int *port, long default_port)
{
    const char *colon = strrchr(text, ':');
    size_t len = colon != NULL ? (size_t)(colon - text) : strlen(text);
    long value = default_port;
    if (len == 0 || len >= host_len)
        return 0;
    if (colon != NULL && !ddnn_parse_long(colon + 1, 1, 65535, &value))
        return 0;
    memcpy(host, text, len);
    host[len] = '\0';
    *port = (int)value;
    return 1;
}

/* counts: local, server, fallback, error (the CSV's sources); what was offloaded is all but the local ones. */
static void publish_counters(uint32_t samples, const unsigned long counts[4], double threshold, double initial)
{
    ddnn_mqtt_counters counters;
    counters.samples = samples;
    counters.local = counts[0];
    counters.offloaded = counts[1] + counts[2] + counts[3];
    counters.fallback = counts[2];
    counters.error = counts[3];
    counters.threshold = threshold;
    counters.default_threshold = initial;
    (void)ddnn_mqtt_publish_telemetry(&counters); /* not connected: the next one carries the same counts */
}

int main(int argc, char **argv)
{
    const ddnn_model *model = &DDNN_RUNNER_MODEL;
    uint8_t *const pixels = model->input;
    const char *samples_path = NULL, *csv_path = NULL, *device_id = NULL, *broker = "127.0.0.1:1883";
    double initial_threshold = model->default_threshold, threshold;
    long timeout_ms = 1000, pace_ms = 0, connect_wait_ms = 3000, telemetry_interval_ms = 2000;
    uint64_t telemetry_due = 0;
    char host[256];
    int port, i, got, used, status = 0, server_only = 0, scores_first = 0;
    long view_index = 0, view_count = 0, first_event_id = 1, keep_events = -1;
    const size_t split_request_bytes =
        ddnn_request_dense_size((uint16_t)model->split_c, (uint16_t)model->split_h, (uint16_t)model->split_w);
    const long keep_max = (long)ddnn_features_capacity_for(split_request_bytes);
    uint64_t request_id;
    uint32_t index = 0;
    int32_t label;
    unsigned long counts[4] = {0, 0, 0, 0};
    static const char *const source_names[4] = {"local", "server", "fallback", "error"};
    FILE *csv = stdout;
    ddnn_samples samples;
    ddnn_result result;
    ddnn_reply reply;
    ddnn_mqtt_config config;

    ddnn_mqtt_config_init(&config);
    for (i = 1; i < argc; ++i) {
        const int has_value = i + 1 < argc;
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout, model);
            return 0;
        } else if (strcmp(argv[i], "--server-only") == 0) {
            server_only = 1;
        } else if (strcmp(argv[i], "--scores-first") == 0) {
            scores_first = 1;
        } else if (strcmp(argv[i], "--keep-events") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 0, keep_max, &keep_events)) {
                fprintf(stderr, "ddnn_device_net: --keep-events needs 0..%ld (the splits of %s that fit the "
                                "%d-byte pool), got '%s'\n", keep_max, model->name, DDNN_FEATURES_POOL_BYTES, argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "-o") == 0 && has_value) {
            csv_path = argv[++i];
        } else if (strcmp(argv[i], "--device-id") == 0 && has_value) {
            device_id = argv[++i];
        } else if (strcmp(argv[i], "--broker") == 0 && has_value) {
            broker = argv[++i];
        } else if (strcmp(argv[i], "--timeout-ms") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 1, 3600000L, &timeout_ms)) {
                fprintf(stderr, "ddnn_device_net: --timeout-ms needs 1..3600000, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--pace-ms") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 0, 60000L, &pace_ms)) {
                fprintf(stderr, "ddnn_device_net: --pace-ms needs 0..60000, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--telemetry-interval-ms") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 0, 3600000L, &telemetry_interval_ms)) {
                fprintf(stderr, "ddnn_device_net: --telemetry-interval-ms needs 0..3600000, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--connect-wait-ms") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 0, 600000L, &connect_wait_ms)) {
                fprintf(stderr, "ddnn_device_net: --connect-wait-ms needs 0..600000, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--view-index") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 0, DDNN_MAX_VIEWS - 1, &view_index)) {
                fprintf(stderr, "ddnn_device_net: --view-index needs 0..%d, got '%s'\n", DDNN_MAX_VIEWS - 1, argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--view-count") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 2, DDNN_MAX_VIEWS, &view_count)) {
                fprintf(stderr, "ddnn_device_net: --view-count needs 2..%d, got '%s'\n", DDNN_MAX_VIEWS, argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--first-event-id") == 0 && has_value) {
            if (!ddnn_parse_long(argv[++i], 1, 0x7fffffffL, &first_event_id)) {
                fprintf(stderr, "ddnn_device_net: --first-event-id needs 1..2147483647, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--threshold") == 0 && has_value) {
            ++i;
            if (!ddnn_threshold_parse(argv[i], strlen(argv[i]), &initial_threshold)) {
                fprintf(stderr, "ddnn_device_net: --threshold needs a number in [0, 1], got '%s'\n", argv[i]);
                return 2;
            }
        } else if ((used = ddnn_mqtt_parse_option(&config, argc, argv, &i)) != 0) {
            if (used < 0)
                return 2;
        } else if (argv[i][0] != '-' && samples_path == NULL) {
            samples_path = argv[i];
        } else {
            fprintf(stderr, "ddnn_device_net: unexpected argument '%s'\n", argv[i]);
            usage(stderr, model);
            return 2;
        }
    }
    if (samples_path == NULL || device_id == NULL) {
        fprintf(stderr, "ddnn_device_net: SAMPLES and --device-id are required\n");
        usage(stderr, model);
        return 2;
    }
    if ((view_count == 0 && view_index != 0) || (view_count > 1 && (view_index >= view_count || server_only))) {
        fprintf(stderr, "ddnn_device_net: a camera of a multi-view model needs --view-index I below --view-count K "
                        "(and sends splits, not --server-only)\n");
        return 2;
    }
    if ((scores_first || keep_events >= 0) &&
        (view_count < 2 || !scores_first || model->offload_raw || model->n_classes > SUMS_MAX_CLASSES)) {
        fprintf(stderr, "ddnn_device_net: --scores-first is a camera of a multi-view model (--view-index I "
                        "--view-count K) sending its exit sums (not a Big-Little model, at most %d classes); "
                        "--keep-events goes with it\n", SUMS_MAX_CLASSES);
        return 2;
    }
    if (scores_first) {
        if (keep_events < 0)
            keep_events = keep_max < DDNN_FEATURES_DEFAULT_EVENTS ? keep_max : DDNN_FEATURES_DEFAULT_EVENTS;
        if (ddnn_features_init((size_t)keep_events, split_request_bytes) != 0)
            return 2; /* keep_events was validated against the same capacity */
        config.scores_first = 1;
        config.split_layer = (uint16_t)model->split_layer;
        config.view_index = (uint8_t)view_index;
        config.view_count = (uint8_t)view_count;
    }
    if (!parse_broker(broker, host, sizeof(host), &port, config.tls ? 8883 : 1883)) {
        fprintf(stderr, "ddnn_device_net: --broker must be HOST:PORT, got '%s'\n", broker);
        return 2;
    }
    if (ddnn_request_dense_size((uint16_t)model->split_c, (uint16_t)model->split_h, (uint16_t)model->split_w) >
            model->request_bytes ||
        DDNN_REQUEST_HEADER_BYTES + model->input_bytes > model->request_bytes) {
        fprintf(stderr, "ddnn_device_net: %s's request buffer (%lu bytes) is smaller than its requests\n", model->name,
                (unsigned long)model->request_bytes);
        return 1;
    }
    if (ddnn_runner_open_samples("ddnn_device_net", model, samples_path, &samples) != 0)
        return 1;
    if (csv_path != NULL && (csv = fopen(csv_path, "w")) == NULL) {
        fprintf(stderr, "ddnn_device_net: cannot write %s\n", csv_path);
        ddnn_samples_close(&samples);
        return 1;
    }
    setvbuf(csv, NULL, _IOLBF, 0); /* one row per line as it happens: tests and demos follow the file */
    config.host = host;
    config.port = port;
    config.device_id = device_id;
    config.model_hash = model->hash;
    config.connect_timeout_s = 2;
    config.retry_ms = 200;
    if (ddnn_mqtt_start(&config, (int)connect_wait_ms) != 0) {
        ddnn_samples_close(&samples);
        if (csv != stdout)
            fclose(csv);
        return 2;
    }
    if (ddnn_mqtt_connected())
        ddnn_sleep_ms(100); /* let retained thresholds arrive before the first sample */
    else
        fprintf(stderr, "ddnn_device_net: no broker at %s yet; answering locally until it appears\n", broker);
    threshold = initial_threshold;
    {
        const char *source;
        double current = initial_threshold;
        if (ddnn_mqtt_threshold(initial_threshold, &current, &source)) {
            fprintf(stderr, "ddnn_device_net: threshold %.17g from %s\n", current, source);
            threshold = current;
        }
    }
    request_id = (ddnn_now_ns() << 8) | 1u; /* distinct across runs; never 0 */

    /* answered_by: the tier whose exit gave final_class (0 = this device). t_server_us is the answering
     * server's own compute; a server that asked the tiers above it (an edge) reports how long that took
     * (t_upstream_us) and their compute (t_upstream_server_us), and upstream_fallback = 1 when they did
     * not answer in time and its own exit answered. */
    fprintf(csv, "index,label,local_class,entropy,exit_local,final_class,source,t_device_us,t_server_us,t_total_us,"
                 "threshold,answered_by,t_upstream_us,t_upstream_server_us,upstream_fallback\n");
    while ((got = ddnn_samples_next(&samples, &label, pixels)) == 1) {
        const char *threshold_source;
        double previous = threshold;
        uint64_t start, device_done;
        uint32_t server_us = 0, upstream_us = 0, upstream_server_us = 0;
        int answered_by = 0, upstream_fallback = 0;
        int32_t final_class;
        int source;

        if (ddnn_mqtt_threshold(initial_threshold, &threshold, &threshold_source))
            fprintf(stderr, "ddnn_device_net: threshold changed %.17g -> %.17g (%s) before sample %lu\n", previous,
                    threshold, threshold_source, (unsigned long)index);
        start = ddnn_now_ns();
        if (server_only) {
            /* Nothing computed on the device: the answer is the server's unless it fails. */
            result.class_id = -1;
            result.entropy = NAN;
            result.exit_local = 0;
        } else {
            model->infer(pixels, threshold, &result);
        }
        device_done = ddnn_now_ns();
        final_class = result.class_id;
        if (result.exit_local && view_count == 0) {
            source = 0;
        } else {
            ddnn_request_header header;
            size_t len;
            int net;
            memcpy(header.model_hash, model->hash, DDNN_WIRE_HASH_BYTES);
            header.request_id = ++request_id;
            header.device_time_us = device_done / 1000u;
            header.event_id = view_count > 1 ? (uint64_t)first_event_id + index : 0u;
            header.view_index = (uint8_t)view_index;
            header.view_count = (uint8_t)view_count;
            if (server_only || model->offload_raw) {
                header.split_layer = DDNN_RAW_SPLIT_LAYER;
                header.channels = (uint16_t)model->input_c;
                header.height = (uint16_t)model->input_h;
                header.width = (uint16_t)model->input_w;
                len = ddnn_request_encode_raw(&header, pixels, model->input_bytes, model->request,
                                              model->request_bytes);
            } else {
                header.split_layer = (uint16_t)model->split_layer;
                header.channels = (uint16_t)model->split_c;
                header.height = (uint16_t)model->split_h;
                header.width = (uint16_t)model->split_w;
                /* Dense: the split's bits only, not its in-memory 64-bit channel words (docs/protocol.md). */
                len = ddnn_request_encode_dense(&header, result.split, (size_t)model->split_words, model->request,
                                                model->request_bytes);
            }
            if (scores_first && len > 0) {
                /* The split waits here under the sums' request id; the aggregator asks for it only when the
                 * event's aggregated exit is not confident. */
                ddnn_features_keep(header.event_id, header.request_id, model->request, len);
                len = ddnn_request_encode_sums(&header, result.sums, (size_t)model->n_classes, sums_request,
                                               sizeof sums_request);
            }
            net = len > 0 ? ddnn_mqtt_request(scores_first ? sums_request : model->request, len, header.request_id,
                                              (int)timeout_ms, &reply)
                          : DDNN_NET_OFFLINE;
            if (net == DDNN_NET_OK && reply.status == DDNN_STATUS_OK && reply.class_id >= 0 &&
                reply.class_id < model->n_answer_classes) {
                source = 1;
                final_class = reply.class_id;
                server_us = reply.server_us;
                upstream_us = reply.upstream_us;
                upstream_server_us = reply.upstream_server_us;
                answered_by = reply.answered_by;
                upstream_fallback = (reply.flags & DDNN_REPLY_FALLBACK) != 0;
            } else {
                if (net == DDNN_NET_OK) {
                    source = 3;
                    fprintf(stderr, "ddnn_device_net: sample %lu: server error %s: %s; answering locally\n",
                            (unsigned long)index, ddnn_status_name(reply.status), reply.message);
                } else {
                    source = 2;
                }
                if (server_only)
                    model->infer(pixels, threshold, &result); /* the local exit is the only answer left */
                final_class = result.class_id;
            }
        }
        ++counts[source];
        fprintf(csv, "%lu,%ld,%ld,%.17g,%d,%ld,%s,%.1f,%lu,%.1f,%.17g,%d,%lu,%lu,%d\n", (unsigned long)index,
                (long)label, (long)result.class_id, result.entropy, result.exit_local, (long)final_class,
                source_names[source], (double)(device_done - start) / 1e3, (unsigned long)server_us,
                (double)(ddnn_now_ns() - start) / 1e3, threshold, answered_by, (unsigned long)upstream_us,
                (unsigned long)upstream_server_us, upstream_fallback);
        ++index;
        if (telemetry_interval_ms > 0 && ddnn_now_ns() >= telemetry_due) {
            publish_counters(index, counts, threshold, initial_threshold);
            telemetry_due = ddnn_now_ns() + (uint64_t)telemetry_interval_ms * 1000000u;
        }
        if (pace_ms > 0)
            ddnn_sleep_ms(pace_ms);
    }
    if (got < 0) {
        fprintf(stderr, "ddnn_device_net: %s: read error at sample %lu\n", samples_path, (unsigned long)index);
        status = 1;
    }
    fprintf(stderr, "ddnn_device_net: %lu samples: local %lu, server %lu, fallback %lu, error %lu\n",
            (unsigned long)index, counts[0], counts[1], counts[2], counts[3]);
    if (scores_first) {
        ddnn_mqtt_feature_counts features;
        ddnn_mqtt_features(&features);
        fprintf(stderr, "ddnn_device_net: feature requests: answered %llu, withheld %llu, other model %llu, "
                        "refused %llu, unsent %llu (keeping %ld events)\n",
                (unsigned long long)features.answered, (unsigned long long)features.withheld,
                (unsigned long long)features.other_model, (unsigned long long)features.refused,
                (unsigned long long)features.unsent, keep_events);
    }
    if (telemetry_interval_ms > 0)
        publish_counters(index, counts, threshold, initial_threshold); /* the final counts: a reader sees all */
    ddnn_mqtt_stop();
    ddnn_samples_close(&samples);
    if (csv != stdout && fclose(csv) != 0) {
        fprintf(stderr, "ddnn_device_net: cannot write %s\n", csv_path);
        status = 1;
    }
    return status;
}
