/*
 * amqp.c - RabbitMQ for event-loop programs; see amqp.h for the contract.
 *
 * Design.  librabbitmq (rabbitmq-c) is blocking and not thread-safe, so one
 * "owner" thread per lr_amqp_t holds the connection and its single channel
 * (CHANNEL).  Two queues connect it to the loop thread, both guarded by one
 * mutex:
 *
 *   loop -> owner: commands (ack, reject, publish, cancel, stop).  Pushing the
 *     first command into an empty queue writes an eventfd; the owner thread
 *     sleeps in poll(2) on that eventfd *and* the connection's socket, so it
 *     wakes at once for either a command or broker data and costs nothing
 *     while idle (rabbitmq-c cannot poll an extra fd itself, but it does
 *     expose the socket; before sleeping we drain everything rabbitmq-c has
 *     buffered, so poll never waits on data that was already read).  An idle
 *     tick of IDLE_TICK_MS lets rabbitmq-c send heartbeats and notice a
 *     silent broker.
 *
 *   owner -> loop: events (delivery, publish outcome, state change, stopped),
 *     appended in batches followed by one uv_async_send; libuv coalesces the
 *     wake-ups and the async callback drains the whole queue in order.
 *
 * Ordering: commands run in the order the loop issued them, so "publish the
 * continuation, wait for its confirm, then ack" keeps its meaning.  Events
 * reach the loop in the order the broker produced them.
 *
 * Owner thread states (set_state() traces every transition):
 *   DISCONNECTED -> CONNECTING -> READY -> (error) -> DISCONNECTED ...
 *   READY -> DRAINING (stop requested, waiting for confirms) -> CLOSED.
 *
 * Publisher confirms: after confirm.select the broker numbers publishes on
 * the channel 1, 2, 3...; unconfirmed publishes sit in a ring indexed by that
 * sequence number; basic.ack / basic.nack (possibly with `multiple`) complete
 * them.  A mandatory publish that cannot be routed comes back as basic.return
 * *before* its basic.ack; basic.return carries no sequence number, so it is
 * matched to the oldest unconfirmed mandatory publish with the same exchange,
 * routing key, body length and body hash (the channel processes publishes in
 * order, so returns arrive in publish order).
 *
 * Reconnect: any connection or channel error (a channel error leaves the
 * delivery tags and confirm numbers of the channel meaningless, so it is
 * handled like a lost connection) fails unconfirmed publishes with LR_ECONN,
 * bumps the generation, reports on_state(0, why) and retries with
 * exponential backoff and jitter (250 ms .. 10 s).  Publishes issued while
 * disconnected fail at once with LR_ECONN rather than queueing without bound.
 *
 * Stopping: the stop command runs after everything queued before it; the
 * owner cancels its consumers (fewer needless redeliveries), waits for
 * outstanding confirms until the stop timeout, closes politely, reports the
 * rest as LR_ESHUTDOWN, and posts a "stopped" event; the loop then joins the
 * thread and closes its handles.  If the thread is stuck in a blocking socket
 * call (a broker that stopped reading), a loop timer shuts the socket down
 * STOP_GRACE_MS after the stop timeout.
 *
 * Thread affinity: lr_amqp_start/ack/reject/publish/cancel_consume/connected/
 * stop and all callbacks: the loop thread.  The owner thread touches only its
 * own fields (t_*, conn, unconfirmed) and the mutex-guarded queues.
 * lr_amqp_sync_*: any one thread per handle; they share the protocol code
 * (conn_*, declare_topology, send_publish) with the owner thread.
 *
 * TLS (amqps://): the broker certificate and host name are verified against
 * LONGRUN_AMQP_CACERT (PEM file) or, when unset, the system bundle
 * /etc/ssl/certs/ca-certificates.crt.  LONGRUN_AMQP_CERT and LONGRUN_AMQP_KEY
 * name a client certificate and key; LONGRUN_AMQP_TLS_VERIFY=0 disables
 * verification (logged as a warning; for tests only).
 *
 * URL quirk: rabbitmq-c reads "amqp://host/" as the empty vhost ""; we read
 * it as "/" like most other clients (an explicit "%2f" also means "/").
 */
#include "amqp.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "list.h"
#include "log.h"
#include "metrics.h"

#define CHANNEL 1
#define FRAME_MAX 131072
#ifndef OWNER_HEARTBEAT_S
#define OWNER_HEARTBEAT_S 30 /* owner connection; rabbitmq-c sends and checks them */
#endif
#define CONNECT_TIMEOUT_MS 10000 /* owner thread: TCP + TLS connect, then login */
#define RPC_TIMEOUT_MS 30000     /* any synchronous AMQP method (declare, consume, ...) */
#define CLOSE_TIMEOUT_MS 2000    /* graceful channel/connection close */
#define CONTENT_TIMEOUT_MS 30000 /* between the frames of one message */
#define IDLE_TICK_MS 1000        /* owner wakes at least this often (heartbeats) */
#define STOP_GRACE_MS 3000       /* after stop's timeout, kick a stuck socket */
#define BACKOFF_MIN_MS 250
#define BACKOFF_MAX_MS 10000
#define MAX_INFLIGHT 65536     /* publishes accepted and not yet completed */
#define CMD_BATCH 1024         /* commands executed before reading frames again */
#define FRAME_BATCH 256        /* frames handled before executing commands again */
#define MAX_MSG_HEADERS 64     /* header pairs per published message */
#define MAX_SHORTSTR 255       /* AMQP short strings: names, ids, content type */
#define MAX_HEADER_BYTES 32768 /* sum of header names and values per message */
#define MAX_QUEUE_NAME 200     /* short task-queue name (longrun.q. prepended) */
#define HEADERS_JSON_MAX (1024 * 1024)
#define JSON_MAX_DEPTH 16
#define DETAIL_MAX 512
#define SYNC_NACK_ATTEMPTS 4 /* blocking publish: tries when the broker nacks */
#define SYSTEM_CA_BUNDLE "/etc/ssl/certs/ca-certificates.crt"

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static struct timeval ms_to_tv(long ms) {
    struct timeval tv;
    if (ms < 0) {
        ms = 0;
    }
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    return tv;
}

static const char *errno_text(int e, char *buf, size_t len) {
#if defined(__GLIBC__) && defined(_GNU_SOURCE)
    return strerror_r(e, buf, len);
#else
    if (strerror_r(e, buf, len) != 0) {
        snprintf(buf, len, "error %d", e);
    }
    return buf;
#endif
}

/* rabbitmq-c's text for status, with the OS reason for socket errors
 * (errno as saved right after the failing call; 0 if unknown). */
static const char *status_text(int status, int saved_errno, char *buf, size_t len) {
    char ebuf[128];
    if (status == AMQP_STATUS_CONNECTION_CLOSED) {
        return "the connection was closed unexpectedly";
    }
    if ((status == AMQP_STATUS_SOCKET_ERROR || status == AMQP_STATUS_TCP_ERROR) && saved_errno != 0 &&
        saved_errno != EAGAIN && saved_errno != EINPROGRESS) {
        snprintf(buf, len, "%s (%s)", amqp_error_string2(status), errno_text(saved_errno, ebuf, sizeof(ebuf)));
        return buf;
    }
    return amqp_error_string2(status);
}

static char *dup_bytes(amqp_bytes_t b) {
    char *s = malloc(b.len + 1);
    if (s == NULL) {
        return NULL;
    }
    if (b.len > 0) {
        memcpy(s, b.bytes, b.len);
    }
    s[b.len] = '\0';
    return s;
}

static char *dup_str(const char *s) { return s != NULL ? strdup(s) : NULL; }

static bool bytes_eq(amqp_bytes_t b, const char *s) {
    size_t n = strlen(s);
    return b.len == n && (n == 0 || memcmp(b.bytes, s, n) == 0);
}

/* FNV-1a, used only to recognise a returned message among pending publishes. */
static uint64_t fnv1a(uint64_t h, const void *data, size_t len) {
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}
#define FNV_INIT 14695981039346656037ull

/* ------------------------------------------------------------------------ */
/* URLs                                                                      */

typedef struct url {
    char *buf; /* parsed copy; ci's strings point into it */
    struct amqp_connection_info ci;
    char redacted[320]; /* amqp://user@host:port/vhost, no password */
} url_t;

static void url_free(url_t *u) {
    free(u->buf);
    u->buf = NULL;
}

static int url_parse(url_t *u, const char *url, char *errbuf, size_t errlen) {
    memset(u, 0, sizeof(*u));
    if (url == NULL || url[0] == '\0') {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL is empty");
    }
    const char *rest;
    if (strncmp(url, "amqp://", 7) == 0) {
        rest = url + 7;
    } else if (strncmp(url, "amqps://", 8) == 0) {
        rest = url + 8;
    } else {
        const char *colon = strstr(url, "://");
        int scheme_len = colon != NULL && colon - url < 16 ? (int)(colon - url) : 0;
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL must start with amqp:// or amqps:// (got %s%.*s)",
                         scheme_len > 0 ? "scheme " : "no scheme", scheme_len, url);
    }
    if (strchr(rest, '?') != NULL || strchr(rest, '#') != NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL,
                         "the AMQP URL has query parameters or a fragment (?..., #...), which "
                         "are not supported; use amqp[s]://user:password@host:port/vhost");
    }
    if (strlen(url) > 1024) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL is longer than 1024 bytes");
    }
    u->buf = strdup(url);
    if (u->buf == NULL) {
        return LR_ENOMEM;
    }
    if (amqp_parse_url(u->buf, &u->ci) != AMQP_STATUS_OK) {
        url_free(u);
        return lr_seterr(errbuf, errlen, LR_EINVAL,
                         "malformed AMQP URL (expected amqp[s]://user:password@host:port/vhost; "
                         "the port must be a number and special characters in the user name, "
                         "password or vhost must be percent-encoded, e.g. %%2F for /)");
    }
    if (u->ci.port <= 0 || u->ci.port > 65535) {
        url_free(u);
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL has an invalid port %d", u->ci.port);
    }
    if (u->ci.host == NULL || u->ci.host[0] == '\0') {
        url_free(u);
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the AMQP URL has no host");
    }
    if (u->ci.vhost == NULL || u->ci.vhost[0] == '\0') {
        u->ci.vhost = "/";
    }
    snprintf(u->redacted, sizeof(u->redacted), "%s://%s@%s:%d/%s", u->ci.ssl ? "amqps" : "amqp", u->ci.user, u->ci.host,
             u->ci.port, strcmp(u->ci.vhost, "/") == 0 ? "" : u->ci.vhost);
    return 0;
}

int lr_amqp_url_check(const char *url, char *errbuf, size_t errlen) {
    url_t u;
    int rc = url_parse(&u, url, errbuf, errlen);
    url_free(&u);
    return rc;
}

int lr_amqp_url_host(const char *url, char *host, size_t hostlen, bool *tls, char *errbuf, size_t errlen) {
    url_t u;
    int rc = url_parse(&u, url, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    if (strlen(u.ci.host) >= hostlen) {
        rc = lr_seterr(errbuf, errlen, LR_ETOOBIG, "the AMQP URL's host is longer than %zu bytes",
                       hostlen > 0 ? hostlen - 1 : 0);
    } else {
        memcpy(host, u.ci.host, strlen(u.ci.host) + 1);
        *tls = u.ci.ssl != 0;
    }
    url_free(&u);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Connection wrapper shared by the owner thread and the blocking helpers    */

typedef struct conn {
    amqp_connection_state_t st;
    bool channel_open;
    bool broken;       /* socket unusable: skip the polite close */
    uint64_t next_seq; /* confirm sequence number of the next publish */
} conn_t;

/* A failed synchronous method, translated. */
typedef struct rpc_err {
    int code;                /* AMQP reply code (403, 404, 406, 320...) or 0 */
    char server[DETAIL_MAX]; /* the broker's reply text, or the library's */
} rpc_err_t;

static int status_err(int status) { return status == AMQP_STATUS_NO_MEMORY ? LR_ENOMEM : LR_ECONN; }

static void send_channel_close_ok(conn_t *c) {
    amqp_channel_close_ok_t ok;
    memset(&ok, 0, sizeof(ok));
    if (amqp_send_method(c->st, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != AMQP_STATUS_OK) {
        c->broken = true;
    }
    c->channel_open = false;
}

static void send_connection_close_ok(conn_t *c) {
    amqp_connection_close_ok_t ok;
    memset(&ok, 0, sizeof(ok));
    (void)amqp_send_method(c->st, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
    c->broken = true;
}

/* Checks the reply of the synchronous method just called.  A channel.close
 * or connection.close from the broker is acknowledged here so that the
 * protocol state stays consistent.  Returns 0, LR_EAMQP (the channel is now
 * closed; the connection is fine), LR_ECONN (the connection is gone) or
 * LR_ENOMEM. */
static int rpc_check(conn_t *c, rpc_err_t *e) {
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c->st);
    e->code = 0;
    e->server[0] = '\0';
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL: return 0;
    case AMQP_RESPONSE_NONE:
        snprintf(e->server, sizeof(e->server), "no reply from the broker");
        c->broken = true;
        return LR_ECONN;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(e->server, sizeof(e->server), "%s", amqp_error_string2(r.library_error));
        c->broken = true;
        return status_err(r.library_error);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            const amqp_channel_close_t *m = r.reply.decoded;
            e->code = m->reply_code;
            snprintf(e->server, sizeof(e->server), "%.*s", (int)m->reply_text.len, (const char *)m->reply_text.bytes);
            send_channel_close_ok(c);
            return c->broken ? LR_ECONN : LR_EAMQP;
        }
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            const amqp_connection_close_t *m = r.reply.decoded;
            e->code = m->reply_code;
            snprintf(e->server, sizeof(e->server), "%.*s", (int)m->reply_text.len, (const char *)m->reply_text.bytes);
            send_connection_close_ok(c);
            return LR_ECONN;
        }
        snprintf(e->server, sizeof(e->server), "unexpected method 0x%08x from the broker", (unsigned)r.reply.id);
        c->broken = true;
        return LR_ECONN;
    }
    c->broken = true;
    return LR_ECONN;
}

/* Opens CHANNEL and puts it in confirm mode; numbering restarts at 1. */
static int channel_setup(conn_t *c, char *errbuf, size_t errlen) {
    rpc_err_t e;
    int rc;
    amqp_channel_open(c->st, CHANNEL);
    rc = rpc_check(c, &e);
    if (rc != 0) {
        c->broken = true;
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot open an AMQP channel: %s", e.server);
    }
    c->channel_open = true;
    amqp_confirm_select(c->st, CHANNEL);
    rc = rpc_check(c, &e);
    if (rc != 0) {
        c->broken = true;
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot enable publisher confirms (confirm.select): %s", e.server);
    }
    c->next_seq = 1;
    return 0;
}

/* Best-effort diagnosis of a failed TCP connect: rabbitmq-c only reports
 * "a socket error occurred", but operators want "connection refused". */
static void diagnose_connect(const char *host, int port, char *buf, size_t len) {
    struct addrinfo hint, *res = NULL;
    char portstr[16];
    char ebuf[128];
    int fd = -1;
    memset(&hint, 0, sizeof(hint));
    hint.ai_family = AF_UNSPEC;
    hint.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof(portstr), "%d", port);
    snprintf(buf, len, "a socket error occurred");
    if (getaddrinfo(host, portstr, &hint, &res) != 0 || res == NULL) {
        snprintf(buf, len, "cannot resolve host %s", host);
        goto out;
    }
    fd = socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, res->ai_protocol);
    if (fd < 0) {
        goto out;
    }
    if (connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
        snprintf(buf, len, "the TCP connection succeeded on retry (transient failure)");
        goto out;
    }
    if (errno == EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int so = 0;
        socklen_t sl = sizeof(so);
        if (poll(&p, 1, 2000) <= 0) {
            snprintf(buf, len, "no answer within the connect timeout");
            goto out;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl) == 0 && so != 0) {
            snprintf(buf, len, "%s", errno_text(so, ebuf, sizeof(ebuf)));
        } else {
            snprintf(buf, len, "the TCP connection succeeded on retry (transient failure)");
        }
        goto out;
    }
    snprintf(buf, len, "%s", errno_text(errno, ebuf, sizeof(ebuf)));
out:
    if (fd >= 0) {
        close(fd);
    }
    if (res != NULL) {
        freeaddrinfo(res);
    }
    /* Lower-case first letter, so that the text reads well after "host:port: ". */
    if (buf[0] >= 'A' && buf[0] <= 'Z') {
        buf[0] = (char)(buf[0] - 'A' + 'a');
    }
}

static int tls_setup(amqp_socket_t *sock, char *errbuf, size_t errlen) {
    const char *cacert = getenv("LONGRUN_AMQP_CACERT");
    const char *cert = getenv("LONGRUN_AMQP_CERT");
    const char *key = getenv("LONGRUN_AMQP_KEY");
    const char *verify = getenv("LONGRUN_AMQP_TLS_VERIFY");
    if (verify != NULL && strcmp(verify, "0") == 0) {
        lr_warn("amqp.tls_insecure", "LONGRUN_AMQP_TLS_VERIFY=0: the broker's TLS certificate is NOT verified");
        amqp_ssl_socket_set_verify_peer(sock, 0);
        amqp_ssl_socket_set_verify_hostname(sock, 0);
    } else {
        amqp_ssl_socket_set_verify_peer(sock, 1);
        amqp_ssl_socket_set_verify_hostname(sock, 1);
        if (cacert == NULL || cacert[0] == '\0') {
            cacert = access(SYSTEM_CA_BUNDLE, R_OK) == 0 ? SYSTEM_CA_BUNDLE : NULL;
        }
        if (cacert == NULL) {
            return lr_seterr(errbuf, errlen, LR_ECONN,
                             "amqps: no CA certificates to verify the broker with; set "
                             "LONGRUN_AMQP_CACERT to a PEM file");
        }
        if (amqp_ssl_socket_set_cacert(sock, cacert) != AMQP_STATUS_OK) {
            return lr_seterr(errbuf, errlen, LR_ECONN, "amqps: cannot load CA certificates from %s", cacert);
        }
    }
    if (cert != NULL && cert[0] != '\0') {
        if (key == NULL || key[0] == '\0' || amqp_ssl_socket_set_key(sock, cert, key) != AMQP_STATUS_OK) {
            return lr_seterr(errbuf, errlen, LR_ECONN,
                             "amqps: cannot load the client certificate %s with key %s "
                             "(LONGRUN_AMQP_CERT, LONGRUN_AMQP_KEY)",
                             cert, key != NULL ? key : "(unset)");
        }
    }
    return 0;
}

/* Connects, logs in, opens CHANNEL in confirm mode.  On failure c is torn
 * down by the caller with conn_close(). */
static int conn_open(conn_t *c, const url_t *u, long timeout_ms, int heartbeat, const char *conn_name, char *errbuf,
                     size_t errlen) {
    amqp_socket_t *sock;
    struct timeval tv = ms_to_tv(timeout_ms);
    struct timeval rpc_tv = ms_to_tv(RPC_TIMEOUT_MS > timeout_ms ? RPC_TIMEOUT_MS : timeout_ms);
    int status;

    memset(c, 0, sizeof(*c));
    c->st = amqp_new_connection();
    if (c->st == NULL) {
        return LR_ENOMEM;
    }
    sock = u->ci.ssl ? amqp_ssl_socket_new(c->st) : amqp_tcp_socket_new(c->st);
    if (sock == NULL) {
        c->broken = true;
        return lr_seterr(errbuf, errlen, u->ci.ssl ? LR_ECONN : LR_ENOMEM, "cannot create the %s socket",
                         u->ci.ssl ? "TLS" : "TCP");
    }
    if (u->ci.ssl) {
        int rc = tls_setup(sock, errbuf, errlen);
        if (rc != 0) {
            c->broken = true;
            return rc;
        }
    }
    status = amqp_socket_open_noblock(sock, u->ci.host, u->ci.port, &tv);
    if (status != AMQP_STATUS_OK) {
        char why[256];
        c->broken = true;
        if (status == AMQP_STATUS_SOCKET_ERROR || status == AMQP_STATUS_TCP_ERROR) {
            diagnose_connect(u->ci.host, u->ci.port, why, sizeof(why));
        } else if (status == AMQP_STATUS_TIMEOUT) {
            snprintf(why, sizeof(why), "no answer within %ld ms", timeout_ms);
        } else if (status == AMQP_STATUS_HOSTNAME_RESOLUTION_FAILED) {
            snprintf(why, sizeof(why), "cannot resolve host %s", u->ci.host);
        } else if (status == AMQP_STATUS_SSL_PEER_VERIFY_FAILED) {
            snprintf(why, sizeof(why),
                     "the broker's TLS certificate is not signed by a trusted "
                     "CA (set LONGRUN_AMQP_CACERT to the CA's PEM file)");
        } else if (status == AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED) {
            snprintf(why, sizeof(why),
                     "the broker's TLS certificate is not issued for host %s "
                     "(use the host name it names)",
                     u->ci.host);
        } else {
            snprintf(why, sizeof(why), "%s", amqp_error_string2(status));
        }
        return lr_seterr(errbuf, errlen, status_err(status), "%s:%d: %s", u->ci.host, u->ci.port, why);
    }
    amqp_set_handshake_timeout(c->st, &tv);
    amqp_set_rpc_timeout(c->st, &rpc_tv);

    amqp_table_entry_t caps[3];
    caps[0].key = amqp_cstring_bytes("authentication_failure_close");
    caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[0].value.value.boolean = 1;
    caps[1].key = amqp_cstring_bytes("consumer_cancel_notify");
    caps[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[1].value.value.boolean = 1;
    caps[2].key = amqp_cstring_bytes("connection.blocked");
    caps[2].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[2].value.value.boolean = 1;
    amqp_table_entry_t props[2];
    props[0].key = amqp_cstring_bytes("connection_name");
    props[0].value.kind = AMQP_FIELD_KIND_UTF8;
    props[0].value.value.bytes = amqp_cstring_bytes(conn_name);
    props[1].key = amqp_cstring_bytes("capabilities");
    props[1].value.kind = AMQP_FIELD_KIND_TABLE;
    props[1].value.value.table.num_entries = 3;
    props[1].value.value.table.entries = caps;
    amqp_table_t props_table = {.num_entries = 2, .entries = props};

    amqp_rpc_reply_t r = amqp_login_with_properties(c->st, u->ci.vhost, 0, FRAME_MAX, heartbeat, &props_table,
                                                    AMQP_SASL_METHOD_PLAIN, u->ci.user, u->ci.password);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        c->broken = true;
        if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            const amqp_connection_close_t *m = r.reply.decoded;
            send_connection_close_ok(c);
            if (m->reply_code == AMQP_ACCESS_REFUSED || m->reply_code == AMQP_NOT_ALLOWED) {
                return lr_seterr(errbuf, errlen, LR_ECONN,
                                 "%s:%d: login refused for user %s on vhost %s (server said: "
                                 "%.*s); check the user name, password and the vhost's "
                                 "permissions",
                                 u->ci.host, u->ci.port, u->ci.user, u->ci.vhost, (int)m->reply_text.len,
                                 (const char *)m->reply_text.bytes);
            }
            return lr_seterr(errbuf, errlen, LR_ECONN, "%s:%d: the broker refused the connection: %u %.*s", u->ci.host,
                             u->ci.port, m->reply_code, (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
            return lr_seterr(errbuf, errlen, status_err(r.library_error), "%s:%d: login failed: %s%s", u->ci.host,
                             u->ci.port, amqp_error_string2(r.library_error),
                             r.library_error == AMQP_STATUS_CONNECTION_CLOSED ||
                                     r.library_error == AMQP_STATUS_SOCKET_CLOSED
                                 ? " (wrong credentials, or not an AMQP 0-9-1 port?)"
                                 : "");
        }
        return lr_seterr(errbuf, errlen, LR_ECONN, "%s:%d: login failed", u->ci.host, u->ci.port);
    }
    return channel_setup(c, errbuf, errlen);
}

/* Closes politely when possible (bounded by CLOSE_TIMEOUT_MS), then frees. */
static void conn_close(conn_t *c) {
    if (c->st == NULL) {
        return;
    }
    if (!c->broken) {
        struct timeval tv = ms_to_tv(CLOSE_TIMEOUT_MS);
        amqp_set_rpc_timeout(c->st, &tv);
        if (c->channel_open) {
            amqp_rpc_reply_t r = amqp_channel_close(c->st, CHANNEL, AMQP_REPLY_SUCCESS);
            if (r.reply_type != AMQP_RESPONSE_NORMAL) {
                c->broken = true;
            }
        }
        if (!c->broken) {
            (void)amqp_connection_close(c->st, AMQP_REPLY_SUCCESS);
        }
    }
    amqp_destroy_connection(c->st);
    c->st = NULL;
    c->channel_open = false;
}

/* Reopens CHANNEL after the broker closed it (the connection is fine). */
static int channel_recover(conn_t *c) {
    char buf[DETAIL_MAX];
    if (c->broken) {
        return LR_ECONN;
    }
    if (c->channel_open) {
        return 0;
    }
    int rc = channel_setup(c, buf, sizeof(buf));
    if (rc != 0) {
        lr_warn("amqp.channel_reopen_failed", "%s", buf);
    }
    return rc;
}

/* Handles a method on channel 0 outside an RPC.  Returns 0 (handled) or
 * LR_ECONN with the reason in detail (the broker is closing the connection). */
static int handle_channel0(conn_t *c, const amqp_frame_t *f, char *detail, size_t dlen) {
    switch (f->payload.method.id) {
    case AMQP_CONNECTION_CLOSE_METHOD: {
        const amqp_connection_close_t *m = f->payload.method.decoded;
        snprintf(detail, dlen, "the broker closed the connection: %u %.*s", m->reply_code, (int)m->reply_text.len,
                 (const char *)m->reply_text.bytes);
        send_connection_close_ok(c);
        return LR_ECONN;
    }
    case AMQP_CONNECTION_BLOCKED_METHOD: {
        const amqp_connection_blocked_t *m = f->payload.method.decoded;
        lr_warn("amqp.blocked", "the broker blocked publishing on this connection (%.*s); publishes wait",
                (int)m->reason.len, (const char *)m->reason.bytes);
        return 0;
    }
    case AMQP_CONNECTION_UNBLOCKED_METHOD: lr_info("amqp.unblocked", "the broker unblocked publishing"); return 0;
    default:
        lr_debug("amqp.ignored_method", "ignoring method 0x%08x on channel 0", (unsigned)f->payload.method.id);
        return 0;
    }
}

/* One message's content (header frame + body frames), read after
 * basic.deliver or basic.return. */
typedef struct content {
    amqp_basic_properties_t *props; /* in the connection's pool: valid until
                                       amqp_maybe_release_buffers() */
    char *body;                     /* malloc'd, NUL-terminated, or NULL if not kept */
    size_t body_len;                /* bytes kept in body */
    uint64_t total_len;             /* body size announced by the broker */
    bool truncated;                 /* total_len > the kept limit */
    uint64_t hash;                  /* FNV-1a of the whole body */
} content_t;

static int wait_frame(conn_t *c, amqp_frame_t *f, long timeout_ms, char *detail, size_t dlen) {
    struct timeval tv = ms_to_tv(timeout_ms);
    char buf[256];
    errno = 0;
    int status = amqp_simple_wait_frame_noblock(c->st, f, &tv);
    int saved = errno;
    if (status == AMQP_STATUS_OK) {
        return 0;
    }
    if (status == AMQP_STATUS_TIMEOUT) {
        return LR_ETIMEOUT;
    }
    c->broken = true;
    snprintf(detail, dlen, "%s", status_text(status, saved, buf, sizeof(buf)));
    return status_err(status);
}

/* Reads the header and body frames that follow a content-bearing method.
 * keep: how many body bytes to keep (0 = none, only hash).  Frames on
 * channel 0 that interleave are handled.  Returns 0, LR_ECONN, LR_ENOMEM. */
static int read_content(conn_t *c, size_t keep, content_t *ct, char *detail, size_t dlen) {
    amqp_frame_t f;
    int rc;
    memset(ct, 0, sizeof(*ct));
    ct->hash = FNV_INIT;
    for (;;) {
        rc = wait_frame(c, &f, CONTENT_TIMEOUT_MS, detail, dlen);
        if (rc == LR_ETIMEOUT) {
            c->broken = true;
            snprintf(detail, dlen, "timed out waiting for a message's content");
            return LR_ECONN;
        }
        if (rc != 0) {
            return rc;
        }
        if (f.channel == 0 && f.frame_type == AMQP_FRAME_METHOD) {
            rc = handle_channel0(c, &f, detail, dlen);
            if (rc != 0) {
                return rc;
            }
            continue;
        }
        break;
    }
    if (f.frame_type != AMQP_FRAME_HEADER || f.channel != CHANNEL) {
        c->broken = true;
        snprintf(detail, dlen, "protocol error: expected a content header, got frame type %u", (unsigned)f.frame_type);
        return LR_ECONN;
    }
    ct->props = f.payload.properties.decoded;
    ct->total_len = f.payload.properties.body_size;
    size_t cap = ct->total_len < keep ? (size_t)ct->total_len : keep;
    ct->truncated = ct->total_len > keep;
    if (keep > 0) {
        ct->body = malloc(cap + 1);
        if (ct->body == NULL) {
            return LR_ENOMEM;
        }
        ct->body[0] = '\0';
    }
    uint64_t got = 0;
    while (got < ct->total_len) {
        rc = wait_frame(c, &f, CONTENT_TIMEOUT_MS, detail, dlen);
        if (rc == LR_ETIMEOUT) {
            c->broken = true;
            snprintf(detail, dlen, "timed out waiting for a message's body");
            rc = LR_ECONN;
        }
        if (rc == 0 && f.channel == 0 && f.frame_type == AMQP_FRAME_METHOD) {
            rc = handle_channel0(c, &f, detail, dlen);
            if (rc == 0) {
                continue;
            }
        }
        if (rc == 0 && (f.frame_type != AMQP_FRAME_BODY || f.channel != CHANNEL)) {
            c->broken = true;
            snprintf(detail, dlen, "protocol error: expected a body frame, got frame type %u", (unsigned)f.frame_type);
            rc = LR_ECONN;
        }
        if (rc != 0) {
            free(ct->body);
            ct->body = NULL;
            return rc;
        }
        amqp_bytes_t frag = f.payload.body_fragment;
        ct->hash = fnv1a(ct->hash, frag.bytes, frag.len);
        if (ct->body != NULL && ct->body_len < cap) {
            size_t n = frag.len < cap - ct->body_len ? frag.len : cap - ct->body_len;
            memcpy(ct->body + ct->body_len, frag.bytes, n);
            ct->body_len += n;
        }
        got += frag.len;
    }
    if (ct->body != NULL) {
        ct->body[ct->body_len] = '\0';
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Publishing (shared)                                                       */

static int check_shortstr(const char *what, const char *s, char *errbuf, size_t errlen) {
    if (s != NULL && strlen(s) > MAX_SHORTSTR) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "%s is longer than %d bytes", what, MAX_SHORTSTR);
    }
    return 0;
}

/* Validates a publish up front: rabbitmq-c sends the method frame before it
 * encodes the properties, so an encoding failure would break the connection. */
static int msg_validate(const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg, char *errbuf,
                        size_t errlen) {
    int rc;
    if (exchange == NULL || routing_key == NULL || msg == NULL || (msg->body == NULL && msg->body_len > 0)) {
        return lr_seterr(errbuf, errlen, LR_EINVAL,
                         "publish: missing exchange, routing key, "
                         "message or body");
    }
    if ((rc = check_shortstr("the exchange name", exchange, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("the routing key", routing_key, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("message_id", msg->message_id, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("correlation_id", msg->correlation_id, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("reply_to", msg->reply_to, errbuf, errlen)) != 0 ||
        (rc = check_shortstr("content_type", msg->content_type, errbuf, errlen)) != 0) {
        return rc;
    }
    if (msg->body_len > LR_AMQP_MAX_BODY) {
        return lr_seterr(errbuf, errlen, LR_ETOOBIG, "message body of %zu bytes exceeds the limit of %d bytes",
                         msg->body_len, LR_AMQP_MAX_BODY);
    }
    if (msg->headers != NULL) {
        size_t n = 0, bytes = 0;
        for (const char *const *h = msg->headers; h[0] != NULL; h += 2) {
            if (h[1] == NULL) {
                return lr_seterr(errbuf, errlen, LR_EINVAL, "header %s has no value", h[0]);
            }
            if (h[0][0] == '\0' || strlen(h[0]) > 127) {
                return lr_seterr(errbuf, errlen, LR_EINVAL, "header names must be 1..127 bytes long");
            }
            if (++n > MAX_MSG_HEADERS) {
                return lr_seterr(errbuf, errlen, LR_ETOOBIG, "more than %d headers", MAX_MSG_HEADERS);
            }
            bytes += strlen(h[0]) + strlen(h[1]);
            if (bytes > MAX_HEADER_BYTES) {
                return lr_seterr(errbuf, errlen, LR_ETOOBIG, "headers exceed %d bytes", MAX_HEADER_BYTES);
            }
        }
    }
    return 0;
}

/* Sends one publish; returns the rabbitmq-c status.  The message must have
 * passed msg_validate(). */
static int send_publish(conn_t *c, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg) {
    amqp_basic_properties_t props;
    amqp_table_entry_t entries[MAX_MSG_HEADERS];
    int n = 0;

    memset(&props, 0, sizeof(props));
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.content_type = amqp_cstring_bytes(msg->content_type != NULL ? msg->content_type : "application/json");
    if (msg->persistent) {
        props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
        props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    }
    if (msg->message_id != NULL) {
        props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        props.message_id = amqp_cstring_bytes(msg->message_id);
    }
    if (msg->correlation_id != NULL) {
        props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        props.correlation_id = amqp_cstring_bytes(msg->correlation_id);
    }
    if (msg->reply_to != NULL) {
        props._flags |= AMQP_BASIC_REPLY_TO_FLAG;
        props.reply_to = amqp_cstring_bytes(msg->reply_to);
    }
    if (msg->headers != NULL) {
        for (const char *const *h = msg->headers; h[0] != NULL && n < MAX_MSG_HEADERS; h += 2) {
            entries[n].key = amqp_cstring_bytes(h[0]);
            entries[n].value.kind = AMQP_FIELD_KIND_UTF8;
            entries[n].value.value.bytes = amqp_cstring_bytes(h[1]);
            n++;
        }
        if (n > 0) {
            props._flags |= AMQP_BASIC_HEADERS_FLAG;
            props.headers.num_entries = n;
            props.headers.entries = entries;
        }
    }
    amqp_bytes_t body = {.len = msg->body_len, .bytes = (void *)msg->body};
    return amqp_basic_publish(c->st, CHANNEL, amqp_cstring_bytes(exchange), amqp_cstring_bytes(routing_key),
                              msg->mandatory ? 1 : 0, 0, &props, body);
}

/* ------------------------------------------------------------------------ */
/* Topology                                                                  */

/* "inequivalent arg 'x-queue-type' for queue ..." -> "x-queue-type". */
static void differing_arg(const char *server, char *out, size_t len) {
    const char *p = strstr(server, "inequivalent arg '");
    out[0] = '\0';
    if (p != NULL) {
        p += strlen("inequivalent arg '");
        const char *q = strchr(p, '\'');
        if (q != NULL && (size_t)(q - p) < len) {
            memcpy(out, p, (size_t)(q - p));
            out[q - p] = '\0';
        }
    }
}

/* Turns a failed declare into a plain-words error.  kind: "queue" or
 * "exchange"; wanted: what longrun needs. */
static int declare_error(conn_t *c, int rc, const rpc_err_t *e, const char *kind, const char *name, const char *wanted,
                         char *errbuf, size_t errlen) {
    if (rc == LR_EAMQP && e->code == AMQP_PRECONDITION_FAILED) {
        char arg[128];
        differing_arg(e->server, arg, sizeof(arg));
        (void)channel_recover(c);
        if (arg[0] != '\0') {
            return lr_seterr(errbuf, errlen, LR_ECONFIG,
                             "%s %s already exists with different arguments: its %s differs "
                             "(server said: %s). longrun needs %s. Delete the %s (its messages "
                             "are lost unless you move them first) or pick another name",
                             kind, name, arg, e->server, wanted, kind);
        }
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "%s %s already exists with different settings (server said: %s). "
                         "longrun needs %s. Delete the %s (its messages are lost unless you "
                         "move them first) or pick another name",
                         kind, name, e->server, wanted, kind);
    }
    if (rc == LR_EAMQP && e->code == AMQP_ACCESS_REFUSED) {
        (void)channel_recover(c);
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "not allowed to declare %s %s (server said: %s); grant the user "
                         "configure permission on it",
                         kind, name, e->server);
    }
    if (rc == LR_EAMQP) {
        (void)channel_recover(c);
        return lr_seterr(errbuf, errlen, LR_EAMQP, "declaring %s %s failed: %u %s", kind, name, e->code, e->server);
    }
    return lr_seterr(errbuf, errlen, rc, "declaring %s %s failed: %s", kind, name, e->server);
}

static int declare_exchange(conn_t *c, const char *name, const char *type, char *errbuf, size_t errlen) {
    rpc_err_t e;
    amqp_exchange_declare(c->st, CHANNEL, amqp_cstring_bytes(name), amqp_cstring_bytes(type), 0, 1, 0, 0,
                          amqp_empty_table);
    int rc = rpc_check(c, &e);
    if (rc != 0) {
        char wanted[64];
        snprintf(wanted, sizeof(wanted), "a durable %s exchange", type);
        return declare_error(c, rc, &e, "exchange", name, wanted, errbuf, errlen);
    }
    return 0;
}

static int bind_queue(conn_t *c, const char *queue, const char *exchange, const char *key, char *errbuf,
                      size_t errlen) {
    rpc_err_t e;
    amqp_queue_bind(c->st, CHANNEL, amqp_cstring_bytes(queue), amqp_cstring_bytes(exchange), amqp_cstring_bytes(key),
                    amqp_empty_table);
    int rc = rpc_check(c, &e);
    if (rc != 0) {
        if (rc == LR_EAMQP) {
            (void)channel_recover(c);
        }
        return lr_seterr(errbuf, errlen, rc == LR_EAMQP && e.code == AMQP_ACCESS_REFUSED ? LR_ECONFIG : rc,
                         "binding queue %s to exchange %s failed: %s", queue, exchange, e.server);
    }
    return 0;
}

static void set_str_entry(amqp_table_entry_t *e, const char *key, const char *val) {
    e->key = amqp_cstring_bytes(key);
    e->value.kind = AMQP_FIELD_KIND_UTF8;
    e->value.value.bytes = amqp_cstring_bytes(val);
}

static int check_queue_names(const char *const *queues, char *errbuf, size_t errlen) {
    if (queues != NULL) {
        for (const char *const *q = queues; *q != NULL; q++) {
            size_t n = strlen(*q);
            if (n == 0 || n > MAX_QUEUE_NAME) {
                return lr_seterr(errbuf, errlen, LR_EINVAL, "task queue name \"%.64s\" must be 1..%d bytes", *q,
                                 MAX_QUEUE_NAME);
            }
            for (size_t i = 0; i < n; i++) {
                if ((unsigned char)(*q)[i] < 0x20 || (*q)[i] == 0x7f) {
                    return lr_seterr(errbuf, errlen, LR_EINVAL, "task queue name contains a control character");
                }
            }
        }
    }
    return 0;
}

/* One declare of a task queue: with x-max-length = max_length when it is
 * above 0, without it when 0, passive (exists, whatever its arguments) when
 * passive.  Returns rpc_check's code with e filled. */
static int queue_declare_once(conn_t *c, const char *name, int delivery_limit, long max_length, bool passive,
                              rpc_err_t *e) {
    amqp_table_entry_t args[6];
    amqp_table_t table = {.num_entries = 5, .entries = args};
    set_str_entry(&args[0], "x-queue-type", "quorum");
    args[1].key = amqp_cstring_bytes("x-delivery-limit");
    args[1].value.kind = AMQP_FIELD_KIND_I32;
    args[1].value.value.i32 = delivery_limit;
    set_str_entry(&args[2], "x-dead-letter-exchange", LR_AMQP_DLX);
    set_str_entry(&args[3], "x-dead-letter-strategy", "at-least-once");
    set_str_entry(&args[4], "x-overflow", "reject-publish");
    if (max_length > 0) {
        args[5].key = amqp_cstring_bytes("x-max-length");
        args[5].value.kind = AMQP_FIELD_KIND_I64;
        args[5].value.value.i64 = max_length;
        table.num_entries = 6;
    }
    if (passive) {
        table = amqp_empty_table;
    }
    amqp_queue_declare(c->st, CHANNEL, amqp_cstring_bytes(name), passive ? 1 : 0, 1, 0, 0, table);
    return rpc_check(c, e);
}

/* Declares task queue name.  The maximum length is a queue argument, which
 * RabbitMQ compares on every declare: a queue created before
 * LONGRUN_QUEUE_MAX_LENGTH existed (or with another value) answers
 * PRECONDITION_FAILED on x-max-length.  That queue is then used as it is
 * (declared again without the argument, which still checks every other
 * one, or passively when it has another limit) and a warning says how to
 * give it the limit without deleting it: a policy, which RabbitMQ applies to
 * existing queues (the lower of policy and argument wins). */
static int declare_task_queue(conn_t *c, const char *name, int delivery_limit, int max_length, char *errbuf,
                              size_t errlen) {
    char wanted[300], arg[128];
    rpc_err_t e;
    int rc = queue_declare_once(c, name, delivery_limit, max_length, false, &e);
    if (rc == LR_EAMQP && e.code == AMQP_PRECONDITION_FAILED && max_length > 0) {
        differing_arg(e.server, arg, sizeof(arg));
        if (strcmp(arg, "x-max-length") == 0 && channel_recover(c) == 0) {
            char first[DETAIL_MAX];
            snprintf(first, sizeof(first), "%s", e.server);
            rc = queue_declare_once(c, name, delivery_limit, 0, false, &e);
            if (rc == LR_EAMQP && e.code == AMQP_PRECONDITION_FAILED) {
                differing_arg(e.server, arg, sizeof(arg));
                if (strcmp(arg, "x-max-length") == 0 && channel_recover(c) == 0) {
                    rc = queue_declare_once(c, name, delivery_limit, 0, true, &e);
                }
            }
            if (rc == 0) {
                lr_warn("amqp.queue_max_length",
                        "queue %s exists with another x-max-length than "
                        "LONGRUN_QUEUE_MAX_LENGTH=%d (server said: %s); using it as it is. To apply the limit "
                        "without recreating it: rabbitmqctl set_policy --apply-to queues longrun-max-length "
                        "'^longrun\\.q\\.' '{\"max-length\":%d,\"overflow\":\"reject-publish\"}' "
                        "(docs/configuration.md)",
                        name, max_length, first, max_length);
                return 0;
            }
        }
    }
    if (rc != 0) {
        snprintf(wanted, sizeof(wanted),
                 "a durable quorum queue with x-delivery-limit=%d, "
                 "x-dead-letter-exchange=%s, x-dead-letter-strategy=at-least-once, "
                 "x-overflow=reject-publish",
                 delivery_limit, LR_AMQP_DLX);
        return declare_error(c, rc, &e, "queue", name, wanted, errbuf, errlen);
    }
    return 0;
}

static int declare_topology(conn_t *c, const char *const *queues, int delivery_limit, int max_length, char *errbuf,
                            size_t errlen) {
    rpc_err_t e;
    int rc;
    if (delivery_limit < 0) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "delivery limit %d is negative", delivery_limit);
    }
    if (max_length < 0) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "queue max length %d is negative", max_length);
    }
    if (delivery_limit == 0) {
        delivery_limit = LR_AMQP_DEFAULT_DELIVERY_LIMIT;
    }
    if ((rc = check_queue_names(queues, errbuf, errlen)) != 0) {
        return rc;
    }
    if ((rc = declare_exchange(c, LR_AMQP_EXCHANGE, "direct", errbuf, errlen)) != 0 ||
        (rc = declare_exchange(c, LR_AMQP_DLX, "fanout", errbuf, errlen)) != 0) {
        return rc;
    }

    amqp_table_entry_t dead_args[1];
    set_str_entry(&dead_args[0], "x-queue-type", "quorum");
    amqp_table_t dead_table = {.num_entries = 1, .entries = dead_args};
    amqp_queue_declare(c->st, CHANNEL, amqp_cstring_bytes(LR_AMQP_DEAD_QUEUE), 0, 1, 0, 0, dead_table);
    if ((rc = rpc_check(c, &e)) != 0) {
        return declare_error(c, rc, &e, "queue", LR_AMQP_DEAD_QUEUE, "a durable quorum queue (x-queue-type=quorum)",
                             errbuf, errlen);
    }
    if ((rc = bind_queue(c, LR_AMQP_DEAD_QUEUE, LR_AMQP_DLX, "", errbuf, errlen)) != 0) {
        return rc;
    }

    for (const char *const *q = queues; q != NULL && *q != NULL; q++) {
        char name[sizeof(LR_AMQP_QUEUE_PREFIX) + MAX_QUEUE_NAME];
        snprintf(name, sizeof(name), "%s%s", LR_AMQP_QUEUE_PREFIX, *q);
        if ((rc = declare_task_queue(c, name, delivery_limit, max_length, errbuf, errlen)) != 0 ||
            (rc = bind_queue(c, name, LR_AMQP_EXCHANGE, *q, errbuf, errlen)) != 0) {
            return rc;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Headers -> JSON                                                           */

typedef struct jbuf {
    char *p;
    size_t len, cap;
    bool failed; /* out of memory or over HEADERS_JSON_MAX */
} jbuf_t;

static void jb_put(jbuf_t *b, const char *s, size_t n) {
    if (b->failed) {
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap == 0 ? 256 : b->cap;
        while (cap < b->len + n + 1) {
            cap *= 2;
        }
        if (cap > HEADERS_JSON_MAX) {
            b->failed = true;
            return;
        }
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void jb_cstr(jbuf_t *b, const char *s) { jb_put(b, s, strlen(s)); }

/* Length of the valid UTF-8 sequence at p (at most n bytes), or 0. */
static size_t utf8_seq(const unsigned char *p, size_t n) {
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (p[0] >= 0xC2 && p[0] <= 0xDF) {
        len = 2;
    } else if (p[0] >= 0xE0 && p[0] <= 0xEF) {
        len = 3;
        if (p[0] == 0xE0) {
            lo = 0xA0;
        } else if (p[0] == 0xED) {
            hi = 0x9F; /* no UTF-16 surrogates */
        }
    } else if (p[0] >= 0xF0 && p[0] <= 0xF4) {
        len = 4;
        if (p[0] == 0xF0) {
            lo = 0x90;
        } else if (p[0] == 0xF4) {
            hi = 0x8F;
        }
    } else {
        return 0;
    }
    if (len > n || p[1] < lo || p[1] > hi) {
        return 0;
    }
    for (size_t i = 2; i < len; i++) {
        if (p[i] < 0x80 || p[i] > 0xBF) {
            return 0;
        }
    }
    return len;
}

/* A JSON string.  NUL bytes and invalid UTF-8 become U+FFFD so that the text
 * is also acceptable to PostgreSQL's jsonb. */
static void jb_string(jbuf_t *b, const void *data, size_t n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = data;
    size_t i = 0;
    jb_put(b, "\"", 1);
    while (i < n && !b->failed) {
        unsigned char ch = p[i];
        if (ch >= 0x80) {
            size_t k = utf8_seq(p + i, n - i);
            if (k == 0) {
                jb_cstr(b, "\\ufffd");
                i++;
            } else {
                jb_put(b, (const char *)p + i, k);
                i += k;
            }
            continue;
        }
        switch (ch) {
        case '"': jb_put(b, "\\\"", 2); break;
        case '\\': jb_put(b, "\\\\", 2); break;
        case '\n': jb_put(b, "\\n", 2); break;
        case '\r': jb_put(b, "\\r", 2); break;
        case '\t': jb_put(b, "\\t", 2); break;
        case 0: jb_cstr(b, "\\ufffd"); break;
        default:
            if (ch < 0x20 || ch == 0x7f) {
                char esc[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
                jb_put(b, esc, 6);
            } else {
                jb_put(b, (const char *)&ch, 1);
            }
        }
        i++;
    }
    jb_put(b, "\"", 1);
}

static void jb_fmt(jbuf_t *b, const char *fmt, ...) LR_PRINTF(2, 3);
static void jb_fmt(jbuf_t *b, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0 && (size_t)n < sizeof(tmp)) {
        jb_put(b, tmp, (size_t)n);
    } else {
        jb_cstr(b, "null");
    }
}

static void jb_table(jbuf_t *b, const amqp_table_t *t, int depth);

static void jb_value(jbuf_t *b, const amqp_field_value_t *v, int depth) {
    if (depth > JSON_MAX_DEPTH) {
        jb_cstr(b, "null");
        return;
    }
    switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN: jb_cstr(b, v->value.boolean ? "true" : "false"); break;
    case AMQP_FIELD_KIND_I8: jb_fmt(b, "%d", (int)v->value.i8); break;
    case AMQP_FIELD_KIND_U8: jb_fmt(b, "%u", (unsigned)v->value.u8); break;
    case AMQP_FIELD_KIND_I16: jb_fmt(b, "%d", (int)v->value.i16); break;
    case AMQP_FIELD_KIND_U16: jb_fmt(b, "%u", (unsigned)v->value.u16); break;
    case AMQP_FIELD_KIND_I32: jb_fmt(b, "%" PRId32, v->value.i32); break;
    case AMQP_FIELD_KIND_U32: jb_fmt(b, "%" PRIu32, v->value.u32); break;
    case AMQP_FIELD_KIND_I64: jb_fmt(b, "%" PRId64, v->value.i64); break;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP: jb_fmt(b, "%" PRIu64, v->value.u64); break;
    case AMQP_FIELD_KIND_F32:
        if (isfinite(v->value.f32)) {
            jb_fmt(b, "%.9g", (double)v->value.f32);
        } else {
            jb_cstr(b, "null");
        }
        break;
    case AMQP_FIELD_KIND_F64:
        if (isfinite(v->value.f64)) {
            jb_fmt(b, "%.17g", v->value.f64);
        } else {
            jb_cstr(b, "null");
        }
        break;
    case AMQP_FIELD_KIND_DECIMAL: {
        /* value * 10^-decimals, written exactly. */
        char digits[16], out[48];
        unsigned dec = v->value.decimal.decimals;
        int nd = snprintf(digits, sizeof(digits), "%" PRIu32, v->value.decimal.value);
        if (dec == 0) {
            jb_cstr(b, digits);
        } else if (dec > 20) {
            jb_cstr(b, "null");
        } else {
            size_t o = 0;
            int intlen = nd - (int)dec;
            if (intlen <= 0) {
                out[o++] = '0';
                out[o++] = '.';
                for (int i = intlen; i < 0; i++) {
                    out[o++] = '0';
                }
                memcpy(out + o, digits, (size_t)nd);
                o += (size_t)nd;
            } else {
                memcpy(out, digits, (size_t)intlen);
                o = (size_t)intlen;
                out[o++] = '.';
                memcpy(out + o, digits + intlen, dec);
                o += dec;
            }
            jb_put(b, out, o);
        }
        break;
    }
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: jb_string(b, v->value.bytes.bytes, v->value.bytes.len); break;
    case AMQP_FIELD_KIND_ARRAY:
        jb_put(b, "[", 1);
        for (int i = 0; i < v->value.array.num_entries; i++) {
            if (i > 0) {
                jb_put(b, ",", 1);
            }
            jb_value(b, &v->value.array.entries[i], depth + 1);
        }
        jb_put(b, "]", 1);
        break;
    case AMQP_FIELD_KIND_TABLE: jb_table(b, &v->value.table, depth + 1); break;
    case AMQP_FIELD_KIND_VOID:
    default: jb_cstr(b, "null"); break;
    }
}

static void jb_table(jbuf_t *b, const amqp_table_t *t, int depth) {
    if (depth > JSON_MAX_DEPTH) {
        jb_cstr(b, "null");
        return;
    }
    jb_put(b, "{", 1);
    for (int i = 0; i < t->num_entries; i++) {
        if (i > 0) {
            jb_put(b, ",", 1);
        }
        jb_string(b, t->entries[i].key.bytes, t->entries[i].key.len);
        jb_put(b, ":", 1);
        jb_value(b, &t->entries[i].value, depth);
    }
    jb_put(b, "}", 1);
}

static char *headers_to_json(const amqp_table_t *t) {
    jbuf_t b = {0};
    jb_table(&b, t, 0);
    if (b.failed) {
        lr_warn("amqp.headers_dropped", "message headers do not fit in %d bytes of JSON", HEADERS_JSON_MAX);
        free(b.p);
        return NULL;
    }
    return b.p;
}

static int64_t header_int(const amqp_table_t *t, const char *key) {
    for (int i = 0; i < t->num_entries; i++) {
        if (!bytes_eq(t->entries[i].key, key)) {
            continue;
        }
        const amqp_field_value_t *v = &t->entries[i].value;
        switch (v->kind) {
        case AMQP_FIELD_KIND_I8: return v->value.i8;
        case AMQP_FIELD_KIND_U8: return v->value.u8;
        case AMQP_FIELD_KIND_I16: return v->value.i16;
        case AMQP_FIELD_KIND_U16: return v->value.u16;
        case AMQP_FIELD_KIND_I32: return v->value.i32;
        case AMQP_FIELD_KIND_U32: return v->value.u32;
        case AMQP_FIELD_KIND_I64: return v->value.i64;
        case AMQP_FIELD_KIND_U64: return v->value.u64 > INT64_MAX ? INT64_MAX : (int64_t)v->value.u64;
        default: return -1;
        }
    }
    return -1;
}

void lr_amqp_delivery_free(lr_amqp_delivery_t *d) {
    if (d == NULL) {
        return;
    }
    free(d->queue);
    free(d->exchange);
    free(d->routing_key);
    free(d->body);
    free(d->message_id);
    free(d->correlation_id);
    free(d->reply_to);
    free(d->content_type);
    free(d->headers_json);
    free(d);
}

/* ------------------------------------------------------------------------ */
/* The owner thread and its queues                                           */

typedef struct item item_t;

typedef struct pub {
    item_t *ev; /* the publish command's own item, reused as its outcome
                   event so that reporting the outcome cannot fail */
    lr_amqp_confirm_cb cb;
    void *arg;
    int result;    /* outcome once completed */
    uint64_t seq;  /* confirm sequence number once sent */
    bool returned; /* basic.return seen; the ack that follows means failure */
    uint64_t hash; /* body hash, to recognise a basic.return */
    char *exchange, *routing_key;
    lr_amqp_msg_t msg;    /* points into strs / body */
    char *body;           /* freed once sent */
    char *strs;           /* one allocation: ids, content type, header pairs */
    const char **headers; /* inside strs */
} pub_t;

static void pub_free(pub_t *p) {
    if (p == NULL) {
        return;
    }
    free(p->exchange);
    free(p->routing_key);
    free(p->body);
    free(p->strs);
    free(p);
}

/* Deep copy of a publish (validated already). */
static pub_t *pub_new(const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg, lr_amqp_confirm_cb cb,
                      void *arg) {
    pub_t *p = calloc(1, sizeof(*p));
    size_t nh = 0, bytes = 0;
    const char *ids[4] = {msg->message_id, msg->correlation_id, msg->reply_to, msg->content_type};
    if (p == NULL) {
        return NULL;
    }
    p->cb = cb;
    p->arg = arg;
    p->exchange = strdup(exchange);
    p->routing_key = strdup(routing_key);
    p->body = malloc(msg->body_len + 1);
    if (p->exchange == NULL || p->routing_key == NULL || p->body == NULL) {
        goto fail;
    }
    if (msg->body_len > 0) {
        memcpy(p->body, msg->body, msg->body_len);
    }
    p->body[msg->body_len] = '\0';
    p->hash = fnv1a(FNV_INIT, p->body, msg->body_len);
    for (int i = 0; i < 4; i++) {
        bytes += ids[i] != NULL ? strlen(ids[i]) + 1 : 0;
    }
    if (msg->headers != NULL) {
        for (const char *const *h = msg->headers; h[0] != NULL; h += 2) {
            nh++;
            bytes += strlen(h[0]) + strlen(h[1]) + 2;
        }
    }
    size_t ptrs = (2 * nh + 1) * sizeof(char *);
    p->strs = malloc(ptrs + bytes + 1);
    if (p->strs == NULL) {
        goto fail;
    }
    p->headers = (const char **)(void *)p->strs;
    char *w = p->strs + ptrs;
    const char *copies[4];
    for (int i = 0; i < 4; i++) {
        copies[i] = NULL;
        if (ids[i] != NULL) {
            size_t n = strlen(ids[i]) + 1;
            memcpy(w, ids[i], n);
            copies[i] = w;
            w += n;
        }
    }
    for (size_t i = 0; i < nh; i++) {
        for (int j = 0; j < 2; j++) {
            size_t n = strlen(msg->headers[2 * i + (size_t)j]) + 1;
            memcpy(w, msg->headers[2 * i + (size_t)j], n);
            p->headers[2 * i + (size_t)j] = w;
            w += n;
        }
    }
    p->headers[2 * nh] = NULL;
    p->msg = *msg;
    p->msg.body = p->body;
    p->msg.message_id = copies[0];
    p->msg.correlation_id = copies[1];
    p->msg.reply_to = copies[2];
    p->msg.content_type = copies[3];
    p->msg.headers = nh > 0 ? p->headers : NULL;
    return p;
fail:
    pub_free(p);
    return NULL;
}

/* Unconfirmed publishes by sequence number: v[(head + i) % cap] holds seq
 * base + i, NULL once completed out of order. */
typedef struct ring {
    pub_t **v;
    size_t cap, head, n;
    uint64_t base;
} ring_t;

static int ring_push(ring_t *r, pub_t *p) {
    if (r->n == 0) {
        r->base = p->seq;
        r->head = 0;
    }
    if (r->n == r->cap) {
        size_t cap = r->cap == 0 ? 64 : r->cap * 2;
        pub_t **v = malloc(cap * sizeof(*v));
        if (v == NULL) {
            return LR_ENOMEM;
        }
        for (size_t i = 0; i < r->n; i++) {
            v[i] = r->v[(r->head + i) % r->cap];
        }
        free(r->v);
        r->v = v;
        r->cap = cap;
        r->head = 0;
    }
    r->v[(r->head + r->n) % r->cap] = p;
    r->n++;
    return 0;
}

static pub_t **ring_at(ring_t *r, size_t i) { return &r->v[(r->head + i) % r->cap]; }

static void ring_trim(ring_t *r) {
    while (r->n > 0 && r->v[r->head] == NULL) {
        r->head = (r->head + 1) % r->cap;
        r->n--;
        r->base++;
    }
}

typedef enum {
    CMD_ACK,
    CMD_REJECT,
    CMD_PUBLISH,
    CMD_CANCEL,
    CMD_STOP,
    EV_DELIVERY,
    EV_CONFIRM,
    EV_STATE,
    EV_STOPPED,
} item_type_t;

/* A command (loop -> owner) or an event (owner -> loop). */
struct item {
    lr_list_t link; /* in one of the command or event lists below */
    item_type_t type;
    uint64_t generation;          /* CMD_ACK/REJECT: of the delivery; EV_STATE: new one */
    uint64_t tag;                 /* CMD_ACK/REJECT */
    bool requeue;                 /* CMD_REJECT */
    long timeout_ms;              /* CMD_STOP */
    pub_t *pub;                   /* CMD_PUBLISH, EV_CONFIRM */
    lr_amqp_delivery_t *delivery; /* EV_DELIVERY */
    int connected;                /* EV_STATE */
    char *detail;                 /* EV_STATE */
};

/* Removes and returns the oldest item of a FIFO list, or NULL. */
static item_t *item_pop(lr_list_t *l) {
    lr_list_t *n = lr_list_pop_front(l);
    return n != NULL ? lr_list_entry(n, item_t, link) : NULL;
}

static void item_free(item_t *it) {
    if (it == NULL) {
        return;
    }
    pub_free(it->pub);
    lr_amqp_delivery_free(it->delivery);
    free(it->detail);
    free(it);
}

typedef enum {
    OWNER_DISCONNECTED, /* no connection; waiting for the next attempt */
    OWNER_CONNECTING,   /* connect, login, declare, consume in progress */
    OWNER_READY,        /* connected: consuming (unless cancelled) and publishing */
    OWNER_DRAINING,     /* stop requested: waiting for outstanding confirms */
    OWNER_CLOSED,       /* finished; the thread is exiting */
} owner_state_t;

static const char *const owner_state_names[] = {"disconnected", "connecting", "ready", "draining", "closed"};

struct lr_amqp {
    /* Immutable after lr_amqp_start (read by both threads). */
    uv_loop_t *loop;
    url_t url;
    char **consume; /* NULL-terminated full queue names */
    size_t nconsume;
    char **declare; /* NULL-terminated short names */
    int prefetch;
    int delivery_limit;
    int max_length;
    lr_amqp_delivery_cb on_delivery;
    lr_amqp_state_cb on_state;
    void *arg;
    char conn_name[128];

    /* libuv handles (loop thread). */
    uv_async_t async;
    uv_timer_t stop_timer;
    int open_handles;

    pthread_t thread;
    int wake_fd; /* eventfd: commands are waiting */

    /* Shared, guarded by mu. */
    pthread_mutex_t mu;
    lr_list_t cmds;   /* item_t, oldest first */
    bool wake_armed;  /* wake_fd has been written and not yet read */
    lr_list_t events; /* item_t, oldest first */
    int kick_fd;      /* current socket, for stop's last resort; -1 when none */

    /* Loop thread only. */
    bool stopping;
    bool stopped;        /* EV_STOPPED seen; thread joined */
    size_t inflight;     /* publishes accepted, outcome not yet delivered */
    uint64_t generation; /* generation announced by the last on_state(1) */
    int connected;
    bool cancelled;
    item_t *stop_item;    /* preallocated so that lr_amqp_stop cannot fail */
    item_t *stopped_item; /* preallocated EV_STOPPED (owner thread uses it last) */
    void (*done)(void *);
    void *done_arg;

    /* Owner thread only. */
    owner_state_t state;
    conn_t conn;
    uint64_t t_generation;
    bool t_cancelled; /* basic.cancel requested: do not consume again */
    bool t_stop;
    uint64_t t_stop_deadline;
    ring_t unconfirmed;
    lr_list_t t_cmds;   /* commands taken from cmds, not yet executed */
    lr_list_t t_events; /* events not yet handed to the loop */
    uint64_t rng;
};

#define set_state(a, s) set_state_at((a), (s), __LINE__)
static void set_state_at(lr_amqp_t *a, owner_state_t s, int line) {
    if (a->state != s) {
        lr_debug("amqp.state", "%s -> %s (line %d)", owner_state_names[a->state], owner_state_names[s], line);
        a->state = s;
    }
}

/* Owner: queue an event for the next flush. */
static void emit(lr_amqp_t *a, item_t *it) { lr_list_push_back(&a->t_events, &it->link); }

/* Owner: hand queued events to the loop and wake it. */
static void flush_events(lr_amqp_t *a) {
    if (lr_list_empty(&a->t_events)) {
        return;
    }
    pthread_mutex_lock(&a->mu);
    lr_list_splice_back(&a->events, &a->t_events);
    pthread_mutex_unlock(&a->mu);
    uv_async_send(&a->async);
}

/* Owner: complete a publish (its command item becomes the outcome event). */
static void complete_pub(lr_amqp_t *a, pub_t *p, int result) {
    item_t *it = p->ev;
    p->ev = NULL;
    p->result = result;
    memset(it, 0, sizeof(*it));
    it->type = EV_CONFIRM;
    it->pub = p;
    emit(a, it);
}

static void emit_state(lr_amqp_t *a, int connected, const char *detail) {
    item_t *it = calloc(1, sizeof(*it));
    if (it == NULL) {
        lr_error("amqp.oom", "out of memory reporting a connection state change");
        return;
    }
    it->type = EV_STATE;
    it->connected = connected;
    it->generation = a->t_generation;
    it->detail = strdup(detail);
    if (it->detail == NULL) {
        lr_error("amqp.oom", "out of memory reporting a connection state change");
        free(it);
        return;
    }
    emit(a, it);
    flush_events(a);
}

/* Owner: every unconfirmed publish gets err (connection lost / stopping). */
static void fail_unconfirmed(lr_amqp_t *a, int err) {
    ring_t *r = &a->unconfirmed;
    for (size_t i = 0; i < r->n; i++) {
        pub_t **pp = ring_at(r, i);
        if (*pp != NULL) {
            complete_pub(a, *pp, err);
            *pp = NULL;
        }
    }
    r->n = 0;
    r->head = 0;
}

/* Owner: basic.ack / basic.nack from the broker. */
static void confirm(lr_amqp_t *a, uint64_t tag, bool multiple, int err) {
    ring_t *r = &a->unconfirmed;
    if (multiple) {
        while (r->n > 0 && r->base <= tag) {
            pub_t *p = r->v[r->head];
            if (p != NULL) {
                complete_pub(a, p, p->returned ? LR_EAMQP : err);
                r->v[r->head] = NULL;
            }
            ring_trim(r);
        }
    } else if (r->n > 0 && tag >= r->base && tag < r->base + r->n) {
        pub_t **pp = ring_at(r, (size_t)(tag - r->base));
        if (*pp != NULL) {
            complete_pub(a, *pp, (*pp)->returned ? LR_EAMQP : err);
            *pp = NULL;
        }
        ring_trim(r);
    } else {
        lr_debug("amqp.unknown_confirm", "confirm for unknown sequence number %" PRIu64, tag);
    }
}

/* Owner: basic.return for a mandatory publish that could not be routed. */
static int handle_return(lr_amqp_t *a, const amqp_basic_return_t *m, char *detail, size_t dlen) {
    char exchange[MAX_SHORTSTR + 1], rk[MAX_SHORTSTR + 1], text[DETAIL_MAX];
    content_t ct;
    snprintf(exchange, sizeof(exchange), "%.*s", (int)m->exchange.len, (const char *)m->exchange.bytes);
    snprintf(rk, sizeof(rk), "%.*s", (int)m->routing_key.len, (const char *)m->routing_key.bytes);
    snprintf(text, sizeof(text), "%u %.*s", m->reply_code, (int)m->reply_text.len, (const char *)m->reply_text.bytes);
    int rc = read_content(&a->conn, 0, &ct, detail, dlen);
    if (rc != 0) {
        return rc;
    }
    ring_t *r = &a->unconfirmed;
    for (size_t i = 0; i < r->n; i++) {
        pub_t *p = *ring_at(r, i);
        if (p != NULL && p->msg.mandatory && !p->returned && p->hash == ct.hash && p->msg.body_len == ct.total_len &&
            strcmp(p->exchange, exchange) == 0 && strcmp(p->routing_key, rk) == 0) {
            p->returned = true;
            lr_warn("amqp.returned",
                    "the broker returned a message published to exchange '%s' with routing "
                    "key '%s': %s",
                    exchange, rk, text);
            return 0;
        }
    }
    lr_warn("amqp.returned_unknown", "basic.return (%s) for exchange '%s' routing key '%s' matches no pending publish",
            text, exchange, rk);
    return 0;
}

/* Owner: basic.deliver -> EV_DELIVERY. */
static int handle_deliver(lr_amqp_t *a, const amqp_basic_deliver_t *m, char *detail, size_t dlen) {
    content_t ct;
    int rc = read_content(&a->conn, a->t_stop ? 0 : LR_AMQP_MAX_BODY, &ct, detail, dlen);
    if (rc != 0) {
        return rc;
    }
    if (a->t_stop) {
        /* Stopping: the message goes back to the queue when we close. */
        return 0;
    }
    const char *queue = NULL;
    /* Consumer tags are "lr.<index>" (see start_consuming). */
    if (m->consumer_tag.len > 3 && memcmp(m->consumer_tag.bytes, "lr.", 3) == 0) {
        size_t idx = 0;
        for (size_t i = 3; i < m->consumer_tag.len; i++) {
            idx = idx * 10 + (size_t)(((const char *)m->consumer_tag.bytes)[i] - '0');
        }
        if (idx < a->nconsume) {
            queue = a->consume[idx];
        }
    }
    lr_amqp_delivery_t *d = calloc(1, sizeof(*d));
    item_t *it = calloc(1, sizeof(*it));
    if (d == NULL || it == NULL) {
        free(ct.body);
        free(d);
        free(it);
        return LR_ENOMEM;
    }
    const amqp_basic_properties_t *p = ct.props;
    d->generation = a->t_generation;
    d->delivery_tag = m->delivery_tag;
    d->queue = dup_str(queue != NULL ? queue : "");
    d->exchange = dup_bytes(m->exchange);
    d->routing_key = dup_bytes(m->routing_key);
    d->redelivered = m->redelivered != 0;
    d->body = ct.body;
    d->body_len = ct.body_len;
    d->body_truncated = ct.truncated;
    d->delivery_count = -1;
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        d->message_id = dup_bytes(p->message_id);
    }
    if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
        d->correlation_id = dup_bytes(p->correlation_id);
    }
    if (p->_flags & AMQP_BASIC_REPLY_TO_FLAG) {
        d->reply_to = dup_bytes(p->reply_to);
    }
    if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
        d->content_type = dup_bytes(p->content_type);
    }
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
        d->headers_json = headers_to_json(&p->headers);
        d->delivery_count = header_int(&p->headers, "x-delivery-count");
    }
    if (d->queue == NULL || d->exchange == NULL || d->routing_key == NULL) {
        lr_amqp_delivery_free(d);
        free(it);
        return LR_ENOMEM;
    }
    if (ct.truncated) {
        lr_warn("amqp.body_truncated", "message %s on queue %s has a %" PRIu64 "-byte body; delivered truncated to %d",
                d->message_id != NULL ? d->message_id : "(no id)", d->queue, ct.total_len, LR_AMQP_MAX_BODY);
    }
    it->type = EV_DELIVERY;
    it->delivery = d;
    emit(a, it);
    return 0;
}

/* Owner: one frame read outside an RPC.  Returns 0 or an error that ends
 * the connection (detail says why). */
static int handle_frame(lr_amqp_t *a, const amqp_frame_t *f, char *detail, size_t dlen) {
    if (f->frame_type != AMQP_FRAME_METHOD) {
        lr_debug("amqp.stray_frame", "ignoring frame type %u on channel %u", (unsigned)f->frame_type,
                 (unsigned)f->channel);
        return 0;
    }
    if (f->channel == 0) {
        return handle_channel0(&a->conn, f, detail, dlen);
    }
    const void *m = f->payload.method.decoded;
    switch (f->payload.method.id) {
    case AMQP_BASIC_DELIVER_METHOD: return handle_deliver(a, m, detail, dlen);
    case AMQP_BASIC_ACK_METHOD: {
        const amqp_basic_ack_t *ack = m;
        confirm(a, ack->delivery_tag, ack->multiple != 0, 0);
        return 0;
    }
    case AMQP_BASIC_NACK_METHOD: {
        const amqp_basic_nack_t *nack = m;
        lr_warn("amqp.nacked", "the broker refused publish #%" PRIu64 "%s", nack->delivery_tag,
                nack->multiple ? " and earlier" : "");
        confirm(a, nack->delivery_tag, nack->multiple != 0, LR_EAMQP);
        return 0;
    }
    case AMQP_BASIC_RETURN_METHOD: return handle_return(a, m, detail, dlen);
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *cc = m;
        snprintf(detail, dlen, "the broker closed the channel: %u %.*s", cc->reply_code, (int)cc->reply_text.len,
                 (const char *)cc->reply_text.bytes);
        send_channel_close_ok(&a->conn);
        return LR_EAMQP;
    }
    case AMQP_BASIC_CANCEL_METHOD: {
        const amqp_basic_cancel_t *bc = m;
        snprintf(detail, dlen,
                 "the broker cancelled consumer %.*s (its queue was deleted or moved); "
                 "reconnecting to declare and consume again",
                 (int)bc->consumer_tag.len, (const char *)bc->consumer_tag.bytes);
        return LR_EAMQP;
    }
    default: lr_debug("amqp.ignored_method", "ignoring method 0x%08x", (unsigned)f->payload.method.id); return 0;
    }
}

static int start_consuming(lr_amqp_t *a, char *detail, size_t dlen) {
    rpc_err_t e;
    int rc;
    if (a->nconsume == 0 || a->t_cancelled) {
        return 0;
    }
    /* Per-consumer prefetch: quorum queues refuse global (per-channel) QoS. */
    amqp_basic_qos(a->conn.st, CHANNEL, 0, (uint16_t)a->prefetch, 0);
    if ((rc = rpc_check(&a->conn, &e)) != 0) {
        return lr_seterr(detail, dlen, rc, "basic.qos failed: %s", e.server);
    }
    for (size_t i = 0; i < a->nconsume; i++) {
        char tag[32];
        snprintf(tag, sizeof(tag), "lr.%zu", i);
        amqp_basic_consume(a->conn.st, CHANNEL, amqp_cstring_bytes(a->consume[i]), amqp_cstring_bytes(tag), 0, 0, 0,
                           amqp_empty_table);
        if ((rc = rpc_check(&a->conn, &e)) != 0) {
            if (e.code == AMQP_NOT_FOUND) {
                return lr_seterr(detail, dlen, rc, "cannot consume from queue %s: it does not exist", a->consume[i]);
            }
            return lr_seterr(detail, dlen, rc, "cannot consume from queue %s: %s", a->consume[i], e.server);
        }
    }
    return 0;
}

static int stop_consuming(lr_amqp_t *a, char *detail, size_t dlen) {
    rpc_err_t e;
    for (size_t i = 0; i < a->nconsume; i++) {
        char tag[32];
        snprintf(tag, sizeof(tag), "lr.%zu", i);
        amqp_basic_cancel(a->conn.st, CHANNEL, amqp_cstring_bytes(tag));
        int rc = rpc_check(&a->conn, &e);
        if (rc != 0) {
            return lr_seterr(detail, dlen, rc, "basic.cancel failed: %s", e.server);
        }
    }
    return 0;
}

/* Owner: run one command.  connected: whether the session is usable.
 * Returns 0 or a connection-ending error. */
static int run_command(lr_amqp_t *a, item_t *it, bool connected, char *detail, size_t dlen) {
    int rc = 0;
    switch (it->type) {
    case CMD_ACK:
    case CMD_REJECT:
        if (!connected || it->generation != a->t_generation) {
            lr_debug("amqp.stale_ack", "dropping %s of delivery %" PRIu64 " from generation %" PRIu64,
                     it->type == CMD_ACK ? "ack" : "reject", it->tag, it->generation);
            break;
        }
        errno = 0;
        rc = it->type == CMD_ACK ? amqp_basic_ack(a->conn.st, CHANNEL, it->tag, 0)
                                 : amqp_basic_reject(a->conn.st, CHANNEL, it->tag, it->requeue ? 1 : 0);
        if (rc != AMQP_STATUS_OK) {
            char buf[256];
            int saved = errno;
            a->conn.broken = true;
            snprintf(detail, dlen, "sending %s failed: %s", it->type == CMD_ACK ? "ack" : "reject",
                     status_text(rc, saved, buf, sizeof(buf)));
            rc = LR_ECONN;
        }
        break;
    case CMD_PUBLISH: {
        /* it stays with p (p->ev) as its future outcome event. */
        pub_t *p = it->pub;
        it->pub = NULL;
        if (!connected) {
            complete_pub(a, p, LR_ECONN);
            return 0;
        }
        errno = 0;
        int status = send_publish(&a->conn, p->exchange, p->routing_key, &p->msg);
        if (status != AMQP_STATUS_OK) {
            char buf[256];
            int saved = errno;
            a->conn.broken = true;
            snprintf(detail, dlen, "publish failed: %s", status_text(status, saved, buf, sizeof(buf)));
            complete_pub(a, p, LR_ECONN);
            return LR_ECONN;
        }
        free(p->body);
        p->body = NULL;
        p->msg.body = NULL;
        p->seq = a->conn.next_seq++;
        if (ring_push(&a->unconfirmed, p) != 0) {
            /* It was sent; we just cannot track it.  Report the unknown. */
            complete_pub(a, p, LR_ECONN);
        }
        return 0;
    }
    case CMD_CANCEL:
        if (!a->t_cancelled) {
            a->t_cancelled = true;
            if (connected) {
                rc = stop_consuming(a, detail, dlen);
            }
        }
        break;
    case CMD_STOP:
        a->t_stop = true;
        a->t_stop_deadline = now_ms() + (uint64_t)(it->timeout_ms > 0 ? it->timeout_ms : 0);
        if (connected) {
            /* From here on a silent broker must not hold the stop for the
               full RPC timeout. */
            long ms = it->timeout_ms < 200 ? 200 : it->timeout_ms;
            struct timeval tv = ms_to_tv(ms < CLOSE_TIMEOUT_MS ? ms : CLOSE_TIMEOUT_MS);
            amqp_set_rpc_timeout(a->conn.st, &tv);
            set_state(a, OWNER_DRAINING);
            if (!a->t_cancelled) {
                a->t_cancelled = true;
                rc = stop_consuming(a, detail, dlen);
            }
        }
        break;
    default: break;
    }
    item_free(it);
    return rc;
}

/* Owner: take new commands from the loop (and reset the eventfd). */
static void take_commands(lr_amqp_t *a) {
    pthread_mutex_lock(&a->mu);
    if (a->wake_armed) {
        uint64_t v;
        ssize_t n = read(a->wake_fd, &v, sizeof(v));
        (void)n;
        a->wake_armed = false;
    }
    lr_list_splice_back(&a->t_cmds, &a->cmds);
    pthread_mutex_unlock(&a->mu);
}

/* Owner: run up to CMD_BATCH commands. */
static int run_commands(lr_amqp_t *a, bool connected, char *detail, size_t dlen) {
    take_commands(a);
    for (int i = 0; i < CMD_BATCH; i++) {
        item_t *it = item_pop(&a->t_cmds);
        if (it == NULL) {
            break;
        }
        int rc = run_command(a, it, connected, detail, dlen);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

/* Owner: sleep until fd is readable, a command arrives, or ms pass. */
static void wait_for_work(lr_amqp_t *a, int fd, long ms) {
    struct pollfd p[2];
    int n = 0;
    p[n].fd = a->wake_fd;
    p[n].events = POLLIN;
    n++;
    if (fd >= 0) {
        p[n].fd = fd;
        p[n].events = POLLIN;
        n++;
    }
    if (poll(p, (nfds_t)n, (int)ms) < 0 && errno != EINTR) {
        lr_warn("amqp.poll", "poll failed: errno %d", errno);
    }
}

/* Owner: the connected session.  Returns 0 after a requested stop, or the
 * error that ended the connection (detail says why). */
static int session_run(lr_amqp_t *a, char *detail, size_t dlen) {
    int rc;
    for (;;) {
        rc = run_commands(a, true, detail, dlen);
        if (rc != 0) {
            return rc;
        }
        if (a->t_stop && (a->unconfirmed.n == 0 || now_ms() >= a->t_stop_deadline)) {
            flush_events(a);
            return 0;
        }
        /* Read what is available without blocking (rabbitmq-c may hold
           frames in its buffers that poll() cannot see). */
        bool idle = true;
        int nframes = 0;
        struct timeval zero = {0, 0};
        for (; nframes < FRAME_BATCH; nframes++) {
            amqp_frame_t f;
            char buf[256];
            errno = 0;
            int status = amqp_simple_wait_frame_noblock(a->conn.st, &f, &zero);
            int saved = errno;
            if (status == AMQP_STATUS_TIMEOUT) {
                break;
            }
            if (status != AMQP_STATUS_OK) {
                a->conn.broken = true;
                snprintf(detail, dlen, "%s", status_text(status, saved, buf, sizeof(buf)));
                return status_err(status);
            }
            idle = false;
            rc = handle_frame(a, &f, detail, dlen);
            amqp_maybe_release_buffers(a->conn.st);
            if (rc != 0) {
                return rc;
            }
        }
        flush_events(a);
        if (!idle || !lr_list_empty(&a->t_cmds)) {
            continue;
        }
        long wait = IDLE_TICK_MS;
        if (a->t_stop) {
            uint64_t now = now_ms();
            wait = a->t_stop_deadline > now ? (long)(a->t_stop_deadline - now) : 0;
            wait = wait < IDLE_TICK_MS ? wait : IDLE_TICK_MS;
        }
        uint64_t before = now_ms();
        wait_for_work(a, amqp_get_sockfd(a->conn.st), wait);
        if (now_ms() - before >= (uint64_t)wait) {
            /* Idle tick: a short wait lets rabbitmq-c send a heartbeat and
               notice a broker that went silent (a zero timeout cannot). */
            amqp_frame_t f;
            char buf[256];
            struct timeval tick = {0, 1000};
            errno = 0;
            int status = amqp_simple_wait_frame_noblock(a->conn.st, &f, &tick);
            int saved = errno;
            if (status == AMQP_STATUS_OK) {
                rc = handle_frame(a, &f, detail, dlen);
                amqp_maybe_release_buffers(a->conn.st);
                if (rc != 0) {
                    return rc;
                }
            } else if (status != AMQP_STATUS_TIMEOUT) {
                a->conn.broken = true;
                snprintf(detail, dlen, "%s", status_text(status, saved, buf, sizeof(buf)));
                return status_err(status);
            }
        }
    }
}

static void set_kick_fd(lr_amqp_t *a, int fd) {
    pthread_mutex_lock(&a->mu);
    a->kick_fd = fd;
    pthread_mutex_unlock(&a->mu);
}

/* Owner: connect, declare, consume. */
static int session_open(lr_amqp_t *a, char *detail, size_t dlen) {
    int rc = conn_open(&a->conn, &a->url, CONNECT_TIMEOUT_MS, OWNER_HEARTBEAT_S, a->conn_name, detail, dlen);
    if (rc != 0) {
        return rc;
    }
    set_kick_fd(a, amqp_get_sockfd(a->conn.st));
    rc = declare_topology(&a->conn, (const char *const *)a->declare, a->delivery_limit, a->max_length, detail, dlen);
    if (rc != 0) {
        return rc;
    }
    return start_consuming(a, detail, dlen);
}

static void session_close(lr_amqp_t *a) {
    if (a->conn.st == NULL) {
        return;
    }
    /* Clear the kick fd first, so that stop's last resort can never hit a
       reused descriptor. */
    set_kick_fd(a, -1);
    conn_close(&a->conn);
}

static uint64_t rng_next(lr_amqp_t *a) {
    a->rng ^= a->rng << 13;
    a->rng ^= a->rng >> 7;
    a->rng ^= a->rng << 17;
    return a->rng;
}

/* 250 ms .. 10 s, doubling, "equal jitter" (half fixed, half random). */
static long backoff_ms(lr_amqp_t *a, unsigned attempt) {
    uint64_t cap = BACKOFF_MIN_MS;
    for (unsigned i = 0; i < attempt && cap < BACKOFF_MAX_MS; i++) {
        cap *= 2;
    }
    if (cap > BACKOFF_MAX_MS) {
        cap = BACKOFF_MAX_MS;
    }
    uint64_t d = cap / 2 + rng_next(a) % (cap / 2 + 1);
    return (long)(d < BACKOFF_MIN_MS ? BACKOFF_MIN_MS : d);
}

/* Owner: wait before reconnecting, still answering commands (publishes
 * fail with LR_ECONN, acks are dropped, stop ends the wait). */
static void disconnected_wait(lr_amqp_t *a, long ms) {
    char detail[DETAIL_MAX];
    uint64_t deadline = now_ms() + (uint64_t)ms;
    for (;;) {
        do {
            /* Not connected: cannot fail (publishes complete with LR_ECONN). */
            (void)run_commands(a, false, detail, sizeof(detail));
            flush_events(a);
        } while (!lr_list_empty(&a->t_cmds));
        uint64_t now = now_ms();
        if (a->t_stop || now >= deadline) {
            return;
        }
        wait_for_work(a, -1, (long)(deadline - now));
    }
}

static void *owner_main(void *arg) {
    lr_amqp_t *a = arg;
    char detail[DETAIL_MAX];
    unsigned attempt = 0;

    while (!a->t_stop) {
        set_state(a, OWNER_CONNECTING);
        detail[0] = '\0';
        int rc = session_open(a, detail, sizeof(detail));
        if (rc == 0) {
            attempt = 0;
            a->t_generation++;
            set_state(a, OWNER_READY);
            char msg[DETAIL_MAX];
            snprintf(msg, sizeof(msg), "connected to %s", a->url.redacted);
            lr_info("amqp.connected", "%s (generation %" PRIu64 ")", msg, a->t_generation);
            emit_state(a, 1, msg);
            rc = session_run(a, detail, sizeof(detail));
        }
        if (a->t_stop) {
            /* Requested stop (even if the connection failed while draining):
               what is still unconfirmed is abandoned, as amqp.h promises. */
            fail_unconfirmed(a, LR_ESHUTDOWN);
            session_close(a);
            break;
        }
        fail_unconfirmed(a, LR_ECONN);
        session_close(a);
        set_state(a, OWNER_DISCONNECTED);
        if (detail[0] == '\0') {
            snprintf(detail, sizeof(detail), "%s", lr_strerror(rc));
        }
        if (a->t_stop) {
            break;
        }
        long delay = backoff_ms(a, rc == LR_ECONFIG ? 100 : attempt);
        attempt++;
        lr_warn("amqp.disconnected", "%s: %s; retrying in %ld ms", a->url.redacted, detail, delay);
        emit_state(a, 0, detail);
        disconnected_wait(a, delay);
    }

    /* Whatever the loop queued before its stop command completes now. */
    for (;;) {
        take_commands(a);
        item_t *it = item_pop(&a->t_cmds);
        if (it == NULL) {
            break;
        }
        if (it->type == CMD_PUBLISH) {
            pub_t *p = it->pub;
            it->pub = NULL;
            complete_pub(a, p, LR_ESHUTDOWN);
            continue;
        }
        item_free(it);
    }
    set_state(a, OWNER_CLOSED);
    item_t *it = a->stopped_item; /* preallocated: this event must not fail */
    a->stopped_item = NULL;
    it->type = EV_STOPPED;
    emit(a, it);
    flush_events(a);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Loop side                                                                 */

static void amqp_free(lr_amqp_t *a) {
    item_t *it;
    while ((it = item_pop(&a->events)) != NULL) {
        item_free(it);
    }
    while ((it = item_pop(&a->cmds)) != NULL) {
        item_free(it);
    }
    item_free(a->stop_item);
    item_free(a->stopped_item);
    free(a->unconfirmed.v);
    url_free(&a->url);
    if (a->consume != NULL) {
        for (size_t i = 0; a->consume[i] != NULL; i++) {
            free(a->consume[i]);
        }
        free(a->consume);
    }
    if (a->declare != NULL) {
        for (size_t i = 0; a->declare[i] != NULL; i++) {
            free(a->declare[i]);
        }
        free(a->declare);
    }
    if (a->wake_fd >= 0) {
        close(a->wake_fd);
    }
    pthread_mutex_destroy(&a->mu);
    free(a);
}

static void handle_closed(uv_handle_t *h) {
    lr_amqp_t *a = h->data;
    if (--a->open_handles > 0) {
        return;
    }
    void (*done)(void *) = a->done;
    void *done_arg = a->done_arg;
    amqp_free(a);
    if (done != NULL) {
        done(done_arg);
    }
}

static void push_command(lr_amqp_t *a, item_t *it) {
    bool wake = false;
    pthread_mutex_lock(&a->mu);
    lr_list_push_back(&a->cmds, &it->link);
    if (!a->wake_armed) {
        a->wake_armed = true;
        wake = true;
    }
    if (wake) {
        uint64_t one = 1;
        ssize_t n = write(a->wake_fd, &one, sizeof(one));
        (void)n;
    }
    pthread_mutex_unlock(&a->mu);
}

static void async_cb(uv_async_t *h) {
    lr_amqp_t *a = h->data;
    lr_list_t batch;
    item_t *it;

    if (a->stopped) {
        return;
    }
    lr_list_init(&batch);
    pthread_mutex_lock(&a->mu);
    lr_list_splice_back(&batch, &a->events);
    pthread_mutex_unlock(&a->mu);

    while ((it = item_pop(&batch)) != NULL) {
        switch (it->type) {
        case EV_DELIVERY:
            if (!a->stopping && a->on_delivery != NULL) {
                lr_amqp_delivery_t *d = it->delivery;
                it->delivery = NULL;
                a->on_delivery(d, a->arg);
            }
            break;
        case EV_CONFIRM: {
            pub_t *p = it->pub;
            a->inflight--;
            if (p->cb != NULL) {
                p->cb(p->result, p->arg);
            }
            break;
        }
        case EV_STATE:
            a->connected = it->connected;
            if (it->connected) {
                a->generation = it->generation;
            }
            if (a->on_state != NULL && !a->stopping) {
                a->on_state(it->connected, it->detail, a->arg);
            }
            break;
        case EV_STOPPED: a->stopped = true; break;
        default: break;
        }
        item_free(it);
    }
    if (a->stopped) {
        pthread_join(a->thread, NULL);
        a->connected = 0;
        uv_close((uv_handle_t *)&a->stop_timer, handle_closed);
        uv_close((uv_handle_t *)&a->async, handle_closed);
    }
}

static void stop_timer_cb(uv_timer_t *t) {
    lr_amqp_t *a = t->data;
    /* The owner thread did not finish within the stop timeout: it is stuck
       in a blocking write or read.  Shut the socket down under it. */
    pthread_mutex_lock(&a->mu);
    if (a->kick_fd >= 0) {
        lr_warn("amqp.stop_kick", "the AMQP thread is slow to stop; shutting its socket down");
        shutdown(a->kick_fd, SHUT_RDWR);
    }
    pthread_mutex_unlock(&a->mu);
}

static atomic_uint instance_counter;

static char **copy_strv(const char *const *v, size_t *count) {
    size_t n = 0;
    while (v != NULL && v[n] != NULL) {
        n++;
    }
    char **out = calloc(n + 1, sizeof(*out));
    if (out == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        out[i] = strdup(v[i]);
        if (out[i] == NULL) {
            for (size_t j = 0; j < i; j++) {
                free(out[j]);
            }
            free(out);
            return NULL;
        }
    }
    if (count != NULL) {
        *count = n;
    }
    return out;
}

static lr_metric_t *replies_metric(void);

int lr_amqp_start(lr_amqp_t **out, uv_loop_t *loop, const lr_amqp_opts_t *opts, char *errbuf, size_t errlen) {
    lr_amqp_t *a = NULL;
    int rc;
    char host[64] = "";
    sigset_t all, old;

    if (out == NULL || loop == NULL || opts == NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "lr_amqp_start: missing argument");
    }
    *out = NULL;
    (void)replies_metric(); /* in /metrics from the start, before the first reply */
    size_t nconsume = 0;
    while (opts->consume != NULL && opts->consume[nconsume] != NULL) {
        nconsume++;
    }
    if (nconsume > 0 && (opts->prefetch < 1 || opts->prefetch > 65535)) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "prefetch %d must be 1..65535", opts->prefetch);
    }
    if (opts->delivery_limit < 0) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "delivery limit %d is negative", opts->delivery_limit);
    }
    for (size_t i = 0; i < nconsume; i++) {
        if (opts->consume[i][0] == '\0' || strlen(opts->consume[i]) > MAX_SHORTSTR) {
            return lr_seterr(errbuf, errlen, LR_EINVAL,
                             "queue name %zu to consume is empty or "
                             "too long",
                             i);
        }
    }
    /* Checked here: the owner thread would otherwise retry a bad name forever. */
    rc = check_queue_names(opts->declare, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    a = calloc(1, sizeof(*a));
    if (a == NULL) {
        return LR_ENOMEM;
    }
    a->wake_fd = -1;
    a->kick_fd = -1;
    lr_list_init(&a->cmds);
    lr_list_init(&a->events);
    lr_list_init(&a->t_cmds);
    lr_list_init(&a->t_events);
    pthread_mutex_init(&a->mu, NULL);
    rc = url_parse(&a->url, opts->url, errbuf, errlen);
    if (rc != 0) {
        goto fail;
    }
    a->loop = loop;
    a->consume = copy_strv(opts->consume, &a->nconsume);
    a->declare = copy_strv(opts->declare, NULL);
    a->stop_item = calloc(1, sizeof(*a->stop_item));
    a->stopped_item = calloc(1, sizeof(*a->stopped_item));
    if (a->consume == NULL || a->declare == NULL || a->stop_item == NULL || a->stopped_item == NULL) {
        rc = LR_ENOMEM;
        goto fail;
    }
    a->prefetch = opts->prefetch;
    a->delivery_limit = opts->delivery_limit;
    a->max_length = opts->max_length;
    a->on_delivery = opts->on_delivery;
    a->on_state = opts->on_state;
    a->arg = opts->arg;
    gethostname(host, sizeof(host) - 1);
    /* "<program>@<host>:<pid>/<n>": findable in rabbitmqctl list_connections. */
    snprintf(a->conn_name, sizeof(a->conn_name), "%s@%s:%ld/%u",
#if defined(__GLIBC__)
             program_invocation_short_name,
#else
             "longrun",
#endif
             host, (long)getpid(), atomic_fetch_add(&instance_counter, 1) + 1);
    a->rng = (now_ms() * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)a;
    if (a->rng == 0) {
        a->rng = 1;
    }
    a->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (a->wake_fd < 0) {
        rc = lr_seterr(errbuf, errlen, LR_EIO, "eventfd failed: errno %d", errno);
        goto fail;
    }
    if (uv_async_init(loop, &a->async, async_cb) != 0) {
        rc = lr_seterr(errbuf, errlen, LR_EIO, "uv_async_init failed");
        goto fail;
    }
    a->async.data = a;
    a->open_handles++;
    uv_timer_init(loop, &a->stop_timer);
    a->stop_timer.data = a;
    a->open_handles++;

    /* The owner thread takes no signals: they belong to the loop thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&a->thread, NULL, owner_main, a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        /* The handles exist: they must be closed, and a is freed in the
           last close callback once the loop runs. */
        lr_seterr(errbuf, errlen, LR_EIO, "cannot start the AMQP thread: errno %d", rc);
        a->done = NULL;
        uv_close((uv_handle_t *)&a->stop_timer, handle_closed);
        uv_close((uv_handle_t *)&a->async, handle_closed);
        return LR_EIO;
    }
#if defined(__GLIBC__)
    pthread_setname_np(a->thread, "lr-amqp");
#endif
    *out = a;
    return 0;
fail:
    amqp_free(a);
    return rc;
}

/* Queues the ack or reject of d for the owner thread. */
static int settle(lr_amqp_t *a, const lr_amqp_delivery_t *d, int type, bool requeue) {
    if (a == NULL || d == NULL) {
        return LR_EINVAL;
    }
    if (a->stopping) {
        return LR_ESHUTDOWN;
    }
    if (!a->connected || d->generation != a->generation) {
        return LR_ESTATE;
    }
    item_t *it = calloc(1, sizeof(*it));
    if (it == NULL) {
        return LR_ENOMEM;
    }
    it->type = type;
    it->generation = d->generation;
    it->tag = d->delivery_tag;
    it->requeue = requeue;
    push_command(a, it);
    return 0;
}

int lr_amqp_ack(lr_amqp_t *a, const lr_amqp_delivery_t *d) { return settle(a, d, CMD_ACK, false); }

int lr_amqp_reject(lr_amqp_t *a, const lr_amqp_delivery_t *d, bool requeue) {
    return settle(a, d, CMD_REJECT, requeue);
}

int lr_amqp_publish(lr_amqp_t *a, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg,
                    lr_amqp_confirm_cb cb, void *arg) {
    char err[DETAIL_MAX];
    if (a == NULL) {
        return LR_EINVAL;
    }
    if (a->stopping) {
        return LR_ESHUTDOWN;
    }
    int rc = msg_validate(exchange, routing_key, msg, err, sizeof(err));
    if (rc != 0) {
        lr_warn("amqp.publish_invalid", "%s", err);
        return rc;
    }
    if (a->inflight >= MAX_INFLIGHT) {
        return LR_EBUSY;
    }
    item_t *it = calloc(1, sizeof(*it));
    if (it == NULL) {
        return LR_ENOMEM;
    }
    it->type = CMD_PUBLISH;
    it->pub = pub_new(exchange, routing_key, msg, cb, arg);
    if (it->pub == NULL) {
        free(it);
        return LR_ENOMEM;
    }
    it->pub->ev = it;
    a->inflight++;
    push_command(a, it);
    return 0;
}

void lr_amqp_cancel_consume(lr_amqp_t *a) {
    if (a == NULL || a->stopping || a->cancelled) {
        return;
    }
    item_t *it = calloc(1, sizeof(*it));
    if (it == NULL) {
        lr_error("amqp.oom", "out of memory cancelling consumers");
        return;
    }
    a->cancelled = true;
    it->type = CMD_CANCEL;
    push_command(a, it);
}

int lr_amqp_connected(const lr_amqp_t *a) { return a != NULL && a->connected && !a->stopping ? 1 : 0; }

void lr_amqp_stop(lr_amqp_t *a, long timeout_ms, void (*done)(void *arg), void *arg) {
    if (a == NULL) {
        return;
    }
    if (a->stopping) {
        lr_warn("amqp.stop_twice", "lr_amqp_stop called twice; ignoring the second call");
        return;
    }
    if (timeout_ms < 0) {
        timeout_ms = 0;
    }
    a->stopping = true;
    a->done = done;
    a->done_arg = arg;
    item_t *it = a->stop_item;
    a->stop_item = NULL;
    it->type = CMD_STOP;
    it->timeout_ms = timeout_ms;
    push_command(a, it);
    uv_timer_start(&a->stop_timer, stop_timer_cb, (uint64_t)timeout_ms + STOP_GRACE_MS, 1000);
}

/* ------------------------------------------------------------------------ */
/* Blocking helpers                                                          */

struct lr_amqp_sync {
    conn_t c;
    url_t url;
};

int lr_amqp_sync_connect(lr_amqp_sync_t **out, const char *url, long timeout_ms, char *errbuf, size_t errlen) {
    lr_amqp_sync_t *s;
    char name[128], host[64] = "";
    int rc;
    if (out == NULL) {
        return LR_EINVAL;
    }
    *out = NULL;
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        return LR_ENOMEM;
    }
    rc = url_parse(&s->url, url, errbuf, errlen);
    if (rc != 0) {
        free(s);
        return rc;
    }
    gethostname(host, sizeof(host) - 1);
    snprintf(name, sizeof(name), "%s@%s:%ld/sync",
#if defined(__GLIBC__)
             program_invocation_short_name,
#else
             "longrun",
#endif
             host, (long)getpid());
    /* Heartbeats off: a blocking helper does not read while idle. */
    rc = conn_open(&s->c, &s->url, timeout_ms > 0 ? timeout_ms : CONNECT_TIMEOUT_MS, 0, name, errbuf, errlen);
    if (rc != 0) {
        lr_amqp_sync_close(s);
        return rc == LR_ENOMEM ? rc : LR_ECONN;
    }
    *out = s;
    return 0;
}

int lr_amqp_sync_declare(lr_amqp_sync_t *s, const char *const *queues, int delivery_limit, int max_length, char *errbuf,
                         size_t errlen) {
    if (s == NULL || s->c.st == NULL || s->c.broken) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "not connected");
    }
    if (!s->c.channel_open && channel_recover(&s->c) != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot reopen the AMQP channel");
    }
    return declare_topology(&s->c, queues, delivery_limit, max_length, errbuf, errlen);
}

/* One publish and its confirm; *nacked tells a basic.nack apart from the
 * other failures. */
static int sync_publish_once(lr_amqp_sync_t *s, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg,
                             long timeout_ms, bool *nacked, char *errbuf, size_t errlen) {
    char detail[DETAIL_MAX];
    char returned[DETAIL_MAX] = "";
    int rc;
    if (s == NULL || s->c.st == NULL || s->c.broken) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "not connected");
    }
    if ((rc = msg_validate(exchange, routing_key, msg, errbuf, errlen)) != 0) {
        return rc;
    }
    if (!s->c.channel_open && channel_recover(&s->c) != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot reopen the AMQP channel");
    }
    errno = 0;
    int status = send_publish(&s->c, exchange, routing_key, msg);
    if (status != AMQP_STATUS_OK) {
        int saved = errno;
        s->c.broken = true;
        return lr_seterr(errbuf, errlen, status_err(status), "publish failed: %s",
                         status_text(status, saved, detail, sizeof(detail)));
    }
    uint64_t seq = s->c.next_seq++;
    uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        amqp_frame_t f;
        uint64_t now = now_ms();
        if (now >= deadline) {
            return lr_seterr(errbuf, errlen, LR_ETIMEOUT,
                             "no confirm from the broker within %ld ms (the message may or may "
                             "not have been stored)",
                             timeout_ms);
        }
        detail[0] = '\0';
        rc = wait_frame(&s->c, &f, (long)(deadline - now), detail, sizeof(detail));
        if (rc == LR_ETIMEOUT) {
            continue;
        }
        if (rc != 0) {
            return lr_seterr(errbuf, errlen, rc, "waiting for the confirm: %s", detail);
        }
        if (f.frame_type != AMQP_FRAME_METHOD) {
            continue;
        }
        if (f.channel == 0) {
            rc = handle_channel0(&s->c, &f, detail, sizeof(detail));
            if (rc != 0) {
                return lr_seterr(errbuf, errlen, rc, "%s", detail);
            }
            continue;
        }
        switch (f.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD:
        case AMQP_BASIC_NACK_METHOD: {
            bool nack = f.payload.method.id == AMQP_BASIC_NACK_METHOD;
            uint64_t tag = nack ? ((const amqp_basic_nack_t *)f.payload.method.decoded)->delivery_tag
                                : ((const amqp_basic_ack_t *)f.payload.method.decoded)->delivery_tag;
            amqp_maybe_release_buffers(s->c.st);
            /* Only one publish is outstanding: a confirm with tag >= seq
               (single or `multiple`) covers it; a lower tag is for an older
               publish whose wait timed out. */
            if (tag < seq) {
                continue;
            }
            if (nack) {
                *nacked = true;
                return lr_seterr(errbuf, errlen, LR_EAMQP,
                                 "the broker refused the message (basic.nack; queue full or "
                                 "unavailable?)");
            }
            if (returned[0] != '\0') {
                return lr_seterr(errbuf, errlen, LR_EAMQP,
                                 "the message could not be routed: exchange '%s' has no queue "
                                 "bound for routing key '%s' (%s)",
                                 exchange, routing_key, returned);
            }
            return 0;
        }
        case AMQP_BASIC_RETURN_METHOD: {
            const amqp_basic_return_t *m = f.payload.method.decoded;
            content_t ct;
            snprintf(returned, sizeof(returned), "%u %.*s", m->reply_code, (int)m->reply_text.len,
                     (const char *)m->reply_text.bytes);
            rc = read_content(&s->c, 0, &ct, detail, sizeof(detail));
            amqp_maybe_release_buffers(s->c.st);
            if (rc != 0) {
                return lr_seterr(errbuf, errlen, rc, "%s", detail);
            }
            continue;
        }
        case AMQP_CHANNEL_CLOSE_METHOD: {
            const amqp_channel_close_t *m = f.payload.method.decoded;
            char text[DETAIL_MAX];
            unsigned code = m->reply_code;
            snprintf(text, sizeof(text), "%.*s", (int)m->reply_text.len, (const char *)m->reply_text.bytes);
            send_channel_close_ok(&s->c);
            amqp_maybe_release_buffers(s->c.st);
            (void)channel_recover(&s->c);
            return lr_seterr(errbuf, errlen, LR_EAMQP, "the broker rejected the publish: %u %s", code, text);
        }
        default: amqp_maybe_release_buffers(s->c.st); continue;
        }
    }
}

int lr_amqp_sync_publish(lr_amqp_sync_t *s, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg,
                         long timeout_ms, char *errbuf, size_t errlen) {
    /* A basic.nack means the broker did not take the message: RabbitMQ sends
       one on an internal error of the queue process (a quorum queue between
       leaders, a full queue).  The first is transient, so the publish is
       retried with a doubling pause while the deadline allows; a full queue
       still fails, a little later. */
    uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    long pause_ms = 50;
    for (int attempt = 1;; attempt++) {
        bool nacked = false;
        uint64_t now = now_ms();
        long left = now < deadline ? (long)(deadline - now) : 0;
        int rc = sync_publish_once(s, exchange, routing_key, msg, left, &nacked, errbuf, errlen);
        if (rc == 0 || !nacked) {
            return rc;
        }
        now = now_ms();
        if (attempt >= SYNC_NACK_ATTEMPTS || now + (uint64_t)pause_ms >= deadline) {
            /* refused every time: the queue is full (x-overflow=reject-publish) */
            return LR_EBUSY;
        }
        struct timespec ts = {.tv_sec = pause_ms / 1000, .tv_nsec = (pause_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
        pause_ms *= 2;
    }
}

int lr_amqp_sync_queue_info(lr_amqp_sync_t *s, const char *queue, uint32_t *messages, uint32_t *consumers, char *errbuf,
                            size_t errlen) {
    rpc_err_t e;
    if (s == NULL || s->c.st == NULL || s->c.broken) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "not connected");
    }
    if (queue == NULL || queue[0] == '\0' || strlen(queue) > MAX_SHORTSTR) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "invalid queue name");
    }
    if (!s->c.channel_open && channel_recover(&s->c) != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "cannot reopen the AMQP channel");
    }
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(s->c.st, CHANNEL, amqp_cstring_bytes(queue), 1, 0, 0, 0, amqp_empty_table);
    int rc = rpc_check(&s->c, &e);
    if (rc != 0 || ok == NULL) {
        if (rc == LR_EAMQP) {
            (void)channel_recover(&s->c);
            if (e.code == AMQP_NOT_FOUND) {
                return lr_seterr(errbuf, errlen, LR_ENOTFOUND, "queue %s does not exist", queue);
            }
        }
        return lr_seterr(errbuf, errlen, rc != 0 ? rc : LR_EAMQP, "queue %s: %s", queue, e.server);
    }
    if (messages != NULL) {
        *messages = ok->message_count;
    }
    if (consumers != NULL) {
        *consumers = ok->consumer_count;
    }
    amqp_maybe_release_buffers(s->c.st);
    return 0;
}

void lr_amqp_sync_close(lr_amqp_sync_t *s) {
    if (s == NULL) {
        return;
    }
    conn_close(&s->c);
    url_free(&s->url);
    free(s);
}

/* ------------------------------------------------------------------------ */
/* Replies                                                                   */

static lr_metric_t *replies_metric(void) {
    /* Registering is idempotent and locked: the same family every time. */
    return lr_metric_counter("longrun_replies_total",
                             "Task outcomes for reply_to queues: sent (confirmed), failed, refused (not an "
                             "allowed queue).",
                             "outcome");
}

bool lr_amqp_reply_direct(const char *reply_to) {
    static const char direct[] = LR_AMQP_DIRECT_REPLY_TO;
    return reply_to != NULL && strncmp(reply_to, direct, sizeof(direct) - 1) == 0 &&
           (reply_to[sizeof(direct) - 1] == '\0' || reply_to[sizeof(direct) - 1] == '.');
}

int lr_amqp_reply_allowed(const char *reply_to, const char *prefixes, char *errbuf, size_t errlen) {
    const char *p = prefixes != NULL ? prefixes : "none";
    if (reply_to == NULL || reply_to[0] == '\0') {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "no reply_to");
    }
    if (strlen(reply_to) > MAX_SHORTSTR) {
        return lr_seterr(errbuf, errlen, LR_EPERM, "reply_to is longer than %d bytes", MAX_SHORTSTR);
    }
    if (strncmp(reply_to, "longrun.", 8) == 0) {
        return lr_seterr(errbuf, errlen, LR_EPERM,
                         "reply_to '%s' is one of longrun's own queues (longrun.*), never a reply queue", reply_to);
    }
    if (lr_amqp_reply_direct(reply_to)) {
        return 0;
    }
    while (strcmp(p, "none") != 0 && *p != '\0') {
        size_t n = strcspn(p, ",");
        if (n > 0 && strncmp(reply_to, p, n) == 0) {
            return 0;
        }
        p += n;
        p += *p == ',';
    }
    return lr_seterr(errbuf, errlen, LR_EPERM,
                     "reply_to '%s' is not an allowed reply queue (direct reply-to " LR_AMQP_DIRECT_REPLY_TO
                     ", or a name starting with LONGRUN_REPLY_TO_PREFIX=%s)",
                     reply_to, p);
}

static void reply_confirmed(int err, void *arg) {
    char *id = arg;
    if (err != 0) {
        lr_warn("task.reply_failed", "could not publish the outcome of task %s to reply_to: %s%s", id, lr_strerror(err),
                err == LR_EAMQP ? " (nacked, or returned: the queue does not exist)" : "");
    }
    lr_metric_inc1(replies_metric(), err == 0 ? "sent" : "failed");
    free(id);
}

int lr_amqp_publish_reply(lr_amqp_t *a, const char *prefixes, const char *reply_to, const char *correlation_id,
                          const char *task_id, const char *body, char *errbuf, size_t errlen) {
    lr_amqp_msg_t msg;
    char why[512];
    char *id;
    int rc = lr_amqp_reply_allowed(reply_to, prefixes, why, sizeof(why));
    if (rc != 0) {
        lr_warn("task.reply_refused", "the outcome of task %s is not published: %s", task_id, why);
        lr_metric_inc1(replies_metric(), "refused");
        return lr_seterr(errbuf, errlen, rc, "%s", why);
    }
    id = strdup(task_id);
    if (id == NULL) {
        lr_metric_inc1(replies_metric(), "failed");
        return 0;
    }
    memset(&msg, 0, sizeof(msg));
    msg.body = body;
    msg.body_len = strlen(body);
    msg.message_id = task_id;
    msg.correlation_id = correlation_id;
    msg.content_type = "application/json";
    msg.persistent = true;
    msg.mandatory = !lr_amqp_reply_direct(reply_to); /* no such queue: basic.return, logged */
    rc = lr_amqp_publish(a, "", reply_to, &msg, reply_confirmed, id);
    if (rc != 0) {
        reply_confirmed(rc, id);
    }
    return 0;
}
