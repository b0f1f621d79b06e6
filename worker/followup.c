/*
 * followup.c - what a run publishes once its new state is committed, then
 * the ack of its delivery.
 *
 *   follow-up       published                                  then
 *   continuation    {"id"} to the task's queue (mandatory)     mark published (outbox), ack
 *   dead            the dead letter to longrun.dlx             outcome to reply_to / callback, ack
 *   outcome         nothing to the broker                      outcome to reply_to / callback, ack
 *   ack             nothing                                    ack
 *
 * RabbitMQ carries dispatch only, so the delivery is acked only after the
 * broker confirmed the follow-up: a worker that dies in between leaves the
 * delivery to be redelivered, and the redelivery finds the committed state.
 * A failed publish is retried with full-jitter backoff while the run keeps
 * its delivery (state BACKOFF); when the worker stops, the run ends and the
 * scheduler's outbox sweep republishes queued tasks.
 *
 * The outcome to reply_to and callback_url is best effort, not awaited
 * before the ack: the outcome is in PostgreSQL either way.
 */
#include "core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "callback.h"
#include "store.h"
#include "wmetrics.h"

static void published(int err, void *arg);
static void publish(lr_run_t *r);

/* How the run ended, from the status it committed. */
static enum lr_run_outcome outcome_of(const lr_run_t *r) {
    if (r->handing_back) {
        return LR_RUN_OUT_REQUEUED;
    }
    switch (r->status) {
    case LR_ST_SUCCEEDED: return LR_RUN_OUT_SUCCEEDED;
    case LR_ST_CANCELLED: return LR_RUN_OUT_CANCELLED;
    case LR_ST_SUSPENDED: return LR_RUN_OUT_SUSPENDED;
    case LR_ST_RETRY_WAIT: return LR_RUN_OUT_RETRY_WAIT;
    case LR_ST_QUEUED: return LR_RUN_OUT_HANDED_BACK;
    default: return LR_RUN_OUT_DEAD;
    }
}

static void retry_timer_cb(uv_timer_t *t) {
    lr_run_t *r = t->data;
    lr_run_io_end(r, LR_IO_TIMER);
    lr_run_set_state(r, LR_RUN_PUBLISHING);
    publish(r);
}

/* Retries a failed publish later (the broker is away); the run keeps its
 * delivery meanwhile.  When the worker stops with the broker gone, the
 * outbox sweep of the scheduler republishes queued tasks, so the run ends. */
static void publish_retry(lr_run_t *r, int err) {
    long delay = lr_backoff_ms(250, 10000, r->publish_tries);
    lr_warn("task.publish_retry", "publish for task %s failed (%s); retrying in %ld ms", r->id, lr_strerror(err),
            delay);
    if (r->w->stopping) {
        /* a hand-back gives the delivery itself back; a decided run acks
         * (the outbox sweep republishes queued tasks) */
        lr_run_finish(r, outcome_of(r), !r->handing_back);
        return;
    }
    if (!r->timer_init) {
        uv_timer_init(r->w->loop, &r->retry_timer);
        r->timer_init = true;
    }
    r->retry_timer.data = r;
    lr_run_set_state(r, LR_RUN_BACKOFF);
    lr_run_io_begin(r, LR_IO_TIMER);
    uv_timer_start(&r->retry_timer, retry_timer_cb, (uint64_t)delay + 1, 0);
}

/* The body of a continuation or a dead letter, malloc'd (NULL: no memory). */
static char *followup_body(const lr_run_t *r) {
    cJSON *o = cJSON_CreateObject();
    char *body;
    cJSON_AddStringToObject(o, "id", r->id);
    if (r->follow == LR_FOLLOW_DEAD) {
        cJSON_AddStringToObject(o, "agent", r->agent);
        if (r->input != NULL) {
            cJSON_AddItemToObject(o, "input", cJSON_Duplicate(r->input, true));
        }
    }
    body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return body;
}

/* Publishes the continuation or the dead letter (state PUBLISHING). */
static void publish(lr_run_t *r) {
    lr_amqp_msg_t msg;
    char key[160];
    const char *headers[7];
    char *body = followup_body(r);
    int rc;

    memset(&msg, 0, sizeof(msg));
    msg.persistent = true;
    msg.content_type = "application/json";
    msg.message_id = r->id;
    msg.body = body;
    msg.body_len = body != NULL ? strlen(body) : 0;
    if (r->follow == LR_FOLLOW_DEAD) {
        snprintf(key, sizeof(key), "task:%s:%lld", r->id, (long long)r->epoch);
        headers[0] = "x-longrun-dead-letter-key";
        headers[1] = key;
        headers[2] = "x-longrun-reason";
        headers[3] = r->reason;
        headers[4] = "x-longrun-queue";
        headers[5] = r->queue;
        headers[6] = NULL;
        msg.headers = headers;
    } else {
        msg.mandatory = true;
    }
    if (body == NULL) {
        publish_retry(r, LR_ENOMEM);
        return;
    }
    lr_run_io_begin(r, LR_IO_PUBLISH);
    rc = r->follow == LR_FOLLOW_DEAD ? lr_amqp_publish(r->w->amqp, LR_AMQP_DLX, "", &msg, published, r)
                                     : lr_amqp_publish(r->w->amqp, LR_AMQP_EXCHANGE, r->queue, &msg, published, r);
    free(body);
    if (rc != 0) {
        lr_run_io_end(r, LR_IO_PUBLISH);
        publish_retry(r, rc);
    }
}

/* The outcome to callback_url and reply_to, best effort. */
static void send_outcome(lr_run_t *r) {
    bool reply = r->reply_to != NULL && r->reply_to[0] != '\0';
    bool callback = r->callback_url != NULL && r->callback_url[0] != '\0';
    bool ok = r->status == LR_ST_SUCCEEDED;
    char *body;
    if (!reply && !callback) {
        return;
    }
    body = lr_outcome_json(r->id, lr_status_name(r->status), ok ? r->out.result : NULL, r->error, ok ? NULL : r->reason,
                           r->step, r->used.tokens_in, r->used.tokens_out, r->used.cost_usd);
    if (body == NULL) {
        return;
    }
    if (callback) {
        lr_callback_send(r->w->loop, &r->w->http, r->id, r->callback_url, body);
    }
    if (reply) {
        char why[512];
        if (lr_amqp_publish_reply(r->w->amqp, r->w->cfg.reply_to_prefix, r->reply_to, r->correlation_id, r->id, body,
                                  why, sizeof(why)) == LR_EPERM &&
            lr_store_reply_refused(r->w->pg, r->id, r->w->id, r->reply_to, why) != 0) {
            lr_warn("task.reply_refused_unrecorded", "task %s: the refused reply_to was not recorded", r->id);
        }
    }
    free(body);
}

static void marked(int err, void *arg) {
    lr_run_t *r = arg;
    (void)err; /* a lost mark only makes the outbox sweep look at the task */
    lr_run_io_end(r, LR_IO_DB);
    lr_run_finish(r, outcome_of(r), true);
}

/* The follow-up is confirmed (or there was none to publish). */
static void followup_done(lr_run_t *r) {
    if (r->follow == LR_FOLLOW_OUTCOME || r->follow == LR_FOLLOW_DEAD) {
        const char *lv[2] = {lr_run_agent_label(r), lr_status_name(r->status)};
        lr_metric_add(lr_wm.tasks_finished, lv, 1);
        if (r->claim_sent_ms != 0) {
            lr_metric_observe(lr_wm.task_seconds, lv,
                              (double)(lr_worker_now(r->w) - r->claim_sent_ms + (uint64_t)r->claim_age_ms) / 1000.0);
        }
        if (r->follow == LR_FOLLOW_DEAD) {
            lr_metric_inc1(lr_wm.dead_letters, r->reason);
        }
        send_outcome(r);
    }
    if (r->follow == LR_FOLLOW_CONTINUATION) {
        /* Outbox bookkeeping: the dispatch of this queued state is confirmed. */
        lr_run_set_state(r, LR_RUN_MARKING);
        lr_run_io_begin(r, LR_IO_DB);
        if (lr_store_mark_published(r->w->pg, r->id, marked, r) != 0) {
            lr_run_io_end(r, LR_IO_DB);
            lr_run_finish(r, outcome_of(r), true);
        }
        return;
    }
    lr_run_finish(r, outcome_of(r), true);
}

static void published(int err, void *arg) {
    lr_run_t *r = arg;
    lr_run_io_end(r, LR_IO_PUBLISH);
    if (err != 0) {
        r->publish_tries++;
        publish_retry(r, err);
        return;
    }
    followup_done(r);
}

void lr_followup_hand_back(lr_run_t *r) {
    LR_LOG(LR_LOG_INFO, &r->log, "task.handed_back",
           "giving the task back through a continuation (its lease "
           "expires or is released; not counted as a delivery)");
    r->handing_back = true;
    r->follow = LR_FOLLOW_CONTINUATION;
    lr_followup_publish(r);
}

void lr_followup_publish(lr_run_t *r) {
    lr_run_set_state(r, LR_RUN_PUBLISHING);
    if (r->follow == LR_FOLLOW_CONTINUATION || r->follow == LR_FOLLOW_DEAD) {
        publish(r);
        return;
    }
    followup_done(r);
}
