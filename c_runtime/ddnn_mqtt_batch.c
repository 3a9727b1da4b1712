/* The server's own MQTT 5 client, behind the interface of ddnn_pahoc.h: ``ddnn-server --transport c-mqtt``.
 *
 * Why not Paho C: a bare Paho C echo spends 68-84 us of CPU per request/reply pair on this kind of host
 * (docs/performance.md, "Where paho-c's floor is"): a receive thread that reads each packet with several
 * small recv() calls, a send thread woken per message, a mutex and a condition variable per message.
 * This client reads whatever the socket holds in one recv() and parses every packet in it under one lock,
 * sends a take's acknowledgements and a batch's replies with one send() from the caller's thread, and
 * wakes its I/O thread only when the socket cannot take more. It speaks only what the server needs:
 * CONNECT (will, user name, password, session expiry, Receive Maximum), SUBSCRIBE/UNSUBSCRIBE, QoS 0/1
 * PUBLISH both ways, PUBACK, PINGREQ, DISCONNECT; over TCP or TLS (OpenSSL).
 *
 * Acknowledgements: a QoS 1 request is acknowledged when ddnn_pahoc_take() hands it to the server, not on
 * arrival (Paho C's way). The CONNECT asks for a Receive Maximum no larger than the queue, but Mosquitto
 * 2.0 honours it only until the first acknowledgements (measured: 8 held, 8 acked, the other 32 came at
 * once), so a full queue stops the reading instead: the rest waits in the socket and the broker, nothing
 * is dropped, and a take that makes room resumes it. A server that dies loses only what it had taken;
 * with a persistent session the broker delivers the rest again.
 *
 * Flow control the other way: at most min(max_inflight, the broker's Receive Maximum) replies await their
 * PUBACK; up to max_buffered more wait encoded behind them; beyond that a publish is refused (counted by
 * the caller). Replies are not kept across a lost connection (they fail, and their devices fall back). */
#include "ddnn_pahoc_core.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define MAX_SUBSCRIPTIONS 64
#define PACKET_LIMIT 268435455u /* MQTT's largest remaining length */
#define READ_CHUNK (256 * 1024)
#define CONNECT_TIMEOUT_MS 5000
#define TAKER_SLICE_MS 50                 /* a taker re-checks for interruption this often while it reads */
#define TAKER_GRACE_NS (50 * 1000000LL)   /* the I/O thread reads only when no take read for this long */

enum { NOBODY, IO_THREAD, TAKER };
#define FAILURE (-1)         /* MQTTASYNC_FAILURE's value: the Python side reports codes as they are */
#define DISCONNECTED (-3)    /* MQTTASYNC_DISCONNECTED */
#define MAX_BUFFERED (-12)   /* MQTTASYNC_MAX_BUFFERED_MESSAGES */

enum { PUBLISH = 3, PUBACK = 4, SUBACK = 9, UNSUBACK = 11, PINGRESP = 13, DISCONNECT = 14, CONNACK = 2 };

typedef struct {
    uint8_t *data;
    size_t len, cap;
} bytes;

typedef enum { OFFLINE, CONNECTING, ONLINE } link_state;

struct ddnn_pahoc {
    ddnn_pahoc_core core; /* config, queue, lock, counters: ddnn_pahoc_core.h */
    pthread_t io;
    int io_started;
    int wake_fd;
    int stopping;

    /* the connection (under lock) */
    int fd;
    SSL_CTX *tls_ctx;
    SSL *tls;
    link_state state;
    uint64_t connection;
    int64_t connect_started_ns, last_sent_ns, last_received_ns, ping_sent_ns;
    int keepalive_s;
    bytes out;                 /* encoded packets not yet written */
    bytes held;                /* QoS 1 replies waiting for an in-flight slot: [u32 len][packet with id 0] */
    size_t held_at;            /* first unsent byte of held */
    int held_count;
    int inflight, inflight_limit;
    int status_inflight;       /* of inflight, the client's own status publishes (not in the stats) */
    uint8_t *inflight_ids;     /* 65536 flags: packet ids awaiting a PUBACK */
    uint16_t next_id;
    uint32_t broker_max_packet;
    uint16_t subscribe_id, unsubscribe_id;

    /* reading (I/O thread only) */
    uint8_t *in;
    size_t in_len, in_cap;
    size_t skip;               /* bytes of an oversized packet still to discard */
    int paused;                /* the queue is full: no reading until a take makes room (under lock) */
    int reader;                /* who reads the socket now (NOBODY, IO_THREAD, TAKER): c->in is theirs */
    int broken;                /* the taker's read failed: the I/O thread closes the link */
    int64_t last_take_ns;      /* a taker read less than TAKER_GRACE_NS ago: the I/O thread does not */

    char *subscriptions[MAX_SUBSCRIPTIONS];
    int n_subscriptions;
    int unsubscribed;
    int acks_queued;           /* this take queued PUBACKs (under lock) */
};

/* ---- encoding --------------------------------------------------------------------------------------- */

static int reserve(bytes *b, size_t more)
{
    size_t cap = b->cap ? b->cap : 4096;
    uint8_t *grown;
    if (b->len + more <= b->cap)
        return 0;
    while (cap < b->len + more)
        cap *= 2;
    grown = realloc(b->data, cap);
    if (grown == NULL)
        return -1;
    b->data = grown;
    b->cap = cap;
    return 0;
}

/* Callers reserve first: these never fail. */
static void put_u8(bytes *b, unsigned v) { b->data[b->len++] = (uint8_t)v; }
static void put_u16(bytes *b, unsigned v)
{
    put_u8(b, v >> 8);
    put_u8(b, v & 0xff);
}
static void put_u32(bytes *b, uint32_t v)
{
    put_u16(b, v >> 16);
    put_u16(b, v & 0xffff);
}
static void put_varint(bytes *b, size_t v)
{
    do {
        uint8_t byte = v % 128;
        v /= 128;
        put_u8(b, byte | (v > 0 ? 0x80 : 0));
    } while (v > 0);
}
static void put_data(bytes *b, const void *data, size_t len)
{
    put_u16(b, (unsigned)len);
    memcpy(b->data + b->len, data, len);
    b->len += len;
}
static size_t varint_size(size_t v) { return v < 128 ? 1 : v < 16384 ? 2 : v < 2097152 ? 3 : 4; }

/* A PUBLISH (no properties) appended to b; *id_at gets the offset of its packet id (QoS 1). */
static int encode_publish(bytes *b, const char *topic, size_t topic_len, const uint8_t *payload, size_t len,
                          int qos, int retain, uint16_t id, size_t *id_at)
{
    size_t remaining = 2 + topic_len + (qos > 0 ? 2 : 0) + 1 + len;
    if (remaining > PACKET_LIMIT || reserve(b, 5 + remaining) != 0)
        return -1;
    put_u8(b, 0x30 | (qos << 1) | (retain ? 1 : 0));
    put_varint(b, remaining);
    put_data(b, topic, topic_len);
    if (qos > 0) {
        *id_at = b->len;
        put_u16(b, id);
    }
    put_u8(b, 0); /* no properties */
    memcpy(b->data + b->len, payload, len);
    b->len += len;
    return 0;
}

/* ---- the socket (lock held) -------------------------------------------------------------------------- */

static void wake_io(ddnn_pahoc *c)
{
    uint64_t one = 1;
    ssize_t rc = write(c->wake_fd, &one, sizeof one);
    (void)rc; /* a full eventfd is already a wake-up */
}

/* Writes what it can of c->out without blocking; 0 when fine (some may remain), -1 when the link is gone. */
static int flush_out(ddnn_pahoc *c)
{
    size_t sent = 0;
    while (sent < c->out.len) {
        ssize_t n;
        if (c->tls != NULL) {
            int w = SSL_write(c->tls, c->out.data + sent, (int)(c->out.len - sent > INT32_MAX ? INT32_MAX
                                                                                               : c->out.len - sent));
            if (w <= 0) {
                int e = SSL_get_error(c->tls, w);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
                    break;
                return -1;
            }
            n = w;
        } else {
            n = send(c->fd, c->out.data + sent, c->out.len - sent, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                return -1;
            }
        }
        sent += (size_t)n;
    }
    if (sent > 0) {
        memmove(c->out.data, c->out.data + sent, c->out.len - sent);
        c->out.len -= sent;
        c->last_sent_ns = ddnn_pahoc_now_ns();
    }
    return 0;
}

/* After appending to c->out from a caller's thread: write now, and leave the rest to the I/O thread. */
static void send_or_wake(ddnn_pahoc *c)
{
    if (c->state == OFFLINE)
        return;
    if (flush_out(c) != 0 || c->out.len > 0)
        wake_io(c);
}

/* A packet id no packet in flight uses (MQTT's ids are one space for PUBLISH, SUBSCRIBE, UNSUBSCRIBE):
 * REPLY_ID marks a caller's QoS 1 publish awaiting its PUBACK, STATUS_ID the client's own "online" (both
 * take one of the broker's in-flight slots; only the caller's count in the stats), OTHER_ID an
 * (un)subscription. */
enum { FREE_ID, REPLY_ID, STATUS_ID, OTHER_ID };

static uint16_t reserve_id(ddnn_pahoc *c, uint8_t kind)
{
    do {
        c->next_id = (uint16_t)(c->next_id + 1);
    } while (c->next_id == 0 || c->inflight_ids[c->next_id] != FREE_ID);
    c->inflight_ids[c->next_id] = kind;
    c->inflight += kind == REPLY_ID || kind == STATUS_ID;
    c->status_inflight += kind == STATUS_ID;
    return c->next_id;
}

static uint16_t take_packet_id(ddnn_pahoc *c) { return reserve_id(c, REPLY_ID); }

/* Held replies into flight while slots are free. */
static void release_held(ddnn_pahoc *c)
{
    while (c->held_count > 0 && c->inflight < c->inflight_limit) {
        uint32_t len;
        uint8_t *packet = c->held.data + c->held_at;
        size_t id_at;
        uint16_t id;
        memcpy(&len, packet, 4);
        memcpy(&id_at, packet + 4, sizeof id_at);
        packet += 4 + sizeof id_at;
        if (reserve(&c->out, len) != 0)
            return;
        id = take_packet_id(c);
        packet[id_at] = (uint8_t)(id >> 8);
        packet[id_at + 1] = (uint8_t)(id & 0xff);
        memcpy(c->out.data + c->out.len, packet, len);
        c->out.len += len;
        c->held_at += 4 + sizeof id_at + len;
        --c->held_count;
    }
    if (c->held_count == 0)
        c->held.len = c->held_at = 0;
}

static void close_link(ddnn_pahoc *c, const char *why)
{
    size_t i;
    if (c->state == ONLINE) {
        ++c->core.stats.lost;
        snprintf(c->core.problem, sizeof c->core.problem, "lost the broker: %.200s", why);
    }
    if (c->tls != NULL) {
        SSL_free(c->tls);
        c->tls = NULL;
    }
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = OFFLINE;
    c->core.stats.connected = c->core.stats.subscribed = 0;
    /* Replies in flight or held will not be confirmed on this connection: they failed. */
    c->core.stats.failed += (uint64_t)(c->inflight - c->status_inflight + c->held_count);
    c->inflight = c->held_count = c->status_inflight = 0;
    c->held.len = c->held_at = 0;
    memset(c->inflight_ids, 0, 65536);
    c->out.len = 0;
    /* With a persistent session the broker delivers what was not acknowledged again: drop those here. */
    if (!c->core.config.clean_start && c->core.config.session_expiry_s > 0) {
        size_t kept = 0;
        for (i = 0; i < c->core.count; ++i) {
            ddnn_pahoc_slot *s = &c->core.ring[(c->core.head + i) % c->core.config.queue_capacity];
            if (s->qos > 0) {
                free(s->data);
            } else {
                c->core.ring[(c->core.head + kept) % c->core.config.queue_capacity] = *s;
                ++kept;
            }
        }
        c->core.count = kept;
    }
    pthread_cond_broadcast(&c->core.changed);
}

/* ---- connecting (I/O thread, lock not held while it blocks) ----------------------------------------- */

static int split_uri(const char *uri, char *host, size_t host_len, char *port, size_t port_len)
{
    const char *rest = strstr(uri, "://"), *colon;
    size_t n;
    rest = rest != NULL ? rest + 3 : uri;
    colon = strrchr(rest, ':');
    if (colon == NULL)
        return -1;
    n = (size_t)(colon - rest);
    if (n > 0 && rest[0] == '[' && rest[n - 1] == ']') {
        ++rest;
        n -= 2;
    }
    if (n == 0 || n >= host_len || strlen(colon + 1) >= port_len)
        return -1;
    memcpy(host, rest, n);
    host[n] = '\0';
    strcpy(port, colon + 1);
    return 0;
}

static int dial(ddnn_pahoc *c, char *problem, size_t problem_len)
{
    char host[256], port[16];
    struct addrinfo hints, *found, *a;
    int fd = -1, rc, one = 1;

    if (split_uri(c->core.config.uri, host, sizeof host, port, sizeof port) != 0) {
        snprintf(problem, problem_len, "cannot connect: bad broker address %.200s", c->core.config.uri);
        return -1;
    }
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &found);
    if (rc != 0) {
        snprintf(problem, problem_len, "cannot connect: %.100s: %.100s", host, gai_strerror(rc));
        return -1;
    }
    for (a = found; a != NULL; a = a->ai_next) {
        struct pollfd p;
        int err = 0;
        socklen_t err_len = sizeof err;
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
            err = errno;
        } else {
            p.fd = fd;
            p.events = POLLOUT;
            if (poll(&p, 1, CONNECT_TIMEOUT_MS) != 1)
                err = ETIMEDOUT;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &err_len) != 0)
                err = errno;
        }
        if (err == 0)
            break;
        snprintf(problem, problem_len, "cannot connect: TCP connect to %.100s:%.10s: %.80s", host, port,
                 strerror(err));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    if (fd >= 0)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void tls_problem(char *problem, size_t problem_len, const char *what)
{
    char reason[160];
    unsigned long e = ERR_get_error();
    ERR_error_string_n(e, reason, sizeof reason);
    snprintf(problem, problem_len, "cannot connect: TLS %s: %.160s", what, e ? reason : "failed");
    ERR_clear_error();
}

/* The TLS handshake on the non-blocking socket, within the connect timeout. */
static SSL *handshake(ddnn_pahoc *c, int fd, const char *host, char *problem, size_t problem_len)
{
    SSL *tls = SSL_new(c->tls_ctx);
    int64_t deadline = ddnn_pahoc_now_ns() + (int64_t)CONNECT_TIMEOUT_MS * 1000000;
    if (tls == NULL || SSL_set_fd(tls, fd) != 1) {
        tls_problem(problem, problem_len, "setup");
        SSL_free(tls);
        return NULL;
    }
    SSL_set_tlsext_host_name(tls, host);
    if (!c->core.config.insecure && SSL_set1_host(tls, host) != 1) {
        tls_problem(problem, problem_len, "setup");
        SSL_free(tls);
        return NULL;
    }
    for (;;) {
        struct pollfd p = {fd, 0, 0};
        int rc = SSL_connect(tls), e, left;
        if (rc == 1)
            return tls;
        e = SSL_get_error(tls, rc);
        left = (int)((deadline - ddnn_pahoc_now_ns()) / 1000000);
        if ((e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) || left <= 0) {
            long verify = SSL_get_verify_result(tls);
            if (verify != X509_V_OK)
                snprintf(problem, problem_len, "cannot connect: TLS: certificate verify failed: %.150s",
                         X509_verify_cert_error_string(verify));
            else
                tls_problem(problem, problem_len, left <= 0 ? "handshake timed out" : "handshake");
            SSL_free(tls);
            return NULL;
        }
        p.events = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        (void)poll(&p, 1, left);
    }
}

static int encode_connect(ddnn_pahoc *c, bytes *b)
{
    const char *status = c->core.config.status_topic;
    size_t id_len = strlen(c->core.config.client_id), user_len = c->core.config.username ? strlen(c->core.config.username) : 0;
    size_t pass_len = c->core.config.password ? strlen(c->core.config.password) : 0;
    size_t status_len = status ? strlen(status) : 0;
    size_t props = 5 + 3; /* session expiry, receive maximum */
    size_t remaining = 10 + varint_size(props) + props + 2 + id_len;
    int receive_maximum = c->core.config.receive_maximum;
    unsigned flags = c->core.config.clean_start ? 0x02 : 0;

    if (id_len > DDNN_PAHOC_TOPIC_LIMIT || user_len > DDNN_PAHOC_TOPIC_LIMIT || pass_len > DDNN_PAHOC_TOPIC_LIMIT || status_len > DDNN_PAHOC_TOPIC_LIMIT)
        return -1;
    /* Never more unacknowledged requests than the queue holds: the broker keeps the rest. */
    if ((size_t)receive_maximum > c->core.config.queue_capacity)
        receive_maximum = (int)c->core.config.queue_capacity;
    if (status != NULL) {
        remaining += 1 + 2 + status_len + 2 + 7;
        flags |= 0x04 | 0x08 | 0x20; /* will, QoS 1, retained */
    }
    if (c->core.config.username != NULL) {
        remaining += 2 + user_len;
        flags |= 0x80;
    }
    if (c->core.config.password != NULL) {
        remaining += 2 + pass_len;
        flags |= 0x40;
    }
    if (reserve(b, 5 + remaining) != 0)
        return -1;
    put_u8(b, 0x10);
    put_varint(b, remaining);
    put_data(b, "MQTT", 4);
    put_u8(b, 5);
    put_u8(b, flags);
    put_u16(b, (unsigned)c->core.config.keepalive_s);
    put_varint(b, props);
    put_u8(b, 0x11);
    put_u32(b, (uint32_t)c->core.config.session_expiry_s);
    put_u8(b, 0x21);
    put_u16(b, (unsigned)receive_maximum);
    put_data(b, c->core.config.client_id, id_len);
    if (status != NULL) {
        put_u8(b, 0); /* will properties */
        put_data(b, status, status_len);
        put_data(b, "offline", 7);
    }
    if (c->core.config.username != NULL)
        put_data(b, c->core.config.username, user_len);
    if (c->core.config.password != NULL)
        put_data(b, c->core.config.password, pass_len);
    return 0;
}

/* Opens the TCP (and TLS) connection and queues CONNECT; the CONNACK comes through the read loop. */
static void open_link(ddnn_pahoc *c)
{
    char problem[DDNN_PAHOC_PROBLEM_MAX] = "", host[256], port[16];
    int fd = dial(c, problem, sizeof problem);
    SSL *tls = NULL;

    if (fd >= 0 && c->tls_ctx != NULL) {
        (void)split_uri(c->core.config.uri, host, sizeof host, port, sizeof port);
        tls = handshake(c, fd, host, problem, sizeof problem);
        if (tls == NULL) {
            close(fd);
            fd = -1;
        }
    }
    pthread_mutex_lock(&c->core.lock);
    if (fd < 0) {
        snprintf(c->core.problem, sizeof c->core.problem, "%s", problem);
    } else {
        c->fd = fd;
        c->tls = tls;
        c->state = CONNECTING;
        c->connect_started_ns = ddnn_pahoc_now_ns();
        c->out.len = 0;
        c->in_len = c->skip = 0;
        if (encode_connect(c, &c->out) != 0 || flush_out(c) != 0)
            close_link(c, "cannot send CONNECT");
    }
    pthread_mutex_unlock(&c->core.lock);
}

/* ---- reading (I/O thread, lock held) ---------------------------------------------------------------- */

static int get_varint(const uint8_t *p, size_t len, size_t *value, size_t *used)
{
    size_t v = 0, i;
    for (i = 0; i < 4 && i < len; ++i) {
        v |= (size_t)(p[i] & 0x7f) << (7 * i);
        if (!(p[i] & 0x80)) {
            *value = v;
            *used = i + 1;
            return 1;
        }
    }
    return i == 4 ? -1 : 0; /* -1 malformed, 0 incomplete */
}

static uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* MQTT 5's names for the failure reason codes a broker sends (section 2.4), as Paho C spells them. */
static const char *reason_name(int code)
{
    switch (code) {
    case 0x80: return "Unspecified error";
    case 0x81: return "Malformed Packet";
    case 0x82: return "Protocol Error";
    case 0x83: return "Implementation specific error";
    case 0x84: return "Unsupported Protocol Version";
    case 0x85: return "Client Identifier not valid";
    case 0x86: return "Bad User Name or Password";
    case 0x87: return "Not authorized";
    case 0x88: return "Server unavailable";
    case 0x89: return "Server busy";
    case 0x8A: return "Banned";
    case 0x8B: return "Server shutting down";
    case 0x8C: return "Bad authentication method";
    case 0x8D: return "Keep Alive timeout";
    case 0x8E: return "Session taken over";
    case 0x8F: return "Topic Filter invalid";
    case 0x90: return "Topic Name invalid";
    case 0x93: return "Receive Maximum exceeded";
    case 0x95: return "Packet too large";
    case 0x97: return "Quota exceeded";
    case 0x98: return "Administrative action";
    case 0x9E: return "Shared Subscriptions not supported";
    case 0x9F: return "Connection rate exceeded";
    case 0xA2: return "Wildcard Subscriptions not supported";
    default: return code >= 0x80 ? "refused" : "Success";
    }
}

/* Reads one property list, remembering the few the client acts on; -1 when malformed. */
static int read_properties(const uint8_t *p, size_t len, size_t *used, uint32_t *receive_maximum,
                           uint32_t *max_packet, uint32_t *server_keepalive, char *reason, size_t reason_len)
{
    size_t total, n, at;
    if (get_varint(p, len, &total, &n) != 1 || n + total > len)
        return -1;
    *used = n + total;
    at = n;
    while (at < n + total) {
        uint8_t id = p[at++];
        size_t left = n + total - at, size;
        switch (id) {
        case 0x01: case 0x17: case 0x19: case 0x24: case 0x25: case 0x28: case 0x29: case 0x2A:
            size = 1;
            break;
        case 0x13: case 0x21: case 0x22: case 0x23:
            size = 2;
            break;
        case 0x02: case 0x11: case 0x18: case 0x27:
            size = 4;
            break;
        case 0x0B: {
            size_t value;
            if (get_varint(p + at, left, &value, &size) != 1)
                return -1;
            break;
        }
        case 0x03: case 0x08: case 0x09: case 0x12: case 0x15: case 0x16: case 0x1A: case 0x1C: case 0x1F:
            if (left < 2)
                return -1;
            size = 2 + (size_t)get_u16(p + at);
            break;
        case 0x26:
            if (left < 2 || left < 4 + (size_t)get_u16(p + at))
                return -1;
            size = 2 + (size_t)get_u16(p + at);
            size += 2 + (size_t)get_u16(p + at + size);
            break;
        default:
            return -1;
        }
        if (size > left)
            return -1;
        if (id == 0x21 && receive_maximum)
            *receive_maximum = get_u16(p + at);
        if (id == 0x27 && max_packet)
            *max_packet = (uint32_t)p[at] << 24 | (uint32_t)p[at + 1] << 16 | (uint32_t)p[at + 2] << 8 | p[at + 3];
        if (id == 0x13 && server_keepalive)
            *server_keepalive = get_u16(p + at);
        if (id == 0x1F && reason && reason_len > 0) {
            size_t m = size - 2 < reason_len - 1 ? size - 2 : reason_len - 1;
            memcpy(reason, p + at + 2, m);
            reason[m] = '\0';
        }
        at += size;
    }
    return 0;
}

static void queue_puback(ddnn_pahoc *c, uint16_t id)
{
    if (reserve(&c->out, 4) == 0) {
        put_u8(&c->out, 0x40);
        put_u8(&c->out, 2);
        put_u16(&c->out, id);
    }
}

static void subscribe_all(ddnn_pahoc *c)
{
    size_t remaining = 3;
    int i;
    for (i = 0; i < c->n_subscriptions; ++i)
        remaining += 2 + strlen(c->subscriptions[i]) + 1;
    if (reserve(&c->out, 5 + remaining) != 0)
        return;
    c->subscribe_id = reserve_id(c, OTHER_ID);
    put_u8(&c->out, 0x82);
    put_varint(&c->out, remaining);
    put_u16(&c->out, c->subscribe_id);
    put_u8(&c->out, 0);
    for (i = 0; i < c->n_subscriptions; ++i) {
        put_data(&c->out, c->subscriptions[i], strlen(c->subscriptions[i]));
        put_u8(&c->out, 1); /* QoS 1 */
    }
}

/* A PUBLISH of which head (at least topic, id and properties, and up to keep payload bytes) is in p. */
static void received_publish(ddnn_pahoc *c, uint8_t flags, const uint8_t *p, size_t have, size_t remaining)
{
    int qos = (flags >> 1) & 3;
    size_t at = 2, props, topic_len, wire, keep;
    uint16_t id = 0;
    uint8_t *data;
    ddnn_pahoc_slot *s;

    if (have < 2 || qos > 1)
        goto malformed;
    topic_len = get_u16(p);
    at += topic_len;
    if (qos > 0) {
        if (have < at + 2)
            goto malformed;
        id = get_u16(p + at);
        at += 2;
    }
    if (have < at)
        goto malformed;
    if (read_properties(p + at, have - at, &props, NULL, NULL, NULL, NULL, 0) != 0) {
        if (have == remaining)
            goto malformed;
        ++c->core.stats.oversized; /* properties larger than the buffer: a sender's doing, dropped (never the link) */
        goto done;
    }
    at += props;
    if (at > remaining)
        goto malformed;
    wire = remaining - at;
    if (topic_len > c->core.config.max_topic_bytes) {
        ++c->core.stats.dropped_topic;
        goto done;
    }
    keep = wire > c->core.config.max_payload_bytes ? c->core.config.keep_oversized_bytes : wire;
    if (keep > have - at)
        keep = have - at;
    if ((data = malloc(topic_len + keep + 1)) == NULL) {
        ++c->core.stats.dropped_full; /* the queue has room (parse_input checked): only memory can be short */
        goto done;
    }
    memcpy(data, p + 2, topic_len);
    memcpy(data + topic_len, p + at, keep);
    s = ddnn_pahoc_core_tail(&c->core); /* not NULL: parse_input saw room */
    s->data = data;
    s->topic_len = topic_len;
    s->payload_len = keep;
    s->wire_len = wire;
    s->arrived_ns = ddnn_pahoc_now_ns();
    s->qos = qos;
    s->packet_id = id;
    s->connection = c->connection;
    ++c->core.count;
    ++c->core.stats.received;
    c->core.stats.oversized += wire > c->core.config.max_payload_bytes;
    return; /* acknowledged when taken */
done:
    if (qos > 0)
        queue_puback(c, id);
    return;
malformed:
    close_link(c, "malformed PUBLISH from the broker");
}

/* Handles one whole packet; returns 0, or -1 once the link was closed. */
static int received_packet(ddnn_pahoc *c, uint8_t first, const uint8_t *p, size_t len)
{
    int type = first >> 4;
    char reason[128] = "";
    size_t used;

    switch (type) {
    case PUBLISH:
        received_publish(c, first & 0x0f, p, len, len);
        break;
    case PUBACK:
        if (len < 2)
            break;
        if (c->inflight_ids[get_u16(p)] == STATUS_ID) {
            c->inflight_ids[get_u16(p)] = FREE_ID;
            --c->inflight;
            --c->status_inflight;
            release_held(c);
        } else if (c->inflight_ids[get_u16(p)] == REPLY_ID) {
            c->inflight_ids[get_u16(p)] = FREE_ID;
            --c->inflight;
            if (len > 2 && p[2] >= 0x80)
                ++c->core.stats.failed;
            else
                ++c->core.stats.completed;
            release_held(c);
        }
        break;
    case CONNACK: {
        uint32_t receive_maximum = 65535, max_packet = 0, keepalive = (uint32_t)c->core.config.keepalive_s;
        if (c->state != CONNECTING || len < 2 ||
            (len > 2 && read_properties(p + 2, len - 2, &used, &receive_maximum, &max_packet, &keepalive, reason,
                                        sizeof reason) != 0)) {
            close_link(c, "unexpected CONNACK");
            return -1;
        }
        if (p[1] >= 0x80) {
            snprintf(c->core.problem, sizeof c->core.problem, "the broker refused the connection: %s (%d)%s%.100s",
                     reason_name(p[1]), p[1], reason[0] ? ": " : "", reason);
            close_link(c, c->core.problem);
            return -1;
        }
        c->state = ONLINE;
        c->core.problem[0] = '\0';
        c->keepalive_s = (int)keepalive;
        c->inflight_limit = c->core.config.max_inflight < (int)receive_maximum ? c->core.config.max_inflight
                                                                           : (int)receive_maximum;
        if (c->inflight_limit > 65000) /* leaves ids for (un)subscriptions */
            c->inflight_limit = 65000;
        c->broker_max_packet = max_packet;
        c->last_received_ns = ddnn_pahoc_now_ns();
        c->ping_sent_ns = 0;
        ++c->connection;
        c->core.stats.connected = 1;
        ++c->core.stats.connects;
        if (c->n_subscriptions > 0 && !c->unsubscribed)
            subscribe_all(c);
        if (c->core.config.status_topic != NULL) {
            size_t id_at;
            uint16_t id = reserve_id(c, STATUS_ID);
            if (encode_publish(&c->out, c->core.config.status_topic, strlen(c->core.config.status_topic),
                               (const uint8_t *)"online", 6, 1, 1, id, &id_at) != 0) {
                c->inflight_ids[id] = FREE_ID;
                --c->inflight;
                --c->status_inflight;
            }
        }
        pthread_cond_broadcast(&c->core.changed);
        break;
    }
    case SUBACK: {
        size_t i, n;
        if (len < 3 || read_properties(p + 2, len - 2, &used, NULL, NULL, NULL, reason, sizeof reason) != 0)
            break;
        if (c->inflight_ids[get_u16(p)] == OTHER_ID)
            c->inflight_ids[get_u16(p)] = FREE_ID;
        n = len - 2 - used;
        for (i = 0; i < n; ++i)
            if (p[2 + used + i] >= 0x80) {
                snprintf(c->core.problem, sizeof c->core.problem, "the broker refused the subscriptions [%.150s]: %s (%d)",
                         i < (size_t)c->n_subscriptions ? c->subscriptions[i] : "?", reason_name(p[2 + used + i]),
                         p[2 + used + i]);
                break;
            }
        if (i == n)
            c->core.stats.subscribed = 1;
        pthread_cond_broadcast(&c->core.changed);
        break;
    }
    case UNSUBACK:
        if (len >= 2 && get_u16(p) == c->unsubscribe_id) {
            c->inflight_ids[c->unsubscribe_id] = FREE_ID;
            c->unsubscribed = 2;
            pthread_cond_broadcast(&c->core.changed);
        }
        break;
    case PINGRESP:
        c->ping_sent_ns = 0;
        break;
    case DISCONNECT:
        if (len > 1)
            (void)read_properties(p + 1, len - 1, &used, NULL, NULL, NULL, reason, sizeof reason);
        {
            char why[200];
            snprintf(why, sizeof why, "the broker disconnected: %s (%d)%s%.120s", reason_name(len > 0 ? p[0] : 0),
                     len > 0 ? p[0] : 0, reason[0] ? ": " : "", reason);
            close_link(c, why);
        }
        return -1;
    default:
        close_link(c, "unexpected packet from the broker");
        return -1;
    }
    return 0;
}

/* Parses every whole packet in c->in; keeps a partial one for the next read. */
static void parse_input(ddnn_pahoc *c)
{
    size_t at = 0;
    int queued_before = (int)c->core.count;

    c->paused = 0;
    if (c->skip > 0) {
        size_t n = c->skip < c->in_len ? c->skip : c->in_len;
        c->skip -= n;
        at = n;
    }
    while (c->state != OFFLINE && at < c->in_len) {
        size_t remaining, used, have = c->in_len - at;
        int rc = get_varint(c->in + at + 1, have - 1, &remaining, &used);
        if (have < 2 || rc == 0)
            break;
        if (rc < 0) {
            close_link(c, "malformed packet from the broker");
            return;
        }
        if ((c->in[at] >> 4) == PUBLISH && c->core.count == c->core.config.queue_capacity) {
            c->paused = 1; /* this PUBLISH waits in the buffer, and the rest in the socket */
            break;
        }
        if (1 + used + remaining <= have) {
            if (received_packet(c, c->in[at], c->in + at + 1 + used, remaining) != 0)
                return;
            at += 1 + used + remaining;
        } else if (1 + used + remaining > c->in_cap) {
            /* Larger than the buffer: only a PUBLISH may be, and once its head and kept bytes are in, the
             * rest is discarded as it arrives. */
            size_t head = c->in_cap - 1 - used - READ_CHUNK;
            if ((c->in[at] >> 4) != PUBLISH) {
                close_link(c, "oversized packet from the broker");
                return;
            }
            if (have - 1 - used < head)
                break;
            received_publish(c, c->in[at] & 0x0f, c->in + at + 1 + used, have - 1 - used, remaining);
            c->skip = remaining - (have - 1 - used);
            at = c->in_len;
        } else {
            break;
        }
    }
    memmove(c->in, c->in + at, c->in_len - at);
    c->in_len -= at;
    if (queued_before == 0 && c->core.count > 0)
        pthread_cond_broadcast(&c->core.changed);
}

/* One read of whatever the socket holds, by the reader (c->reader), lock not held; -1 when the connection
 * ended. TLS reads take the lock: an SSL object must not be read and written at once, and callers write
 * under it. */
static int read_some(ddnn_pahoc *c)
{
    ssize_t n;
    if (c->in_cap - c->in_len == 0)
        return 0;
    if (c->tls != NULL) {
        int got = 0;
        pthread_mutex_lock(&c->core.lock);
        for (;;) {
            int r = SSL_read(c->tls, c->in + c->in_len, (int)(c->in_cap - c->in_len > INT32_MAX
                                                                  ? INT32_MAX : c->in_cap - c->in_len));
            if (r <= 0) {
                int e = SSL_get_error(c->tls, r);
                if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                    got = -1;
                break;
            }
            c->in_len += (size_t)r;
            c->last_received_ns = ddnn_pahoc_now_ns();
            got = 1;
            /* OpenSSL may hold more decrypted bytes than fit: parse, then read on, unless the queue is full. */
            if (SSL_pending(c->tls) == 0)
                break;
            parse_input(c);
            if (c->paused || c->state == OFFLINE)
                break;
        }
        pthread_mutex_unlock(&c->core.lock);
        return got;
    }
    n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    if (n == 0)
        return -1;
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
    c->in_len += (size_t)n;
    c->last_received_ns = ddnn_pahoc_now_ns();
    return 1;
}

/* After a read by the reader, lock held: parse it, or leave a failed link to the I/O thread. */
static void after_read(ddnn_pahoc *c, int got)
{
    c->reader = NOBODY;
    pthread_cond_broadcast(&c->core.changed); /* a taker waiting for the reading hands it over now */
    if (got < 0) {
        c->broken = 1;
        wake_io(c);
        return;
    }
    parse_input(c);
    if (c->state != OFFLINE && c->out.len > 0)
        send_or_wake(c);
}

/* ---- the I/O thread ------------------------------------------------------------------------------------ */

static void *io_loop(void *arg)
{
    ddnn_pahoc *c = arg;
    int64_t retry_ns = 100000000, next_attempt = 0;

    for (;;) {
        struct pollfd p[2];
        int timeout_ms = 200, n_fds = 1, fd, rc, tls_pending, reading;
        int64_t now = ddnn_pahoc_now_ns();

        pthread_mutex_lock(&c->core.lock);
        if (c->stopping) {
            pthread_mutex_unlock(&c->core.lock);
            return NULL;
        }
        if (c->state == OFFLINE) {
            pthread_mutex_unlock(&c->core.lock);
            if (now >= next_attempt) {
                open_link(c);
                pthread_mutex_lock(&c->core.lock);
                if (c->state == OFFLINE) {
                    next_attempt = ddnn_pahoc_now_ns() + retry_ns;
                    retry_ns = retry_ns * 2 > 2000000000 ? 2000000000 : retry_ns * 2;
                }
                pthread_mutex_unlock(&c->core.lock);
            } else {
                struct pollfd w = {c->wake_fd, POLLIN, 0};
                uint64_t drained;
                if (poll(&w, 1, (int)((next_attempt - now) / 1000000) + 1) == 1)
                    (void)!read(c->wake_fd, &drained, sizeof drained);
            }
            continue;
        }
        if (c->state == CONNECTING && now - c->connect_started_ns > (int64_t)CONNECT_TIMEOUT_MS * 1000000) {
            snprintf(c->core.problem, sizeof c->core.problem, "cannot connect: no CONNACK within %d ms", CONNECT_TIMEOUT_MS);
            close_link(c, c->core.problem);
            pthread_mutex_unlock(&c->core.lock);
            continue;
        }
        if (c->state == ONLINE) {
            int64_t keepalive_ns = (int64_t)c->keepalive_s * 1000000000;
            retry_ns = 100000000;
            if (c->paused)
                c->ping_sent_ns = 0; /* its PINGRESP waits behind the unread requests: no timeout */
            if (c->keepalive_s > 0 && c->ping_sent_ns > 0 && now - c->ping_sent_ns > keepalive_ns) {
                close_link(c, "no PINGRESP within the keepalive");
                pthread_mutex_unlock(&c->core.lock);
                continue;
            }
            if (c->keepalive_s > 0 && c->ping_sent_ns == 0 && now - c->last_sent_ns >= keepalive_ns &&
                reserve(&c->out, 2) == 0) {
                put_u8(&c->out, 0xC0);
                put_u8(&c->out, 0);
                c->ping_sent_ns = now;
            }
        }
        if (c->broken || (c->out.len > 0 && flush_out(c) != 0)) {
            close_link(c, c->broken ? "connection closed" : "write failed");
            c->broken = 0;
            pthread_mutex_unlock(&c->core.lock);
            continue;
        }
        if (c->paused && c->core.count < c->core.config.queue_capacity && c->reader == NOBODY) {
            parse_input(c); /* a take made room: what waited in the buffer first */
            pthread_cond_broadcast(&c->core.changed);
        }
        /* While a taker is about it reads the socket itself (one thread woken per arrival, not two); this
         * thread reads when none is (before the first take, and while the server is busy elsewhere). */
        reading = !c->paused && c->reader == NOBODY && (c->state == CONNECTING || now - c->last_take_ns >
                                                                                         TAKER_GRACE_NS);
        if (reading)
            c->reader = IO_THREAD;
        fd = c->fd;
        p[0].fd = fd;
        p[0].events = (reading ? POLLIN : 0) | (c->out.len > 0 ? POLLOUT : 0);
        /* Bytes OpenSSL decrypted but nobody read yet: poll() cannot see them. */
        tls_pending = reading && c->tls != NULL && SSL_pending(c->tls) > 0;
        pthread_mutex_unlock(&c->core.lock);
        p[1].fd = c->wake_fd;
        p[1].events = POLLIN;
        n_fds = 2;
        rc = poll(p, (nfds_t)n_fds, tls_pending ? 0 : reading ? TAKER_SLICE_MS : timeout_ms);
        if (tls_pending) {
            p[0].revents |= POLLIN;
            rc = 1;
        }
        if (rc > 0 && (p[1].revents & POLLIN)) {
            uint64_t drained;
            (void)!read(c->wake_fd, &drained, sizeof drained);
        }
        if (reading) {
            int got = rc > 0 && (p[0].revents & (POLLIN | POLLHUP | POLLERR)) ? read_some(c) : 0;
            pthread_mutex_lock(&c->core.lock);
            after_read(c, got);
            pthread_mutex_unlock(&c->core.lock);
        }
    }
}

/* ---- the caller's threads ---------------------------------------------------------------------------- */

static SSL_CTX *tls_context(const ddnn_pahoc_config *config, char *error, size_t error_len)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    char reason[160];
    if (ctx == NULL)
        goto failed;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (config->ca_file != NULL ? SSL_CTX_load_verify_locations(ctx, config->ca_file, NULL) != 1
                                : SSL_CTX_set_default_verify_paths(ctx) != 1)
        goto failed;
    if (config->cert_file != NULL && (SSL_CTX_use_certificate_chain_file(ctx, config->cert_file) != 1 ||
                                      SSL_CTX_use_PrivateKey_file(ctx, config->key_file, SSL_FILETYPE_PEM) != 1))
        goto failed;
    SSL_CTX_set_verify(ctx, config->insecure ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
    return ctx;
failed:
    ERR_error_string_n(ERR_get_error(), reason, sizeof reason);
    snprintf(error, error_len, "TLS setup: %s", reason);
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
}

/* What create allocated after the core (which the caller frees when it was set up). */
static void free_client(ddnn_pahoc *c)
{
    size_t i;
    for (i = 0; i < (size_t)c->n_subscriptions; ++i)
        free(c->subscriptions[i]);
    if (c->wake_fd >= 0)
        close(c->wake_fd);
    SSL_CTX_free(c->tls_ctx);
    free(c->in);
    free(c->out.data);
    free(c->held.data);
    free(c->inflight_ids);
}

ddnn_pahoc *ddnn_pahoc_create(const ddnn_pahoc_config *config, char *error, size_t error_len)
{
    ddnn_pahoc *c = calloc(1, sizeof *c);

    if (c == NULL) {
        snprintf(error, error_len, "out of memory");
        return NULL;
    }
    c->fd = c->wake_fd = -1;
    if (ddnn_pahoc_core_init(&c->core, config, error, error_len) != 0) {
        free(c);
        return NULL;
    }
    /* Room for a whole packet of the largest kept size, a topic of MQTT's limit and a read beyond it. */
    c->in_cap = DDNN_PAHOC_TOPIC_LIMIT + 16 + config->max_topic_bytes + config->max_payload_bytes + 2 * READ_CHUNK;
    if ((c->in = malloc(c->in_cap)) == NULL || (c->inflight_ids = calloc(65536, 1)) == NULL ||
        (c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
        snprintf(error, error_len, "out of memory");
    } else if (!config->tls || (c->tls_ctx = tls_context(&c->core.config, error, error_len)) != NULL) {
        return c;
    }
    free_client(c);
    ddnn_pahoc_core_free(&c->core);
    free(c);
    return NULL;
}

int ddnn_pahoc_start(ddnn_pahoc *c, const char *const *subscriptions, int n_subscriptions)
{
    int i;
    if (n_subscriptions < 0 || n_subscriptions > MAX_SUBSCRIPTIONS || c->io_started)
        return FAILURE;
    for (i = 0; i < n_subscriptions; ++i) {
        size_t n = strlen(subscriptions[i]);
        if (n > DDNN_PAHOC_TOPIC_LIMIT || (c->subscriptions[i] = malloc(n + 1)) == NULL)
            return FAILURE;
        memcpy(c->subscriptions[i], subscriptions[i], n + 1);
        c->n_subscriptions = i + 1;
    }
    if (pthread_create(&c->io, NULL, io_loop, c) != 0)
        return FAILURE;
    c->io_started = 1;
    return 0;
}

int ddnn_pahoc_wait_ready(ddnn_pahoc *c, int timeout_ms) { return ddnn_pahoc_core_wait_ready(&c->core, timeout_ms); }

size_t ddnn_pahoc_problem(ddnn_pahoc *c, char *out, size_t out_len)
{
    return ddnn_pahoc_core_problem(&c->core, out, out_len);
}

/* A taken request's PUBACK, owed only on the connection it came on. Lock held. */
static void acknowledge_taken(void *context, const ddnn_pahoc_slot *s)
{
    ddnn_pahoc *c = context;
    if (s->qos > 0 && s->connection == c->connection && c->state == ONLINE) {
        queue_puback(c, s->packet_id);
        c->acks_queued = 1;
    }
}

int ddnn_pahoc_take(ddnn_pahoc *c, int max_messages, int timeout_ms, int linger_ms, int64_t *records,
                    uint8_t *buffer, size_t buffer_len)
{
    struct timespec deadline;
    int64_t until;
    int taken;

    if (buffer_len < c->core.config.max_topic_bytes + c->core.config.max_payload_bytes)
        return -2;
    ddnn_pahoc_deadline_in(&deadline, timeout_ms);
    until = ddnn_pahoc_now_ns() + (int64_t)timeout_ms * 1000000;
    pthread_mutex_lock(&c->core.lock);
    c->last_take_ns = ddnn_pahoc_now_ns();
    if (c->paused && c->core.count < c->core.config.queue_capacity && c->reader == NOBODY)
        parse_input(c); /* the last take made room */
    while (c->core.count == 0 && !c->core.interrupted) {
        int64_t left_ms = (until - ddnn_pahoc_now_ns()) / 1000000;
        if (left_ms <= 0)
            break;
        if (c->state != OFFLINE && !c->paused && !c->broken && c->reader == NOBODY) {
            /* Read the socket here rather than wait for the I/O thread to: one wake-up per arrival. */
            struct pollfd p = {c->fd, POLLIN, 0};
            int got = 0, pending = c->tls != NULL && SSL_pending(c->tls) > 0;
            c->reader = TAKER;
            pthread_mutex_unlock(&c->core.lock);
            if (pending || poll(&p, 1, (int)(left_ms < TAKER_SLICE_MS ? left_ms : TAKER_SLICE_MS)) > 0)
                got = read_some(c);
            pthread_mutex_lock(&c->core.lock);
            c->last_take_ns = ddnn_pahoc_now_ns();
            after_read(c, got);
            continue;
        }
        if (c->reader == IO_THREAD)
            wake_io(c); /* hand the reading over */
        if (pthread_cond_timedwait(&c->core.changed, &c->core.lock, &deadline) == ETIMEDOUT)
            break;
    }
    if (c->core.interrupted && c->core.count == 0) {
        pthread_mutex_unlock(&c->core.lock);
        return -1;
    }
    if (linger_ms > 0 && c->core.count < (size_t)max_messages && !c->paused && c->reader == NOBODY &&
        c->state == ONLINE && !c->broken) {
        /* Sleep rather than poll: what arrives meanwhile waits in the socket and comes in one read. */
        struct timespec pause = {linger_ms / 1000, (long)(linger_ms % 1000) * 1000000L};
        int got;
        c->reader = TAKER;
        pthread_mutex_unlock(&c->core.lock);
        nanosleep(&pause, NULL);
        got = read_some(c);
        pthread_mutex_lock(&c->core.lock);
        after_read(c, got);
    }
    c->acks_queued = 0;
    taken = ddnn_pahoc_core_copy(&c->core, max_messages, records, buffer, buffer_len, acknowledge_taken, c);
    if (c->acks_queued)
        send_or_wake(c);
    if (c->paused && taken > 0)
        wake_io(c);
    pthread_mutex_unlock(&c->core.lock);
    return taken;
}

void ddnn_pahoc_interrupt(ddnn_pahoc *c) { ddnn_pahoc_core_interrupt(&c->core); }

/* Lock held; does not send. */
static int publish_locked(ddnn_pahoc *c, const char *topic, const uint8_t *payload, size_t len, int qos, int retain)
{
    size_t topic_len = strlen(topic), id_at = 0, before;
    size_t packet = 1 + 4 + 2 + topic_len + 2 + 1 + len;

    if (c->state != ONLINE)
        return DISCONNECTED;
    if (topic_len > DDNN_PAHOC_TOPIC_LIMIT || qos < 0 || qos > 1 || len > PACKET_LIMIT ||
        (c->broker_max_packet > 0 && packet > c->broker_max_packet))
        return FAILURE;
    if (qos == 0 || c->inflight < c->inflight_limit) {
        uint16_t id = qos > 0 ? take_packet_id(c) : 0;
        if (encode_publish(&c->out, topic, topic_len, payload, len, qos, retain, id, &id_at) != 0) {
            if (qos > 0) {
                c->inflight_ids[id] = 0;
                --c->inflight;
            }
            return FAILURE;
        }
        ++c->core.stats.published;
        c->core.stats.completed += qos == 0; /* fire and forget: complete once written */
        return 0;
    }
    if (c->held_count >= c->core.config.max_buffered)
        return MAX_BUFFERED;
    before = c->held.len;
    if (reserve(&c->held, 4 + sizeof id_at) != 0)
        return FAILURE;
    c->held.len += 4 + sizeof id_at;
    if (encode_publish(&c->held, topic, topic_len, payload, len, qos, retain, 0, &id_at) != 0) {
        c->held.len = before;
        return FAILURE;
    }
    {
        uint32_t n = (uint32_t)(c->held.len - before - 4 - sizeof id_at);
        id_at -= before + 4 + sizeof id_at;
        memcpy(c->held.data + before, &n, 4);
        memcpy(c->held.data + before + 4, &id_at, sizeof id_at);
    }
    ++c->held_count;
    ++c->core.stats.published;
    return 0;
}

int ddnn_pahoc_publish(ddnn_pahoc *c, const char *topic, const uint8_t *payload, size_t len, int qos, int retain)
{
    int rc;
    pthread_mutex_lock(&c->core.lock);
    rc = publish_locked(c, topic, payload, len, qos, retain);
    if (rc == 0)
        send_or_wake(c);
    pthread_mutex_unlock(&c->core.lock);
    return rc;
}

int ddnn_pahoc_publish_many(ddnn_pahoc *c, const char *topics, const int64_t *topic_offsets, const uint8_t *payloads,
                            const int64_t *payload_offsets, int n, int qos, int *results)
{
    int i, failed = 0;
    pthread_mutex_lock(&c->core.lock);
    for (i = 0; i < n; ++i) {
        int64_t len = payload_offsets[i + 1] - payload_offsets[i];
        results[i] = len < 0 ? FAILURE
                             : publish_locked(c, topics + topic_offsets[i], payloads + payload_offsets[i],
                                              (size_t)len, qos, 0);
        failed += results[i] != 0;
    }
    if (failed < n)
        send_or_wake(c);
    pthread_mutex_unlock(&c->core.lock);
    return failed;
}

int ddnn_pahoc_unsubscribe(ddnn_pahoc *c, const char *const *topics, int n_topics, int timeout_ms)
{
    size_t remaining = 3;
    int i, done;

    pthread_mutex_lock(&c->core.lock);
    c->unsubscribed = 1; /* a reconnect from now on does not subscribe again */
    if (n_topics == 0) {
        pthread_mutex_unlock(&c->core.lock);
        return 1;
    }
    for (i = 0; i < n_topics; ++i)
        remaining += 2 + strlen(topics[i]);
    if (c->state != ONLINE || reserve(&c->out, 5 + remaining) != 0) {
        pthread_mutex_unlock(&c->core.lock);
        return 0;
    }
    c->unsubscribe_id = reserve_id(c, OTHER_ID);
    put_u8(&c->out, 0xA2);
    put_varint(&c->out, remaining);
    put_u16(&c->out, c->unsubscribe_id);
    put_u8(&c->out, 0);
    for (i = 0; i < n_topics; ++i)
        put_data(&c->out, topics[i], strlen(topics[i]));
    send_or_wake(c);
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
    int64_t deadline = ddnn_pahoc_now_ns() + (int64_t)timeout_ms * 1000000;

    pthread_mutex_lock(&c->core.lock);
    c->stopping = 1; /* from now on the I/O thread neither reconnects nor reads */
    if (c->state == ONLINE && reserve(&c->out, 9) == 0) {
        /* DISCONNECT, normal, with session expiry 0: nothing queues for a server that has gone. */
        put_u8(&c->out, 0xE0);
        put_u8(&c->out, 7);
        put_u8(&c->out, 0);
        put_u8(&c->out, 5);
        put_u8(&c->out, 0x11);
        put_u32(&c->out, 0);
        while (c->out.len > 0 && ddnn_pahoc_now_ns() < deadline && flush_out(c) == 0 && c->out.len > 0) {
            struct pollfd p = {c->fd, POLLOUT, 0};
            pthread_mutex_unlock(&c->core.lock);
            (void)poll(&p, 1, 10);
            pthread_mutex_lock(&c->core.lock);
        }
    }
    c->stopping = 1;
    c->core.interrupted = 1;
    pthread_cond_broadcast(&c->core.changed);
    pthread_mutex_unlock(&c->core.lock);
    wake_io(c);
    if (c->io_started)
        pthread_join(c->io, NULL);
    if (c->tls != NULL)
        SSL_shutdown(c->tls);
    c->state = OFFLINE; /* a close is not a lost connection */
    close_link(c, "closed");
    free_client(c);
    ddnn_pahoc_core_free(&c->core);
    free(c);
}
