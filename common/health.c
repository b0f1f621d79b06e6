/* health.c - /healthz, /readyz, /health and /metrics over libmicrohttpd;
 * see health.h.  The server runs MHD's internal polling thread; the loop
 * only stores small values under a mutex. */
#include "health.h"

#include <microhttpd.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "metrics.h"

struct lr_health {
    struct MHD_Daemon *mhd;
    pthread_mutex_t mu;
    char component[32];
    long stall_ms;
    struct timespec last_tick;
    struct timespec started;
    int ready;
    char reason[256];
    char *snapshot;
};

static double since_ms(const struct timespec *t) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t->tv_sec) * 1000.0 + (double)(now.tv_nsec - t->tv_nsec) / 1e6;
}

static enum MHD_Result reply(struct MHD_Connection *c, unsigned int status, const char *type, char *body) {
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
    ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
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

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                               const char *version, const char *upload, size_t *upload_size, void **ptr) {
    lr_health_t *h = cls;
    (void)version;
    (void)upload;
    (void)upload_size;
    (void)ptr;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", strdup("method not allowed\n"));
    }
    if (strcmp(url, "/healthz") == 0) {
        double age;
        pthread_mutex_lock(&h->mu);
        age = since_ms(&h->last_tick);
        pthread_mutex_unlock(&h->mu);
        if (age > (double)h->stall_ms) {
            return reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain",
                         fmt("event loop stalled for %.0f ms\n", age));
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
        char *body;
        char reason[600];
        double age;
        pthread_mutex_lock(&h->mu);
        age = since_ms(&h->last_tick);
        lr_json_escape(reason, 0, sizeof(reason), h->ready ? "" : h->reason);
        body = fmt("{\"component\":\"%s\",\"version\":\"%s\",\"uptime_seconds\":%.0f,\"loop_lag_ms\":%.0f,"
                   "\"live\":%s,\"ready\":%s,\"not_ready_reason\":\"%s\",\"status\":%s}\n",
                   h->component, LONGRUN_VERSION, since_ms(&h->started) / 1000.0, age,
                   age <= (double)h->stall_ms ? "true" : "false", h->ready ? "true" : "false",
                   reason, h->snapshot != NULL ? h->snapshot : "{}");
        pthread_mutex_unlock(&h->mu);
        return reply(c, MHD_HTTP_OK, "application/json", body);
    }
    if (strcmp(url, "/metrics") == 0) {
        return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4", lr_metrics_render());
    }
    return reply(c, MHD_HTTP_NOT_FOUND, "text/plain", strdup("not found: try /healthz /readyz /health /metrics\n"));
}

int lr_health_start(lr_health_t **out, int port, const char *component, long stall_ms, char *errbuf,
                    size_t errlen) {
    lr_health_t *h;
    *out = NULL;
    if (port <= 0) {
        return 0;
    }
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
    h->mhd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, (uint16_t)port, NULL, NULL,
                              handler, h, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)10,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned int)64, MHD_OPTION_END);
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
    if (h == NULL) {
        return;
    }
    pthread_mutex_lock(&h->mu);
    h->ready = ready;
    snprintf(h->reason, sizeof(h->reason), "%s", reason != NULL ? reason : "");
    pthread_mutex_unlock(&h->mu);
}

void lr_health_set_snapshot(lr_health_t *h, const char *json) {
    char *copy;
    if (h == NULL) {
        return;
    }
    copy = json != NULL ? strdup(json) : NULL;
    pthread_mutex_lock(&h->mu);
    free(h->snapshot);
    h->snapshot = copy;
    pthread_mutex_unlock(&h->mu);
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
