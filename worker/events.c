/*
 * events.c - task events to the RabbitMQ stream longrun.events (events.h).
 *
 * Called by claim.c and step.c once a statement committed; builds each
 * event as a small JSON object and hands it to lr_amqp_publish (the AMQP
 * owner thread publishes it with a confirm).  Nothing waits for the
 * confirm: confirm_cb only counts.  The number of unconfirmed events is
 * bounded; beyond it an event is dropped and counted, so a slow or absent
 * broker never holds memory or a run.
 */
#include "events.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "amqp.h"
#include "wmetrics.h"

static long inflight; /* published, not yet confirmed (all runs of the process) */

static bool events_on(const lr_run_t *r) { return r->w->cfg.events != 0; }

static uint64_t wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* "2026-12-08T01:02:03.456Z" */
static void add_ts(cJSON *o, uint64_t ms) {
    char buf[96];
    time_t s = (time_t)(ms / 1000u);
    struct tm tm;
    gmtime_r(&s, &tm);
    snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000u));
    cJSON_AddStringToObject(o, "ts", buf);
}

static void drop(const char *reason) { lr_metric_inc1(lr_wm.events_dropped, reason); }

typedef struct sent {
    char type[24];
} sent_t;

static void confirm_cb(int err, void *arg) {
    sent_t *s = arg;
    inflight--;
    if (err == 0) {
        lr_metric_inc1(lr_wm.events_published, s->type);
    } else {
        drop(err == LR_ECONN ? "disconnected" : err == LR_ESHUTDOWN ? "shutdown" : "nacked");
    }
    free(s);
}

/* A new event object: the fields every event has. */
static cJSON *event_new(const lr_run_t *r, int64_t seq, int step, const char *type, uint64_t ts) {
    cJSON *o = cJSON_CreateObject();
    if (o == NULL) {
        return NULL;
    }
    cJSON_AddNumberToObject(o, "v", 1);
    cJSON_AddStringToObject(o, "task_id", r->id);
    cJSON_AddNumberToObject(o, "seq", (double)seq);
    cJSON_AddNumberToObject(o, "step", step);
    cJSON_AddStringToObject(o, "type", type);
    add_ts(o, ts);
    cJSON_AddStringToObject(o, "worker", r->w->id);
    return o;
}

/* Publishes o (consumed) without waiting for anything. */
static void publish(lr_run_t *r, cJSON *o) {
    lr_worker_t *w = r->w;
    const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "type"));
    char *body = NULL, seq[24], mid[LR_UUID_LEN + 32];
    const char *headers[7];
    lr_amqp_msg_t m;
    sent_t *s = NULL;
    int rc;
    if (type == NULL || (body = cJSON_PrintUnformatted(o)) == NULL || (s = calloc(1, sizeof(*s))) == NULL) {
        drop("nomem");
        goto out;
    }
    if (w->amqp == NULL || !w->amqp_up) {
        drop("disconnected");
        goto out;
    }
    if (inflight >= w->cfg.events_max_inflight) {
        drop("full");
        goto out;
    }
    snprintf(s->type, sizeof(s->type), "%s", type);
    snprintf(seq, sizeof(seq), "%.0f", cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(o, "seq")));
    snprintf(mid, sizeof(mid), "%s:%s", r->id, seq);
    headers[0] = LR_EVENTS_TASK_HEADER;
    headers[1] = r->id;
    headers[2] = "x-longrun-seq";
    headers[3] = seq;
    headers[4] = "x-longrun-event";
    headers[5] = type;
    headers[6] = NULL;
    memset(&m, 0, sizeof(m));
    m.body = body;
    m.body_len = strlen(body);
    m.message_id = mid;
    m.content_type = "application/json";
    m.persistent = true;
    m.headers = headers;
    rc = lr_amqp_publish(w->amqp, "", LR_EVENTS_STREAM, &m, confirm_cb, s);
    if (rc != 0) {
        drop(rc == LR_EBUSY ? "full" : "error");
        goto out;
    }
    s = NULL; /* confirm_cb frees it */
    inflight++;
out:
    free(s);
    free(body);
    cJSON_Delete(o);
}

int lr_events_step_count(const lr_step_t *out) {
    cJSON *calls = out->tool_calls != NULL ? cJSON_Parse(out->tool_calls) : NULL;
    int n = cJSON_IsArray(calls) ? cJSON_GetArraySize(calls) : 0;
    cJSON_Delete(calls);
    return 2 + 2 * n;
}

void lr_events_claimed(lr_run_t *r) {
    cJSON *o;
    if (!events_on(r)) {
        return;
    }
    o = event_new(r, r->event_seq, r->step, r->step > 0 ? "resumed" : "claimed", wall_ms());
    if (o == NULL) {
        drop("nomem");
        return;
    }
    cJSON_AddNumberToObject(o, "epoch", (double)r->epoch);
    cJSON_AddNumberToObject(o, "attempt", r->attempt);
    publish(r, o);
}

/* The event that reports the task's new status (not running). */
static cJSON *status_event(lr_run_t *r, int64_t seq, int step, enum lr_status status, uint64_t now) {
    cJSON *o;
    switch (status) {
    case LR_ST_SUSPENDED:
    case LR_ST_RETRY_WAIT:
        if ((o = event_new(r, seq, step, "suspended", now)) != NULL) {
            cJSON_AddStringToObject(o, "reason", status == LR_ST_RETRY_WAIT ? "retry" : r->reason);
        }
        return o;
    case LR_ST_QUEUED:
        if ((o = event_new(r, seq, step, "released", now)) != NULL) {
            cJSON_AddStringToObject(o, "reason", r->reason[0] != '\0' ? r->reason : "slice");
        }
        return o;
    default:
        if ((o = event_new(r, seq, step, "outcome", now)) != NULL) {
            cJSON_AddStringToObject(o, "status", lr_status_name(status));
            if (status == LR_ST_SUCCEEDED) {
                cJSON_AddNullToObject(o, "stop_reason");
            } else {
                cJSON_AddStringToObject(o, "stop_reason", r->reason[0] != '\0' ? r->reason : lr_status_name(status));
            }
        }
        return o;
    }
}

void lr_events_step(lr_run_t *r, int64_t last, enum lr_status status) {
    int n = lr_events_step_count(&r->out), step = r->step + 1, i = 0;
    int64_t seq;
    uint64_t now = wall_ms(), started;
    cJSON *calls = NULL, *c, *o;
    if (last <= 0) {
        last = r->event_seq + n + (status != LR_ST_RUNNING ? 1 : 0);
    }
    seq = last - n - (status != LR_ST_RUNNING ? 1 : 0) + 1;
    r->event_seq = last;
    if (!events_on(r)) {
        return;
    }
    started = now - (lr_worker_now(r->w) - r->step_start_ms);
    if ((o = event_new(r, seq++, step, "step_started", started)) != NULL) {
        publish(r, o);
    }
    calls = r->out.tool_calls != NULL ? cJSON_Parse(r->out.tool_calls) : NULL;
    cJSON_ArrayForEach(c, calls) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name"));
        const char *st = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "status"));
        const cJSON *ms = cJSON_GetObjectItemCaseSensitive(c, "ms");
        if ((o = event_new(r, seq++, step, "tool_call_started", now)) != NULL) {
            cJSON_AddStringToObject(o, "name", name != NULL ? name : "");
            cJSON_AddNumberToObject(o, "call", i);
            publish(r, o);
        }
        if ((o = event_new(r, seq++, step, "tool_call_finished", now)) != NULL) {
            cJSON_AddStringToObject(o, "name", name != NULL ? name : "");
            cJSON_AddNumberToObject(o, "call", i);
            cJSON_AddStringToObject(o, "status", st != NULL ? st : "unknown");
            cJSON_AddNumberToObject(o, "ms", cJSON_IsNumber(ms) ? ms->valuedouble : 0);
            publish(r, o);
        }
        i++;
    }
    cJSON_Delete(calls);
    if ((o = event_new(r, seq++, step, "step_finished", now)) != NULL) {
        cJSON *u = cJSON_AddObjectToObject(o, "usage");
        cJSON_AddNumberToObject(u, "tokens_in", (double)r->out.tokens_in);
        cJSON_AddNumberToObject(u, "tokens_out", (double)r->out.tokens_out);
        cJSON_AddNumberToObject(u, "tokens_cached", (double)r->out.tokens_cached);
        cJSON_AddNumberToObject(u, "cost_usd", r->out.cost_usd);
        if (r->out.model != NULL) {
            cJSON_AddStringToObject(o, "model", r->out.model);
        } else {
            cJSON_AddNullToObject(o, "model");
        }
        cJSON_AddNumberToObject(o, "latency_ms", (double)(lr_worker_now(r->w) - r->step_start_ms));
        cJSON_AddNumberToObject(o, "tool_calls", i);
        cJSON_AddStringToObject(o, "status", lr_status_name(status));
        publish(r, o);
    }
    if (status != LR_ST_RUNNING && (o = status_event(r, seq, step, status, now)) != NULL) {
        publish(r, o);
    }
}

void lr_events_transition(lr_run_t *r, int64_t seq, enum lr_status status) {
    cJSON *o;
    r->event_seq = seq > 0 ? seq : r->event_seq + 1;
    if (!events_on(r)) {
        return;
    }
    if ((o = status_event(r, r->event_seq, r->step, status, wall_ms())) != NULL) {
        publish(r, o);
    }
}
