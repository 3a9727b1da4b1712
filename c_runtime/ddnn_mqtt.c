#include "ddnn_mqtt.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <MQTTClient.h>

#include "ddnn_exit.h"
#include "ddnn_runner_common.h"

#define TOPIC_MAX 128
#define URI_MAX 300

/* All state is static: one client per device process, no allocation by this module after start
 * (Paho allocates internally). `lock` guards everything the callback thread touches. */
static struct {
    MQTTClient client;
    int created;
    char uri[URI_MAX];
    char client_id[64];
    char device_id[DDNN_DEVICE_ID_MAX + 1];
    char request_topic[TOPIC_MAX];
    char reply_topic[TOPIC_MAX];
    char status_topic[TOPIC_MAX];
    char model_threshold_topic[TOPIC_MAX];
    char device_threshold_topic[TOPIC_MAX];
    int port;
    int connect_timeout_s, retry_ms;

    pthread_mutex_t lock;
    pthread_cond_t changed;
    int connected;
    int running;
    pthread_t reconnector;
    int reconnector_started;

    uint64_t waiting_id; /* request being waited for; 0 = none */
    int have_reply;
    ddnn_reply reply;

    int model_threshold_valid, device_threshold_valid;
    double model_threshold, device_threshold;
} net;

static void log_line(const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "ddnn_mqtt[%s]: ", net.device_id);
    vfprintf(stderr, fmt, args);
    fputc('\n', stderr);
    va_end(args);
}

static int topic_is(const char *topic, int topic_len, const char *want)
{
    size_t len = topic_len > 0 ? (size_t)topic_len : strlen(topic);
    return len == strlen(want) && memcmp(topic, want, len) == 0;
}

static int on_message(void *context, char *topic, int topic_len, MQTTClient_message *message)
{
    (void)context;
    if (topic_is(topic, topic_len, net.reply_topic)) {
        ddnn_reply reply;
        if (ddnn_reply_decode((const uint8_t *)message->payload, (size_t)message->payloadlen, &reply) != 0) {
            log_line("undecodable reply of %d bytes ignored", message->payloadlen);
        } else {
            pthread_mutex_lock(&net.lock);
            /* A reply for another request arrived after its timeout: that sample was answered locally. */
            if (net.waiting_id != 0 && reply.request_id == net.waiting_id && !net.have_reply) {
                net.reply = reply;
                net.have_reply = 1;
                pthread_cond_broadcast(&net.changed);
            }
            pthread_mutex_unlock(&net.lock);
        }
    } else {
        const int device = topic_is(topic, topic_len, net.device_threshold_topic);
        const int model = topic_is(topic, topic_len, net.model_threshold_topic);
        double value = 0.0;
        const size_t len = message->payloadlen > 0 ? (size_t)message->payloadlen : 0;
        if ((device || model) && len > 0 && !ddnn_threshold_parse((const char *)message->payload, len, &value)) {
            /* Invalid text or out of [0, 1]: keep the previous threshold. */
            log_line("ignoring invalid threshold on %s", device ? net.device_threshold_topic
                                                             : net.model_threshold_topic);
        } else if (device || model) {
            /* An empty retained message clears the topic's threshold. */
            pthread_mutex_lock(&net.lock);
            if (device) {
                net.device_threshold_valid = len > 0;
                net.device_threshold = value;
            } else {
                net.model_threshold_valid = len > 0;
                net.model_threshold = value;
            }
            pthread_mutex_unlock(&net.lock);
        }
    }
    MQTTClient_freeMessage(&message);
    MQTTClient_free(topic);
    return 1;
}

static void on_connection_lost(void *context, char *cause)
{
    (void)context;
    pthread_mutex_lock(&net.lock);
    net.connected = 0;
    pthread_cond_broadcast(&net.changed); /* a waiting request falls back now, not at its timeout */
    pthread_mutex_unlock(&net.lock);
    log_line("lost the broker (%s); reconnecting in the background", cause ? cause : "no cause");
}

static int publish_status(const char *status)
{
    MQTTClient_message message = MQTTClient_message_initializer;
    MQTTResponse response;
    message.payload = (void *)status;
    message.payloadlen = (int)strlen(status);
    message.qos = 1;
    message.retained = 1;
    int rc;
    response = MQTTClient_publishMessage5(net.client, net.status_topic, &message, NULL);
    rc = response.reasonCode;
    MQTTResponse_free(response);
    return rc;
}

/* Paho C leaves Nagle on and does not expose its socket. A request written right after the PUBACK
 * of the previous reply would then wait for the broker's delayed ACK (~40 ms per sample), so after
 * each connection we find the TCP socket whose peer is the broker port and set TCP_NODELAY on it. */
static void set_no_delay(int port)
{
    int fd, one = 1;
    for (fd = 0; fd < 1024; ++fd) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof(peer);
        int type = 0;
        socklen_t type_len = sizeof(type);
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) != 0 || type != SOCK_STREAM)
            continue;
        if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0)
            continue;
        if ((peer.ss_family == AF_INET && ntohs(((struct sockaddr_in *)&peer)->sin_port) == port) ||
            (peer.ss_family == AF_INET6 && ntohs(((struct sockaddr_in6 *)&peer)->sin6_port) == port))
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
}

static int connect_once(void)
{
    MQTTClient_connectOptions options = MQTTClient_connectOptions_initializer5;
    MQTTClient_willOptions will = MQTTClient_willOptions_initializer;
    MQTTResponse response;
    char *topics[3];
    int qos[3] = {1, 1, 1};
    int rc;

    will.topicName = net.status_topic;
    will.message = "offline";
    will.retained = 1;
    will.qos = 1;
    options.keepAliveInterval = 10;
    options.cleanstart = 1; /* replies to an earlier connection are stale: they were answered locally */
    options.connectTimeout = net.connect_timeout_s;
    options.will = &will;
    response = MQTTClient_connect5(net.client, &options, NULL, NULL);
    rc = response.reasonCode;
    MQTTResponse_free(response);
    if (rc != MQTTCLIENT_SUCCESS)
        return rc;
    set_no_delay(net.port);
    topics[0] = net.reply_topic;
    topics[1] = net.model_threshold_topic;
    topics[2] = net.device_threshold_topic;
    response = MQTTClient_subscribeMany5(net.client, 3, topics, qos, NULL, NULL);
    rc = response.reasonCode;
    MQTTResponse_free(response);
    if (rc > 2) { /* granted QoS 0..2 are successes */
        MQTTClient_disconnect5(net.client, 0, MQTTREASONCODE_UNSPECIFIED_ERROR, NULL);
        return rc;
    }
    publish_status("online");
    pthread_mutex_lock(&net.lock);
    net.connected = 1;
    pthread_cond_broadcast(&net.changed);
    pthread_mutex_unlock(&net.lock);
    log_line("connected to %s as %s", net.uri, net.client_id);
    return 0;
}

static void *reconnect_loop(void *arg)
{
    int logged = 0;
    (void)arg;
    for (;;) {
        int connected, running;
        pthread_mutex_lock(&net.lock);
        connected = net.connected;
        running = net.running;
        pthread_mutex_unlock(&net.lock);
        if (!running)
            break;
        if (!connected) {
            if (connect_once() == 0) {
                logged = 0;
            } else if (!logged) {
                log_line("no broker at %s; retrying every %d ms", net.uri, net.retry_ms);
                logged = 1;
            }
        }
        ddnn_sleep_ms(net.retry_ms);
    }
    return NULL;
}

int ddnn_mqtt_start(const ddnn_mqtt_config *config, int wait_ms)
{
    MQTTClient_createOptions create = MQTTClient_createOptions_initializer;
    size_t id_len;
    char hex[2 * DDNN_WIRE_HASH_BYTES + 1];
    int i, n;

    if (!ddnn_device_id_valid(config->device_id)) {
        fprintf(stderr, "ddnn_mqtt: device id must be 1..%d characters of A-Z a-z 0-9 _ . - starting with a "
                        "letter or digit\n", DDNN_DEVICE_ID_MAX);
        return -1;
    }
    id_len = strlen(config->device_id);
    memset(&net, 0, sizeof(net));
    memcpy(net.device_id, config->device_id, id_len + 1);
    for (i = 0; i < DDNN_WIRE_HASH_BYTES; ++i)
        snprintf(hex + 2 * i, 3, "%02x", config->model_hash[i]);
    n = snprintf(net.uri, sizeof(net.uri), "tcp://%s:%d", config->host, config->port);
    if (n < 0 || (size_t)n >= sizeof(net.uri))
        return -1;
    /* Unique per device and per process: two runs of one device never kick each other off. */
    snprintf(net.client_id, sizeof(net.client_id), "ddnn-dev-%s-%lx", net.device_id,
             (unsigned long)(time(NULL) ^ (long)clock()));
    /* The device id in the request topic is what the server answers (and what a broker ACL ties to this
     * device's credentials); the reply comes back on the device's own reply topic. */
    snprintf(net.request_topic, TOPIC_MAX, "ddnn/req/%s/%s", hex, net.device_id);
    snprintf(net.reply_topic, TOPIC_MAX, "ddnn/reply/%s", net.device_id);
    snprintf(net.status_topic, TOPIC_MAX, "ddnn/status/%s", net.device_id);
    snprintf(net.model_threshold_topic, TOPIC_MAX, "ddnn/threshold/%s", hex);
    snprintf(net.device_threshold_topic, TOPIC_MAX, "ddnn/threshold/%s/%s", hex, net.device_id);
    net.port = config->port;
    net.connect_timeout_s = config->connect_timeout_s > 0 ? config->connect_timeout_s : 2;
    net.retry_ms = config->retry_ms > 0 ? config->retry_ms : 200;
    pthread_mutex_init(&net.lock, NULL);
    pthread_cond_init(&net.changed, NULL);
    create.MQTTVersion = MQTTVERSION_5;
    if (MQTTClient_createWithOptions(&net.client, net.uri, net.client_id, MQTTCLIENT_PERSISTENCE_NONE, NULL,
                                     &create) != MQTTCLIENT_SUCCESS) {
        fprintf(stderr, "ddnn_mqtt: cannot create a client for %s\n", net.uri);
        return -1;
    }
    net.created = 1;
    if (MQTTClient_setCallbacks(net.client, NULL, on_connection_lost, on_message, NULL) != MQTTCLIENT_SUCCESS) {
        fprintf(stderr, "ddnn_mqtt: cannot set up the client\n");
        return -1;
    }
    net.running = 1;
    if (pthread_create(&net.reconnector, NULL, reconnect_loop, NULL) != 0) {
        fprintf(stderr, "ddnn_mqtt: cannot start the reconnection thread\n");
        return -1;
    }
    net.reconnector_started = 1;
    for (i = 0; i < wait_ms / 10 && !ddnn_mqtt_connected(); ++i)
        ddnn_sleep_ms(10);
    return 0;
}

int ddnn_mqtt_connected(void)
{
    int connected;
    pthread_mutex_lock(&net.lock);
    connected = net.connected;
    pthread_mutex_unlock(&net.lock);
    return connected;
}

static void deadline_after(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec += 1;
        ts->tv_nsec -= 1000000000L;
    }
}

int ddnn_mqtt_request(const uint8_t *request, size_t len, uint64_t request_id, int timeout_ms, ddnn_reply *reply)
{
    MQTTClient_message message = MQTTClient_message_initializer;
    MQTTResponse response;
    struct timespec deadline;
    int rc, result;

    if (!ddnn_mqtt_connected() || request_id == 0)
        return DDNN_NET_OFFLINE;
    pthread_mutex_lock(&net.lock);
    net.waiting_id = request_id;
    net.have_reply = 0;
    pthread_mutex_unlock(&net.lock);
    message.payload = (void *)request;
    message.payloadlen = (int)len;
    message.qos = 1;
    response = MQTTClient_publishMessage5(net.client, net.request_topic, &message, NULL);
    rc = response.reasonCode;
    MQTTResponse_free(response);
    pthread_mutex_lock(&net.lock);
    if (rc != MQTTCLIENT_SUCCESS) {
        result = DDNN_NET_OFFLINE;
    } else {
        /* CLOCK_REALTIME deadline: pthread_condattr_setclock is not in every libc this targets. */
        deadline_after(&deadline, timeout_ms);
        while (!net.have_reply && net.connected)
            if (pthread_cond_timedwait(&net.changed, &net.lock, &deadline) == ETIMEDOUT)
                break;
        result = net.have_reply ? DDNN_NET_OK : (net.connected ? DDNN_NET_TIMEOUT : DDNN_NET_OFFLINE);
        if (net.have_reply)
            *reply = net.reply;
    }
    net.waiting_id = 0;
    pthread_mutex_unlock(&net.lock);
    return result;
}

int ddnn_mqtt_threshold(double fallback, double *threshold, const char **source)
{
    double value = fallback;
    const char *from = "default";
    pthread_mutex_lock(&net.lock);
    if (net.device_threshold_valid) {
        value = net.device_threshold;
        from = net.device_threshold_topic;
    } else if (net.model_threshold_valid) {
        value = net.model_threshold;
        from = net.model_threshold_topic;
    }
    pthread_mutex_unlock(&net.lock);
    if (source != NULL)
        *source = from;
    if (value == *threshold)
        return 0;
    *threshold = value;
    return 1;
}

void ddnn_mqtt_stop(void)
{
    if (!net.created)
        return;
    pthread_mutex_lock(&net.lock);
    net.running = 0;
    pthread_mutex_unlock(&net.lock);
    if (net.reconnector_started)
        pthread_join(net.reconnector, NULL);
    if (ddnn_mqtt_connected()) {
        publish_status("offline");
        MQTTClient_disconnect5(net.client, 1000, MQTTREASONCODE_NORMAL_DISCONNECTION, NULL);
    }
    MQTTClient_destroy(&net.client);
    pthread_cond_destroy(&net.changed);
    pthread_mutex_destroy(&net.lock);
    net.created = 0;
}
