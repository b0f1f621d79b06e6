/*
 * callback.c - delivers a task's outcome to its callback_url as an HTTP POST.
 *
 * The body is the same outcome JSON as the reply_to message
 * (docs/task-contract.md), with headers Idempotency-Key: <task id>:outcome
 * and X-Longrun-Task-Id.  Up to 5 attempts, 1 s, 2 s, 4 s, 8 s apart, on
 * connection errors, timeouts, 408, 429 and 5xx.  Tasks must not make
 * workers reach arbitrary hosts (server-side request forgery), so a URL is
 * called only when it matches a rule of LONGRUN_CALLBACK_ALLOW
 * (common/urlguard.h: scheme, host, port and path prefix on the URL as
 * libcurl parses and normalises it; the normalised URL is what is sent),
 * and each address it resolves to is checked again when curl connects
 * (loopback, private, link-local, metadata, ... refused unless the rule
 * names them), on a fresh connection that is not pooled.  Redirects are
 * not followed (common/http.c).  A refusal is logged with its reason
 * (task.callback_refused) and counted in
 * longrun_callbacks_refused_total{reason}; it is not retried.  Delivery is
 * best-effort after the outcome is committed (a worker that stops or dies
 * mid-retry does not retry again; a stopping worker logs each one it gives
 * up); the outcome itself is always in PostgreSQL.
 *
 * Pending deliveries are kept in a list (loop thread only), so that
 * lr_callback_abandon_all() can cancel and free them when the worker stops.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "callback.h"

#include "config.h"
#include "list.h"
#include "log.h"
#include "task.h"
#include "urlguard.h"
#include "wmetrics.h"

typedef struct callback {
    lr_list_t link;         /* in pending */
    lr_http_t *const *http; /* the worker's client slot */
    uv_timer_t timer;
    lr_http_req_t *req; /* the attempt in flight, or NULL */
    char id[LR_UUID_LEN + 1];
    char *url; /* the normalised URL that matched */
    char *body;
    int tries;
    uint64_t rules;                  /* the rules it matched (for the connect-time check) */
    enum lr_urlguard_reason refused; /* why the last attempt's connect was refused, or LR_UG_OK */
} callback_t;

static lr_list_t pending = {&pending, &pending};
static lr_urlguard_t *guard; /* LONGRUN_CALLBACK_ALLOW (lr_callback_configure) */

/* One log line and one count per refusal; url is never logged whole. */
static void refuse(const char *task_id, const char *url, enum lr_urlguard_reason why, const char *detail) {
    char shown[256], masked[256];
    lr_urlguard_loggable(url, shown, sizeof(shown));
    lr_config_mask_secrets(shown, masked, sizeof(masked));
    lr_metric_inc1(lr_wm.callbacks_refused, lr_urlguard_reason_name(why));
    lr_warn("task.callback_refused", "task %s: callback_url %s refused (%s)%s%s; not called", task_id, masked,
            lr_urlguard_reason_name(why), detail != NULL ? ": " : "", detail != NULL ? detail : "");
}

/* The connect-time check (lr_http_addr_cb) of one delivery. */
static int cb_check_addr(const struct sockaddr *sa, size_t len, void *arg, char *why, size_t whylen) {
    callback_t *c = arg;
    enum lr_urlguard_reason r;
    char addr[64];
    if (lr_urlguard_check_addr(guard, c->rules, sa, len, &r) == 0) {
        return 0;
    }
    c->refused = r;
    lr_urlguard_addr_str(sa, len, addr, sizeof(addr));
    snprintf(why, whylen, "%s is %s, not named by LONGRUN_CALLBACK_ALLOW", addr, lr_urlguard_reason_name(r));
    return LR_EPERM;
}

static void cb_closed(uv_handle_t *h) {
    callback_t *c = h->data;
    free(c->url);
    free(c->body);
    free(c);
}

static void cb_send(callback_t *c);

static void cb_timer(uv_timer_t *t) { cb_send(t->data); }

static void cb_finish(callback_t *c) {
    lr_list_remove(&c->link);
    uv_close((uv_handle_t *)&c->timer, cb_closed);
}

static void cb_done(const lr_http_response_t *resp, void *arg) {
    callback_t *c = arg;
    bool retry = resp->err != 0 || resp->status == 408 || resp->status == 429 || resp->status >= 500;
    c->req = NULL;
    if (resp->err != 0 && c->refused != LR_UG_OK) {
        refuse(c->id, c->url, c->refused, resp->errmsg);
    } else if (resp->err == 0 && resp->status >= 200 && resp->status < 300) {
        lr_info("task.callback_delivered", "outcome of task %s delivered to its callback (HTTP %ld)", c->id,
                resp->status);
    } else if (retry && c->tries < 5) {
        uv_timer_start(&c->timer, cb_timer, 1000u << (c->tries - 1), 0);
        return;
    } else {
        lr_warn("task.callback_failed", "outcome of task %s not delivered to its callback after %d attempt(s): %s",
                c->id, c->tries, resp->err != 0 ? lr_strerror(resp->err) : "HTTP error");
    }
    cb_finish(c);
}

static void cb_send(callback_t *c) {
    char idem[96], task[96];
    const char *headers[4];
    lr_http_opts_t o;
    lr_http_t *http = *c->http;
    snprintf(idem, sizeof(idem), "Idempotency-Key: %s:outcome", c->id);
    snprintf(task, sizeof(task), "X-Longrun-Task-Id: %s", c->id);
    headers[0] = "Content-Type: application/json";
    headers[1] = idem;
    headers[2] = task;
    headers[3] = NULL;
    lr_http_opts_post(&o, c->url, headers, c->body);
    o.timeout_ms = 10000;
    o.max_body = 4096;
    o.check_addr = cb_check_addr;
    o.check_arg = c;
    o.fresh_connection = true; /* a pooled connection was not checked against these rules */
    c->refused = LR_UG_OK;
    c->tries++;
    if (http == NULL || lr_http_send(http, &o, cb_done, c, &c->req) != 0) {
        c->req = NULL;
        lr_warn("task.callback_failed", "cannot send the outcome of task %s to its callback", c->id);
        cb_finish(c);
    }
}

int lr_callback_configure(const char *rules, char *errbuf, size_t errlen) {
    lr_urlguard_t *g = NULL;
    int rc = lr_urlguard_parse(&g, rules, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    lr_urlguard_free(guard);
    guard = g;
    return 0;
}

void lr_callback_send(uv_loop_t *loop, lr_http_t *const *http, const char *task_id, const char *url, const char *body) {
    callback_t *c;
    char *norm = NULL;
    uint64_t rules = 0;
    enum lr_urlguard_reason why;
    if (lr_urlguard_match(guard, url, &rules, &norm, &why) != 0) {
        refuse(task_id, url, why, why == LR_UG_NOT_ALLOWED ? "no rule of LONGRUN_CALLBACK_ALLOW matches" : NULL);
        return;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL) {
        lr_warn("task.callback_failed", "task %s: out of memory; callback not called", task_id);
        free(norm);
        return;
    }
    c->http = http;
    snprintf(c->id, sizeof(c->id), "%s", task_id);
    c->url = norm;
    c->rules = rules;
    c->body = strdup(body);
    uv_timer_init(loop, &c->timer);
    uv_unref((uv_handle_t *)&c->timer); /* never holds the worker's exit */
    c->timer.data = c;
    lr_list_push_front(&pending, &c->link);
    if (c->url == NULL || c->body == NULL) {
        cb_finish(c);
        return;
    }
    cb_send(c);
}

void lr_callback_abandon_all(void) {
    while (!lr_list_empty(&pending)) {
        callback_t *c = lr_list_entry(lr_list_first(&pending), callback_t, link);
        lr_warn("task.callback_abandoned",
                "worker stopping: outcome of task %s not delivered to its callback "
                "after %d attempt(s) (it is in PostgreSQL)",
                c->id, c->tries);
        if (c->req != NULL) {
            lr_http_cancel(c->req);
            c->req = NULL;
        }
        uv_timer_stop(&c->timer);
        cb_finish(c);
    }
    /* Nothing is sent after this (the runs stopped first). */
    lr_urlguard_free(guard);
    guard = NULL;
}
