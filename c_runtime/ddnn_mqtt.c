#include "ddnn_mqtt.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <MQTTClient.h>

#include "ddnn_exit.h"
#include "ddnn_features.h"
#include "ddnn_runner_common.h"
#include "ddnn_timer.h"

#define TOPIC_MAX 128
#define URI_MAX 300
#define PASSWORD_MAX 255 /* the same bound as ddnn_gen/wire/connection.py */
/* Feature requests waiting for the answering thread; past this, counted unsent (the aggregator's deadline
 * covers them). A camera waits for each event's answer before the next, so a handful is already generous. */
#define PENDING_FEATURES DDNN_FEATURES_DEFAULT_EVENTS

/* All state is static: one client per device process, no allocation by this module after start
 * (Paho allocates internally). `lock` guards everything the callback thread touches. */
static struct {
    MQTTClient client;
    int created;
    char uri[URI_MAX];
    char uris[DDNN_MQTT_MAX_BROKERS][URI_MAX]; /* uri first, then the --also-broker nodes */
    char *uri_list[DDNN_MQTT_MAX_BROKERS];
    int uri_count;
    char password[PASSWORD_MAX + 1];
    ddnn_mqtt_config config; /* the caller's strings must outlive the client (argv does) */
    char device_id[DDNN_DEVICE_ID_MAX + 1];
    char request_topic[TOPIC_MAX];
    char reply_topic[TOPIC_MAX];
    char status_topic[TOPIC_MAX];
    char telemetry_topic[TOPIC_MAX];
    char model_key[2 * DDNN_WIRE_HASH_BYTES + 1];
    char model_threshold_topic[TOPIC_MAX];
    char device_threshold_topic[TOPIC_MAX];
    char features_topic[TOPIC_MAX];
    int connect_timeout_s, retry_ms;

    pthread_mutex_t lock;
    pthread_cond_t changed; /* timed waits on CLOCK_MONOTONIC: a wall-clock step cannot cut a wait short */
    int connected;
    int running;
    int taken_over;
    int last_refusal; /* the last connection failure logged, so a broker that keeps refusing is said once */
    pthread_t reconnector;
    int reconnector_started;

    uint64_t waiting_id; /* request being waited for; 0 = none */
    const uint8_t *waiting_request; /* its bytes (the caller's, valid while it waits), to send again */
    size_t waiting_len;
    int have_reply;
    ddnn_reply reply;

    int model_threshold_valid, device_threshold_valid;
    double model_threshold, device_threshold;

    ddnn_mqtt_feature_counts features; /* under lock */
    /* Valid feature requests handed from Paho's callback thread to the answering thread (see on_message). */
    pthread_cond_t pending_changed;
    ddnn_feature_request pending[PENDING_FEATURES];
    size_t pending_head, pending_count;
    pthread_t answerer;
    int answerer_started;
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

static int publish(const char *topic, const void *payload, size_t len, int retained);

static int send_split(const uint8_t *request, size_t len, void *context)
{
    (void)context;
    return publish(net.request_topic, request, len, 0);
}

/* Answers one valid feature request of this model, on the answering thread: the split held for it, or
 * NO_FEATURES. */
static void answer_feature_request(const ddnn_feature_request *request)
{
    uint64_t *count;
    int rc = MQTTCLIENT_SUCCESS;
    if (ddnn_features_answer(request->event_id, request->request_id, send_split, NULL, &rc)) {
        count = &net.features.answered;
    } else {
        ddnn_request_header header;
        uint8_t out[DDNN_REQUEST_HEADER_BYTES];
        size_t n;
        memset(&header, 0, sizeof header);
        memcpy(header.model_hash, request->model_hash, DDNN_WIRE_HASH_BYTES);
        header.split_layer = net.config.split_layer;
        header.request_id = request->request_id;
        header.device_time_us = ddnn_now_ns() / 1000u;
        header.event_id = request->event_id;
        header.view_index = net.config.view_index;
        header.view_count = net.config.view_count;
        n = ddnn_request_encode_no_features(&header, out, sizeof out);
        rc = n > 0 ? publish(net.request_topic, out, n, 0) : MQTTCLIENT_FAILURE;
        count = &net.features.withheld;
    }
    pthread_mutex_lock(&net.lock);
    ++*count;
    if (rc != MQTTCLIENT_SUCCESS)
        ++net.features.unsent;
    pthread_mutex_unlock(&net.lock);
}

static void *answer_loop(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&net.lock);
    for (;;) {
        ddnn_feature_request request;
        while (net.pending_count == 0 && net.running)
            pthread_cond_wait(&net.pending_changed, &net.lock);
        if (!net.running)
            break;
        request = net.pending[net.pending_head];
        net.pending_head = (net.pending_head + 1) % PENDING_FEATURES;
        --net.pending_count;
        pthread_mutex_unlock(&net.lock);
        answer_feature_request(&request);
        pthread_mutex_lock(&net.lock);
    }
    pthread_mutex_unlock(&net.lock);
    return NULL;
}

/* Everything on the features topic is hostile until decoded: a malformed request or another model's is
 * counted and dropped; a valid one is queued for the answering thread.
 *
 * Not answered here: Paho's MQTTClient API forbids calling it from inside a callback ("You must not call a
 * function from this API from within a callback otherwise a deadlock might result", MQTTClient.h, @page
 * callbacks, Paho C 1.3.12 as installed and upstream v1.3.13). The deadlock is real for a publish:
 * MQTTClient_publish5 (MQTTClient.c) waits for a partly written packet by looping on MQTTClient_yield(),
 * which only sleeps while the background thread runs, and that background thread is the one inside this
 * callback, the only one that would finish the write. A split larger than the socket's free send buffer
 * would hang the camera's network thread for good (reproduced with libpaho-mqtt3c 1.3.12 on loopback: a
 * 64 MiB QoS 1 publish from messageArrived never returned; the same from the main thread returned at once). */
static void on_feature_request(const uint8_t *data, size_t len)
{
    ddnn_feature_request request;
    const int refusal = ddnn_feature_request_decode(data, len, &request);
    pthread_mutex_lock(&net.lock);
    if (refusal != DDNN_FEATURES_OK) {
        if (net.features.refused == 0) /* said once: a flood must not flood the log too */
            log_line("ignoring a message of %lu bytes on %s: not a feature request (reason %d)", (unsigned long)len,
                     net.features_topic, refusal);
        ++net.features.refused;
    } else if (memcmp(request.model_hash, net.config.model_hash, DDNN_WIRE_HASH_BYTES) != 0) {
        ++net.features.other_model;
    } else if (net.pending_count == PENDING_FEATURES) {
        ++net.features.unsent;
    } else {
        net.pending[(net.pending_head + net.pending_count) % PENDING_FEATURES] = request;
        ++net.pending_count;
        pthread_cond_signal(&net.pending_changed);
    }
    pthread_mutex_unlock(&net.lock);
}

static int on_message(void *context, char *topic, int topic_len, MQTTClient_message *message)
{
    (void)context;
    if (net.config.scores_first && topic_is(topic, topic_len, net.features_topic)) {
        on_feature_request((const uint8_t *)message->payload,
                           message->payloadlen > 0 ? (size_t)message->payloadlen : 0);
    } else if (topic_is(topic, topic_len, net.reply_topic)) {
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

/* The broker's DISCONNECT (MQTT 5). 0x8E: another client connected with this device id. */
static void on_disconnected(void *context, MQTTProperties *properties, enum MQTTReasonCodes reason)
{
    (void)context;
    (void)properties;
    pthread_mutex_lock(&net.lock);
    net.connected = 0;
    if (reason == MQTTREASONCODE_SESSION_TAKEN_OVER)
        net.taken_over = 1;
    pthread_cond_broadcast(&net.changed);
    pthread_mutex_unlock(&net.lock);
    if (reason == MQTTREASONCODE_SESSION_TAKEN_OVER)
        log_line("another client connected as device %s and took the session over; answering locally from now on",
                 net.device_id);
    else
        log_line("the broker disconnected this device: %s", MQTTReasonCode_toString(reason));
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

/* QoS 1 (or 0) publish on MQTT 5 or 3.1.1; Paho's result code (or the broker's MQTT 5 reason code). */
static int publish_qos(const char *topic, const void *payload, size_t len, int retained, int qos)
{
    MQTTClient_message message = MQTTClient_message_initializer;
    MQTTResponse response;
    int rc;
    message.payload = (void *)payload;
    message.payloadlen = (int)len;
    message.qos = qos;
    message.retained = retained;
    if (net.config.mqtt311)
        return MQTTClient_publishMessage(net.client, topic, &message, NULL);
    response = MQTTClient_publishMessage5(net.client, topic, &message, NULL);
    rc = response.reasonCode;
    MQTTResponse_free(response);
    return rc;
}

static int publish(const char *topic, const void *payload, size_t len, int retained)
{
    return publish_qos(topic, payload, len, retained, 1);
}

static int publish_status(const char *status)
{
    return publish(net.status_topic, status, strlen(status), 1);
}

static void disconnect(int timeout_ms, enum MQTTReasonCodes reason)
{
    if (net.config.mqtt311)
        MQTTClient_disconnect(net.client, timeout_ms);
    else
        MQTTClient_disconnect5(net.client, timeout_ms, reason, NULL);
}

static int tls_error(const char *text, size_t len, void *context)
{
    (void)context;
    while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == '\r'))
        --len;
    if (net.last_refusal == 0) /* the first failing attempt says why; the retries every retry_ms do not */
        log_line("TLS: %.*s", (int)len, text);
    return 0;
}

/* The SUBACK's verdict on topic i: Paho C 1.3 puts the first reason code in reasonCode and, when there are
 * several, all of them in reasonCodes[]. A SUBACK with fewer codes than topics refused the rest. */
static enum MQTTReasonCodes subscription_code(const MQTTResponse *response, int i)
{
    if (i >= response->reasonCodeCount)
        return MQTTREASONCODE_UNSPECIFIED_ERROR;
    if (response->reasonCodeCount > 1 && response->reasonCodes != NULL)
        return response->reasonCodes[i];
    return response->reasonCode;
}

static const char *const subscription_names[4] = {"replies", "model threshold", "device threshold",
                                                  "feature requests"};

/* A refused reply subscription leaves the device deaf (a refused features one, a scores-first camera whose
 * splits nobody can ask for): it disconnects and retries later (the broker's rules may be fixed meanwhile).
 * Refused threshold subscriptions only cost live thresholds. */
static int check_subscriptions(const MQTTResponse *response, char *const *topics, int n_topics)
{
    const char *const *names = subscription_names;
    int i, reply_ok = 1;
    for (i = 0; i < n_topics; ++i) {
        const enum MQTTReasonCodes code = subscription_code(response, i);
        if (code <= MQTTREASONCODE_GRANTED_QOS_2)
            continue;
        if (net.last_refusal == 0)
            log_line("the broker refused the %s subscription %s: %s", names[i], topics[i],
                     MQTTReasonCode_toString(code));
        if (i == 0 || i == 3)
            reply_ok = 0;
    }
    return reply_ok;
}

/* MQTT 3.1.1's SUBACK: one granted QoS per topic, 0x80 for a refusal (RabbitMQ closes the connection instead). */
static int check_subscriptions311(const int *granted, char *const *topics, int n_topics)
{
    const char *const *names = subscription_names;
    int i, reply_ok = 1;
    for (i = 0; i < n_topics; ++i) {
        if (granted[i] != 0x80)
            continue;
        if (net.last_refusal == 0)
            log_line("the broker refused the %s subscription %s", names[i], topics[i]);
        if (i == 0 || i == 3)
            reply_ok = 0;
    }
    return reply_ok;
}

static int connect_and_subscribe311(MQTTClient_connectOptions *options, char **topics, int *qos, int n_topics)
{
    int rc;
    options->MQTTVersion = MQTTVERSION_3_1_1;
    options->cleansession = 1; /* replies to an earlier connection are stale: they were answered locally */
    rc = MQTTClient_connect(net.client, options);
    if (rc != MQTTCLIENT_SUCCESS)
        return rc;
    rc = MQTTClient_subscribeMany(net.client, n_topics, topics, qos);
    if (rc == MQTTCLIENT_SUCCESS && !check_subscriptions311(qos, topics, n_topics))
        rc = MQTTREASONCODE_NOT_AUTHORIZED;
    if (rc != MQTTCLIENT_SUCCESS)
        MQTTClient_disconnect(net.client, 0);
    return rc;
}

static int connect_once(void)
{
    MQTTClient_connectOptions options = MQTTClient_connectOptions_initializer5;
    MQTTClient_connectOptions options311 = MQTTClient_connectOptions_initializer;
    MQTTClient_willOptions will = MQTTClient_willOptions_initializer;
    MQTTClient_SSLOptions ssl = MQTTClient_SSLOptions_initializer;
    MQTTResponse response;
    char *topics[4];
    const int sub_qos = net.config.subscribe_qos;
    const int n_topics = net.config.scores_first ? 4 : 3;
    int qos[4];
    int rc;

    qos[0] = qos[1] = qos[2] = qos[3] = sub_qos;
    if (net.config.mqtt311)
        options = options311;

    will.topicName = net.status_topic;
    will.message = "offline";
    will.retained = 1;
    will.qos = 1;
    options.keepAliveInterval = 10;
    if (!net.config.mqtt311)
        options.cleanstart = 1; /* replies to an earlier connection are stale: they were answered locally */
    if (net.uri_count > 1) {
        /* Paho tries them in order on each attempt: the first node while it is up, else the next one. */
        options.serverURIs = net.uri_list;
        options.serverURIcount = net.uri_count;
    }
    options.connectTimeout = net.connect_timeout_s;
    options.will = &will;
    options.username = net.config.username;
    options.password = net.config.password_file != NULL ? net.password : NULL;
    if (net.config.tls) {
        ssl.trustStore = net.config.ca_file; /* NULL: Paho loads OpenSSL's default verify paths */
        ssl.keyStore = net.config.cert_file;
        ssl.privateKey = net.config.key_file;
        ssl.enableServerCertAuth = !net.config.insecure;
        ssl.verify = !net.config.insecure; /* the certificate must name the host (or address) dialled */
        ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
        ssl.ssl_error_cb = tls_error;
        options.ssl = &ssl;
    }
    topics[0] = net.reply_topic;
    topics[1] = net.model_threshold_topic;
    topics[2] = net.device_threshold_topic;
    topics[3] = net.features_topic;
    if (net.config.mqtt311) {
        rc = connect_and_subscribe311(&options, topics, qos, n_topics);
        if (rc != MQTTCLIENT_SUCCESS)
            return rc;
    } else {
        response = MQTTClient_connect5(net.client, &options, NULL, NULL);
        rc = response.reasonCode;
        MQTTResponse_free(response);
        if (rc != MQTTCLIENT_SUCCESS)
            return rc;
        response = MQTTClient_subscribeMany5(net.client, n_topics, topics, qos, NULL, NULL);
        rc = response.reasonCode;
        if (rc >= 0 && !check_subscriptions(&response, topics, n_topics))
            rc = MQTTREASONCODE_NOT_AUTHORIZED;
        MQTTResponse_free(response);
        if (rc < 0 || rc > MQTTREASONCODE_GRANTED_QOS_2) {
            MQTTClient_disconnect5(net.client, 0, MQTTREASONCODE_UNSPECIFIED_ERROR, NULL);
            return rc;
        }
    }
    publish_status("online");
    pthread_mutex_lock(&net.lock);
    net.connected = 1;
    pthread_cond_broadcast(&net.changed);
    if (net.uri_count > 1 && net.waiting_id != 0 && !net.have_reply && net.waiting_request != NULL) {
        /* A fail-over: the reply may have been routed to the old node. Same bytes, same request id. */
        if (publish(net.request_topic, net.waiting_request, net.waiting_len, 0) == MQTTCLIENT_SUCCESS)
            log_line("sent the waiting request again after reconnecting");
    }
    pthread_mutex_unlock(&net.lock);
    log_line("connected to %s as %s%s", options.returned.serverURI ? options.returned.serverURI : net.uri,
             net.device_id,
             net.config.tls ? (net.config.insecure ? " (TLS, broker NOT verified: --insecure)" : " (TLS)") : "");
    return 0;
}

/* One line for a failed attempt: Paho's own codes are negative, the broker's MQTT 5 reason codes positive. */
static const char *failure_text(int rc)
{
    if (rc < 0)
        return MQTTClient_strerror(rc);
    return MQTTReasonCode_toString((enum MQTTReasonCodes)rc);
}

static void *reconnect_loop(void *arg)
{
    (void)arg;
    for (;;) {
        int connected, running, taken_over, rc;
        pthread_mutex_lock(&net.lock);
        connected = net.connected;
        running = net.running;
        taken_over = net.taken_over;
        pthread_mutex_unlock(&net.lock);
        if (!running || taken_over)
            break;
        if (!connected) {
            rc = connect_once();
            if (rc == 0) {
                net.last_refusal = 0;
            } else if (rc != net.last_refusal) {
                log_line("cannot use the broker at %s (%s); retrying every %d ms", net.uri, failure_text(rc),
                         net.retry_ms);
                net.last_refusal = rc;
            }
        }
        ddnn_sleep_ms(net.retry_ms);
    }
    return NULL;
}

static int read_password(const char *path)
{
    FILE *file = fopen(path, "rb");
    size_t len;
    int extra;
    if (file == NULL) {
        fprintf(stderr, "ddnn_mqtt: --password-file %s: cannot read it\n", path);
        return -1;
    }
    if (fgets(net.password, sizeof(net.password), file) == NULL)
        net.password[0] = '\0';
    len = strcspn(net.password, "\r\n");
    extra = len == strlen(net.password) && !feof(file) ? fgetc(file) : EOF;
    fclose(file);
    if (extra != EOF && extra != '\n' && extra != '\r') {
        fprintf(stderr, "ddnn_mqtt: --password-file %s: the password is longer than %d bytes\n", path, PASSWORD_MAX);
        return -1;
    }
    net.password[len] = '\0';
    if (len == 0) {
        fprintf(stderr, "ddnn_mqtt: --password-file %s: the first line is empty\n", path);
        return -1;
    }
    return 0;
}

void ddnn_mqtt_config_init(ddnn_mqtt_config *config)
{
    memset(config, 0, sizeof(*config));
}

int ddnn_mqtt_parse_option(ddnn_mqtt_config *config, int argc, char **argv, int *i)
{
    static const char *const with_value[] = {"--ca-file", "--cert", "--key", "--username", "--password-file"};
    const char **targets[5];
    const char *arg = argv[*i];
    size_t k;
    targets[0] = &config->ca_file;
    targets[1] = &config->cert_file;
    targets[2] = &config->key_file;
    targets[3] = &config->username;
    targets[4] = &config->password_file;
    if (strcmp(arg, "--tls") == 0) {
        config->tls = 1;
        return 1;
    }
    if (strcmp(arg, "--insecure") == 0) {
        config->insecure = 1;
        return 1;
    }
    if (strcmp(arg, "--mqtt-version") == 0 || strcmp(arg, "--subscribe-qos") == 0 ||
        strcmp(arg, "--also-broker") == 0) {
        const char *value = *i + 1 < argc ? argv[*i + 1] : "";
        if (strcmp(arg, "--mqtt-version") == 0 && (strcmp(value, "5") == 0 || strcmp(value, "3.1.1") == 0)) {
            config->mqtt311 = strcmp(value, "3.1.1") == 0;
        } else if (strcmp(arg, "--subscribe-qos") == 0 && (strcmp(value, "0") == 0 || strcmp(value, "1") == 0)) {
            config->subscribe_qos = value[0] - '0';
            config->subscribe_qos_set = 1;
        } else if (strcmp(arg, "--also-broker") == 0 && value[0] != '\0' && value[0] != '-' &&
                   config->also_broker_count < DDNN_MQTT_MAX_BROKERS - 1) {
            config->also_brokers[config->also_broker_count++] = value;
        } else {
            fprintf(stderr, "ddnn_mqtt: %s needs %s\n", arg,
                    strcmp(arg, "--mqtt-version") == 0 ? "5 or 3.1.1"
                    : strcmp(arg, "--subscribe-qos") == 0 ? "0 or 1"
                                                         : "HOST:PORT (at most 7 of them)");
            return -1;
        }
        ++*i;
        return 1;
    }
    for (k = 0; k < sizeof(with_value) / sizeof(with_value[0]); ++k) {
        if (strcmp(arg, with_value[k]) == 0) {
            if (*i + 1 >= argc || argv[*i + 1][0] == '\0') {
                fprintf(stderr, "ddnn_mqtt: %s needs a value\n", arg);
                return -1;
            }
            *targets[k] = argv[++*i];
            if (k <= 2)
                config->tls = 1; /* a CA file or a client certificate only mean something over TLS */
            return 1;
        }
    }
    return 0;
}

void ddnn_mqtt_usage(FILE *out)
{
    fprintf(out, "  --tls                 connect with TLS (ssl://); implied by --ca-file, --cert and --key\n"
                 "  --ca-file FILE        CA certificates (PEM) the broker's must chain to (default: system store)\n"
                 "  --cert FILE --key FILE  client certificate and key (PEM), for brokers that identify by them\n"
                 "  --username NAME       MQTT user name\n"
                 "  --password-file FILE  file whose first line is the MQTT password\n"
                 "  --insecure            TLS without checking the broker's certificate and name (testing only)\n"
                 "  --mqtt-version V      5 (default) or 3.1.1 (RabbitMQ's MQTT plugin)\n"
                 "  --subscribe-qos Q     QoS of the reply and threshold subscriptions: 1 (default), 0 on RabbitMQ\n"
                 "  --also-broker H:P     another node of the broker's cluster, tried when the others fail\n"
                 "                        (repeatable; same TLS and credentials)\n");
}

/* A flag the callback thread writes, read under the lock. */
static int read_flag(const int *flag)
{
    int value;
    pthread_mutex_lock(&net.lock);
    value = *flag;
    pthread_mutex_unlock(&net.lock);
    return value;
}

int ddnn_mqtt_taken_over(void)
{
    return read_flag(&net.taken_over);
}

int ddnn_mqtt_start(const ddnn_mqtt_config *config, int wait_ms)
{
    MQTTClient_createOptions create = MQTTClient_createOptions_initializer;
    pthread_condattr_t clock_attr;
    size_t id_len;
    char hex[2 * DDNN_WIRE_HASH_BYTES + 1];
    int i, n;

    if (!ddnn_device_id_valid(config->device_id)) {
        fprintf(stderr, "ddnn_mqtt: device id must be 1..%d characters of A-Z a-z 0-9 _ . - starting with a "
                        "letter or digit\n", DDNN_DEVICE_ID_MAX);
        return -1;
    }
    if ((config->cert_file == NULL) != (config->key_file == NULL)) {
        fprintf(stderr, "ddnn_mqtt: --cert and --key go together (a client certificate and its key)\n");
        return -1;
    }
    if (config->insecure && !config->tls) {
        fprintf(stderr, "ddnn_mqtt: --insecure needs --tls\n");
        return -1;
    }
    if (config->password_file != NULL && config->username == NULL) {
        fprintf(stderr, "ddnn_mqtt: --password-file needs --username\n");
        return -1;
    }
    id_len = strlen(config->device_id);
    memset(&net, 0, sizeof(net));
    net.config = *config;
    memcpy(net.device_id, config->device_id, id_len + 1);
    if (config->password_file != NULL && read_password(config->password_file) != 0)
        return -1;
    for (i = 0; i < DDNN_WIRE_HASH_BYTES; ++i)
        snprintf(hex + 2 * i, 3, "%02x", config->model_hash[i]);
    n = snprintf(net.uri, sizeof(net.uri), "%s://%s:%d", config->tls ? "ssl" : "tcp", config->host, config->port);
    if (n < 0 || (size_t)n >= sizeof(net.uri))
        return -1;
    if (!config->subscribe_qos_set)
        net.config.subscribe_qos = 1;
    memcpy(net.uris[0], net.uri, sizeof(net.uri));
    net.uri_list[0] = net.uris[0];
    net.uri_count = 1;
    for (i = 0; i < config->also_broker_count; ++i) {
        const char *node = config->also_brokers[i];
        const char *colon = strrchr(node, ':');
        /* HOST:PORT only: Paho parses the URI, so nothing that would read as a scheme, path or second port. */
        if (colon == NULL || colon == node || strspn(colon + 1, "0123456789") != strlen(colon + 1) ||
            strlen(colon + 1) == 0 || strlen(colon + 1) > 5 || strpbrk(node, "/ ") != NULL) {
            fprintf(stderr, "ddnn_mqtt: --also-broker %s is not HOST:PORT\n", node);
            return -1;
        }
        n = snprintf(net.uris[net.uri_count], URI_MAX, "%s://%s", config->tls ? "ssl" : "tcp", node);
        if (n < 0 || n >= URI_MAX) {
            fprintf(stderr, "ddnn_mqtt: --also-broker %s is too long\n", node);
            return -1;
        }
        net.uri_list[net.uri_count] = net.uris[net.uri_count];
        ++net.uri_count;
    }
    /* The device id in the request topic is what the server answers (and what a broker ACL ties to this
     * device's credentials); the reply comes back on the device's own reply topic. */
    snprintf(net.request_topic, TOPIC_MAX, "ddnn/req/%s/%s", hex, net.device_id);
    snprintf(net.reply_topic, TOPIC_MAX, "ddnn/reply/%s", net.device_id);
    snprintf(net.status_topic, TOPIC_MAX, "ddnn/status/%s", net.device_id);
    snprintf(net.telemetry_topic, TOPIC_MAX, "ddnn/device/%s/telemetry", net.device_id);
    memcpy(net.model_key, hex, sizeof net.model_key);
    snprintf(net.model_threshold_topic, TOPIC_MAX, "ddnn/threshold/%s", hex);
    snprintf(net.device_threshold_topic, TOPIC_MAX, "ddnn/threshold/%s/%s", hex, net.device_id);
    snprintf(net.features_topic, TOPIC_MAX, "ddnn/features/%s", net.device_id);
    net.connect_timeout_s = config->connect_timeout_s > 0 ? config->connect_timeout_s : 2;
    net.retry_ms = config->retry_ms > 0 ? config->retry_ms : 200;
    pthread_mutex_init(&net.lock, NULL);
    pthread_condattr_init(&clock_attr);
    pthread_condattr_setclock(&clock_attr, CLOCK_MONOTONIC);
    pthread_cond_init(&net.changed, &clock_attr);
    pthread_condattr_destroy(&clock_attr);
    pthread_cond_init(&net.pending_changed, NULL);
    create.MQTTVersion = config->mqtt311 ? MQTTVERSION_3_1_1 : MQTTVERSION_5;
    /* Client id = device id: one identity per device on the broker (see ddnn_mqtt.h for two processes). */
    if (MQTTClient_createWithOptions(&net.client, net.uri, net.device_id, MQTTCLIENT_PERSISTENCE_NONE, NULL,
                                     &create) != MQTTCLIENT_SUCCESS) {
        fprintf(stderr, "ddnn_mqtt: cannot create a client for %s\n", net.uri);
        return -1;
    }
    net.created = 1;
    if (MQTTClient_setCallbacks(net.client, NULL, on_connection_lost, on_message, NULL) != MQTTCLIENT_SUCCESS ||
        (!config->mqtt311 && MQTTClient_setDisconnected(net.client, NULL, on_disconnected) != MQTTCLIENT_SUCCESS)) {
        fprintf(stderr, "ddnn_mqtt: cannot set up the client\n");
        return -1;
    }
    net.running = 1;
    if (pthread_create(&net.reconnector, NULL, reconnect_loop, NULL) != 0) {
        fprintf(stderr, "ddnn_mqtt: cannot start the reconnection thread\n");
        return -1;
    }
    net.reconnector_started = 1;
    if (config->scores_first) {
        if (pthread_create(&net.answerer, NULL, answer_loop, NULL) != 0) {
            fprintf(stderr, "ddnn_mqtt: cannot start the feature answering thread\n");
            return -1;
        }
        net.answerer_started = 1;
    }
    for (i = 0; i < wait_ms / 10 && !ddnn_mqtt_connected(); ++i)
        ddnn_sleep_ms(10);
    return 0;
}

int ddnn_mqtt_connected(void)
{
    return read_flag(&net.connected);
}

static void deadline_after(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts); /* the clock net.changed waits on */
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec += 1;
        ts->tv_nsec -= 1000000000L;
    }
}

int ddnn_mqtt_request(const uint8_t *request, size_t len, uint64_t request_id, int timeout_ms, ddnn_reply *reply)
{
    struct timespec deadline;
    /* With fail-over nodes, a lost connection is waited out (until the timeout) instead of answered locally. */
    const int ride_out = net.uri_count > 1;
    int rc, result, sent;

    if (request_id == 0 || (!ride_out && !ddnn_mqtt_connected()))
        return DDNN_NET_OFFLINE;
    deadline_after(&deadline, timeout_ms);
    pthread_mutex_lock(&net.lock);
    net.waiting_id = request_id;
    net.have_reply = 0;
    net.waiting_request = request;
    net.waiting_len = len;
    /* Connected now, or (riding out) the reconnection publishes it: connect_once sends what waits. */
    sent = net.connected;
    pthread_mutex_unlock(&net.lock);
    rc = sent ? publish(net.request_topic, request, len, 0) : MQTTCLIENT_SUCCESS;
    pthread_mutex_lock(&net.lock);
    if (rc != MQTTCLIENT_SUCCESS && !ride_out) {
        result = DDNN_NET_OFFLINE;
    } else {
        while (!net.have_reply && (net.connected || ride_out) && net.running)
            if (pthread_cond_timedwait(&net.changed, &net.lock, &deadline) == ETIMEDOUT)
                break;
        result = net.have_reply ? DDNN_NET_OK : (net.connected ? DDNN_NET_TIMEOUT : DDNN_NET_OFFLINE);
        if (net.have_reply)
            *reply = net.reply;
    }
    net.waiting_id = 0;
    net.waiting_request = NULL;
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

/* A threshold as JSON: the number, or null when the topic holds none. */
static int json_threshold(char *out, size_t size, int valid, double value)
{
    return valid ? snprintf(out, size, "%.17g", value) : snprintf(out, size, "null");
}

int ddnn_mqtt_publish_telemetry(const ddnn_mqtt_counters *counters)
{
    /* Fixed size: five 20-digit counters, three %.17g numbers, the ids and the keys fit with room to spare. */
    char payload[768], model_value[32], device_value[32];
    struct timespec now;
    int model_valid, device_valid, len;
    double model_threshold, device_threshold;

    if (!net.created || !ddnn_mqtt_connected() || net.taken_over)
        return -1;
    pthread_mutex_lock(&net.lock);
    model_valid = net.model_threshold_valid;
    model_threshold = net.model_threshold;
    device_valid = net.device_threshold_valid;
    device_threshold = net.device_threshold;
    pthread_mutex_unlock(&net.lock);
    json_threshold(model_value, sizeof model_value, model_valid, model_threshold);
    json_threshold(device_value, sizeof device_value, device_valid, device_threshold);
    clock_gettime(CLOCK_REALTIME, &now);
    /* Device ids are [A-Za-z0-9_.-] and the model key hex: nothing here needs JSON escaping. */
    len = snprintf(payload, sizeof payload,
                   "{\"v\":1,\"device\":\"%s\",\"model\":\"%s\",\"time\":%.3f,\"samples\":%llu,\"local\":%llu,"
                   "\"offloaded\":%llu,\"fallback\":%llu,\"error\":%llu,\"threshold\":%.17g,"
                   "\"thresholds\":{\"model\":%s,\"device\":%s,\"default\":%.17g}}",
                   net.device_id, net.model_key, (double)now.tv_sec + (double)now.tv_nsec / 1e9,
                   (unsigned long long)counters->samples, (unsigned long long)counters->local,
                   (unsigned long long)counters->offloaded, (unsigned long long)counters->fallback,
                   (unsigned long long)counters->error, counters->threshold, model_value, device_value,
                   counters->default_threshold);
    if (len < 0 || (size_t)len >= sizeof payload)
        return -1;
    /* QoS 0, not retained: a reader wants the current figures, and the next message replaces a lost one. */
    return publish_qos(net.telemetry_topic, payload, (size_t)len, 0, 0) == MQTTCLIENT_SUCCESS ? 0 : -1;
}

void ddnn_mqtt_features(ddnn_mqtt_feature_counts *counts)
{
    pthread_mutex_lock(&net.lock);
    *counts = net.features;
    pthread_mutex_unlock(&net.lock);
}

void ddnn_mqtt_stop(void)
{
    if (!net.created)
        return;
    pthread_mutex_lock(&net.lock);
    net.running = 0;
    pthread_cond_broadcast(&net.pending_changed);
    pthread_mutex_unlock(&net.lock);
    if (net.reconnector_started)
        pthread_join(net.reconnector, NULL);
    if (net.answerer_started) /* before the client goes: it may be publishing an answer */
        pthread_join(net.answerer, NULL);
    if (ddnn_mqtt_connected()) {
        publish_status("offline");
        disconnect(1000, MQTTREASONCODE_NORMAL_DISCONNECTION);
    }
    MQTTClient_destroy(&net.client);
    pthread_cond_destroy(&net.changed);
    pthread_cond_destroy(&net.pending_changed);
    pthread_mutex_destroy(&net.lock);
    net.created = 0;
}
