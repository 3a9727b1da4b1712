/* The server's Paho C transport (server/pahoc_transport.py drives it through cffi): MQTT 5 over
 * libpaho-mqtt3as, with the network on Paho's own threads and nothing calling back into Python.
 *
 * Paho's message-arrived callback copies each message (topic, payload, arrival time) into a bounded
 * queue; ddnn_pahoc_take() hands Python up to N of them in one call, waiting (without the GIL) for the
 * first. Replies go out with ddnn_pahoc_publish(); their delivery results feed counters that
 * ddnn_pahoc_wait_published() waits on.
 *
 * Acknowledgements: Paho C sends a QoS 1 PUBACK as soon as a PUBLISH is read (MQTTProtocolClient.c,
 * MQTTProtocol_handlePublishes), before the application sees it, and has no manual-ack API. A request
 * is therefore acknowledged once it is in this queue: a server that dies loses what it holds, and those
 * devices answer locally when their timeout expires (docs/deployment.md, "Transports").
 *
 * Bounds: a topic over max_topic_bytes is counted and dropped (no topic a reply could go to is that
 * long); a payload over max_payload_bytes keeps only its first keep_oversized_bytes bytes, flagged, so
 * the server can still answer TOO_LARGE with the request's id. A message that finds the queue full is
 * counted and dropped: its device falls back on its timeout. */
#ifndef DDNN_PAHOC_H
#define DDNN_PAHOC_H

#include <stddef.h>
#include <stdint.h>

typedef struct ddnn_pahoc ddnn_pahoc;

typedef struct {
    const char *uri;       /* tcp://HOST:PORT or ssl://HOST:PORT */
    int port;              /* PORT again: TCP_NODELAY goes on the sockets connected to it */
    const char *client_id;
    const char *username;  /* NULL: none */
    const char *password;  /* NULL: none */
    int tls, insecure;
    const char *ca_file, *cert_file, *key_file; /* NULL: system trust store / no client certificate */
    int clean_start;
    int session_expiry_s;
    int receive_maximum;
    int keepalive_s;
    int max_inflight;      /* QoS 1 replies awaiting their PUBACK */
    int max_buffered;      /* replies queued behind those; more are refused (counted by the caller) */
    const char *status_topic; /* retained "online" on every connect, "offline" as the will */
    size_t queue_capacity;
    size_t max_topic_bytes;
    size_t max_payload_bytes;
    size_t keep_oversized_bytes;
} ddnn_pahoc_config;

typedef struct {
    uint64_t received;          /* messages queued */
    uint64_t dropped_full;      /* dropped: the queue was full */
    uint64_t dropped_topic;     /* dropped: topic longer than max_topic_bytes */
    uint64_t oversized;         /* queued truncated: payload longer than max_payload_bytes */
    uint64_t published, completed, failed; /* replies handed to Paho, delivered, failed */
    uint64_t connects, lost;    /* successful connections, lost connections */
    int connected, subscribed;
    int queued;                 /* messages waiting in the queue now */
} ddnn_pahoc_stats;

/* Fields of one taken message in ddnn_pahoc_take()'s records (DDNN_PAHOC_FIELDS int64 each). */
enum {
    DDNN_PAHOC_TOPIC_OFFSET, DDNN_PAHOC_TOPIC_LEN, DDNN_PAHOC_PAYLOAD_OFFSET, DDNN_PAHOC_PAYLOAD_LEN,
    DDNN_PAHOC_WIRE_LEN,     /* the payload's length on the wire (larger than PAYLOAD_LEN when truncated) */
    DDNN_PAHOC_ARRIVED_NS,   /* CLOCK_MONOTONIC, Python's time.monotonic() clock */
    DDNN_PAHOC_QOS,
    DDNN_PAHOC_FIELDS
};

/* NULL with a reason in error when the configuration is unusable. */
ddnn_pahoc *ddnn_pahoc_create(const ddnn_pahoc_config *config, char *error, size_t error_len);
/* Connect in the background; every connection (reconnects too) subscribes to these topics at QoS 1. */
int ddnn_pahoc_start(ddnn_pahoc *client, const char *const *subscriptions, int n_subscriptions);
/* 1 once connected and every subscription was granted, 0 on timeout. */
int ddnn_pahoc_wait_ready(ddnn_pahoc *client, int timeout_ms);
/* Why the last connection attempt failed ("" when none); returns its length. */
size_t ddnn_pahoc_problem(ddnn_pahoc *client, char *out, size_t out_len);
/* Up to max_messages queued messages, waiting at most timeout_ms for the first, then (linger_ms > 0) up to
 * linger_ms more for others to arrive, so a busy server takes several per call; copies topics and payloads
 * into buffer and fills records. Returns how many; stops early at a message that would not fit
 * (buffer_len must hold max_topic_bytes + max_payload_bytes). -1 once interrupted. */
int ddnn_pahoc_take(ddnn_pahoc *client, int max_messages, int timeout_ms, int linger_ms, int64_t *records,
                    uint8_t *buffer, size_t buffer_len);
/* Wakes ddnn_pahoc_take() for good (shutdown). */
void ddnn_pahoc_interrupt(ddnn_pahoc *client);
/* 0 when Paho took the message, else Paho's error code (MQTTASYNC_*, negative). */
int ddnn_pahoc_publish(ddnn_pahoc *client, const char *topic, const uint8_t *payload, size_t len, int qos,
                       int retain);
/* n messages in one call (a worker's replies to a batch, without a Python-to-C crossing each): message i has
 * the NUL-terminated topic at topics + topic_offsets[i] and the payload payloads[payload_offsets[i] ..
 * payload_offsets[i + 1]). results[i] gets ddnn_pahoc_publish's code; returns how many were not taken. */
int ddnn_pahoc_publish_many(ddnn_pahoc *client, const char *topics, const int64_t *topic_offsets,
                            const uint8_t *payloads, const int64_t *payload_offsets, int n, int qos, int *results);
/* Unsubscribe the request subscriptions (the shared group routes new requests elsewhere); 1 once the
 * broker confirmed within timeout_ms. */
int ddnn_pahoc_unsubscribe(ddnn_pahoc *client, const char *const *topics, int n_topics, int timeout_ms);
/* 1 once every published message completed (or the connection is gone), 0 on timeout. */
int ddnn_pahoc_wait_published(ddnn_pahoc *client, int timeout_ms);
void ddnn_pahoc_get_stats(ddnn_pahoc *client, ddnn_pahoc_stats *out);
/* Disconnect (session expiry 0: nothing queues for a server that has gone) and free everything. */
void ddnn_pahoc_close(ddnn_pahoc *client, int timeout_ms);

#endif
