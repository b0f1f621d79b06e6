/* health.c - /healthz, /readyz, /health and /metrics over libmicrohttpd;
 * see health.h.
 *
 * Design: libmicrohttpd's one internal polling thread (epoll; poll where
 * the library has no epoll; never select, which breaks on a descriptor
 * above FD_SETSIZE) accepts, reads and answers every connection.  The loop
 * only stores small values under h->mu; the handler copies them out.  The
 * accept policy, the connection notifications and the library's log
 * callback run on that same thread, so the table of open connections per
 * client address (h->peers, h->open) needs no lock.
 *
 * Limits, in the order a new connection meets them: libmicrohttpd's total
 * (LR_HEALTH_MAX_CONNECTIONS) and per-address (LR_HEALTH_PER_IP_CONNECTIONS)
 * limits, then accept_policy(): once all but LR_HEALTH_RESERVED_CONNECTIONS
 * are in use, only an address with no connection open gets one.  A flood
 * holds connections; the kubelet's probes open one at a time and close it,
 * so they find the reserve free.  Idle connections (a slow client included:
 * libmicrohttpd's timeout counts from the last byte) are closed after
 * LR_HEALTH_TIMEOUT_SECONDS; a request's headers get
 * LR_HEALTH_REQUEST_MEMORY bytes at most. */
#include "health.h"

#include <cjson/cJSON.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "buildinfo.h"
#include "config.h"
#include "log.h"
#include "metrics.h"

/* One line per this many milliseconds at most from libmicrohttpd's log (a
 * flood makes it say "connection limit" for every refused connection). */
#define HEALTH_LOG_EVERY_MS 10000.0

/* Open connections of one client address. */
struct peer {
    int family; /* AF_INET or AF_INET6; 0: slot free */
    unsigned char addr[16];
    int open;
};

struct lr_health {
    struct MHD_Daemon *mhd;
    pthread_mutex_t mu;
    char component[32];
    long stall_ms;
    struct timespec last_tick;
    struct timespec started;
    int ready;
    char reason[256];
    char *snapshot;           /* one JSON object, or NULL */
    char snapshot_error[200]; /* why the last snapshot was refused, or "" */
    int snapshot_warned;      /* the error last warned about (0: none) */
    /* libmicrohttpd's thread only */
    struct peer peers[LR_HEALTH_MAX_CONNECTIONS];
    int open;
    struct timespec log_at;
    unsigned long log_suppressed;
};

static lr_metric_t *m_open, *m_refused;

static double since_ms(const struct timespec *t) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t->tv_sec) * 1000.0 + (double)(now.tv_nsec - t->tv_nsec) / 1e6;
}

/* ---- connection limits (libmicrohttpd's thread) -------------------------- */

/* Copies the address of sa into family/addr; false for another family. */
static bool peer_key(const struct sockaddr *sa, int *family, unsigned char addr[16]) {
    memset(addr, 0, 16);
    if (sa == NULL) {
        return false;
    }
    *family = sa->sa_family;
    if (sa->sa_family == AF_INET) {
        memcpy(addr, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
        return true;
    }
    if (sa->sa_family == AF_INET6) {
        memcpy(addr, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, 16);
        return true;
    }
    return false;
}

/* The slot of sa's address with connections open; with add, a free slot
 * otherwise (there is always one: each open connection holds at most one
 * slot).  NULL when there is none. */
static struct peer *peer_find(lr_health_t *h, const struct sockaddr *sa, bool add) {
    int family;
    unsigned char addr[16];
    struct peer *free_slot = NULL;
    if (!peer_key(sa, &family, addr)) {
        return NULL;
    }
    for (int i = 0; i < LR_HEALTH_MAX_CONNECTIONS; i++) {
        struct peer *p = &h->peers[i];
        if (p->open > 0 && p->family == family && memcmp(p->addr, addr, 16) == 0) {
            return p;
        }
        if (p->open == 0 && free_slot == NULL) {
            free_slot = p;
        }
    }
    if (!add || free_slot == NULL) {
        return NULL;
    }
    free_slot->family = family;
    memcpy(free_slot->addr, addr, 16);
    return free_slot;
}

/* Runs after libmicrohttpd's own limits let the connection through. */
static enum MHD_Result accept_policy(void *cls, const struct sockaddr *addr, socklen_t addrlen) {
    lr_health_t *h = cls;
    const struct peer *p;
    (void)addrlen;
    if (h->open < LR_HEALTH_MAX_CONNECTIONS - LR_HEALTH_RESERVED_CONNECTIONS) {
        return MHD_YES;
    }
    p = peer_find(h, addr, false);
    if (p == NULL) {
        return MHD_YES; /* none open from there: the reserve is for it */
    }
    lr_metric_inc1(m_refused, "reserved");
    return MHD_NO;
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
    lr_health_t *h = cls;
    struct peer *p = *socket_context;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        p = ci != NULL ? peer_find(h, ci->client_addr, true) : NULL;
        if (p != NULL) {
            p->open++;
        }
        *socket_context = p;
        h->open++;
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        if (p != NULL && p->open > 0) {
            p->open--;
        }
        *socket_context = NULL;
        h->open--;
    }
    lr_metric_set(m_open, NULL, h->open);
}

/* libmicrohttpd's messages, rate-limited into our log; its "connection
 * limit" message is the only sign of a refusal by its own limits. */
static void mhd_log(void *cls, const char *fm, va_list ap) __attribute__((format(printf, 2, 0)));
static void mhd_log(void *cls, const char *fm, va_list ap) {
    lr_health_t *h = cls;
    char msg[256];
    vsnprintf(msg, sizeof(msg), fm, ap);
    msg[strcspn(msg, "\r\n")] = '\0';
    if (strstr(fm, "connection limit") != NULL) {
        lr_metric_inc1(m_refused, "limit");
    }
    if ((h->log_at.tv_sec != 0 || h->log_at.tv_nsec != 0) && since_ms(&h->log_at) < HEALTH_LOG_EVERY_MS) {
        h->log_suppressed++;
        return;
    }
    lr_warn("health.http", "%s (%lu similar messages in the last %.0f s not logged)", msg, h->log_suppressed,
            HEALTH_LOG_EVERY_MS / 1000.0);
    clock_gettime(CLOCK_MONOTONIC, &h->log_at);
    h->log_suppressed = 0;
}

/* ---- requests --------------------------------------------------------- */

/* Queues body (malloc'd, ours to free) as the answer. */
static enum MHD_Result reply_with(struct MHD_Connection *c, unsigned int status, const char *type, char *body,
                                  const char *allow) {
    struct MHD_Response *r;
    enum MHD_Result ret;
    if (body == NULL) {
        return MHD_NO;
    }
    r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (r == NULL) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    if (allow != NULL) {
        MHD_add_response_header(r, "Allow", allow);
    }
    ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result reply(struct MHD_Connection *c, unsigned int status, const char *type, char *body) {
    return reply_with(c, status, type, body, NULL);
}

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...) {
    va_list ap;
    char *s = NULL;
    va_start(ap, f);
    if (vasprintf(&s, f, ap) < 0) {
        s = NULL;
    }
    va_end(ap);
    return s;
}

/* /health: the fixed fields (under 1 KiB) and the snapshot (at most
 * LR_HEALTH_SNAPSHOT_MAX), so the body is bounded. */
static char *health_body(lr_health_t *h) {
    char reason[600];
    char refused[sizeof(h->snapshot_error) * 6 + 32];
    char *body;
    double age;
    size_t n;
    pthread_mutex_lock(&h->mu);
    age = since_ms(&h->last_tick);
    lr_json_escape(reason, 0, sizeof(reason), h->ready ? "" : h->reason);
    /* a refused snapshot: {"snapshot_error":"why"} in its place */
    n = (size_t)snprintf(refused, sizeof(refused), "{\"snapshot_error\":\"");
    n = lr_json_escape(refused, n, sizeof(refused) - 2, h->snapshot_error);
    snprintf(refused + n, sizeof(refused) - n, "\"}");
    body =
        fmt("{\"component\":\"%s\",\"version\":\"%s\",\"commit\":\"%s\",\"uptime_seconds\":%.0f,\"loop_lag_ms\":%.0f,"
            "\"live\":%s,\"ready\":%s,\"not_ready_reason\":\"%s\",\"status\":%s}\n",
            h->component, lr_build_version, lr_build_commit, since_ms(&h->started) / 1000.0, age,
            age <= (double)h->stall_ms ? "true" : "false", h->ready ? "true" : "false", reason,
            h->snapshot != NULL            ? h->snapshot
            : h->snapshot_error[0] != '\0' ? refused
                                           : "{}");
    pthread_mutex_unlock(&h->mu);
    return body;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                               const char *version, const char *upload, size_t *upload_size, void **ptr) {
    lr_health_t *h = cls;
    (void)version;
    (void)upload;
    (void)upload_size;
    (void)ptr;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        return reply_with(c, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", strdup("method not allowed\n"), "GET, HEAD");
    }
    if (strcmp(url, "/healthz") == 0) {
        double age;
        pthread_mutex_lock(&h->mu);
        age = since_ms(&h->last_tick);
        pthread_mutex_unlock(&h->mu);
        if (age > (double)h->stall_ms) {
            return reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain", fmt("event loop stalled for %.0f ms\n", age));
        }
        return reply(c, MHD_HTTP_OK, "text/plain", strdup("ok\n"));
    }
    if (strcmp(url, "/readyz") == 0) {
        int ready;
        char reason[256];
        pthread_mutex_lock(&h->mu);
        ready = h->ready;
        snprintf(reason, sizeof(reason), "%s", h->reason);
        pthread_mutex_unlock(&h->mu);
        return ready ? reply(c, MHD_HTTP_OK, "text/plain", strdup("ready\n"))
                     : reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain", fmt("not ready: %s\n", reason));
    }
    if (strcmp(url, "/health") == 0) {
        return reply(c, MHD_HTTP_OK, "application/json", health_body(h));
    }
    if (strcmp(url, "/metrics") == 0) {
        return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4", lr_metrics_render());
    }
    return reply(c, MHD_HTTP_NOT_FOUND, "text/plain", strdup("not found: try /healthz /readyz /health /metrics\n"));
}

/* ---- public API ------------------------------------------------------- */

int lr_health_start(lr_health_t **out, int port, const char *component, long stall_ms, char *errbuf, size_t errlen) {
    lr_health_t *h;
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    *out = NULL;
    if (port <= 0) {
        return 0;
    }
    if (MHD_is_feature_supported(MHD_FEATURE_EPOLL) == MHD_YES) {
        flags |= MHD_USE_EPOLL;
    } else if (MHD_is_feature_supported(MHD_FEATURE_POLL) == MHD_YES) {
        flags |= MHD_USE_POLL;
    } else {
        return lr_seterr(errbuf, errlen, LR_EIO,
                         "LONGRUN_HTTP_PORT=%d: libmicrohttpd has neither epoll nor poll (select breaks above "
                         "descriptor 1024)",
                         port);
    }
    m_open = lr_metric_gauge("longrun_http_connections", "Open connections to the health and metrics server", NULL);
    m_refused = lr_metric_counter("longrun_http_connections_refused_total",
                                  "Connections to the health and metrics server refused by its limits", "reason");
    h = calloc(1, sizeof(*h));
    if (h == NULL) {
        return LR_ENOMEM;
    }
    pthread_mutex_init(&h->mu, NULL);
    snprintf(h->component, sizeof(h->component), "%s", component);
    snprintf(h->reason, sizeof(h->reason), "starting");
    h->stall_ms = stall_ms;
    clock_gettime(CLOCK_MONOTONIC, &h->last_tick);
    h->started = h->last_tick;
    h->mhd = MHD_start_daemon(flags, (uint16_t)port, accept_policy, h, handler, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_log,
                              h, MHD_OPTION_CONNECTION_LIMIT, (unsigned int)LR_HEALTH_MAX_CONNECTIONS,
                              MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned int)LR_HEALTH_PER_IP_CONNECTIONS,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)LR_HEALTH_TIMEOUT_SECONDS,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)LR_HEALTH_REQUEST_MEMORY,
                              MHD_OPTION_NOTIFY_CONNECTION, on_connection, h, MHD_OPTION_END);
    if (h->mhd == NULL) {
        pthread_mutex_destroy(&h->mu);
        free(h);
        return lr_seterr(errbuf, errlen, LR_EIO, "LONGRUN_HTTP_PORT=%d: cannot listen (port in use?)", port);
    }
    *out = h;
    return 0;
}

void lr_health_tick(lr_health_t *h) {
    if (h == NULL) {
        return;
    }
    pthread_mutex_lock(&h->mu);
    clock_gettime(CLOCK_MONOTONIC, &h->last_tick);
    pthread_mutex_unlock(&h->mu);
}

void lr_health_set_ready(lr_health_t *h, int ready, const char *reason) {
    char masked[sizeof(h->reason)];
    if (h == NULL) {
        return;
    }
    (void)lr_config_mask_secrets(reason != NULL ? reason : "", masked, sizeof(masked));
    pthread_mutex_lock(&h->mu);
    h->ready = ready;
    memcpy(h->reason, masked, sizeof(masked));
    pthread_mutex_unlock(&h->mu);
}

int lr_health_set_snapshot(lr_health_t *h, const char *json) {
    char *copy = NULL;
    char why[sizeof(h->snapshot_error)] = "";
    size_t n;
    int rc = 0;
    bool warn;
    if (h == NULL) {
        return 0;
    }
    n = json != NULL ? strnlen(json, (size_t)LR_HEALTH_SNAPSHOT_MAX + 1) : 0;
    if (n > LR_HEALTH_SNAPSHOT_MAX) {
        rc = LR_ETOOBIG;
        snprintf(why, sizeof(why), "the snapshot is longer than %d bytes, the limit", LR_HEALTH_SNAPSHOT_MAX);
    } else if (json != NULL) {
        /* n + 1: the parse must end at the NUL, nothing after the object */
        cJSON *parsed = cJSON_ParseWithLengthOpts(json, n + 1, NULL, 1);
        if (!cJSON_IsObject(parsed)) {
            rc = LR_EPARSE;
            snprintf(why, sizeof(why), "the snapshot (%zu bytes) is not one JSON object: cut by a buffer?", n);
        } else {
            copy = strndup(json, n);
            if (copy == NULL) {
                rc = LR_ENOMEM;
                snprintf(why, sizeof(why), "out of memory copying the snapshot (%zu bytes)", n);
            }
        }
        cJSON_Delete(parsed);
    }
    pthread_mutex_lock(&h->mu);
    free(h->snapshot);
    h->snapshot = copy;
    memcpy(h->snapshot_error, why, sizeof(why));
    warn = rc != 0 && h->snapshot_warned != rc;
    h->snapshot_warned = rc;
    pthread_mutex_unlock(&h->mu);
    if (warn) {
        lr_warn("health.snapshot", "%s; /health shows snapshot_error until a good one", why);
    }
    return rc;
}

void lr_health_stop(lr_health_t *h) {
    if (h == NULL) {
        return;
    }
    MHD_stop_daemon(h->mhd);
    pthread_mutex_destroy(&h->mu);
    free(h->snapshot);
    free(h);
}

void lr_health_set_snapshot_tree(lr_health_t *h, cJSON *o) {
    char *txt = o != NULL ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (txt != NULL) {
        (void)lr_health_set_snapshot(h, txt);
    }
    free(txt);
}
