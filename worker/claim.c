/*
 * claim.c - from a delivery to a started step: parse the message (a
 * malformed one is dead-lettered), claim the task (or create its row when it
 * arrives straight from the broker), decide whether it may run (state
 * version, an operator's cancel, crash loop, deadline, agent, tenant cap),
 * load its step log, and hand it to step.c.
 *
 * Suspects (docs/architecture.md, crash-loop attribution): a task claimed
 * suspect_claims() times without progress runs alone as this worker's one
 * suspect until its first checkpoint; other suspects wait unclaimed in
 * w->deferred (state DEFERRED), holding their delivery.
 */
#include "core.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "state.h"
#include "store.h"
#include "wmetrics.h"

static void run_load(lr_run_t *r);
static void tenant_bounce(lr_run_t *r, int running);
static void tenant_cb(const lr_store_count_res_t *res, void *arg);
static void suspect_next(lr_worker_t *w);

static void history_cb(const lr_store_history_res_t *res, void *arg) {
    lr_run_t *r = arg;
    size_t held_bytes = 0;
    lr_run_io_end(r, LR_IO_DB);
    if (res->err != 0) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.history_failed", "cannot load the step log: %s", res->errmsg);
        lr_run_requeue(r);
        return;
    }
    cJSON_Delete(r->history);
    r->history = cJSON_CreateArray();
    for (int i = 0; i < res->n; i++) {
        const char *body;
        int version;
        cJSON *m;
        lr_store_history_row(res, i, &body, &version);
        held_bytes += LR_MEM_STATE_FACTOR * strlen(body);
        m = cJSON_Parse(body);
        if (m != NULL && lr_state_decode(version, m) != 0) {
            /* (the claim checked tasks.state_version; a step newer than the
             * task row would be a bug, so refuse rather than misread) */
            LR_LOG(LR_LOG_WARN, &r->log, "task.state_too_new",
                   "step state version %d is newer than this worker "
                   "reads (%d)",
                   version, lr_state_version());
            cJSON_Delete(m);
            lr_step_transition(r, LR_ST_QUEUED, "state_version_too_new", NULL, NULL, -1, 0);
            return;
        }
        cJSON_AddItemToArray(r->history, m != NULL ? m : cJSON_CreateArray());
    }
    if (held_bytes > r->mem_charged) {
        lr_run_mem_set(r, held_bytes); /* (replaces the claim's provisional charge) */
    }
    lr_step_next(r);
}

static char *dup_or_null(const char *s) { return s != NULL ? strdup(s) : NULL; }

/* Copies the claimed row into the run. */
static void take_row(lr_run_t *r, const lr_store_task_t *t) {
    lr_worker_t *w = r->w;
    r->epoch = t->epoch;
    r->lease_until_ms = r->claim_sent_ms + (uint64_t)w->cfg.lease_seconds * 1000u;
    r->step = t->step;
    r->attempt = t->attempt;
    r->max_attempts = t->max_attempts;
    r->used.tokens_in = t->tokens_in;
    r->used.tokens_out = t->tokens_out;
    r->used.cost_usd = t->cost_usd;
    r->used.tool_calls = t->tool_calls;
    r->used.active_ms = t->active_ms;
    r->used.wall_ms = t->wall_ms; /* (at the claim: lr_run_usage adds the time since) */
    r->outage_ms = t->outage_ms;
    free(r->budgets_json);
    r->budgets_json = dup_or_null(t->budgets);
    snprintf(r->agent, sizeof(r->agent), "%s", t->agent != NULL ? t->agent : "");
    snprintf(r->queue, sizeof(r->queue), "%s", t->queue != NULL ? t->queue : "");
    free(r->reply_to);
    r->reply_to = dup_or_null(t->reply_to);
    free(r->correlation_id);
    r->correlation_id = dup_or_null(t->correlation_id);
    free(r->callback_url);
    r->callback_url = dup_or_null(t->callback_url);
    free(r->tenant);
    r->tenant = dup_or_null(t->tenant);
    cJSON_Delete(r->input);
    r->input = t->input != NULL ? cJSON_Parse(t->input) : NULL;
    r->log.epoch = r->epoch;
    r->log.step = r->step;
    r->slice_start_ms = lr_worker_now(w);
    r->slice_steps = 0;
    r->claim_age_ms = t->age_ms;
    LR_LOG(LR_LOG_DEBUG, &r->log, "task.claimed", "claimed (claims without progress: %d)", t->claims);
    lr_metric_add(lr_wm.tasks_started, NULL, 1);
    if (t->queue_wait_ms >= 0) {
        char queue[sizeof(r->queue) + sizeof(LR_AMQP_QUEUE_PREFIX)]; /* named as longrun_queue_depth names it */
        snprintf(queue, sizeof(queue), "%s%s", LR_AMQP_QUEUE_PREFIX, r->queue);
        lr_metric_observe(lr_wm.queue_wait_seconds, (const char *const[]){queue, lr_run_agent_label(r)},
                          (double)t->queue_wait_ms / 1000.0);
    }
}

/* Whether the claimed task may run here: false when it was handed back,
 * cancelled or dead-lettered instead (state version, an operator's cancel,
 * crash loop, deadline, agent). */
static bool may_run(lr_run_t *r, const lr_store_task_t *t) {
    lr_worker_t *w = r->w;
    if (t->state_version > lr_state_version()) {
        /* Written by a newer worker: hand it back rather than misread it. */
        LR_LOG(LR_LOG_WARN, &r->log, "task.state_too_new", "state version %d is newer than this worker reads (%d)",
               t->state_version, lr_state_version());
        lr_step_transition(r, LR_ST_QUEUED, "state_version_too_new", NULL, NULL, -1, 0);
        return false;
    }
    if (t->cancel_requested) {
        /* cancelled while no worker ran it (its owner died, or missed the
         * notification): a claim is a step boundary */
        lr_step_cancel_task(r);
        return false;
    }
    if (t->claims > w->cfg.max_claims) {
        char why[160];
        snprintf(why, sizeof(why), "claimed %d times without progress (limit %d): its worker keeps dying", t->claims,
                 w->cfg.max_claims);
        lr_step_transition(r, LR_ST_DEAD, "crash_loop", why, "crash_loop", -1, 0);
        return false;
    }
    if (t->past_deadline) {
        lr_step_transition(r, LR_ST_DEAD, "deadline", "the task's deadline passed", "deadline", -1, 0);
        return false;
    }
    r->exec = w->find_executor(r->agent);
    if (r->exec == NULL) {
        char why[160];
        snprintf(why, sizeof(why), "unknown agent '%s'", r->agent);
        lr_step_transition(r, LR_ST_DEAD, "unknown_agent", why, "unknown_agent", -1, 0);
        return false;
    }
    return true;
}

/* After a successful claim: decide whether to run, then the tenant cap. */
static void run_claimed(lr_run_t *r, const lr_store_task_t *t) {
    lr_worker_t *w = r->w;
    take_row(r, t);
    if (!may_run(r, t)) {
        return;
    }
    if (r->tenant != NULL && w->cfg.tenant_max_running > 0) {
        if (t->tenant_running >= w->cfg.tenant_max_running) {
            tenant_bounce(r, t->tenant_running);
            return;
        }
        /* The count above was read before this claim committed, so claims
         * racing on other connections do not see each other.  Count again
         * now that ours is visible: whichever of them counts last sees all
         * the others, so the cap holds exactly. */
        lr_run_set_state(r, LR_RUN_ADMITTING);
        lr_run_io_begin(r, LR_IO_DB);
        if (lr_store_tenant_running(w->pg, r->tenant, tenant_cb, r) != 0) {
            lr_run_io_end(r, LR_IO_DB);
            lr_run_requeue(r);
        }
        return;
    }
    run_load(r);
}

/* The tenant is at its fleet-wide cap: come back in a moment (no attempt,
 * no crash claim) so that other tenants' work flows. */
static void tenant_bounce(lr_run_t *r, int running) {
    LR_LOG(LR_LOG_DEBUG, &r->log, "task.tenant_limit", "tenant %s has %d running (cap %d); suspending briefly",
           r->tenant, running, r->w->cfg.tenant_max_running);
    lr_step_transition(r, LR_ST_SUSPENDED, "tenant_limit", NULL, NULL, 1000 + lr_backoff_ms(1000, 2000, 1), 0);
}

static void tenant_cb(const lr_store_count_res_t *res, void *arg) {
    lr_run_t *r = arg;
    long running;
    lr_run_io_end(r, LR_IO_DB);
    if (res->err != 0) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.tenant_check_failed", "cannot count the tenant's running tasks: %s",
               res->errmsg);
        lr_run_requeue(r);
        return;
    }
    running = res->count; /* ours included */
    if (running > r->w->cfg.tenant_max_running) {
        tenant_bounce(r, (int)running - 1);
        return;
    }
    run_load(r);
}

/* Loads the step log if the executor needs it, then starts the step. */
static void run_load(lr_run_t *r) {
    lr_worker_t *w = r->w;
    if (r->exec->needs_history && r->step > 0) {
        lr_run_set_state(r, LR_RUN_LOADING);
        lr_run_io_begin(r, LR_IO_DB);
        if (lr_store_history(w->pg, r->id, history_cb, r) != 0) {
            lr_run_io_end(r, LR_IO_DB);
            lr_run_requeue(r);
        }
        return;
    }
    lr_step_next(r);
}

static void insert_cb(const lr_store_claim_res_t *res, void *arg);
static void claim_cb(const lr_store_claim_res_t *res, void *arg);

/* Claims without progress that make a task a suspect: 2, or the crash-loop
 * limit if lower (then a bystander still stays within the limit). */
static int suspect_claims(const lr_worker_t *w) { return w->cfg.max_claims < 2 ? w->cfg.max_claims : 2; }

/* Sends the claim.  It may take a suspect task only when this worker's
 * suspect slot is free and no other such claim is in flight. */
static void run_claim(lr_run_t *r) {
    lr_worker_t *w = r->w;
    lr_store_claim_args_t a;
    bool may = w->suspect == NULL && !w->suspect_claiming;
    a.id = r->id;
    a.worker = w->id;
    a.lease_seconds = w->cfg.lease_seconds;
    a.claims_below = may ? 1000000 : suspect_claims(w);
    a.reclaim = r->reclaim;
    if (may) {
        w->suspect_claiming = true;
        r->claim_may_suspect = true;
    }
    lr_run_set_state(r, LR_RUN_CLAIMING);
    r->claim_sent_ms = lr_worker_now(w);
    lr_run_io_begin(r, LR_IO_DB);
    if (lr_store_claim(w->pg, &a, claim_cb, r) != 0) {
        lr_run_io_end(r, LR_IO_DB);
        if (may) {
            w->suspect_claiming = false;
            r->claim_may_suspect = false;
        }
        lr_run_requeue(r);
    }
}

/* Claims the next deferred suspect if the slot is free. */
static void suspect_next(lr_worker_t *w) {
    lr_run_t *r;
    if (w->suspect != NULL || w->suspect_claiming || lr_list_empty(&w->deferred) || w->stopping) {
        return;
    }
    r = lr_list_entry(lr_list_pop_front(&w->deferred), lr_run_t, defer_link);
    lr_list_init(&r->defer_link);
    if (w->draining) {
        lr_run_requeue(r); /* never claimed: the broker gives it to another worker */
        suspect_next(w);
        return;
    }
    run_claim(r);
}

/* After a connection loss hid whether our claim (or insert) committed: claim
 * again, allowed to take back a live lease that is ours (the statement waits
 * for the reconnection).  Giving the message back instead would strand the
 * task: its redelivery would meet our own live lease and be dropped, and the
 * task would wait for the lease to expire.  Not when another run of this
 * worker holds the same task (that lease is that run's). */
static bool run_retry_claim(lr_run_t *r) {
    if (r->db_retries++ >= 5) {
        return false;
    }
    lr_list_foreach(it, &r->w->runs) {
        const lr_run_t *o = lr_list_entry(it, lr_run_t, link);
        if (o != r && o->state != LR_RUN_DONE && strcmp(o->id, r->id) == 0) {
            return false;
        }
    }
    LR_LOG(LR_LOG_WARN, &r->log, "task.claim_retry", "connection lost during the claim; claiming again");
    r->reclaim = true;
    run_claim(r);
    return true;
}

void lr_claim_progress(lr_run_t *r) {
    if (r->w->suspect == r) {
        r->w->suspect = NULL;
        suspect_next(r->w);
    }
}

/* First sight of a task published straight to the broker: create its row,
 * claimed. */
static void run_insert(lr_run_t *r) {
    lr_worker_t *w = r->w;
    lr_store_insert_args_t a;
    char *input = cJSON_PrintUnformatted(r->msg.input);
    char *budgets = lr_budgets_to_json(&r->msg.budgets);
    char *metadata = r->msg.metadata ? cJSON_PrintUnformatted(r->msg.metadata) : NULL;
    int rc;
    a.id = r->id;
    a.queue = r->queue;
    a.agent = r->msg.agent;
    a.input = input;
    a.budgets = budgets;
    a.metadata = metadata;
    a.max_attempts = r->msg.max_attempts > 0 ? r->msg.max_attempts : w->cfg.max_attempts;
    a.deadline = r->msg.deadline;
    a.tenant = r->msg.tenant;
    a.callback_url = r->msg.callback_url;
    a.reply_to = r->d->reply_to;
    a.correlation_id = r->d->correlation_id;
    a.worker = w->id;
    a.lease_seconds = w->cfg.lease_seconds;
    lr_run_set_state(r, LR_RUN_INSERTING);
    r->claim_sent_ms = lr_worker_now(w);
    lr_run_io_begin(r, LR_IO_DB);
    /* (the statement's text parameters are sent when it is queued, so these
     * buffers need not outlive the call) */
    rc = lr_store_insert(w->pg, &a, insert_cb, r);
    free(input);
    free(budgets);
    free(metadata);
    if (rc != 0) {
        lr_run_io_end(r, LR_IO_DB);
        lr_run_requeue(r);
    }
}

/* The claim took nothing: why decides (claim_cb).  A suspect waits for the
 * slot; a task without a row is created (or its stray continuation
 * dead-lettered); a runnable one not taken goes back; the rest is dropped. */
static void not_claimed(lr_run_t *r, const lr_store_claim_res_t *res, bool may_suspect) {
    lr_worker_t *w = r->w;
    const char *cur = res->cur_status;
    if (cur != NULL && !may_suspect && res->cur_claims >= suspect_claims(w) && !w->draining) {
        if (strcmp(cur, "queued") == 0 || (strcmp(cur, "running") == 0 && !res->cur_leased)) {
            /* A suspect, and another suspect holds this worker's slot: wait,
             * unclaimed, holding the delivery. */
            LR_LOG(LR_LOG_DEBUG, &r->log, "task.suspect_deferred",
                   "suspect task waits for this worker's "
                   "suspect slot");
            lr_run_set_state(r, LR_RUN_DEFERRED);
            lr_list_push_back(&w->deferred, &r->defer_link);
            suspect_next(w);
            return;
        }
    }
    suspect_next(w);
    if (cur == NULL) {
        if (r->msg.continuation) {
            lr_amqp_delivery_t *d = r->d;
            char why[128];
            r->d = NULL;
            snprintf(why, sizeof(why), "continuation for unknown task %s", r->id);
            lr_deadletter_message(w->pg, w->amqp, d, "unknown_task", why);
            lr_run_drop(r, LR_RUN_OUT_REJECTED);
            return;
        }
        run_insert(r);
        return;
    }
    if (strcmp(cur, "queued") == 0 || (strcmp(cur, "running") == 0 && !res->cur_leased)) {
        /* Runnable, yet not claimed: a suspect that this worker may not
         * take now (its slot is busy while it drains).  The message is the
         * task's dispatch: give it back rather than drop it, or the task
         * would stay queued with nothing in the broker. */
        LR_LOG(LR_LOG_DEBUG, &r->log, "task.suspect_returned", "suspect task given back to the broker");
        lr_run_requeue(r);
        return;
    }
    if (strcmp(cur, "running") == 0 && res->cur_leased) {
        LR_LOG(LR_LOG_INFO, &r->log, "task.duplicate_delivery",
               "duplicate delivery: the task is leased by a live owner; dropped");
    } else {
        LR_LOG(LR_LOG_DEBUG, &r->log, "task.not_runnable", "task is %s; message dropped", cur);
    }
    lr_run_drop(r, LR_RUN_OUT_DROPPED);
}

static void claim_cb(const lr_store_claim_res_t *res, void *arg) {
    lr_run_t *r = arg;
    lr_worker_t *w = r->w;
    bool may_suspect = r->claim_may_suspect;

    lr_run_io_end(r, LR_IO_DB);
    if (may_suspect) {
        r->claim_may_suspect = false;
        w->suspect_claiming = false;
    }
    if (res->lost && run_retry_claim(r)) {
        suspect_next(w);
        return;
    }
    if (res->err != 0) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.claim_failed", "claim failed: %s; giving the message back", res->errmsg);
        lr_run_requeue(r);
        suspect_next(w);
        return;
    }
    if (res->claimed) {
        if (may_suspect && res->task.claims > suspect_claims(w)) {
            w->suspect = r;
            LR_LOG(LR_LOG_INFO, &r->log, "task.suspect",
                   "claimed %d times without progress: running it as "
                   "this worker's only suspect until it checkpoints",
                   res->task.claims);
        }
        suspect_next(w);
        run_claimed(r, &res->task);
        return;
    }
    not_claimed(r, res, may_suspect);
}

static void insert_cb(const lr_store_claim_res_t *res, void *arg) {
    lr_run_t *r = arg;
    lr_run_io_end(r, LR_IO_DB);
    if (res->refused) {
        lr_amqp_delivery_t *d = r->d;
        LR_LOG(LR_LOG_WARN, &r->log, "task.insert_refused", "%s", res->why);
        r->d = NULL;
        lr_deadletter_message(r->w->pg, r->w->amqp, d, "invalid", res->why);
        lr_run_drop(r, LR_RUN_OUT_REJECTED);
        return;
    }
    if (res->lost && run_retry_claim(r)) {
        return; /* the claim finds the row if the insert committed, else inserts again */
    }
    if (res->err != 0) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.insert_failed", "cannot create the task row: %s", res->errmsg);
        lr_run_requeue(r);
        return;
    }
    if (!res->claimed) {
        /* Raced with another creator: claim the existing row. */
        run_claim(r);
        return;
    }
    run_claimed(r, &res->task);
}

/* Claims r with a provisional charge for the state it will load, so that
 * room does not admit more claims than it can hold (the load sets the real
 * charge). */
static void held_claim(lr_run_t *r) {
    lr_run_mem_set(r, LR_MEM_MIN_RESERVE);
    run_claim(r);
}

static const char *queue_short_name(const char *full) {
    size_t n = strlen(LR_AMQP_QUEUE_PREFIX);
    if (full != NULL && strncmp(full, LR_AMQP_QUEUE_PREFIX, n) == 0) {
        return full + n;
    }
    return "default";
}

void lr_claim_delivery(lr_amqp_delivery_t *d, void *arg) {
    lr_worker_t *w = arg;
    lr_run_t *r;
    char err[512];
    int rc;

    if (w->stopping) {
        (void)lr_amqp_reject(w->amqp, d, true);
        lr_amqp_delivery_free(d);
        return;
    }
    r = lr_run_new(w, d);
    if (r == NULL) {
        (void)lr_amqp_reject(w->amqp, d, true);
        lr_amqp_delivery_free(d);
        return;
    }
    rc = lr_task_parse(d->body, d->body_len, &r->msg, err, sizeof(err));
    if (rc == 0 && !r->msg.has_id && d->message_id != NULL && lr_uuid_valid(d->message_id)) {
        /* A full body without "id": the AMQP message_id is the task id (the
         * contract sets message_id = task id), so redeliveries stay one task. */
        for (int i = 0; i <= LR_UUID_LEN; i++) {
            r->msg.id[i] = (char)tolower((unsigned char)d->message_id[i]);
        }
        r->msg.has_id = true;
    }
    if (rc != 0 || !r->msg.has_id) {
        const char *reason = rc == LR_ETOOBIG ? "oversized" : rc == LR_EPARSE ? "bad_json" : "invalid";
        if (rc == 0) {
            snprintf(err, sizeof(err),
                     "id: required on messages consumed by workers, in the body or "
                     "as a UUID message_id (the worker cannot make retries "
                     "idempotent without it)");
            lr_task_msg_free(&r->msg);
        }
        r->d = NULL;
        lr_deadletter_message(w->pg, w->amqp, d, reason, err);
        lr_run_drop(r, LR_RUN_OUT_REJECTED);
        return;
    }
    if (d->message_id != NULL && strcmp(d->message_id, r->msg.id) != 0 && lr_uuid_valid(d->message_id)) {
        lr_warn("message.id_mismatch", "message_id %s differs from the body's id %s; using the body's", d->message_id,
                r->msg.id);
    }
    snprintf(r->id, sizeof(r->id), "%s", r->msg.id);
    snprintf(r->queue, sizeof(r->queue), "%s", queue_short_name(d->queue));
    r->log.task_id = r->id;
    if (!lr_list_empty(&w->held) || !lr_mem_room(&w->mem)) {
        /* Over the memory budget: wait unclaimed (the broker keeps the
         * message ours, unacked) until a release makes room. */
        lr_run_set_state(r, LR_RUN_HELD);
        lr_list_push_back(&w->held, &r->defer_link);
        lr_metric_add(lr_wm.memory_holds, NULL, 1);
        return;
    }
    /* An unknown agent is a permanent error, found after the claim or the
     * insert, so that the dead letter points at a recorded task. */
    held_claim(r);
}

void lr_claim_room(void *arg) {
    lr_worker_t *w = arg;
    while (!lr_list_empty(&w->held) && !w->stopping && lr_mem_room(&w->mem)) {
        lr_run_t *r = lr_list_entry(lr_list_pop_front(&w->held), lr_run_t, defer_link);
        lr_list_init(&r->defer_link);
        if (w->draining) {
            lr_run_requeue(r); /* never claimed: the broker gives it to another worker */
            continue;
        }
        held_claim(r);
    }
}

void lr_claim_release_deferred(lr_worker_t *w) {
    while (!lr_list_empty(&w->held)) {
        lr_run_t *r = lr_list_entry(lr_list_pop_front(&w->held), lr_run_t, defer_link);
        lr_list_init(&r->defer_link);
        lr_run_requeue(r); /* never claimed: back to the broker */
    }
    while (!lr_list_empty(&w->deferred)) {
        lr_run_t *r = lr_list_entry(lr_list_pop_front(&w->deferred), lr_run_t, defer_link);
        lr_list_init(&r->defer_link);
        lr_run_requeue(r); /* never claimed: back to the broker */
    }
}
