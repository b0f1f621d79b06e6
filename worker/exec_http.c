/*
 * exec_http.c - the built-in deterministic task kind `http-steps`.
 *
 * Input: {"steps": N, "path": "/step"?, "crash_at_step": K?}.  Each step is
 * one HTTP POST to LONGRUN_HTTP_STEPS_URL + path (the host is configured by
 * the operator, never taken from the task) with the same headers tools get:
 * Idempotency-Key <task>:<step>:0, X-Longrun-Task-Id, X-Longrun-Epoch.  The
 * task succeeds after step N.  It exercises the durable core end to end
 * through the real curl path without a model.
 *
 * `crash_at_step` is honoured only with LONGRUN_TEST_HOOKS=1: the worker
 * aborts when it reaches that step (the poison-task test).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "worker.h"

typedef struct http_step {
    lr_run_t *run;
    lr_step_t *out;
    lr_step_done_cb done;
    lr_http_req_t *req;
    int step;
    int total;
} http_step_t;

static void step_response(const lr_http_response_t *resp, void *arg) {
    http_step_t *s = arg;
    lr_step_t *out = s->out;
    cJSON *m = cJSON_CreateArray();
    cJSON *o = cJSON_CreateObject();
    char *txt;

    s->req = NULL;
    cJSON_AddStringToObject(o, "role", "tool");
    cJSON_AddNumberToObject(o, "step", s->step);
    cJSON_AddNumberToObject(o, "http_status", (double)resp->status);
    cJSON_AddItemToArray(m, o);
    txt = cJSON_PrintUnformatted(m);
    cJSON_Delete(m);
    out->messages = txt;
    out->tool_calls_count = 1;
    if (resp->err != 0) {
        out->outcome = LR_STEP_FAIL_TRANSIENT;
        snprintf(out->error, sizeof(out->error), "step %d: %s: %s", s->step, lr_strerror(resp->err), resp->errmsg);
    } else if (resp->status >= 200 && resp->status < 300) {
        if (s->step >= s->total) {
            char result[64];
            snprintf(result, sizeof(result), "{\"steps\":%d}", s->total);
            out->result = strdup(result);
            out->outcome = LR_STEP_FINISHED;
        } else {
            out->outcome = LR_STEP_CONTINUE;
        }
    } else if (resp->status == 408 || resp->status == 409 || resp->status == 429 || resp->status >= 500) {
        out->outcome = LR_STEP_FAIL_TRANSIENT;
        snprintf(out->error, sizeof(out->error), "step %d: HTTP %ld", s->step, resp->status);
    } else {
        out->outcome = LR_STEP_FAIL_PERMANENT;
        snprintf(out->error, sizeof(out->error), "step %d: HTTP %ld (not retryable)", s->step, resp->status);
    }
    s->done(s->run);
}

static int http_start(lr_run_t *r, lr_step_t *out, lr_step_done_cb done) {
    lr_worker_t *w = lr_run_worker(r);
    const cJSON *in = lr_run_input(r);
    const cJSON *steps = cJSON_GetObjectItemCaseSensitive(in, "steps");
    const cJSON *path = cJSON_GetObjectItemCaseSensitive(in, "path");
    const cJSON *crash = cJSON_GetObjectItemCaseSensitive(in, "crash_at_step");
    const char *base = getenv("LONGRUN_HTTP_STEPS_URL");
    http_step_t **st = (http_step_t **)lr_run_exec_state(r);
    http_step_t *s;
    char url[2300], idem[128], h_task[96], h_epoch[64], h_step[48], body[160];
    const char *headers[6];
    lr_http_opts_t o;
    int rc;

    if (!cJSON_IsNumber(steps) || steps->valuedouble < 1 || steps->valuedouble > 10000) {
        out->outcome = LR_STEP_FAIL_PERMANENT;
        snprintf(out->error, sizeof(out->error), "input.steps: must be an integer in [1, 10000]");
        goto fail_now;
    }
    if (path != NULL && (!cJSON_IsString(path) || path->valuestring[0] != '/' ||
                         strstr(path->valuestring, "://") != NULL || strlen(path->valuestring) > 200)) {
        out->outcome = LR_STEP_FAIL_PERMANENT;
        snprintf(out->error, sizeof(out->error), "input.path: must be an absolute path like /step");
        goto fail_now;
    }
    if (!lr_run_lease_ok(r)) {
        out->outcome = LR_STEP_ABANDONED; /* paused past the lease: maybe another worker's task now */
        snprintf(out->error, sizeof(out->error), "the lease ran out before the step");
        goto fail_now;
    }
    if (base == NULL || base[0] == '\0') {
        out->outcome = LR_STEP_FAIL_PERMANENT;
        snprintf(out->error, sizeof(out->error), "LONGRUN_HTTP_STEPS_URL is not configured on this worker");
        goto fail_now;
    }
    if (lr_worker_test_hooks(w) && cJSON_IsNumber(crash) && (int)crash->valuedouble == lr_run_step_no(r) + 1) {
        lr_error("test.crash", "LONGRUN_TEST_HOOKS: crashing at step %d of task %s as asked", lr_run_step_no(r) + 1,
                 lr_run_id(r));
        fflush(stdout);
        abort();
    }
    if (*st == NULL) {
        *st = calloc(1, sizeof(http_step_t));
        if (*st == NULL) {
            return LR_ENOMEM;
        }
    }
    s = *st;
    s->run = r;
    s->out = out;
    s->done = done;
    s->step = lr_run_step_no(r) + 1;
    s->total = (int)steps->valuedouble;
    snprintf(url, sizeof(url), "%s%s", base, path != NULL ? path->valuestring : "/step");
    snprintf(idem, sizeof(idem), "Idempotency-Key: %s:%d:0", lr_run_id(r), s->step);
    snprintf(h_task, sizeof(h_task), "X-Longrun-Task-Id: %s", lr_run_id(r));
    snprintf(h_epoch, sizeof(h_epoch), "X-Longrun-Epoch: %lld", (long long)lr_run_epoch(r));
    snprintf(h_step, sizeof(h_step), "X-Longrun-Step: %d", s->step);
    snprintf(body, sizeof(body), "{\"task_id\":\"%s\",\"step\":%d}", lr_run_id(r), s->step);
    headers[0] = "Content-Type: application/json";
    headers[1] = idem;
    headers[2] = h_task;
    headers[3] = h_epoch;
    headers[4] = h_step;
    headers[5] = NULL;
    lr_http_opts_post(&o, url, headers, body);
    o.timeout_ms = 30000;
    o.max_body = 65536;
    rc = lr_http_send(lr_worker_http(w), &o, step_response, s, &s->req);
    return rc;

fail_now:
    /* Input errors are permanent: LR_EPERM tells the worker to read
     * out->outcome instead of treating the failure as transient. */
    return LR_EPERM;
}

static void http_cancel(lr_run_t *r) {
    http_step_t *s = *(http_step_t **)lr_run_exec_state(r);
    if (s != NULL && s->req != NULL) {
        lr_http_cancel(s->req);
        s->req = NULL;
    }
}

static void http_release(lr_run_t *r) {
    http_step_t **st = (http_step_t **)lr_run_exec_state(r);
    if (*st != NULL && (*st)->req != NULL) {
        lr_http_cancel((*st)->req);
    }
    free(*st);
    *st = NULL;
}

const lr_executor_t lr_exec_http_steps = {
    .name = "http-steps",
    .needs_history = false,
    .start = http_start,
    .cancel = http_cancel,
    .release = http_release,
};
