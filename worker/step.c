/*
 * step.c - a claimed run's steps: start one in the executor, checkpoint what
 * it produced (the step row and the task row in one statement), and the
 * status changes without a step (retry_wait, dead, a hand-back).
 *
 * After each committed checkpoint the task's new status decides: running =
 * the next step at once (within the slice), anything else = the run's
 * follow-up (followup.c).  Failure rules (docs/architecture.md): a fenced
 * statement abandons the run locally; a statement error gives the delivery
 * back; a lost connection is the store's business (store.h).
 *
 * An operator's immediate cancel (cancel.c) ends a run here too: the step
 * in flight is aborted, or the next one not started, and the cancellation
 * is written through the same fenced transition (lr_step_cancel_task).
 */
#include "core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agents.h"
#include "events.h"
#include "state.h"
#include "store.h"
#include "wmetrics.h"

static void step_done(lr_run_t *r);
static void checkpoint(lr_run_t *r);

/* Whether the step being checkpointed ends the slice (it counts). */
static bool slice_over(lr_run_t *r) {
    lr_worker_t *w = r->w;
    const lr_agent_t *a = r->agent[0] != '\0' ? lr_agents_find(r->agent) : NULL;
    int steps = a != NULL && a->slice_steps > 0 ? a->slice_steps : w->cfg.slice_steps;
    int secs = a != NULL && a->slice_seconds > 0 ? a->slice_seconds : w->cfg.slice_seconds;
    return r->slice_steps + 1 >= steps || lr_worker_now(w) - r->slice_start_ms >= (uint64_t)secs * 1000u;
}

static void start_step(lr_run_t *r) {
    int rc;
    if (r->cancel_now) {
        /* an immediate cancel arrived since the claim or the last step */
        lr_step_cancel_task(r);
        return;
    }
    r->log.step = r->step + 1;
    lr_step_reset(&r->out);
    r->step_start_ms = lr_worker_now(r->w);
    lr_run_set_state(r, LR_RUN_STEPPING);
    lr_run_io_begin(r, LR_IO_STEP);
    rc = r->exec->start(r, &r->out, step_done);
    if (rc != 0) {
        /* done never runs: end the step here (the I/O bit too) */
        if (rc != LR_EPERM) {
            r->out.outcome = LR_STEP_FAIL_TRANSIENT;
            snprintf(r->out.error, sizeof(r->out.error), "could not start step: %s", lr_strerror(rc));
        }
        step_done(r);
    }
}

static void checkpoint_cb(const lr_store_write_res_t *res, void *arg);

/* The task's status after the step that just ended, whether the lease goes
 * with it, and the event's reason. */
static enum lr_status status_after_step(lr_run_t *r, bool *release, const char **reason) {
    *release = true;
    switch (r->out.outcome) {
    case LR_STEP_FINISHED: *reason = "succeeded"; return LR_ST_SUCCEEDED;
    case LR_STEP_SUSPEND:
        *reason = r->out.suspend_reason[0] ? r->out.suspend_reason : "suspended";
        return LR_ST_SUSPENDED;
    case LR_STEP_STOP: *reason = r->out.stop_reason[0] ? r->out.stop_reason : "stopped"; return LR_ST_DEAD;
    default: break;
    }
    if (r->w->draining || r->abandon) {
        *reason = "drain";
        return LR_ST_QUEUED;
    }
    if (slice_over(r)) {
        *reason = "slice_end";
        return LR_ST_QUEUED;
    }
    *release = false;
    *reason = NULL;
    return LR_ST_RUNNING;
}

static void checkpoint(lr_run_t *r) {
    lr_worker_t *w = r->w;
    lr_store_checkpoint_args_t a;
    bool release;
    const char *reason = NULL;
    enum lr_status status = status_after_step(r, &release, &reason);
    long latency = (long)(lr_worker_now(w) - r->step_start_ms);
    int rc;

    r->status = status;
    snprintf(r->reason, sizeof(r->reason), "%s", reason != NULL ? reason : "");
    memset(&a, 0, sizeof(a));
    a.id = r->id;
    a.epoch = r->epoch;
    a.step_no = r->step + 1;
    a.status = lr_status_name(status);
    a.worker = w->id;
    a.messages = r->out.messages;
    a.tool_calls = r->out.tool_calls;
    a.model = r->out.model;
    a.fallback = r->out.fallback;
    a.tokens_in = r->out.tokens_in;
    a.tokens_out = r->out.tokens_out;
    a.tokens_cached = r->out.tokens_cached;
    a.tool_calls_count = r->out.tool_calls_count;
    a.cost_usd = r->out.cost_usd;
    a.latency_ms = latency;
    a.active_ms = latency;
    a.release = release;
    a.result = r->out.outcome == LR_STEP_FINISHED ? r->out.result : NULL;
    a.error = r->out.outcome == LR_STEP_STOP && r->out.error[0] ? r->out.error : NULL;
    a.stop_reason = r->out.outcome == LR_STEP_STOP ? reason : NULL;
    a.suspend_reason = r->out.outcome == LR_STEP_SUSPEND ? r->out.suspend_reason : NULL;
    a.resume_in_ms = r->out.outcome == LR_STEP_SUSPEND ? r->out.resume_in_ms : -1;
    a.wait_event = r->out.outcome == LR_STEP_SUSPEND && r->out.wait_event[0] ? r->out.wait_event : NULL;
    a.event_reason = reason;
    a.lease_seconds = w->cfg.lease_seconds;
    a.state_version = lr_state_version();
    a.events = lr_events_step_count(&r->out);
    if (r->out.outcome == LR_STEP_STOP) {
        snprintf(r->error, sizeof(r->error), "%s", r->out.error);
    }
    lr_run_set_state(r, LR_RUN_CHECKPOINTING);
    r->ckpt_sent_ms = lr_worker_now(w);
    lr_run_io_begin(r, LR_IO_DB);
    rc = lr_store_checkpoint(w->pg, &a, checkpoint_cb, r);
    if (rc != 0) {
        lr_run_io_end(r, LR_IO_DB);
        lr_error("task.checkpoint_queue_failed", "cannot queue checkpoint of task %s: %s", r->id, lr_strerror(rc));
        r->abandon = true;
        lr_run_requeue(r);
    }
}

static void checkpoint_committed(lr_run_t *r) {
    lr_worker_t *w = r->w;
    w->on_progress(r); /* claims is 0 again: the suspect slot is free */
    r->step++;
    r->slice_steps++;
    r->used.tokens_in += r->out.tokens_in;
    r->used.tokens_out += r->out.tokens_out;
    r->used.cost_usd += r->out.cost_usd;
    lr_run_add_usage(r, r->out.tool_calls_count, (long)(lr_worker_now(w) - r->step_start_ms));
    if (r->out.model != NULL) {
        r->outage_ms = -1; /* a model answered: the checkpoint cleared outage_since */
    }
    lr_metric_inc1(lr_wm.steps, lr_run_agent_label(r));
    lr_metric_observe(lr_wm.step_seconds, (const char *const[]){lr_run_agent_label(r)},
                      (double)(lr_worker_now(w) - r->step_start_ms) / 1000.0);
    if (r->exec->needs_history && !r->exec->keeps_conversation && r->out.messages != NULL) {
        /* Keep the in-memory step log in step with what was committed. */
        cJSON *m = cJSON_Parse(r->out.messages);
        if (r->history == NULL) {
            r->history = cJSON_CreateArray();
        }
        if (m != NULL) {
            (void)lr_state_decode(lr_state_version(), m);
        }
        cJSON_AddItemToArray(r->history, m != NULL ? m : cJSON_CreateArray());
    }
    /* the conversation or the step log holds the step's messages now */
    lr_run_mem_step_done(r, r->out.messages != NULL ? LR_MEM_STATE_FACTOR * strlen(r->out.messages) : 0);
    w->steps_done++;
    r->log.step = r->step;
    switch (r->status) {
    case LR_ST_RUNNING: start_step(r); return;
    case LR_ST_QUEUED: r->follow = LR_FOLLOW_CONTINUATION; break;
    case LR_ST_DEAD:
        r->follow = LR_FOLLOW_DEAD;
        w->tasks_finished++;
        LR_LOG(LR_LOG_WARN, &r->log, "task.dead", "task dead-lettered: %s", r->reason);
        break;
    case LR_ST_SUSPENDED:
        r->follow = LR_FOLLOW_ACK;
        lr_metric_inc1(lr_wm.suspensions, r->reason);
        LR_LOG(LR_LOG_INFO, &r->log, "task.suspended", "task suspended: %s", r->reason);
        break;
    default: /* succeeded, cancelled */
        r->follow = LR_FOLLOW_OUTCOME;
        w->tasks_finished++;
        LR_LOG(LR_LOG_INFO, &r->log, "task.finished", "task %s after %d steps", lr_status_name(r->status), r->step);
        break;
    }
    lr_followup_publish(r);
}

void lr_step_fenced(lr_run_t *r, const char *what) {
    r->fenced = true;
    lr_metric_add(lr_wm.fencing_rejections, NULL, 1);
    LR_LOG(LR_LOG_WARN, &r->log, "task.fenced",
           "%s rejected: a newer owner holds the task (epoch %lld is stale); abandoning locally", what,
           (long long)r->epoch);
    lr_run_finish(r, LR_RUN_OUT_FENCED, true);
}

static void checkpoint_cb(const lr_store_write_res_t *res, void *arg) {
    lr_run_t *r = arg;
    lr_run_io_end(r, LR_IO_DB);
    if (res->err != 0) {
        LR_LOG(LR_LOG_ERROR, &r->log, "task.checkpoint_failed", "checkpoint failed: %s", res->errmsg);
        /* A statement error is not transient by retrying the same write;
         * give the task back (the message is redelivered; crash-loop
         * accounting bounds the retries). */
        lr_run_requeue(r);
        return;
    }
    if (res->fenced) {
        lr_step_fenced(r, "checkpoint");
        return;
    }
    lr_metric_observe(lr_wm.checkpoint_seconds, NULL, (double)(lr_worker_now(r->w) - r->ckpt_sent_ms) / 1000.0);
    r->lease_from_ms = r->ckpt_sent_ms; /* the checkpoint renewed the lease (if it kept it) */
    if (r->status == LR_ST_RUNNING) {
        r->lease_until_ms = r->ckpt_sent_ms + (uint64_t)r->w->cfg.lease_seconds * 1000u;
    }
    if (res->status != NULL && lr_status_parse(res->status) != r->status &&
        lr_status_parse(res->status) != LR_ST_COUNT) {
        /* An operator cancelled the task meanwhile: it stops here. */
        r->status = lr_status_parse(res->status);
        snprintf(r->reason, sizeof(r->reason), "cancelled");
        snprintf(r->error, sizeof(r->error), "%s", res->error != NULL ? res->error : "");
    }
    lr_events_step(r, res->event_seq, r->status);
    checkpoint_committed(r);
}

static void step_done(lr_run_t *r) {
    lr_worker_t *w = r->w;
    lr_run_io_end(r, LR_IO_STEP);
    if (r->state == LR_RUN_DONE) {
        lr_run_maybe_free(r);
        return;
    }
    if (r->out.messages != NULL && lr_state_version() != 1) {
        /* Store the step in this worker's state shape (version 1 is neutral). */
        cJSON *m = cJSON_Parse(r->out.messages);
        char *enc = NULL;
        if (m != NULL) {
            lr_state_encode(m);
            enc = cJSON_PrintUnformatted(m);
            cJSON_Delete(m);
        }
        if (enc != NULL) {
            free(r->out.messages);
            r->out.messages = enc;
        }
    }
    if (r->out.outcome == LR_STEP_SUSPEND &&
        (strcmp(r->out.suspend_reason, "provider_unavailable") == 0 ||
         strcmp(r->out.suspend_reason, "rate_limited") == 0 || strcmp(r->out.suspend_reason, "spend_cap") == 0) &&
        (r->out.messages == NULL || strcmp(r->out.messages, "[]") == 0)) {
        /* A park in a provider outage, behind a rate limit or a spend cap
         * added nothing: no step row, so that waiting again and again does
         * not use up max_steps. */
        lr_step_transition(r, LR_ST_SUSPENDED, r->out.suspend_reason, NULL, NULL, r->out.resume_in_ms, 0);
        return;
    }
    switch (r->out.outcome) {
    case LR_STEP_CONTINUE:
    case LR_STEP_FINISHED:
    case LR_STEP_SUSPEND:
    case LR_STEP_STOP: checkpoint(r); return;
    case LR_STEP_FAIL_PERMANENT:
        LR_LOG(LR_LOG_WARN, &r->log, "task.step_failed", "permanent failure: %s", r->out.error);
        lr_step_transition(r, LR_ST_DEAD, r->out.stop_reason[0] ? r->out.stop_reason : "permanent_error", r->out.error,
                           r->out.stop_reason[0] ? r->out.stop_reason : "permanent_error", -1, 0);
        return;
    case LR_STEP_ABANDONED:
        r->abandon = true; /* handed back with a continuation (if it is still ours) */
        lr_step_transition(r, LR_ST_QUEUED, "abandoned", NULL, NULL, -1, 0);
        return;
    default: {
        long delay;
        if (r->attempt + 1 >= r->max_attempts) {
            LR_LOG(LR_LOG_WARN, &r->log, "task.exhausted", "attempt %d of %d failed: %s", r->attempt + 1,
                   r->max_attempts, r->out.error);
            lr_step_transition(r, LR_ST_DEAD, "exhausted", r->out.error, "exhausted", -1, 1);
            return;
        }
        delay = lr_backoff_ms(w->cfg.retry_base_ms, w->cfg.retry_max_ms, r->attempt);
        LR_LOG(LR_LOG_INFO, &r->log, "task.retry_wait", "attempt %d of %d failed (%s); retrying in %ld ms",
               r->attempt + 1, r->max_attempts, r->out.error, delay);
        lr_metric_add(lr_wm.retries, NULL, 1);
        lr_step_transition(r, LR_ST_RETRY_WAIT, "transient_error", r->out.error, NULL, delay, 1);
        return;
    }
    }
}

/* ------------------------------------------------------------- transitions */

static void transition_cb(const lr_store_write_res_t *res, void *arg) {
    lr_run_t *r = arg;
    lr_run_io_end(r, LR_IO_DB);
    if (res->err == LR_ECONN) {
        lr_run_requeue(r);
        return;
    }
    if (res->err != 0) {
        LR_LOG(LR_LOG_ERROR, &r->log, "task.transition_failed", "transition to %s failed: %s",
               lr_status_name(r->status), res->errmsg);
        lr_run_requeue(r);
        return;
    }
    if (res->ambiguous) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.transition_ambiguous",
               "the transition to %s committed before the "
               "connection broke, or a newer owner holds the task; ending here",
               lr_status_name(r->status));
        lr_run_finish(r, LR_RUN_OUT_DROPPED, true);
        return;
    }
    if (res->fenced) {
        lr_step_fenced(r, "transition");
        return;
    }
    if (res->recovered) {
        LR_LOG(LR_LOG_INFO, &r->log, "task.transition_recovered",
               "the transition to %s had committed before "
               "the connection broke; sending its follow-ups",
               lr_status_name(r->status));
    }
    if (res->status != NULL && lr_status_parse(res->status) == LR_ST_CANCELLED && r->status != LR_ST_CANCELLED) {
        /* An operator cancelled the task meanwhile: the wait became the end. */
        LR_LOG(LR_LOG_INFO, &r->log, "task.cancelled_meanwhile", "cancelled by an operator instead of %s",
               lr_status_name(r->status));
        r->status = LR_ST_CANCELLED;
        snprintf(r->reason, sizeof(r->reason), "cancelled");
    }
    lr_events_transition(r, res->event_seq, r->status);
    if (r->status == LR_ST_DEAD) {
        r->w->tasks_finished++;
        r->follow = LR_FOLLOW_DEAD;
        LR_LOG(LR_LOG_WARN, &r->log, "task.dead", "task dead-lettered: %s: %s", r->reason, r->error);
    } else if (r->status == LR_ST_CANCELLED) {
        /* the operator's reason, as the row has it, goes into the outcome */
        snprintf(r->error, sizeof(r->error), "%s", res->error != NULL ? res->error : "");
        r->w->tasks_finished++;
        r->follow = LR_FOLLOW_OUTCOME;
        LR_LOG(LR_LOG_INFO, &r->log, "task.finished", "task cancelled after %d steps", r->step);
    } else if (r->status == LR_ST_QUEUED && (r->abandon || strcmp(r->reason, "drain") == 0)) {
        /* (state_version_too_new is only acked: the outbox republishes it
         * after its grace, which paces old workers instead of a hot loop.)
         * Claimed after the drain began and handed back untouched, or
         * released at the drain deadline: publish it again for another
         * worker, then ack (acking alone would strand it until the outbox
         * sweep; giving the delivery back would count against the queue's
         * delivery limit, so 20 drains would dead-letter a healthy task). */
        r->follow = LR_FOLLOW_CONTINUATION;
    } else {
        r->follow = LR_FOLLOW_ACK;
    }
    lr_followup_publish(r);
}

void lr_step_transition(lr_run_t *r, enum lr_status status, const char *reason, const char *error,
                        const char *stop_reason, long resume_in_ms, int attempt_inc) {
    lr_store_transition_args_t a;
    int rc;

    r->status = status;
    snprintf(r->reason, sizeof(r->reason), "%s", stop_reason != NULL ? stop_reason : reason);
    snprintf(r->error, sizeof(r->error), "%s", error != NULL ? error : "");
    snprintf(r->tr_reason, sizeof(r->tr_reason), "%s", reason);
    snprintf(r->tr_stop, sizeof(r->tr_stop), "%s", stop_reason != NULL ? stop_reason : "");
    memset(&a, 0, sizeof(a));
    a.id = r->id;
    a.epoch = r->epoch;
    a.status = lr_status_name(status);
    a.worker = r->w->id;
    a.reason = r->tr_reason;
    a.error = error != NULL ? r->error : NULL;
    a.stop_reason = stop_reason != NULL ? r->tr_stop : NULL;
    a.resume_in_ms = resume_in_ms;
    a.attempt_inc = attempt_inc;
    a.suspend_reason = status == LR_ST_RETRY_WAIT ? "retry" : status == LR_ST_SUSPENDED ? r->tr_reason : NULL;
    lr_run_set_state(r, LR_RUN_TRANSITION);
    lr_run_io_begin(r, LR_IO_DB);
    rc = lr_store_transition(r->w->pg, &a, transition_cb, r);
    if (rc != 0) {
        lr_run_io_end(r, LR_IO_DB);
        lr_run_requeue(r);
    }
}

void lr_step_next(lr_run_t *r) {
    if (r->w->draining) {
        /* Claimed but not started: release it untouched. */
        lr_step_transition(r, LR_ST_QUEUED, "drain", NULL, NULL, -1, 0);
        r->abandon = false;
        return;
    }
    start_step(r);
}

void lr_step_cancel(lr_run_t *r) {
    if (r->exec->cancel != NULL) {
        r->exec->cancel(r);
    }
    lr_run_io_end(r, LR_IO_STEP);
}

void lr_step_cancel_task(lr_run_t *r) {
    bool in_step = r->state == LR_RUN_STEPPING && (r->io & LR_IO_STEP);
    r->cancel_now = false;
    if (in_step) {
        /* HTTP requests removed from curl, timers stopped, the call's memory
         * charge released; the executor's done() never runs.  Nothing of
         * the step is written: the step log ends at the last checkpoint. */
        lr_step_cancel(r);
    }
    r->log.step = r->step;
    LR_LOG(LR_LOG_INFO, &r->log, "task.cancelling", "cancelled by an operator %s step %d; writing the cancellation",
           in_step ? "during" : "before", r->step + 1);
    lr_step_transition(r, LR_ST_CANCELLED, "cancelled", NULL, "cancelled", -1, 0);
}
