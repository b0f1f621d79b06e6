/*
 * run.c - a run's life: one delivery of a task, from its arrival to the one
 * place it is freed.
 *
 * Design.  A run is a state machine (run_fsm.h): lr_run_set_state() is the
 * only writer of r->state, checks every move against run_fsm.c's table and
 * traces it, as curl's mstate() does.  Its outstanding I/O is a set of typed
 * bits (r->io: a statement, a publish, a step, the backoff timer; libuv's
 * split of handles and requests), not a hand-kept counter; a run is freed in
 * run_maybe_free() only, once it is DONE and no I/O refers to it.
 *
 * This file also holds the accessors executors use (worker.h).
 */
#include "core.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

static const char *const status_names[LR_ST_COUNT] = {
    [LR_ST_RUNNING] = "running",       [LR_ST_QUEUED] = "queued",       [LR_ST_SUCCEEDED] = "succeeded",
    [LR_ST_FAILED] = "failed",         [LR_ST_DEAD] = "dead",           [LR_ST_SUSPENDED] = "suspended",
    [LR_ST_RETRY_WAIT] = "retry_wait", [LR_ST_CANCELLED] = "cancelled",
};

const char *lr_status_name(enum lr_status s) { return s < LR_ST_COUNT ? status_names[s] : "?"; }

enum lr_status lr_status_parse(const char *s) {
    for (int i = 0; s != NULL && i < LR_ST_COUNT; i++) {
        if (strcmp(s, status_names[i]) == 0) {
            return (enum lr_status)i;
        }
    }
    return LR_ST_COUNT;
}

uint64_t lr_worker_now(lr_worker_t *w) {
    uv_update_time(w->loop);
    return uv_now(w->loop);
}

long lr_backoff_ms(long base, long max, int n) {
    double cap = (double)base * pow(2.0, n > 30 ? 30 : n);
    unsigned int rnd = 0;
    if (cap > (double)max) {
        cap = (double)max;
    }
    if (getrandom(&rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        rnd = (unsigned int)rand();
    }
    return (long)(cap * ((double)rnd / (double)UINT32_MAX));
}

/* ---------------------------------------------------------------- accessors */

void lr_step_reset(lr_step_t *s) {
    free(s->messages);
    free(s->tool_calls);
    free(s->result);
    free(s->model);
    free(s->fallback);
    memset(s, 0, sizeof(*s));
    s->resume_in_ms = -1;
}

const char *lr_run_id(const lr_run_t *r) { return r->id; }
int lr_run_step_no(const lr_run_t *r) { return r->step; }
int64_t lr_run_epoch(const lr_run_t *r) { return r->epoch; }
const cJSON *lr_run_input(const lr_run_t *r) { return r->input; }
const char *lr_run_agent(const lr_run_t *r) { return r->agent; }

const char *lr_run_agent_label(const lr_run_t *r) {
    if (r->agent[0] != '\0' &&
        (r->exec != NULL || (r->w->find_executor != NULL && r->w->find_executor(r->agent) != NULL))) {
        return r->agent;
    }
    return "unknown";
}
const cJSON *lr_run_history(const lr_run_t *r) { return r->history; }
void **lr_run_exec_state(lr_run_t *r) { return &r->exec_state; }
const char *lr_run_budgets_json(const lr_run_t *r) { return r->budgets_json; }
const char *lr_run_tenant(const lr_run_t *r) { return r->tenant; }
lr_worker_t *lr_run_worker(lr_run_t *r) { return r->w; }
bool lr_run_lease_ok(lr_run_t *r) { return r->lease_until_ms != 0 && lr_worker_now(r->w) < r->lease_until_ms; }
lr_http_t *lr_worker_http(lr_worker_t *w) { return w->http; }
struct lr_mcp *lr_worker_mcp(lr_worker_t *w) {
    return w->mcp;
}
struct lr_mem *lr_worker_mem(lr_worker_t *w) {
    return &w->mem;
}
uv_loop_t *lr_worker_loop(lr_worker_t *w) { return w->loop; }
lr_pg_pool_t *lr_worker_pg(lr_worker_t *w) { return w->pg; }
const lr_config_t *lr_worker_config(const lr_worker_t *w) { return &w->cfg; }
const char *lr_worker_id(const lr_worker_t *w) { return w->id; }
bool lr_worker_test_hooks(const lr_worker_t *w) { return w->test_hooks; }

void lr_run_usage(const lr_run_t *r, lr_run_usage_t *u) {
    *u = r->used;
    u->step = r->step;
    u->outage_ms = r->outage_ms < 0 ? -1 : r->outage_ms + (long)(lr_worker_now(r->w) - r->claim_sent_ms);
    u->wall_ms = r->used.wall_ms + (long)(lr_worker_now(r->w) - r->claim_sent_ms);
}

void lr_run_add_usage(lr_run_t *r, long tool_calls, long active_ms) {
    r->used.tool_calls += tool_calls;
    r->used.active_ms += active_ms;
}

/* ---------------------------------------------------------------- lifecycle */

lr_run_t *lr_run_new(lr_worker_t *w, lr_amqp_delivery_t *d) {
    lr_run_t *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        return NULL;
    }
    r->w = w;
    r->d = d;
    r->state = LR_RUN_NEW;
    r->log.task_id = NULL;
    r->log.step = -1;
    r->log.epoch = -1;
    r->out.resume_in_ms = -1;
    r->outage_ms = -1;
    lr_list_init(&r->defer_link);
    lr_list_push_front(&w->runs, &r->link);
    w->nruns++;
    return r;
}

bool lr_run_set_state_at(lr_run_t *r, enum lr_run_state s, const char *fn, int line) {
    if (!lr_run_move_ok((int)r->state, (int)s)) {
        LR_LOG(LR_LOG_ERROR, &r->log, "task.bad_state", "refused move %s -> %s (%s:%d): not in the table",
               lr_run_state_name((int)r->state), lr_run_state_name((int)s), fn, line);
        return false;
    }
    if (lr_log_threshold <= LR_LOG_DEBUG) {
        lr_log_emit(LR_LOG_DEBUG, &r->log, "task.state", "%s -> %s (%s:%d)", lr_run_state_name((int)r->state),
                    lr_run_state_name((int)s), fn, line);
    }
    r->state = s;
    return true;
}

void lr_run_io_begin(lr_run_t *r, unsigned io) {
    if (r->io & io) {
        LR_LOG(LR_LOG_ERROR, &r->log, "task.bad_io", "I/O %#x started twice in state %s", io,
               lr_run_state_name((int)r->state));
    }
    r->io |= io;
}

void lr_run_io_end(lr_run_t *r, unsigned io) { r->io &= ~io; }

void lr_run_mem_set(lr_run_t *r, size_t n) {
    if (n > r->mem_charged) {
        lr_mem_charge(&r->w->mem, n - r->mem_charged);
    } else if (n < r->mem_charged) {
        lr_mem_release(&r->w->mem, r->mem_charged - n);
    }
    r->mem_charged = n;
}

void lr_run_mem_adopt(lr_run_t *r, size_t n) {
    r->mem_charged += n;
    r->mem_step += n;
}

void lr_run_mem_step_done(lr_run_t *r, size_t state_bytes) {
    size_t step = r->mem_step;
    r->mem_step = 0;
    lr_mem_settled(&r->w->mem, step);
    lr_run_mem_set(r, r->mem_charged - step + state_bytes);
}

static void run_timer_closed(uv_handle_t *h) { free(h->data); }

/* Frees what the run owns (not the run itself). */
static void run_release(lr_run_t *r) {
    if (r->exec != NULL && r->exec->release != NULL) {
        r->exec->release(r);
    }
    lr_run_mem_step_done(r, 0);
    lr_run_mem_set(r, 0);
    lr_amqp_delivery_free(r->d);
    r->d = NULL;
    lr_task_msg_free(&r->msg);
    lr_step_reset(&r->out);
    cJSON_Delete(r->input);
    cJSON_Delete(r->history);
    free(r->budgets_json);
    free(r->reply_to);
    free(r->correlation_id);
    free(r->callback_url);
    free(r->tenant);
}

static void run_unlink(lr_run_t *r) {
    lr_list_remove(&r->link);
    lr_list_remove(&r->defer_link);
    r->w->nruns--;
}

void lr_run_maybe_free(lr_run_t *r) {
    lr_worker_t *w = r->w;
    if (r->state != LR_RUN_DONE || r->io != 0) {
        return;
    }
    run_unlink(r);
    run_release(r);
    if (r->timer_init) {
        r->retry_timer.data = r;
        uv_close((uv_handle_t *)&r->retry_timer, run_timer_closed);
    } else {
        free(r);
    }
    if (w->on_run_freed != NULL) {
        w->on_run_freed(w);
    }
}

void lr_run_finish(lr_run_t *r, enum lr_run_outcome o, bool ack) {
    lr_worker_t *w = r->w;
    if (w->on_progress != NULL) {
        w->on_progress(r);
    }
    if (r->d != NULL) {
        (void)(ack ? lr_amqp_ack(w->amqp, r->d) : lr_amqp_reject(w->amqp, r->d, true));
        lr_amqp_delivery_free(r->d);
        r->d = NULL;
    }
    if (!lr_run_outcome_ok((int)r->state, (int)o)) {
        LR_LOG(LR_LOG_ERROR, &r->log, "task.bad_outcome", "outcome %s from state %s is not in the table",
               lr_run_outcome_name((int)o), lr_run_state_name((int)r->state));
    }
    r->outcome = o;
    r->state = LR_RUN_DONE; /* (every state reaches DONE: checked just above) */
    if (lr_log_threshold <= LR_LOG_DEBUG) {
        lr_log_emit(LR_LOG_DEBUG, &r->log, "task.state", "-> done (%s)", lr_run_outcome_name((int)o));
    }
    lr_run_maybe_free(r);
}

void lr_run_requeue(lr_run_t *r) {
    lr_worker_t *w = r->w;
    if (r->epoch > 0 && r->d != NULL && !w->stopping && w->hand_back != NULL && !r->handing_back) {
        w->hand_back(r);
        return;
    }
    lr_run_finish(r, LR_RUN_OUT_REQUEUED, false);
}

void lr_run_drop(lr_run_t *r, enum lr_run_outcome o) { lr_run_finish(r, o, true); }

void lr_run_free_all(lr_worker_t *w) {
    while (!lr_list_empty(&w->runs)) {
        lr_run_t *r = lr_list_entry(lr_list_first(&w->runs), lr_run_t, link);
        run_unlink(r);
        run_release(r);
        free(r); /* (the loop is closed: its timer is gone with it) */
    }
}
