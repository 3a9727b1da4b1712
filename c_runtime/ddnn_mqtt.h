/* The device's MQTT 5 client for ddnn-server (Paho C, MQTTClient API, one client per process).
 *
 * ddnn_mqtt_request() publishes one request (QoS 1) on ddnn/req/<model>/<device> and waits for the
 * reply with its request id on ddnn/reply/<device> at most timeout_ms; it returns DDNN_NET_OFFLINE at once while the broker is gone,
 * so the caller answers locally (fallback) and never hangs. A background thread reconnects and
 * re-subscribes. Retained thresholds on ddnn/threshold/<model> and ddnn/threshold/<model>/<device>
 * are tracked; ddnn_mqtt_threshold() hands the caller the current one between samples.
 * Birth/last-will: retained "online"/"offline" on ddnn/status/<device>. */
#ifndef DDNN_MQTT_H
#define DDNN_MQTT_H

#include <stddef.h>
#include <stdint.h>

#include "ddnn_protocol.h"

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
} ddnn_mqtt_config;

/* Creates the client and starts connecting in the background; waits up to wait_ms for the first
 * connection. Returns 0 (even if not yet connected), or -1 on bad configuration. */
int ddnn_mqtt_start(const ddnn_mqtt_config *config, int wait_ms);

int ddnn_mqtt_connected(void);

/* Publishes `len` request bytes carrying request_id and waits for the matching reply. */
int ddnn_mqtt_request(const uint8_t *request, size_t len, uint64_t request_id, int timeout_ms, ddnn_reply *reply);

/* Current threshold: the device-specific retained value, else the model-wide one, else `fallback`.
 * Returns 1 when it differs from *threshold (and updates it), else 0. `source` names the topic. */
int ddnn_mqtt_threshold(double fallback, double *threshold, const char **source);

/* Publishes the "offline" status, disconnects and stops the reconnection thread. */
void ddnn_mqtt_stop(void);

#endif
