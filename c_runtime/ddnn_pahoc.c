/* The server's Paho C transport: see ddnn_pahoc.h. Not part of any generated device project (the
 * device talks MQTTClient in ddnn_mqtt.c); it is built into a cffi extension by the server. */
#include "ddnn_pahoc_core.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <MQTTAsync.h>

#define MAX_SUBSCRIPTIONS 64

struct ddnn_pahoc {
    ddnn_pahoc_core core;          /* config, queue, lock, counters: ddnn_pahoc_core.h */
    MQTTAsync handle;
    char *subscriptions[MAX_SUBSCRIPTIONS];
    int subscription_qos[MAX_SUBSCRIPTIONS];
    int n_subscriptions;
    int unsubscribed;
    MQTTAsync_connectOptions connect;
    MQTTAsync_willOptions will;
    MQTTAsync_SSLOptions ssl;
    MQTTProperties connect_properties;
};

/* Called with the lock held. */
static void set_problem(ddnn_pahoc *c, const char *what, int code, const char *message)
{
    if (message != NULL && message[0] != '\0')
        snprintf(c->core.problem, sizeof c->core.problem, "%s: %s (%d)", what, message, code);
    else
        snprintf(c->core.problem, sizeof c->core.problem, "%s: %s (%d)", what, MQTTReasonCode_toString(code), code);
}

/* ---- Paho's threads ------------------------------------------------------------------------------ */

static int message_arrived(void *context, char *topic, int topic_len, MQTTAsync_message *message)
{
    ddnn_pahoc *c = context;
    /* topic_len is 0 when the topic is NUL-terminated and carries no NULs. */
    size_t tlen = topic_len > 0 ? (size_t)topic_len : strlen(topic);
    size_t wire = message->payloadlen > 0 ? (size_t)message->payloadlen : 0;
    size_t keep = wire;
    uint8_t *data = NULL;
    ddnn_pahoc_slot *s;
    int oversized = 0;

    if (tlen <= c->core.config.max_topic_bytes) {
        if (wire > c->core.config.max_payload_bytes) {
            keep = c->core.config.keep_oversized_bytes < wire ? c->core.config.keep_oversized_bytes : wire;
            oversized = 1;
        }
        data = malloc(tlen + keep + 1);
        if (data != NULL) {
            memcpy(data, topic, tlen);
            if (keep > 0)
                memcpy(data + tlen, message->payload, keep);
        }
    }
    pthread_mutex_lock(&c->core.lock);
    if (tlen > c->core.config.max_topic_bytes) {
        ++c->core.stats.dropped_topic;
    } else if (data == NULL || (s = ddnn_pahoc_core_tail(&c->core)) == NULL) {
        ++c->core.stats.dropped_full;
        free(data);
    } else {
        s->data = data;
        s->topic_len = tlen;
        s->payload_len = keep;
        s->wire_len = wire;
        s->arrived_ns = ddnn_pahoc_now_ns();
        s->qos = message->qos;
        ++c->core.count;
        ++c->core.stats.received;
        c->core.stats.oversized += (uint64_t)oversized;
        pthread_cond_broadcast(&c->core.changed);
    }
    pthread_mutex_unlock(&c->core.lock);
    MQTTAsync_freeMessage(&message);
    MQTTAsync_free(topic);
    return 1; /* handled (queued or counted): Paho must not offer it again */
}

static void subscribed(void *context, MQTTAsync_successData5 *response)
{
    ddnn_pahoc *c = context;
    int i, refused = -1;
    enum MQTTReasonCodes code = response->reasonCode;

    /* Paho reports one subscription's code in reasonCode (leaving alt.sub unset), several in alt.sub. */
    if (c->n_subscriptions > 1) {
        for (i = 0; i < response->alt.sub.reasonCodeCount && i < c->n_subscriptions; ++i)
            if (response->alt.sub.reasonCodes[i] >= MQTTREASONCODE_UNSPECIFIED_ERROR) {
                refused = i;
                code = response->alt.sub.reasonCodes[i];
                break;
            }
    } else if (code >= MQTTREASONCODE_UNSPECIFIED_ERROR) {
        refused = 0;
    }
    pthread_mutex_lock(&c->core.lock);
    if (refused >= 0 && refused < c->n_subscriptions) {
        char what[DDNN_PAHOC_PROBLEM_MAX - 56]; /* room left in problem for the reason and its code: no truncation */
        snprintf(what, sizeof what, "the broker refused the subscriptions [%.150s]", c->subscriptions[refused]);
        set_problem(c, what, code, NULL);
    } else {
        c->core.stats.subscribed = 1;
    }
    pthread_cond_broadcast(&c->core.changed);
    pthread_mutex_unlock(&c->core.lock);
}

static void subscribe_failed(void *context, MQTTAsync_failureData5 *response)
{
    ddnn_pahoc *c = context;
    pthread_mutex_lock(&c->core.lock);
    /* Paho reports a SUBACK that refuses (reason code >= 0x80) here, not in subscribed(). */
    if (response->reasonCode >= MQTTREASONCODE_UNSPECIFIED_ERROR)
        set_problem(c, "the broker refused the subscriptions", response->reasonCode, NULL);
    else
        set_problem(c, "subscribing failed", response->code, response->message);
    pthread_mutex_unlock(&c->core.lock);
}

/* Request/reply packets are small: with Nagle's algorithm on, a reply written while the broker's ACK of the
 * previous one is delayed waits ~40 ms. Paho C never sets TCP_NODELAY and exposes no socket (the device's
 * runner interposes connect(), ddnn_nodelay.c, which a Python extension cannot), so on every connection
 * this sets it on each TCP socket of the process whose peer is the broker's port: Paho's, and at worst
 * another client's of the same broker, which the server's paho-mqtt clients set anyway. */
static void set_no_delay(int port)
{
    DIR *fds = opendir("/proc/self/fd");
    struct dirent *entry;
    int fd, type, one = 1;

    if (fds == NULL)
        return;
    while ((entry = readdir(fds)) != NULL) {
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer, type_len = sizeof type;
        char *end;
        long n = strtol(entry->d_name, &end, 10);
        if (*end != '\0' || end == entry->d_name || n < 0 || n > INT32_MAX)
            continue;
        fd = (int)n;
        if (getpeername(fd, (struct sockaddr *)&peer, &peer_len) != 0 ||
            getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) != 0 || type != SOCK_STREAM)
            continue;
        if ((peer.ss_family == AF_INET && ntohs(((struct sockaddr_in *)&peer)->sin_port) == port) ||
            (peer.ss_family == AF_INET6 && ntohs(((struct sockaddr_in6 *)&peer)->sin6_port) == port))
            (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    closedir(fds);
}

static void connected(void *context, char *cause)
{
    ddnn_pahoc *c = context;
    MQTTAsync_responseOptions options = MQTTAsync_responseOptions_initializer;
    MQTTAsync_message status = MQTTAsync_message_initializer;
    int rc, resubscribe;

    (void)cause;
    set_no_delay(c->core.config.port);
    pthread_mutex_lock(&c->core.lock);
    c->core.stats.connected = 1;
    ++c->core.stats.connects;
    c->core.problem[0] = '\0';
    resubscribe = c->n_subscriptions > 0 && !c->unsubscribed;
    pthread_cond_broadcast(&c->core.changed);
    pthread_mutex_unlock(&c->core.lock);
    if (resubscribe) {
        options.onSuccess5 = subscribed;
        options.onFailure5 = subscribe_failed;
        options.context = c;
        rc = MQTTAsync_subscribeMany(c->handle, c->n_subscriptions, c->subscriptions, c->subscription_qos,
                                     &options);
        if (rc != MQTTASYNC_SUCCESS) {
            pthread_mutex_lock(&c->core.lock);
            set_problem(c, "subscribing failed", rc, MQTTAsync_strerror(rc));
            pthread_mutex_unlock(&c->core.lock);
        }
    }
    if (c->core.config.status_topic != NULL) {
        status.payload = (void *)"online";
        status.payloadlen = 6;
        status.qos = 1;
        status.retained = 1;
        MQTTAsync_sendMessage(c->handle, c->core.config.status_topic, &status, NULL);
    }
}

static void connect_failed(void *context, MQTTAsync_failureData5 *response)
{
    ddnn_pahoc *c = context;
    pthread_mutex_lock(&c->core.lock);
    if (response->reasonCode >= MQTTREASONCODE_UNSPECIFIED_ERROR)
        set_problem(c, "the broker refused the connection", response->reasonCode, NULL);
    else
        set_problem(c, "cannot connect", response->code, response->message);
    pthread_mutex_unlock(&c->core.lock);
}

static void connection_lost(void *context, char *cause)
{
    ddnn_pahoc *c = context;
    pthread_mutex_lock(&c->core.lock);
    c->core.stats.connected = 0;
    c->core.stats.subscribed = 0;
    ++c->core.stats.lost;
    snprintf(c->core.problem, sizeof c->core.problem, "lost the broker: %.200s", cause != NULL ? cause : "connection closed");
    pthread_cond_broadcast(&c->core.changed);
    pthread_mutex_unlock(&c->core.lock);
}

static void delivered(void *context, MQTTAsync_successData5 *response)
{
    ddnn_pahoc *c = context;
    (void)response;
    pthread_mutex_lock(&c->core.lock);
    ++c->core.stats.completed;
    pthread_cond_broadcast(&c->core.changed);
    pthread_mutex_unlock(&c->core.lock);
}

static void delivery_failed(void *context, MQTTAsync_failureData5 *response)
{
    ddnn_pahoc *c = context;
    (void)response;
    pthread_mutex_lock(&c->core.lock);
    ++c->core.stats.failed;
    pthread_cond_broadcast(&c->core.changed);
    pthread_mutex_unlock(&c->core.lock);
}

static void unsubscribed(void *context, MQTTAsync_successData5 *response)
{
    ddnn_pahoc *c = context;
    (void)response;
    pthread_mutex_lock(&c->core.lock);
    c->unsubscribed = 2; /* confirmed */
    pthread_cond_broadcast(&c->core.changed);
    pthread_mutex_unlock(&c->core.lock);
}

/* ---- the caller's threads ------------------------------------------------------------------------ */

static void add_int_property(MQTTProperties *properties, enum MQTTPropertyCodes code, int value)
{
    MQTTProperty property;
    memset(&property, 0, sizeof property);
    property.identifier = code;
    if (code == MQTTPROPERTY_CODE_RECEIVE_MAXIMUM)
        property.value.integer2 = (unsigned short)value; /* a two-byte integer property */
    else
        property.value.integer4 = (unsigned int)value;
    MQTTProperties_add(properties, &property);
}

ddnn_pahoc *ddnn_pahoc_create(const ddnn_pahoc_config *config, char *error, size_t error_len)
{
    MQTTAsync_createOptions create = MQTTAsync_createOptions_initializer5;
    MQTTAsync_connectOptions connect = MQTTAsync_connectOptions_initializer5;
    MQTTAsync_willOptions will = MQTTAsync_willOptions_initializer;
    MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
    MQTTProperties empty = MQTTProperties_initializer;
    ddnn_pahoc *c = calloc(1, sizeof *c);
    int rc;

    if (c == NULL) {
        snprintf(error, error_len, "out of memory");
        return NULL;
    }
    if (ddnn_pahoc_core_init(&c->core, config, error, error_len) != 0) {
        free(c);
        return NULL;
    }
    create.maxBufferedMessages = config->max_buffered;
    create.sendWhileDisconnected = 0;
    rc = MQTTAsync_createWithOptions(&c->handle, c->core.config.uri, c->core.config.client_id, MQTTCLIENT_PERSISTENCE_NONE,
                                     NULL, &create);
    if (rc != MQTTASYNC_SUCCESS) {
        snprintf(error, error_len, "cannot create a Paho C client for %s: %s", c->core.config.uri, MQTTAsync_strerror(rc));
        ddnn_pahoc_core_free(&c->core);
        free(c);
        return NULL;
    }
    MQTTAsync_setCallbacks(c->handle, c, connection_lost, message_arrived, NULL);
    MQTTAsync_setConnected(c->handle, c, connected);

    c->connect_properties = empty;
    add_int_property(&c->connect_properties, MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL, config->session_expiry_s);
    add_int_property(&c->connect_properties, MQTTPROPERTY_CODE_RECEIVE_MAXIMUM, config->receive_maximum);
    connect.keepAliveInterval = config->keepalive_s;
    connect.cleanstart = config->clean_start;
    connect.maxInflight = config->max_inflight;
    connect.username = c->core.config.username;
    connect.password = c->core.config.password;
    connect.connectTimeout = 5;
    /* Reconnect 1 s to 2 s apart (Paho counts whole seconds); the paho-mqtt transport waits 0.1 s to 2 s. */
    connect.automaticReconnect = 1;
    connect.minRetryInterval = 1;
    connect.maxRetryInterval = 2;
    connect.connectProperties = &c->connect_properties;
    connect.onFailure5 = connect_failed;
    connect.context = c;
    if (c->core.config.status_topic != NULL) {
        will.topicName = c->core.config.status_topic;
        will.message = "offline";
        will.retained = 1;
        will.qos = 1;
        c->will = will;
        connect.will = &c->will;
    }
    if (config->tls) {
        ssl.trustStore = c->core.config.ca_file; /* NULL: OpenSSL's default verify paths */
        ssl.keyStore = c->core.config.cert_file;
        ssl.privateKey = c->core.config.key_file;
        ssl.enableServerCertAuth = !config->insecure;
        ssl.verify = !config->insecure; /* the certificate must name the host dialled */
        ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
        c->ssl = ssl;
        connect.ssl = &c->ssl;
    }
    c->connect = connect;
    return c;
}

int ddnn_pahoc_start(ddnn_pahoc *c, const char *const *subscriptions, int n_subscriptions)
{
    int i, rc;

    if (n_subscriptions < 0 || n_subscriptions > MAX_SUBSCRIPTIONS)
        return MQTTASYNC_FAILURE;
    for (i = 0; i < n_subscriptions; ++i) {
        size_t n = strlen(subscriptions[i]) + 1;
        c->subscriptions[i] = malloc(n);
        if (c->subscriptions[i] == NULL)
            return MQTTASYNC_FAILURE;
        memcpy(c->subscriptions[i], subscriptions[i], n);
        c->subscription_qos[i] = 1;
        c->n_subscriptions = i + 1;
    }
    rc = MQTTAsync_connect(c->handle, &c->connect);
    if (rc != MQTTASYNC_SUCCESS) {
        pthread_mutex_lock(&c->core.lock);
        set_problem(c, "cannot connect", rc, MQTTAsync_strerror(rc));
        pthread_mutex_unlock(&c->core.lock);
    }
    return rc;
}

int ddnn_pahoc_wait_ready(ddnn_pahoc *c, int timeout_ms) { return ddnn_pahoc_core_wait_ready(&c->core, timeout_ms); }

size_t ddnn_pahoc_problem(ddnn_pahoc *c, char *out, size_t out_len)
{
    return ddnn_pahoc_core_problem(&c->core, out, out_len);
}

int ddnn_pahoc_take(ddnn_pahoc *c, int max_messages, int timeout_ms, int linger_ms, int64_t *records,
                    uint8_t *buffer, size_t buffer_len)
{
    struct timespec deadline;
    int taken;

    if (buffer_len < c->core.config.max_topic_bytes + c->core.config.max_payload_bytes)
        return -2;
    ddnn_pahoc_deadline_in(&deadline, timeout_ms);
    pthread_mutex_lock(&c->core.lock);
    while (c->core.count == 0 && !c->core.interrupted &&
           pthread_cond_timedwait(&c->core.changed, &c->core.lock, &deadline) != ETIMEDOUT) {
    }
    if (c->core.interrupted && c->core.count == 0) {
        pthread_mutex_unlock(&c->core.lock);
        return -1;
    }
    if (linger_ms > 0) {
        ddnn_pahoc_deadline_in(&deadline, linger_ms);
        while (c->core.count < (size_t)max_messages && !c->core.interrupted &&
               pthread_cond_timedwait(&c->core.changed, &c->core.lock, &deadline) != ETIMEDOUT) {
        }
    }
    taken = ddnn_pahoc_core_copy(&c->core, max_messages, records, buffer, buffer_len, NULL, NULL);
    pthread_mutex_unlock(&c->core.lock);
    return taken;
}

void ddnn_pahoc_interrupt(ddnn_pahoc *c) { ddnn_pahoc_core_interrupt(&c->core); }

int ddnn_pahoc_publish(ddnn_pahoc *c, const char *topic, const uint8_t *payload, size_t len, int qos, int retain)
{
    MQTTAsync_responseOptions options = MQTTAsync_responseOptions_initializer;
    MQTTAsync_message message = MQTTAsync_message_initializer;
    int rc;

    if (len > 268435455u) /* MQTT's largest packet */
        return MQTTASYNC_FAILURE;
    message.payload = (void *)payload; /* Paho copies it before returning */
    message.payloadlen = (int)len;
    message.qos = qos;
    message.retained = retain;
    options.onSuccess5 = delivered;
    options.onFailure5 = delivery_failed;
    options.context = c;
    pthread_mutex_lock(&c->core.lock);
    ++c->core.stats.published;
    pthread_mutex_unlock(&c->core.lock);
    rc = MQTTAsync_sendMessage(c->handle, topic, &message, &options);
    if (rc != MQTTASYNC_SUCCESS) {
        pthread_mutex_lock(&c->core.lock);
        --c->core.stats.published;
        pthread_mutex_unlock(&c->core.lock);
    }
    return rc;
}

int ddnn_pahoc_publish_many(ddnn_pahoc *c, const char *topics, const int64_t *topic_offsets, const uint8_t *payloads,
                            const int64_t *payload_offsets, int n, int qos, int *results)
{
    int i, failed = 0;

    for (i = 0; i < n; ++i) {
        int64_t len = payload_offsets[i + 1] - payload_offsets[i];

        results[i] = len < 0 ? MQTTASYNC_FAILURE
                             : ddnn_pahoc_publish(c, topics + topic_offsets[i], payloads + payload_offsets[i],
                                                  (size_t)len, qos, 0);
        failed += results[i] != MQTTASYNC_SUCCESS;
    }
    return failed;
}

int ddnn_pahoc_unsubscribe(ddnn_pahoc *c, const char *const *topics, int n_topics, int timeout_ms)
{
    MQTTAsync_responseOptions options = MQTTAsync_responseOptions_initializer;
    int done, rc;

    pthread_mutex_lock(&c->core.lock);
    c->unsubscribed = 1; /* a reconnect from now on does not subscribe again */
    pthread_mutex_unlock(&c->core.lock);
    if (n_topics == 0)
        return 1;
    options.onSuccess5 = unsubscribed;
    options.context = c;
    rc = MQTTAsync_unsubscribeMany(c->handle, n_topics, (char *const *)topics, &options);
    if (rc != MQTTASYNC_SUCCESS)
        return 0;
    pthread_mutex_lock(&c->core.lock);
    done = ddnn_pahoc_core_wait_for(&c->core, &c->unsubscribed, 2, timeout_ms);
    pthread_mutex_unlock(&c->core.lock);
    return done;
}

int ddnn_pahoc_wait_published(ddnn_pahoc *c, int timeout_ms)
{
    return ddnn_pahoc_core_wait_published(&c->core, timeout_ms);
}

void ddnn_pahoc_get_stats(ddnn_pahoc *c, ddnn_pahoc_stats *out) { ddnn_pahoc_core_get_stats(&c->core, out); }

void ddnn_pahoc_close(ddnn_pahoc *c, int timeout_ms)
{
    MQTTAsync_disconnectOptions options = MQTTAsync_disconnectOptions_initializer5;
    MQTTProperties properties = MQTTProperties_initializer;
    struct timespec pause = {0, 10000000L};
    int waited, i;

    add_int_property(&properties, MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL, 0);
    options.properties = properties;
    options.timeout = timeout_ms;
    if (MQTTAsync_isConnected(c->handle) && MQTTAsync_disconnect(c->handle, &options) == MQTTASYNC_SUCCESS)
        for (waited = 0; waited < timeout_ms && MQTTAsync_isConnected(c->handle); waited += 10)
            nanosleep(&pause, NULL);
    MQTTProperties_free(&properties);
    ddnn_pahoc_interrupt(c);
    MQTTAsync_destroy(&c->handle);
    for (i = 0; i < c->n_subscriptions; ++i)
        free(c->subscriptions[i]);
    MQTTProperties_free(&c->connect_properties);
    ddnn_pahoc_core_free(&c->core);
    free(c);
}
