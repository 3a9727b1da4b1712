/* The device's MQTT client for ddnn-server (Paho C, MQTTClient API, one client per process): MQTT 5, or 3.1.1
 * for brokers such as RabbitMQ's MQTT plugin (the protocol needs no MQTT 5 property), on one broker or a list
 * of cluster nodes to fail over between (see ddnn_mqtt_parse_option).
 *
 * ddnn_mqtt_request() publishes one request (QoS 1) on ddnn/req/<model>/<device> and waits for the
 * reply with its request id on ddnn/reply/<device> at most timeout_ms; it returns DDNN_NET_OFFLINE at once while the broker is gone,
 * so the caller answers locally (fallback) and never hangs. A background thread reconnects and
 * re-subscribes. Retained thresholds on ddnn/threshold/<model> and ddnn/threshold/<model>/<device>
 * are tracked; ddnn_mqtt_threshold() hands the caller the current one between samples.
 * Birth/last-will: retained "online"/"offline" on ddnn/status/<device>.
 * A scores-first camera (config.scores_first) also subscribes to ddnn/features/<device> and answers each valid
 * feature request naming its model on the callback thread: the split ddnn_features holds for it (published on
 * the request topic), else NO_FEATURES. Anything else on that topic is counted and ignored.
 *
 * The MQTT client id is the device id, so a broker can tie it to the credentials (use_username_as_clientid,
 * %c patterns). TLS (ssl://, Paho C's SSL library libpaho-mqtt3cs) verifies the broker's certificate against
 * ca_file (else OpenSSL's default trust store) and its host name, unless `insecure` is set explicitly.
 * Credentials: a user name and a password read from a file, and/or a client certificate and key.
 * A second process connecting with the same device id takes the session over; when the broker says so
 * (MQTT 5 DISCONNECT 0x8E) this process stops using the network and answers locally from then on, so two
 * processes of one id do not take the session from each other in turns. */
#ifndef DDNN_MQTT_H
#define DDNN_MQTT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ddnn_protocol.h"

/* The broker and its fail-over alternatives (cluster nodes), at most. */
#define DDNN_MQTT_MAX_BROKERS 8

enum ddnn_net_result {
    DDNN_NET_OK = 0,      /* reply received (its status may still be an error) */
    DDNN_NET_TIMEOUT = 1, /* no reply within the timeout */
    DDNN_NET_OFFLINE = 2  /* not connected, or the publish failed */
};

typedef struct {
    const char *host;
    int port;
    const char *device_id;                       /* ddnn_device_id_valid() */
    const uint8_t *model_hash;                   /* DDNN_WIRE_HASH_BYTES bytes */
    int connect_timeout_s;                       /* per connection attempt */
    int retry_ms;                                /* pause between reconnection attempts */
    int tls;                                     /* ssl:// instead of tcp:// */
    const char *ca_file;                         /* PEM CA bundle; NULL: OpenSSL's default trust store */
    const char *cert_file, *key_file;            /* client certificate and its key (PEM), or NULL */
    const char *username;                        /* or NULL */
    const char *password_file;                   /* first line = the password (kept off the command line) */
    int insecure;                                /* TLS without certificate or host name checks */
    int mqtt311;                                 /* MQTT 3.1.1 instead of 5 (RabbitMQ's MQTT plugin) */
    int subscribe_qos;                           /* QoS of the reply/threshold subscriptions: 1, or 0 on RabbitMQ */
    int subscribe_qos_set;                       /* subscribe_qos was given (else 1) */
    const char *also_brokers[DDNN_MQTT_MAX_BROKERS - 1]; /* HOST:PORT of further cluster nodes (fail-over) */
    int also_broker_count;
    int scores_first;                            /* answer feature requests from ddnn_features (ddnn_features.h) */
    uint16_t split_layer;                        /* scores first: the NO_FEATURES header's split layer ... */
    uint8_t view_index, view_count;              /* ... and this camera's view of the events */
} ddnn_mqtt_config;

/* Zeroes a configuration (plain TCP, no credentials). */
void ddnn_mqtt_config_init(ddnn_mqtt_config *config);

/* Command-line options for the connection, shared by every runner: --tls, --ca-file F, --cert F, --key F,
 * --username U, --password-file F, --insecure, --mqtt-version 5|3.1.1, --subscribe-qos 0|1, --also-broker
 * HOST:PORT (repeatable: further nodes of a cluster, tried in turn, same TLS and credentials). With more than
 * one broker the device rides out a fail-over: a request waiting for its reply (or a connection) keeps
 * waiting until its timeout, and is published again, same request id, once connected to the next node (the
 * reply may have gone with the old node; a second reply is ignored by request id). Looks at argv[*i]; returns 1 and advances *i past what it
 * consumed, 0 when argv[*i] is none of them, -1 (message printed) when its value is missing. */
int ddnn_mqtt_parse_option(ddnn_mqtt_config *config, int argc, char **argv, int *i);

/* Usage lines for those options. */
void ddnn_mqtt_usage(FILE *out);

/* 1 once another client took this device's session over (see above). */
int ddnn_mqtt_taken_over(void);

/* Creates the client and starts connecting in the background; waits up to wait_ms for the first
 * connection. Returns 0 (even if not yet connected), or -1 on bad configuration. */
int ddnn_mqtt_start(const ddnn_mqtt_config *config, int wait_ms);

int ddnn_mqtt_connected(void);

/* Publishes `len` request bytes carrying request_id and waits for the matching reply. */
int ddnn_mqtt_request(const uint8_t *request, size_t len, uint64_t request_id, int timeout_ms, ddnn_reply *reply);

/* Current threshold: the device-specific retained value, else the model-wide one, else `fallback`.
 * Returns 1 when it differs from *threshold (and updates it), else 0. `source` names the topic. */
int ddnn_mqtt_threshold(double fallback, double *threshold, const char **source);

/* The device's counters since it started, as its telemetry reports them (docs/protocol.md, "Telemetry"). */
typedef struct {
    uint64_t samples, local, offloaded, fallback, error; /* offloaded: sent on (answered, fell back or error) */
    double threshold;                                    /* the one in use */
    double default_threshold;                            /* the one it started with (--threshold / the model's) */
} ddnn_mqtt_counters;

/* Publishes the counters as JSON on ddnn/device/<device>/telemetry (QoS 0, not retained), with the retained
 * thresholds it holds. Returns 0 when handed to the broker, -1 when not connected (nothing is queued). */
int ddnn_mqtt_publish_telemetry(const ddnn_mqtt_counters *counters);

/* What a scores-first camera did with the messages on its features topic. */
typedef struct {
    uint64_t answered;     /* valid feature requests answered with the split held */
    uint64_t withheld;     /* ... answered NO_FEATURES: the event is no longer held (or never was) */
    uint64_t other_model;  /* well-formed requests naming another model: nothing to say */
    uint64_t refused;      /* not a feature request of this protocol (length, magic, version, fields) */
    uint64_t unsent;       /* answers the broker did not take (not connected), or requests that found the
                            * answering thread's queue full */
} ddnn_mqtt_feature_counts;

void ddnn_mqtt_features(ddnn_mqtt_feature_counts *counts);

/* Publishes the "offline" status, disconnects and stops the reconnection thread. */
void ddnn_mqtt_stop(void);

#endif
