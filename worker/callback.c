/*
 * callback.c - delivers a task's outcome to its callback_url as an HTTP POST.
 *
 * The body is the same outcome JSON as the reply_to message
 * (docs/task-contract.md), with headers Idempotency-Key: <task id>:outcome
 * and X-Longrun-Task-Id.  Up to 5 attempts, 1 s, 2 s, 4 s, 8 s apart, on
 * connection errors, timeouts, 408, 429 and 5xx.  Only URLs that start with
 * one of the prefixes in LONGRUN_CALLBACK_ALLOW (comma-separated) are called:
 * tasks must not make workers reach arbitrary hosts.  Delivery is
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

#include "list.h"
#include "log.h"
#include "task.h"

typedef struct callback {
    lr_list_t link;              /* in pending */
    lr_http_t *const *http;      /* the worker's client slot */
    uv_timer_t timer;
    lr_http_req_t *req;          /* the attempt in flight, or NULL */
    char id[LR_UUID_LEN + 1];
    char *url;
    char *body;
    int tries;
} callback_t;

static lr_list_t pending = {&pending, &pending};

static void cb_closed(uv_handle_t *h) {
    callback_t *c = h->data;
    free(c->url);
    free(c->body);
    free(c);
}

static void cb_send(callback_t *c);

static void cb_timer(uv_timer_t *t) {
    cb_send(t->data);
}

static void cb_finish(callback_t *c) {
    lr_list_remove(&c->link);
    uv_close((uv_handle_t *)&c->timer, cb_closed);
}

static void cb_done(const lr_http_response_t *resp, void *arg) {
    callback_t *c = arg;
    bool retry = resp->err != 0 || resp->status == 408 || resp->status == 429 || resp->status >= 500;
    c->req = NULL;
    if (resp->err == 0 && resp->status >= 200 && resp->status < 300) {
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
    memset(&o, 0, sizeof(o));
    o.method = "POST";
    o.url = c->url;
    o.headers = headers;
    o.body = c->body;
    o.body_len = strlen(c->body);
    o.timeout_ms = 10000;
    o.max_body = 4096;
    c->tries++;
    if (http == NULL || lr_http_send(http, &o, cb_done, c, &c->req) != 0) {
        c->req = NULL;
        lr_warn("task.callback_failed", "cannot send the outcome of task %s to its callback", c->id);
        cb_finish(c);
    }
}

static bool allowed(const char *url) {
    const char *allow = getenv("LONGRUN_CALLBACK_ALLOW");
    char *copy, *save = NULL;
    bool ok = false;
    if (allow == NULL || allow[0] == '\0') {
        return false;
    }
    copy = strdup(allow);
    for (char *p = copy != NULL ? strtok_r(copy, ",", &save) : NULL; p != NULL && !ok; p = strtok_r(NULL, ",", &save)) {
        ok = p[0] != '\0' && strncmp(url, p, strlen(p)) == 0;
    }
    free(copy);
    return ok;
}

void lr_callback_send(uv_loop_t *loop, lr_http_t *const *http, const char *task_id, const char *url,
                      const char *body) {
    callback_t *c;
    if (!allowed(url)) {
        lr_warn("task.callback_refused", "task %s: callback_url is not under LONGRUN_CALLBACK_ALLOW; not called",
                task_id);
        return;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL) {
        return;
    }
    c->http = http;
    snprintf(c->id, sizeof(c->id), "%s", task_id);
    c->url = strdup(url);
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
        lr_warn("task.callback_abandoned", "worker stopping: outcome of task %s not delivered to its callback "
                "after %d attempt(s) (it is in PostgreSQL)", c->id, c->tries);
        if (c->req != NULL) {
            lr_http_cancel(c->req);
            c->req = NULL;
        }
        uv_timer_stop(&c->timer);
        cb_finish(c);
    }
}
