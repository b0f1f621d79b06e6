/*
 * worker.c - the durable execution core of longrun-worker.
 *
 * Design.  One libuv loop thread owns everything here.  Each delivery from
 * RabbitMQ becomes an lr_run_t, a state machine (enum run_state, one
 * set_state() that traces old -> new with the line) that goes:
 *
 *   CLAIMING -> [INSERTING] -> [LOADING] -> STEPPING -> CHECKPOINTING
 *            -> STEPPING ... -> (slice end / finish / suspend / stop)
 *            -> PUBLISHING (continuation, result, dead letter) -> DONE
 *
 * PostgreSQL is the truth: a claim bumps the fencing epoch; every write is
 * conditional on it; a checkpoint appends the step row and advances the task
 * row in one statement (worker/sql.h).  RabbitMQ carries dispatch only: a
 * delivery is acked after the state it led to is committed and any follow-up
 * message (continuation, dead letter, result) is confirmed by the broker.
 *
 * Failure rules (docs/architecture.md):
 *  - fenced (zero rows): abandon locally, ack, never retry the write;
 *  - checkpoint lost with the connection (ambiguous): look for the step row
 *    with our epoch; present = committed, absent = retry the checkpoint;
 *  - a transient step failure parks the task in retry_wait (attempt + 1) or
 *    dead-letters it when attempts are exhausted; permanent ones dead-letter;
 *  - malformed messages are recorded in dead_letters with their raw bytes and
 *    published to longrun.dlx with the reason, then acked;
 *  - SIGTERM: stop consuming, let steps finish and checkpoint with a
 *    release, publish continuations, ack; at the drain deadline, release the
 *    leases of steps still running (they run again elsewhere) and exit.
 *
 * Ownership: a run owns its delivery (until acked), its parsed message and
 * its executor state.  A run is freed only when no database query, publish or
 * step refers to it (run->pending == 0) and it reached DONE.
 */
#include "worker.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "log.h"
#include "text.h"
#include "migrations.h"
#include "sql.h"
#include "health.h"
#include "wmetrics.h"
#include "agents.h"
#include "breaker.h"
#include "state.h"
#include "store.h"

enum run_state {
    RUN_CLAIMING,      /* claim statement in flight */
    RUN_INSERTING,     /* creating the row of a task first seen on the broker */
    RUN_LOADING,       /* loading the step log (executors that need history) */
    RUN_STEPPING,      /* a step is running in the executor */
    RUN_CHECKPOINTING, /* the step's checkpoint is in flight */
    RUN_VERIFYING,     /* checking whether an ambiguous checkpoint committed */
    RUN_TRANSITION,    /* a transition without a step is in flight */
    RUN_PUBLISHING,    /* continuation / dead letter / result publish in flight */
    RUN_DONE,          /* acked (or dropped); freed when nothing refers to it */
};

static const char *const run_state_names[] = {"claiming", "inserting", "loading", "stepping",
                                              "checkpointing", "verifying", "transition",
                                              "publishing", "done"};

/* What the run does once its state is committed. */
enum run_after {
    AFTER_NOTHING = 0,
    AFTER_CONTINUE,     /* next step */
    AFTER_CONTINUATION, /* publish {"id"} to the task queue, then ack */
    AFTER_DEAD,         /* publish the dead letter to longrun.dlx, then ack */
    AFTER_FINISHED,     /* publish the outcome (reply_to), then ack */
    AFTER_ACK,          /* just ack */
};

struct lr_run {
    lr_worker_t *w;
    lr_run_t *prev, *next;       /* worker's list of runs */
    lr_amqp_delivery_t *d;       /* owned until acked */
    lr_task_msg_t msg;           /* parsed body (owned) */
    enum run_state state;
    enum run_after after;
    int pending;                 /* queries / publishes / steps referring to this run */
    bool fenced;
    bool abandon;                /* stop at the next boundary (drain deadline) */
    bool stepping;               /* the executor holds a step */
    bool claim_may_suspect;      /* its claim in flight may take a suspect task */
    lr_run_t *defer_next;        /* in the worker's list of deferred suspects */
    char id[LR_UUID_LEN + 1];
    char queue[LR_TASK_MAX_AGENT + 1];
    char agent[LR_TASK_MAX_AGENT + 1];
    char *reply_to;
    char *correlation_id;
    char *callback_url;
    char *tenant;
    int64_t epoch;
    int step;                    /* last checkpointed step */
    int attempt, max_attempts;
    long tokens_in, tokens_out;
    double cost_usd;
    int slice_steps;             /* steps done in this delivery */
    uint64_t slice_start_ms;
    uint64_t step_start_ms;
    uint64_t ckpt_sent_ms;
    uint64_t lease_from_ms;      /* the last committed checkpoint that extended the lease was sent then */
    cJSON *input;                /* owned */
    char *budgets_json;          /* owned: the task's budgets object as stored */
    long tool_calls_total;       /* usage before this delivery (from the claim) */
    long active_ms;
    cJSON *history;              /* owned: array of per-step message arrays */
    const lr_executor_t *exec;
    void *exec_state;
    lr_step_t out;               /* the current step's output */
    char final_status[16];       /* status written by the last transition */
    char reason[32];
    char error[512];
    int publish_tries;
    /* Retrying statements whose outcome a broken connection hid: */
    int db_retries;
    bool reclaim;                /* our claim may have committed: take our own live lease back */
    char tr_reason[40], tr_stop[40]; /* the last transition's arguments */
    uv_timer_t retry_timer;      /* publish retry backoff */
    bool timer_init;
    lr_log_ctx_t log;
};

struct lr_worker {
    uv_loop_t *loop;
    lr_config_t cfg;
    char id[128];
    char hostname[128];
    char queues_csv[1024];
    const char **queue_names;    /* full names longrun.q.<name> */
    const char **queue_short;
    int nqueues;
    lr_pg_pool_t *pg;
    lr_amqp_t *amqp;
    lr_http_t *http;
    uv_signal_t sigterm, sigint, sigquit, sighup;
    uv_timer_t lease_timer;
    uv_timer_t drain_timer;
    lr_run_t *runs;
    int nruns;
    bool draining;
    bool stopping;
    bool amqp_up;
    int pg_usable;
    bool test_hooks;
    int exit_code;
    int closing;                 /* components still closing */
    uint64_t steps_done;
    uint64_t tasks_finished;
    lr_health_t *health;
    uv_timer_t health_timer;
    int schema_state;            /* 0 unknown, 1 ok, -1 incompatible */
    char schema_msg[160];
    bool renew_failing;           /* the last lease renewal failed */
    uint64_t renew_ok_sent_ms;    /* when the last successful renewal was sent */
    /* Crash-loop attribution: a task whose last suspect_claims() (2) claims
     * made no progress is a suspect.  At most one suspect runs per worker
     * until its first checkpoint; the others wait unclaimed, so a poison task
     * that kills the process cannot drag the claim counts of the tasks that
     * share its worker up to crash_loop with it (a bystander's count stays at
     * most suspect_claims(), within the limit).  A single crash makes no
     * suspect, so the recovery of a dead worker's tasks is not serialized. */
    lr_run_t *suspect;            /* the suspect claimed and not yet checkpointed */
    bool suspect_claiming;        /* a claim that may take a suspect is in flight */
    lr_run_t *deferred, *deferred_tail;
};

static void run_next(lr_run_t *r);
static void run_load(lr_run_t *r);
static void tenant_bounce(lr_run_t *r, int running);
static void tenant_cb(const lr_store_count_res_t *res, void *arg);
static void run_publish_followup(lr_run_t *r);
static void run_transition(lr_run_t *r, const char *status, const char *reason, const char *error,
                           const char *stop_reason, long resume_in_ms, int attempt_inc);
static void worker_maybe_exit(lr_worker_t *w);
static void suspect_next(lr_worker_t *w);

/* ---------------------------------------------------------------- helpers */

static uint64_t now_ms(lr_worker_t *w) {
    uv_update_time(w->loop);
    return uv_now(w->loop);
}

void lr_step_reset(lr_step_t *s) {
    free(s->messages);
    free(s->tool_calls);
    free(s->result);
    free(s->model);
    memset(s, 0, sizeof(*s));
    s->resume_in_ms = -1;
}

const char *lr_run_id(const lr_run_t *r) { return r->id; }
int lr_run_step_no(const lr_run_t *r) { return r->step; }
int64_t lr_run_epoch(const lr_run_t *r) { return r->epoch; }
const cJSON *lr_run_input(const lr_run_t *r) { return r->input; }
const char *lr_run_agent(const lr_run_t *r) { return r->agent; }
const cJSON *lr_run_history(const lr_run_t *r) { return r->history; }
void **lr_run_exec_state(lr_run_t *r) { return &r->exec_state; }
lr_worker_t *lr_run_worker(lr_run_t *r) { return r->w; }
lr_http_t *lr_worker_http(lr_worker_t *w) { return w->http; }
uv_loop_t *lr_worker_loop(lr_worker_t *w) { return w->loop; }
lr_pg_pool_t *lr_worker_pg(lr_worker_t *w) { return w->pg; }
const lr_config_t *lr_worker_config(const lr_worker_t *w) { return &w->cfg; }
const char *lr_worker_id(const lr_worker_t *w) { return w->id; }
bool lr_worker_test_hooks(const lr_worker_t *w) { return w->test_hooks; }

#define set_state(r, s) set_state_at((r), (s), __LINE__)
static void set_state_at(lr_run_t *r, enum run_state s, int line) {
    if (lr_log_threshold <= LR_LOG_DEBUG) {
        lr_log_emit(LR_LOG_DEBUG, &r->log, "task.state", "%s -> %s (line %d)",
                    run_state_names[r->state], run_state_names[s], line);
    }
    r->state = s;
}

/* Full-jitter exponential backoff: random in [0, min(max, base * 2^n)]. */
static long backoff_ms(long base, long max, int n) {
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

static lr_executor_t const *find_executor(const char *agent) {
    if (strcmp(agent, "http-steps") == 0) {
        return &lr_exec_http_steps;
    }
    if (lr_agents_find(agent) != NULL) {
        return &lr_exec_agent;
    }
    return NULL;
}

const char *lr_run_budgets_json(const lr_run_t *r) { return r->budgets_json; }
const char *lr_run_tenant(const lr_run_t *r) { return r->tenant; }

void lr_run_usage(const lr_run_t *r, lr_run_usage_t *u) {
    u->step = r->step;
    u->tokens_in = r->tokens_in;
    u->tokens_out = r->tokens_out;
    u->cost_usd = r->cost_usd;
    u->tool_calls = r->tool_calls_total;
    u->active_ms = r->active_ms;
}

void lr_run_add_usage(lr_run_t *r, long tool_calls, long active_ms) {
    r->tool_calls_total += tool_calls;
    r->active_ms += active_ms;
}

/* ------------------------------------------------------------ run lifecycle */

static lr_run_t *run_new(lr_worker_t *w, lr_amqp_delivery_t *d) {
    lr_run_t *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        return NULL;
    }
    r->w = w;
    r->d = d;
    r->log.task_id = NULL;
    r->log.step = -1;
    r->log.epoch = -1;
    r->out.resume_in_ms = -1;
    r->next = w->runs;
    if (w->runs != NULL) {
        w->runs->prev = r;
    }
    w->runs = r;
    w->nruns++;
    return r;
}

static void run_timer_closed(uv_handle_t *h) {
    lr_run_t *r = h->data;
    free(r);
}

/* Frees r if it is done and nothing refers to it any more. */
static void run_maybe_free(lr_run_t *r) {
    lr_worker_t *w = r->w;
    if (r->state != RUN_DONE || r->pending > 0) {
        return;
    }
    if (r->prev != NULL) {
        r->prev->next = r->next;
    } else {
        w->runs = r->next;
    }
    if (r->next != NULL) {
        r->next->prev = r->prev;
    }
    w->nruns--;
    if (r->exec != NULL && r->exec->release != NULL) {
        r->exec->release(r);
    }
    lr_amqp_delivery_free(r->d);
    lr_task_msg_free(&r->msg);
    lr_step_reset(&r->out);
    cJSON_Delete(r->input);
    cJSON_Delete(r->history);
    free(r->budgets_json);
    free(r->reply_to);
    free(r->correlation_id);
    free(r->callback_url);
    free(r->tenant);
    if (r->timer_init) {
        r->timer_init = false;
        uv_close((uv_handle_t *)&r->retry_timer, run_timer_closed);
    } else {
        free(r);
    }
    worker_maybe_exit(w);
}

/* Acks the delivery (if still held) and ends the run. */
static void suspect_release(lr_run_t *r);

static void run_done(lr_run_t *r) {
    suspect_release(r);
    if (r->d != NULL) {
        (void)lr_amqp_ack(r->w->amqp, r->d);
        lr_amqp_delivery_free(r->d);
        r->d = NULL;
    }
    set_state(r, RUN_DONE);
    run_maybe_free(r);
}

/* Gives the delivery back to the broker without a decision (drain deadline,
 * lost database): the message is redelivered elsewhere. */
static void run_requeue(lr_run_t *r) {
    suspect_release(r);
    if (r->d != NULL) {
        (void)lr_amqp_reject(r->w->amqp, r->d, true);
        lr_amqp_delivery_free(r->d);
        r->d = NULL;
    }
    set_state(r, RUN_DONE);
    run_maybe_free(r);
}

/* ------------------------------------------------------ malformed messages */

typedef struct dead_msg {
    lr_worker_t *w;
    lr_amqp_delivery_t *d;
    char reason[32];
    char error[512];
    char key[256];
    bool safe;                   /* record only what PostgreSQL surely accepts */
} dead_msg_t;

/* Replaces every byte that is not part of valid UTF-8 with '?' (in place). */
static void utf8_scrub(char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t k = lr_utf8_seq_len((unsigned char *)s + i, n - i);
        if (k == 0) {
            s[i++] = '?';
        } else {
            i += k;
        }
    }
}

static void dead_msg_free(dead_msg_t *m) {
    lr_amqp_delivery_free(m->d);
    free(m);
}

static void dead_msg_published(int err, void *arg) {
    dead_msg_t *m = arg;
    if (err != 0) {
        /* The record is committed; the DLX copy is for AMQP-side tooling.
         * Ack anyway: the dead letter is never lost, it is in PostgreSQL. */
        lr_warn("dead_letter.publish_failed", "could not publish dead letter %s to %s: %s", m->key,
                LR_AMQP_DLX, lr_strerror(err));
    }
    (void)lr_amqp_ack(m->w->amqp, m->d);
    dead_msg_free(m);
}

static void dead_msg_recorded(const lr_store_dead_message_res_t *res, void *arg);

static void dead_msg_record(dead_msg_t *m) {
    lr_amqp_delivery_t *d = m->d;
    lr_store_dead_message_args_t a;
    bool mid_ok;
    int rc;

    /* The raw bytes always go in (bytea); the parsed body, the message id
     * and the headers only when PostgreSQL will surely take them, and not at
     * all in safe mode (after the server refused them): a malformed message
     * must never fail its own dead-letter record. */
    mid_ok = !m->safe && d->message_id != NULL && lr_pg_text_ok(d->message_id, strlen(d->message_id));
    memset(&a, 0, sizeof(a));
    a.body = d->body;
    a.body_len = d->body_len;
    a.message_id = mid_ok ? d->message_id : NULL;
    a.queue = d->queue;
    a.reason = m->reason;
    a.error = m->error;
    a.headers_json = m->safe ? NULL : d->headers_json;
    a.delivery_count = d->delivery_count >= 0 ? (long long)d->delivery_count : -1;
    a.body_is_json = !m->safe && lr_json_storable(d->body, d->body_len);
    a.task_id = (mid_ok && lr_uuid_valid(d->message_id)) ? d->message_id : NULL;
    rc = lr_store_dead_message(m->w->pg, &a, dead_msg_recorded, m);
    if (rc != 0) {
        lr_error("dead_letter.query_failed", "cannot queue the dead-letter record: %s; requeueing",
                 lr_strerror(rc));
        (void)lr_amqp_reject(m->w->amqp, d, true);
        dead_msg_free(m);
    }
}

static void dead_msg_recorded(const lr_store_dead_message_res_t *res, void *arg) {
    dead_msg_t *m = arg;
    lr_amqp_msg_t msg;
    const char *headers[9];
    int rc;

    if (res->err != 0) {
        if (res->err == LR_EDB && !m->safe) {
            lr_warn("dead_letter.safe_mode", "dead letter (%s) refused by PostgreSQL (%s); recording the "
                    "raw bytes only", m->reason, res->errmsg);
            m->safe = true;
            dead_msg_record(m);
            return;
        }
        lr_error("dead_letter.record_failed", "cannot record dead letter (%s): %s; requeueing",
                 m->reason, res->errmsg);
        (void)lr_amqp_reject(m->w->amqp, m->d, true);
        dead_msg_free(m);
        return;
    }
    snprintf(m->key, sizeof(m->key), "%s", res->key);
    lr_metric_inc1(lr_wm.dead_letters, m->reason);
    lr_warn("message.dead_lettered", "message %s from %s dead-lettered: %s: %s",
            m->d->message_id != NULL ? m->d->message_id : "(no message_id)",
            m->d->queue != NULL ? m->d->queue : "?", m->reason, m->error);
    headers[0] = "x-longrun-dead-letter-key";
    headers[1] = m->key;
    headers[2] = "x-longrun-reason";
    headers[3] = m->reason;
    headers[4] = "x-longrun-error";
    headers[5] = m->error;
    headers[6] = "x-longrun-queue";
    headers[7] = m->d->queue != NULL ? m->d->queue : "";
    headers[8] = NULL;
    memset(&msg, 0, sizeof(msg));
    msg.body = m->d->body;
    msg.body_len = m->d->body_len;
    msg.message_id = m->d->message_id;
    msg.content_type = m->d->content_type;
    msg.persistent = true;
    msg.headers = headers;
    rc = lr_amqp_publish(m->w->amqp, LR_AMQP_DLX, "", &msg, dead_msg_published, m);
    if (rc != 0) {
        dead_msg_published(rc, m);
    }
}

/* Takes ownership of d. */
static void dead_letter_message(lr_worker_t *w, lr_amqp_delivery_t *d, const char *reason,
                                const char *error) {
    dead_msg_t *m = calloc(1, sizeof(*m));
    if (m == NULL) {
        (void)lr_amqp_reject(w->amqp, d, true);
        lr_amqp_delivery_free(d);
        return;
    }
    m->w = w;
    m->d = d;
    snprintf(m->reason, sizeof(m->reason), "%s", reason);
    snprintf(m->error, sizeof(m->error), "%s", error);
    utf8_scrub(m->error); /* it may quote (or cut) bytes of the body */
    dead_msg_record(m);
}

/* ------------------------------------------------------------- publishing */

static void run_published(int err, void *arg);

static void retry_timer_cb(uv_timer_t *t) {
    lr_run_t *r = t->data;
    r->pending--;
    run_publish_followup(r);
}

/* Retries a failed publish later (the broker is away); the run keeps its
 * delivery meanwhile.  On drain with the broker gone, the outbox sweep of the
 * scheduler republishes queued tasks, so the run may end. */
static void run_publish_retry(lr_run_t *r, int err) {
    long delay = backoff_ms(250, 10000, r->publish_tries);
    lr_warn("task.publish_retry", "publish for task %s failed (%s); retrying in %ld ms", r->id,
            lr_strerror(err), delay);
    if (r->w->stopping) {
        run_done(r);
        return;
    }
    if (!r->timer_init) {
        uv_timer_init(r->w->loop, &r->retry_timer);
        r->retry_timer.data = r;
        r->timer_init = true;
    }
    r->pending++;
    uv_timer_start(&r->retry_timer, retry_timer_cb, (uint64_t)delay + 1, 0);
}

/* This run's outcome message (lr_outcome_json), malloc'd. */
static char *run_outcome(const lr_run_t *r) {
    bool ok = strcmp(r->final_status, "succeeded") == 0;
    return lr_outcome_json(r->id, r->final_status, ok ? r->out.result : NULL, r->error, ok ? NULL : r->reason,
                           r->step, r->tokens_in, r->tokens_out, r->cost_usd);
}

/* Publishes what the committed state calls for, then acks (run_published). */
static void run_publish_followup(lr_run_t *r) {
    lr_worker_t *w = r->w;
    lr_amqp_msg_t msg;
    char *body = NULL;
    char key[160];
    const char *headers[7];
    int rc = 0;
    cJSON *o;

    memset(&msg, 0, sizeof(msg));
    msg.persistent = true;
    msg.content_type = "application/json";
    msg.message_id = r->id;
    set_state(r, RUN_PUBLISHING);
    switch (r->after) {
    case AFTER_CONTINUATION:
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "id", r->id);
        body = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        msg.body = body;
        msg.body_len = body != NULL ? strlen(body) : 0;
        msg.mandatory = true;
        if (body == NULL) {
            rc = LR_ENOMEM;
            break;
        }
        r->pending++;
        rc = lr_amqp_publish(w->amqp, LR_AMQP_EXCHANGE, r->queue, &msg, run_published, r);
        if (rc != 0) {
            r->pending--;
        }
        break;
    case AFTER_DEAD:
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "id", r->id);
        cJSON_AddStringToObject(o, "agent", r->agent);
        if (r->input != NULL) {
            cJSON_AddItemToObject(o, "input", cJSON_Duplicate(r->input, true));
        }
        body = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        snprintf(key, sizeof(key), "task:%s:%lld", r->id, (long long)r->epoch);
        headers[0] = "x-longrun-dead-letter-key";
        headers[1] = key;
        headers[2] = "x-longrun-reason";
        headers[3] = r->reason;
        headers[4] = "x-longrun-queue";
        headers[5] = r->queue;
        headers[6] = NULL;
        msg.headers = headers;
        msg.body = body;
        msg.body_len = body != NULL ? strlen(body) : 0;
        if (body == NULL) {
            rc = LR_ENOMEM;
            break;
        }
        r->pending++;
        rc = lr_amqp_publish(w->amqp, LR_AMQP_DLX, "", &msg, run_published, r);
        if (rc != 0) {
            r->pending--;
        }
        break;
    default:
        break;
    }
    free(body);
    if (r->after != AFTER_CONTINUATION && r->after != AFTER_DEAD) {
        run_published(0, r);
        return;
    }
    if (rc != 0) {
        run_publish_retry(r, rc);
    }
}

/* The outcome to callback_url and reply_to, best effort (not awaited before
 * the ack: the outcome is in PostgreSQL either way). */
static void run_send_reply(lr_run_t *r) {
    char *body;
    bool reply = r->reply_to != NULL && r->reply_to[0] != '\0';
    bool callback = r->callback_url != NULL && r->callback_url[0] != '\0';
    if (!reply && !callback) {
        return;
    }
    body = run_outcome(r);
    if (body == NULL) {
        return;
    }
    if (callback) {
        lr_callback_send(r->w, r->id, r->callback_url, body);
    }
    if (reply) {
        lr_amqp_publish_reply(r->w->amqp, r->reply_to, r->correlation_id, r->id, body);
    }
    free(body);
}

static void mark_published_cb(int err, void *arg) {
    lr_run_t *r = arg;
    (void)err; /* the outbox sweep covers a lost mark */
    r->pending--;
    run_done(r);
}

static void run_published(int err, void *arg) {
    lr_run_t *r = arg;
    if (r->after == AFTER_CONTINUATION || r->after == AFTER_DEAD) {
        r->pending--;
    }
    if (err != 0) {
        r->publish_tries++;
        run_publish_retry(r, err);
        return;
    }
    if (r->after == AFTER_FINISHED || r->after == AFTER_DEAD) {
        lr_metric_inc1(lr_wm.tasks_finished, r->final_status);
        if (r->after == AFTER_DEAD) {
            lr_metric_inc1(lr_wm.dead_letters, r->reason);
        }
        run_send_reply(r);
    }
    if (r->after == AFTER_CONTINUATION) {
        /* Outbox bookkeeping: the dispatch of this queued state is confirmed. */
        r->pending++;
        if (lr_store_mark_published(r->w->pg, r->id, mark_published_cb, r) != 0) {
            r->pending--;
            run_done(r);
        }
        return;
    }
    run_done(r);
}

/* --------------------------------------------------------------- stepping */

static void run_step_done(lr_run_t *r);

/* Whether the step being checkpointed ends the slice (it counts). */
static bool slice_over(lr_run_t *r) {
    lr_worker_t *w = r->w;
    const lr_agent_t *a = r->agent[0] != '\0' ? lr_agents_find(r->agent) : NULL;
    int steps = a != NULL && a->slice_steps > 0 ? a->slice_steps : w->cfg.slice_steps;
    int secs = a != NULL && a->slice_seconds > 0 ? a->slice_seconds : w->cfg.slice_seconds;
    return r->slice_steps + 1 >= steps || now_ms(w) - r->slice_start_ms >= (uint64_t)secs * 1000u;
}

static void run_start_step(lr_run_t *r) {
    int rc;
    r->log.step = r->step + 1;
    lr_step_reset(&r->out);
    r->step_start_ms = now_ms(r->w);
    set_state(r, RUN_STEPPING);
    r->pending++;
    r->stepping = true;
    rc = r->exec->start(r, &r->out, run_step_done);
    if (rc != 0) {
        r->pending--;
        r->stepping = false;
        if (rc != LR_EPERM) {
            r->out.outcome = LR_STEP_FAIL_TRANSIENT;
            snprintf(r->out.error, sizeof(r->out.error), "could not start step: %s", lr_strerror(rc));
        }
        r->pending++;
        run_step_done(r);
    }
}

static void checkpoint_cb(const lr_store_write_res_t *res, void *arg);

static const char *status_for_outcome(lr_run_t *r, bool *release, const char **reason) {
    *release = true;
    switch (r->out.outcome) {
    case LR_STEP_FINISHED:
        *reason = "succeeded";
        return "succeeded";
    case LR_STEP_SUSPEND:
        *reason = r->out.suspend_reason[0] ? r->out.suspend_reason : "suspended";
        return "suspended";
    case LR_STEP_STOP:
        *reason = r->out.stop_reason[0] ? r->out.stop_reason : "stopped";
        return "dead";
    default:
        break;
    }
    if (r->w->draining || r->abandon) {
        *reason = "drain";
        return "queued";
    }
    if (slice_over(r)) {
        *reason = "slice_end";
        return "queued";
    }
    *release = false;
    *reason = NULL;
    return "running";
}

static void run_checkpoint(lr_run_t *r) {
    lr_worker_t *w = r->w;
    lr_store_checkpoint_args_t a;
    bool release;
    const char *reason = NULL;
    const char *status = status_for_outcome(r, &release, &reason);
    long latency = (long)(now_ms(w) - r->step_start_ms);
    int rc;

    snprintf(r->final_status, sizeof(r->final_status), "%s", status);
    snprintf(r->reason, sizeof(r->reason), "%s", reason != NULL ? reason : "");
    memset(&a, 0, sizeof(a));
    a.id = r->id;
    a.epoch = r->epoch;
    a.step_no = r->step + 1;
    a.status = status;
    a.worker = w->id;
    a.messages = r->out.messages;
    a.tool_calls = r->out.tool_calls;
    a.model = r->out.model;
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
    if (r->out.outcome == LR_STEP_STOP) {
        snprintf(r->error, sizeof(r->error), "%s", r->out.error);
    }
    set_state(r, RUN_CHECKPOINTING);
    r->ckpt_sent_ms = now_ms(w);
    r->pending++;
    rc = lr_store_checkpoint(w->pg, &a, checkpoint_cb, r);
    if (rc != 0) {
        r->pending--;
        lr_error("task.checkpoint_queue_failed", "cannot queue checkpoint of task %s: %s", r->id,
                 lr_strerror(rc));
        r->abandon = true;
        run_requeue(r);
    }
}

static void run_checkpoint_committed(lr_run_t *r) {
    lr_worker_t *w = r->w;
    suspect_release(r); /* progress: claims is 0 again */
    r->step++;
    r->slice_steps++;
    r->tokens_in += r->out.tokens_in;
    r->tokens_out += r->out.tokens_out;
    r->cost_usd += r->out.cost_usd;
    lr_run_add_usage(r, r->out.tool_calls_count, (long)(now_ms(w) - r->step_start_ms));
    lr_metric_add(lr_wm.steps, NULL, 1);
    lr_metric_observe(lr_wm.step_seconds, NULL, (double)(now_ms(w) - r->step_start_ms) / 1000.0);
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
    w->steps_done++;
    r->log.step = r->step;
    if (strcmp(r->final_status, "running") == 0) {
        run_start_step(r);
        return;
    }
    if (strcmp(r->final_status, "queued") == 0) {
        r->after = AFTER_CONTINUATION;
    } else if (strcmp(r->final_status, "dead") == 0) {
        r->after = AFTER_DEAD;
        w->tasks_finished++;
        LR_LOG(LR_LOG_WARN, &r->log, "task.dead", "task dead-lettered: %s", r->reason);
    } else if (strcmp(r->final_status, "suspended") == 0) {
        r->after = AFTER_ACK;
        lr_metric_inc1(lr_wm.suspensions, r->reason);
        LR_LOG(LR_LOG_INFO, &r->log, "task.suspended", "task suspended: %s", r->reason);
    } else {
        r->after = AFTER_FINISHED;
        w->tasks_finished++;
        LR_LOG(LR_LOG_INFO, &r->log, "task.finished", "task %s after %d steps", r->final_status,
               r->step);
    }
    run_publish_followup(r);
}

static void run_fenced(lr_run_t *r, const char *what) {
    r->fenced = true;
    lr_metric_add(lr_wm.fencing_rejections, NULL, 1);
    LR_LOG(LR_LOG_WARN, &r->log, "task.fenced",
           "%s rejected: a newer owner holds the task (epoch %lld is stale); abandoning locally",
           what, (long long)r->epoch);
    run_done(r);
}

static void checkpoint_cb(const lr_store_write_res_t *res, void *arg) {
    lr_run_t *r = arg;
    r->pending--;
    if (res->err != 0) {
        LR_LOG(LR_LOG_ERROR, &r->log, "task.checkpoint_failed", "checkpoint failed: %s", res->errmsg);
        /* A statement error is not transient by retrying the same write;
         * give the task back (the message is redelivered; crash-loop
         * accounting bounds the retries). */
        run_requeue(r);
        return;
    }
    if (res->fenced) {
        run_fenced(r, "checkpoint");
        return;
    }
    lr_metric_observe(lr_wm.checkpoint_seconds, NULL, (double)(now_ms(r->w) - r->ckpt_sent_ms) / 1000.0);
    r->lease_from_ms = r->ckpt_sent_ms; /* the checkpoint renewed the lease (if it kept it) */
    if (res->status != NULL && strcmp(res->status, r->final_status) != 0) {
        /* An operator cancelled the task meanwhile: it stops here. */
        snprintf(r->final_status, sizeof(r->final_status), "%s", res->status);
        snprintf(r->reason, sizeof(r->reason), "cancelled");
    }
    run_checkpoint_committed(r);
}

static void run_step_done(lr_run_t *r) {
    lr_worker_t *w = r->w;
    r->pending--;
    r->stepping = false;
    if (r->state == RUN_DONE) {
        run_maybe_free(r);
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
    switch (r->out.outcome) {
    case LR_STEP_CONTINUE:
    case LR_STEP_FINISHED:
    case LR_STEP_SUSPEND:
    case LR_STEP_STOP:
        run_checkpoint(r);
        return;
    case LR_STEP_FAIL_PERMANENT:
        LR_LOG(LR_LOG_WARN, &r->log, "task.step_failed", "permanent failure: %s", r->out.error);
        run_transition(r, "dead", r->out.stop_reason[0] ? r->out.stop_reason : "permanent_error", r->out.error,
                       r->out.stop_reason[0] ? r->out.stop_reason : "permanent_error", -1, 0);
        return;
    case LR_STEP_ABANDONED:
        run_transition(r, "queued", "abandoned", NULL, NULL, -1, 0);
        return;
    default: {
        long delay;
        if (r->attempt + 1 >= r->max_attempts) {
            LR_LOG(LR_LOG_WARN, &r->log, "task.exhausted", "attempt %d of %d failed: %s",
                   r->attempt + 1, r->max_attempts, r->out.error);
            run_transition(r, "dead", "exhausted", r->out.error, "exhausted", -1, 1);
            return;
        }
        delay = backoff_ms(w->cfg.retry_base_ms, w->cfg.retry_max_ms, r->attempt);
        LR_LOG(LR_LOG_INFO, &r->log, "task.retry_wait",
               "attempt %d of %d failed (%s); retrying in %ld ms", r->attempt + 1, r->max_attempts,
               r->out.error, delay);
        lr_metric_add(lr_wm.retries, NULL, 1);
        run_transition(r, "retry_wait", "transient_error", r->out.error, NULL, delay, 1);
        return;
    }
    }
}

/* ------------------------------------------------------------- transitions */

static void transition_cb(const lr_store_write_res_t *res, void *arg) {
    lr_run_t *r = arg;
    r->pending--;
    if (res->err == LR_ECONN) {
        run_requeue(r);
        return;
    }
    if (res->err != 0) {
        LR_LOG(LR_LOG_ERROR, &r->log, "task.transition_failed", "transition to %s failed: %s",
               r->final_status, res->errmsg);
        run_requeue(r);
        return;
    }
    if (res->ambiguous) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.transition_ambiguous", "the transition to %s committed before the "
               "connection broke, or a newer owner holds the task; ending here", r->final_status);
        run_done(r);
        return;
    }
    if (res->fenced) {
        run_fenced(r, "transition");
        return;
    }
    if (strcmp(r->final_status, "dead") == 0) {
        r->w->tasks_finished++;
        r->after = AFTER_DEAD;
        LR_LOG(LR_LOG_WARN, &r->log, "task.dead", "task dead-lettered: %s: %s", r->reason, r->error);
    } else if (strcmp(r->final_status, "queued") == 0 && r->abandon) {
        /* Released at the drain deadline: the delivery goes back as is. */
        run_requeue(r);
        return;
    } else if (strcmp(r->final_status, "queued") == 0 && strcmp(r->reason, "drain") == 0) {
        /* (state_version_too_new is only acked: the outbox republishes it
         * after its grace, which paces old workers instead of a hot loop.)
         * Claimed after the drain began, handed back untouched: publish it
         * again for another worker (acking alone would strand it until the
         * scheduler's outbox sweep). */
        r->after = AFTER_CONTINUATION;
    } else {
        r->after = AFTER_ACK;
    }
    run_publish_followup(r);
}

static void run_transition(lr_run_t *r, const char *status, const char *reason, const char *error,
                           const char *stop_reason, long resume_in_ms, int attempt_inc) {
    lr_store_transition_args_t a;
    int rc;

    snprintf(r->final_status, sizeof(r->final_status), "%s", status);
    snprintf(r->reason, sizeof(r->reason), "%s", stop_reason != NULL ? stop_reason : reason);
    snprintf(r->error, sizeof(r->error), "%s", error != NULL ? error : "");
    snprintf(r->tr_reason, sizeof(r->tr_reason), "%s", reason);
    snprintf(r->tr_stop, sizeof(r->tr_stop), "%s", stop_reason != NULL ? stop_reason : "");
    memset(&a, 0, sizeof(a));
    a.id = r->id;
    a.epoch = r->epoch;
    a.status = r->final_status;
    a.worker = r->w->id;
    a.reason = r->tr_reason;
    a.error = error != NULL ? r->error : NULL;
    a.stop_reason = stop_reason != NULL ? r->tr_stop : NULL;
    a.resume_in_ms = resume_in_ms;
    a.attempt_inc = attempt_inc;
    a.suspend_reason = strcmp(status, "retry_wait") == 0  ? "retry"
                       : strcmp(status, "suspended") == 0 ? r->tr_reason
                                                          : NULL;
    set_state(r, RUN_TRANSITION);
    r->pending++;
    rc = lr_store_transition(r->w->pg, &a, transition_cb, r);
    if (rc != 0) {
        r->pending--;
        run_requeue(r);
    }
}

/* ------------------------------------------------------------------ claim */

static void history_cb(const lr_store_history_res_t *res, void *arg) {
    lr_run_t *r = arg;
    r->pending--;
    if (res->err != 0) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.history_failed", "cannot load the step log: %s", res->errmsg);
        run_requeue(r);
        return;
    }
    cJSON_Delete(r->history);
    r->history = cJSON_CreateArray();
    for (int i = 0; i < res->n; i++) {
        const char *body;
        int version;
        cJSON *m;
        lr_store_history_row(res, i, &body, &version);
        m = cJSON_Parse(body);
        if (m != NULL && lr_state_decode(version, m) != 0) {
            /* (the claim checked tasks.state_version; a step newer than the
             * task row would be a bug, so refuse rather than misread) */
            LR_LOG(LR_LOG_WARN, &r->log, "task.state_too_new", "step state version %d is newer than this worker "
                   "reads (%d)", version, lr_state_version());
            cJSON_Delete(m);
            run_transition(r, "queued", "state_version_too_new", NULL, NULL, -1, 0);
            return;
        }
        cJSON_AddItemToArray(r->history, m != NULL ? m : cJSON_CreateArray());
    }
    run_next(r);
}

/* After a successful claim: decide whether to run. */
static char *dup_or_null(const char *s) { return s != NULL ? strdup(s) : NULL; }

static void run_claimed(lr_run_t *r, const lr_store_task_t *t) {
    lr_worker_t *w = r->w;

    r->epoch = t->epoch;
    r->step = t->step;
    r->attempt = t->attempt;
    r->max_attempts = t->max_attempts;
    r->tokens_in = t->tokens_in;
    r->tokens_out = t->tokens_out;
    r->cost_usd = t->cost_usd;
    r->tool_calls_total = t->tool_calls;
    r->active_ms = t->active_ms;
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
    r->slice_start_ms = now_ms(w);
    r->slice_steps = 0;
    LR_LOG(LR_LOG_DEBUG, &r->log, "task.claimed", "claimed (claims without progress: %d)", t->claims);
    lr_metric_add(lr_wm.tasks_started, NULL, 1);

    if (t->state_version > lr_state_version()) {
        /* Written by a newer worker: hand it back rather than misread it. */
        LR_LOG(LR_LOG_WARN, &r->log, "task.state_too_new", "state version %d is newer than this worker reads (%d)",
               t->state_version, lr_state_version());
        run_transition(r, "queued", "state_version_too_new", NULL, NULL, -1, 0);
        return;
    }
    if (t->claims > w->cfg.max_claims) {
        char why[160];
        snprintf(why, sizeof(why), "claimed %d times without progress (limit %d): its worker keeps dying",
                 t->claims, w->cfg.max_claims);
        run_transition(r, "dead", "crash_loop", why, "crash_loop", -1, 0);
        return;
    }
    if (t->past_deadline) {
        run_transition(r, "dead", "deadline", "the task's deadline passed", "deadline", -1, 0);
        return;
    }
    r->exec = find_executor(r->agent);
    if (r->exec == NULL) {
        char why[160];
        snprintf(why, sizeof(why), "unknown agent '%s'", r->agent);
        run_transition(r, "dead", "unknown_agent", why, "unknown_agent", -1, 0);
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
        set_state(r, RUN_LOADING);
        r->pending++;
        if (lr_store_tenant_running(w->pg, r->tenant, tenant_cb, r) != 0) {
            r->pending--;
            run_requeue(r);
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
    run_transition(r, "suspended", "tenant_limit", NULL, NULL, 1000 + backoff_ms(1000, 2000, 1), 0);
}

static void tenant_cb(const lr_store_count_res_t *res, void *arg) {
    lr_run_t *r = arg;
    long running;
    r->pending--;
    if (res->err != 0) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.tenant_check_failed", "cannot count the tenant's running tasks: %s",
               res->errmsg);
        run_requeue(r);
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
        set_state(r, RUN_LOADING);
        r->pending++;
        if (lr_store_history(w->pg, r->id, history_cb, r) != 0) {
            r->pending--;
            run_requeue(r);
        }
        return;
    }
    run_next(r);
}

/* Starts the next step, or hands the task back when draining. */
static void run_next(lr_run_t *r) {
    if (r->w->draining) {
        /* Claimed but not started: release it untouched. */
        run_transition(r, "queued", "drain", NULL, NULL, -1, 0);
        r->abandon = false;
        return;
    }
    run_start_step(r);
}

static void insert_cb(const lr_store_claim_res_t *res, void *arg);
static void claim_cb(const lr_store_claim_res_t *res, void *arg);

/* Claims without progress that make a task a suspect: 2, or the crash-loop
 * limit if lower (then a bystander still stays within the limit). */
static int suspect_claims(const lr_worker_t *w) {
    return w->cfg.max_claims < 2 ? w->cfg.max_claims : 2;
}

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
    set_state(r, RUN_CLAIMING);
    r->pending++;
    if (lr_store_claim(w->pg, &a, claim_cb, r) != 0) {
        r->pending--;
        if (may) {
            w->suspect_claiming = false;
            r->claim_may_suspect = false;
        }
        run_requeue(r);
    }
}

/* Claims the next deferred suspect if the slot is free. */
static void suspect_next(lr_worker_t *w) {
    lr_run_t *r;
    if (w->suspect != NULL || w->suspect_claiming || w->deferred == NULL || w->stopping) {
        return;
    }
    r = w->deferred;
    w->deferred = r->defer_next;
    if (w->deferred == NULL) {
        w->deferred_tail = NULL;
    }
    r->defer_next = NULL;
    if (w->draining) {
        run_requeue(r); /* never claimed: the broker gives it to another worker */
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
    for (lr_run_t *o = r->w->runs; o != NULL; o = o->next) {
        if (o != r && o->state != RUN_DONE && strcmp(o->id, r->id) == 0) {
            return false;
        }
    }
    LR_LOG(LR_LOG_WARN, &r->log, "task.claim_retry", "connection lost during the claim; claiming again");
    r->reclaim = true;
    run_claim(r);
    return true;
}

static void suspect_release(lr_run_t *r) {
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
    set_state(r, RUN_INSERTING);
    r->pending++;
    /* (the statement's text parameters are sent when it is queued, so these
     * buffers need not outlive the call) */
    rc = lr_store_insert(w->pg, &a, insert_cb, r);
    free(input);
    free(budgets);
    free(metadata);
    if (rc != 0) {
        r->pending--;
        run_requeue(r);
    }
}

static void claim_cb(const lr_store_claim_res_t *res, void *arg) {
    lr_run_t *r = arg;
    lr_worker_t *w = r->w;
    const char *cur;
    bool may_suspect = r->claim_may_suspect;

    r->pending--;
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
        run_requeue(r);
        suspect_next(w);
        return;
    }
    if (res->claimed) {
        if (may_suspect && res->task.claims > suspect_claims(w)) {
            w->suspect = r;
            LR_LOG(LR_LOG_INFO, &r->log, "task.suspect", "claimed %d times without progress: running it as "
                   "this worker's only suspect until it checkpoints", res->task.claims);
        }
        suspect_next(w);
        run_claimed(r, &res->task);
        return;
    }
    cur = res->cur_status;
    if (cur != NULL && !may_suspect && res->cur_claims >= suspect_claims(w) && !w->draining) {
        if (strcmp(cur, "queued") == 0 || (strcmp(cur, "running") == 0 && !res->cur_leased)) {
            /* A suspect, and another suspect holds this worker's slot: wait,
             * unclaimed, holding the delivery. */
            LR_LOG(LR_LOG_DEBUG, &r->log, "task.suspect_deferred", "suspect task waits for this worker's "
                   "suspect slot");
            r->defer_next = NULL;
            if (w->deferred_tail != NULL) {
                w->deferred_tail->defer_next = r;
            } else {
                w->deferred = r;
            }
            w->deferred_tail = r;
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
            dead_letter_message(w, d, "unknown_task", why);
            set_state(r, RUN_DONE);
            run_maybe_free(r);
            return;
        }
        run_insert(r);
        return;
    }
    if (strcmp(cur, "running") == 0 && res->cur_leased) {
        LR_LOG(LR_LOG_INFO, &r->log, "task.duplicate_delivery",
               "duplicate delivery: the task is leased by a live owner; dropped");
    } else {
        LR_LOG(LR_LOG_DEBUG, &r->log, "task.not_runnable", "task is %s; message dropped", cur);
    }
    run_done(r);
}

static void insert_cb(const lr_store_claim_res_t *res, void *arg) {
    lr_run_t *r = arg;
    r->pending--;
    if (res->refused) {
        lr_amqp_delivery_t *d = r->d;
        LR_LOG(LR_LOG_WARN, &r->log, "task.insert_refused", "%s", res->why);
        r->d = NULL;
        dead_letter_message(r->w, d, "invalid", res->why);
        set_state(r, RUN_DONE);
        run_maybe_free(r);
        return;
    }
    if (res->lost && run_retry_claim(r)) {
        return; /* the claim finds the row if the insert committed, else inserts again */
    }
    if (res->err != 0) {
        LR_LOG(LR_LOG_WARN, &r->log, "task.insert_failed", "cannot create the task row: %s", res->errmsg);
        run_requeue(r);
        return;
    }
    if (!res->claimed) {
        /* Raced with another creator: claim the existing row. */
        run_claim(r);
        return;
    }
    run_claimed(r, &res->task);
}

/* --------------------------------------------------------------- delivery */

static const char *queue_short_name(const char *full) {
    size_t n = strlen(LR_AMQP_QUEUE_PREFIX);
    if (full != NULL && strncmp(full, LR_AMQP_QUEUE_PREFIX, n) == 0) {
        return full + n;
    }
    return "default";
}

static void on_delivery(lr_amqp_delivery_t *d, void *arg) {
    lr_worker_t *w = arg;
    lr_run_t *r;
    char err[512];
    int rc;

    if (w->stopping) {
        (void)lr_amqp_reject(w->amqp, d, true);
        lr_amqp_delivery_free(d);
        return;
    }
    r = run_new(w, d);
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
            snprintf(err, sizeof(err), "id: required on messages consumed by workers, in the body or "
                                       "as a UUID message_id (the worker cannot make retries "
                                       "idempotent without it)");
            lr_task_msg_free(&r->msg);
        }
        r->d = NULL;
        dead_letter_message(w, d, reason, err);
        set_state(r, RUN_DONE);
        run_maybe_free(r);
        return;
    }
    if (d->message_id != NULL && strcmp(d->message_id, r->msg.id) != 0 &&
        lr_uuid_valid(d->message_id)) {
        lr_warn("message.id_mismatch", "message_id %s differs from the body's id %s; using the body's",
                d->message_id, r->msg.id);
    }
    snprintf(r->id, sizeof(r->id), "%s", r->msg.id);
    snprintf(r->queue, sizeof(r->queue), "%s", queue_short_name(d->queue));
    r->log.task_id = r->id;
    /* An unknown agent is a permanent error, found after the claim or the
     * insert, so that the dead letter points at a recorded task. */
    run_claim(r);
}

/* ---------------------------------------------------------- leases + beats */

/* One batch renewal: when it was sent. */
typedef struct renew {
    lr_worker_t *w;
    uint64_t sent_ms;
} renew_t;

static int lease_cmp(const void *a, const void *b) {
    const lr_store_lease_t *x = a, *y = b;
    int c = strcmp(x->id, y->id);
    return c != 0 ? c : (x->epoch > y->epoch) - (x->epoch < y->epoch);
}

/* Cancels the step in flight of a run that must stop (done(r) never runs). */
static void run_stop_step(lr_run_t *r) {
    if (r->exec->cancel != NULL) {
        r->exec->cancel(r);
    }
    r->stepping = false;
    r->pending--;
}

static void renew_cb(const lr_store_renew_res_t *res, void *arg) {
    renew_t *rn = arg;
    lr_worker_t *w = rn->w;
    lr_store_lease_t *lost = NULL;
    if (res->err != 0) {
        lr_warn("lease.renew_failed", "lease renewal failed: %s", res->errmsg);
        w->renew_failing = true;
        free(rn);
        return;
    }
    w->renew_failing = false;
    w->renew_ok_sent_ms = rn->sent_ms;
    if (res->nfenced > 0 && (lost = malloc((size_t)res->nfenced * sizeof(*lost))) != NULL) {
        memcpy(lost, res->fenced, (size_t)res->nfenced * sizeof(*lost));
        qsort(lost, (size_t)res->nfenced, sizeof(*lost), lease_cmp);
    }
    /* A lease that a newer owner holds (or whose task left `running`): a
     * step in flight stops now rather than run to its end for nothing;
     * other states learn it from their next fenced statement. */
    for (lr_run_t *r = w->runs, *next; lost != NULL && r != NULL && !w->stopping; r = next) {
        lr_store_lease_t key = {r->id, r->epoch};
        next = r->next;
        if (r->state != RUN_STEPPING || !r->stepping || r->fenced) {
            continue;
        }
        if (bsearch(&key, lost, (size_t)res->nfenced, sizeof(key), lease_cmp) != NULL) {
            run_stop_step(r);
            run_fenced(r, "lease renewal");
        }
    }
    free(lost);
    free(rn);
}

/* The renewal period: min(lease / 3, heartbeat), in ms. */
static uint64_t renew_every_ms(const lr_worker_t *w) {
    uint64_t every = (uint64_t)w->cfg.lease_seconds * 1000u / 3u;
    uint64_t hb = (uint64_t)w->cfg.heartbeat_seconds * 1000u;
    return hb < every ? hb : every;
}

/* No renewal for longer than the lease: our leases may have expired and the
 * tasks been handed to another worker.  Stop the steps in flight (they run
 * again from their last checkpoint) instead of doing work nobody can
 * checkpoint. */
static void lease_check_lost(lr_worker_t *w) {
    int stopped = 0;
    if (!w->renew_failing || now_ms(w) - w->renew_ok_sent_ms <= (uint64_t)w->cfg.lease_seconds * 1000u) {
        return;
    }
    for (lr_run_t *r = w->runs, *next; r != NULL; r = next) {
        next = r->next;
        if (r->state == RUN_STEPPING && r->stepping && !r->fenced) {
            run_stop_step(r);
            r->abandon = true;
            stopped++;
            run_requeue(r);
        }
    }
    if (stopped > 0) {
        lr_warn("lease.lost", "no lease renewal for more than %d s (database unreachable): stopped %d "
                "running step(s); their tasks resume from the last checkpoint", w->cfg.lease_seconds,
                stopped);
    }
}

/* Renews, in one statement, the leases whose last checkpoint did not
 * already extend them this period. */
static void lease_renew(lr_worker_t *w) {
    lr_store_lease_t *leases = malloc(((size_t)w->nruns + 1) * sizeof(*leases));
    renew_t *rn = malloc(sizeof(*rn));
    int n = 0;
    if (leases == NULL || rn == NULL) {
        free(leases);
        free(rn);
        return;
    }
    for (lr_run_t *r = w->runs; r != NULL; r = r->next) {
        if (r->epoch <= 0 || r->state == RUN_DONE || r->fenced) {
            continue;
        }
        if (r->lease_from_ms != 0 && now_ms(w) - r->lease_from_ms < renew_every_ms(w)) {
            continue; /* renewing it again would only cost a row update */
        }
        leases[n].id = r->id;
        leases[n].epoch = r->epoch;
        n++;
    }
    rn->w = w;
    rn->sent_ms = now_ms(w);
    if (n == 0) {
        w->renew_failing = false; /* no lease held, none to lose */
        w->renew_ok_sent_ms = now_ms(w);
        free(rn);
    } else if (lr_store_renew(w->pg, leases, n, w->cfg.lease_seconds, (long)w->cfg.lease_seconds * 500, renew_cb,
                              rn) != 0) {
        lr_warn("lease.renew_failed", "cannot queue the lease renewal");
        free(rn);
    }
    free(leases);
}

static void lease_timer_cb(uv_timer_t *t) {
    lr_worker_t *w = t->data;
    lr_store_heartbeat_args_t hb = {
        .worker = w->id,
        .hostname = w->hostname,
        .version = LONGRUN_VERSION,
        .queues_csv = w->queues_csv,
        .pid = (int)getpid(),
        .in_flight = w->nruns,
        .max_in_flight = w->cfg.max_in_flight,
        .draining = w->draining,
    };
    lease_check_lost(w);
    lease_renew(w);
    if (lr_store_heartbeat(w->pg, &hb) != 0) {
        lr_debug("worker.heartbeat_failed", "cannot queue the heartbeat");
    }
}

/* ------------------------------------------------------ shutdown + signals */

static void component_closed(void *arg) {
    lr_worker_t *w = arg;
    w->closing--;
    if (w->closing == 0) {
        uv_stop(w->loop);
    }
}

static void handle_closed(uv_handle_t *h) {
    (void)h;
}

static void worker_close_all(lr_worker_t *w) {
    if (w->stopping) {
        return;
    }
    w->stopping = true;
    lr_info("worker.stopping", "closing connections (%d runs left)", w->nruns);
    uv_timer_stop(&w->lease_timer);
    uv_timer_stop(&w->drain_timer);
    uv_close((uv_handle_t *)&w->lease_timer, handle_closed);
    uv_close((uv_handle_t *)&w->drain_timer, handle_closed);
    uv_timer_stop(&w->health_timer);
    uv_close((uv_handle_t *)&w->health_timer, handle_closed);
    uv_close((uv_handle_t *)&w->sigterm, handle_closed);
    uv_close((uv_handle_t *)&w->sigint, handle_closed);
    uv_close((uv_handle_t *)&w->sigquit, handle_closed);
    uv_close((uv_handle_t *)&w->sighup, handle_closed);
    w->closing = 3;
    lr_callback_abandon_all();
    lr_http_close(w->http, component_closed, w);
    w->http = NULL;
    lr_pg_pool_close(w->pg, component_closed, w);
    w->pg = NULL;
    lr_amqp_stop(w->amqp, 5000, component_closed, w);
    w->amqp = NULL;
}

static void worker_maybe_exit(lr_worker_t *w) {
    if (w->draining && w->nruns == 0 && !w->stopping) {
        lr_info("worker.drained", "every in-flight task is checkpointed and handed back");
        worker_close_all(w);
    }
}

/* Drain deadline: steps still running are abandoned without a checkpoint;
 * their leases are released so that another worker can take them now. */
static void drain_deadline_cb(uv_timer_t *t) {
    lr_worker_t *w = t->data;
    lr_warn("worker.drain_deadline", "drain deadline reached with %d tasks in flight; abandoning their "
            "running steps (they run again elsewhere)", w->nruns);
    for (lr_run_t *r = w->runs, *next; r != NULL; r = next) {
        next = r->next;
        if (r->state == RUN_STEPPING && r->stepping) {
            r->abandon = true;
            if (r->exec->cancel != NULL) {
                r->exec->cancel(r);
            }
            r->stepping = false;
            r->pending--;
            run_transition(r, "queued", "abandoned", NULL, NULL, -1, 0);
        }
    }
    /* Whatever is still pending gets a few more seconds via amqp stop. */
    uv_timer_start(&w->drain_timer, (uv_timer_cb)worker_close_all, 3000, 0);
}

static void start_drain(lr_worker_t *w, const char *why) {
    if (w->draining) {
        return;
    }
    w->draining = true;
    lr_info("worker.draining", "%s: stop consuming, finish and checkpoint in-flight steps (%d), "
            "hand the rest back, exit within %d s", why, w->nruns, w->cfg.drain_seconds);
    lr_amqp_cancel_consume(w->amqp);
    uv_timer_start(&w->drain_timer, drain_deadline_cb, (uint64_t)w->cfg.drain_seconds * 1000u, 0);
    while (w->deferred != NULL) {
        lr_run_t *r = w->deferred; /* suspects never claimed: back to the broker */
        w->deferred = r->defer_next;
        r->defer_next = NULL;
        run_requeue(r);
    }
    w->deferred_tail = NULL;
    worker_maybe_exit(w);
}

static void on_signal(uv_signal_t *s, int signum) {
    lr_worker_t *w = s->data;
    if (signum == SIGHUP) {
        lr_info("worker.sighup", "SIGHUP: nothing to reload yet (configuration is read at start)");
        return;
    }
    if (signum == SIGQUIT || w->draining) {
        lr_warn("worker.exit_now", "%s: exiting now without draining (%d tasks in flight run again "
                "elsewhere after their leases expire)", strsignal(signum), w->nruns);
        fflush(stdout);
        _exit(signum == SIGQUIT ? 3 : 1);
    }
    start_drain(w, strsignal(signum));
}

/* ------------------------------------------------------------- components */

static void on_amqp_state(int connected, const char *detail, void *arg) {
    lr_worker_t *w = arg;
    w->amqp_up = connected != 0;
    if (connected) {
        lr_info("amqp.connected", "RabbitMQ connected; consuming %s", w->queues_csv);
    } else {
        lr_warn("amqp.disconnected", "RabbitMQ unavailable: %s; in-flight tasks continue, "
                "reconnecting", detail != NULL ? detail : "");
    }
}

static void flags_cb(const lr_store_flags_res_t *res, void *arg) {
    (void)arg;
    if (res->err != 0) {
        lr_warn("flags.load_failed", "cannot read the kill switches: %s", res->errmsg);
        return;
    }
    lr_flags_replace(res->entries, res->n);
    lr_info("flags.loaded", "%d kill switch(es) active", res->n);
}

/* NOTIFY longrun_flags (and every reconnect): reload the kill switches. */
static void on_flags_notify(const char *channel, const char *payload, void *arg) {
    lr_worker_t *w = arg;
    (void)channel;
    (void)payload;
    if (!w->stopping && lr_store_flags(w->pg, flags_cb, w) != 0) {
        lr_warn("flags.load_failed", "cannot queue the kill-switch reload");
    }
}

static void schema_cb(const lr_store_count_res_t *res, void *arg) {
    lr_worker_t *w = arg;
    int v;
    if (res->err != 0) {
        w->schema_state = -1;
        snprintf(w->schema_msg, sizeof(w->schema_msg), "schema not readable (run longrun migrate): %.100s",
                 res->errmsg);
        return;
    }
    v = (int)res->count;
    if (v < lr_schema_version_known()) {
        w->schema_state = -1;
        snprintf(w->schema_msg, sizeof(w->schema_msg), "schema version %d is older than %d: run longrun migrate", v,
                 lr_schema_version_known());
    } else {
        /* newer is compatible: migrations are additive (docs/deploy.md) */
        w->schema_state = 1;
        w->schema_msg[0] = '\0';
    }
}

/* Every second: liveness tick, readiness, gauges, the /health snapshot. */
static void health_timer_cb(uv_timer_t *t) {
    lr_worker_t *w = t->data;
    const char *why = NULL;
    char snap[6144], circuits[4096];
    static unsigned ticks;
    ticks++;
    lr_health_tick(w->health);
    if ((w->schema_state <= 0 || ticks % 30 == 0) && w->pg_usable > 0) {
        if (lr_store_schema_version(w->pg, schema_cb, w) != 0) {
            lr_debug("worker.schema_check", "cannot queue the schema check");
        }
    }
    if (w->draining) {
        why = "draining";
    } else if (!w->amqp_up) {
        why = "RabbitMQ not connected";
    } else if (w->pg_usable == 0) {
        why = "PostgreSQL not connected";
    } else if (w->schema_state < 0) {
        why = w->schema_msg;
    } else if (w->schema_state == 0) {
        why = "checking the schema version";
    }
    lr_health_set_ready(w->health, why == NULL, why);
    lr_metric_set(lr_wm.ready, NULL, why == NULL ? 1 : 0);
    lr_metric_set(lr_wm.in_flight, NULL, w->nruns);
    lr_metric_set(lr_wm.amqp_connected, NULL, w->amqp_up ? 1 : 0);
    lr_metric_set(lr_wm.pg_connections, NULL, w->pg_usable);
    (void)lr_breakers_json(circuits, sizeof(circuits));
    snprintf(snap, sizeof(snap),
             "{\"worker\":\"%s\",\"dependencies\":{\"rabbitmq\":{\"status\":\"%s\"},"
             "\"postgres\":{\"status\":\"%s\",\"usable_connections\":%d,\"pending_queries\":%zu},"
             "\"schema\":{\"status\":\"%s\",\"binary_version\":%d}},"
             "\"in_flight\":%d,\"max_in_flight\":%d,\"draining\":%s,\"steps\":%llu,\"tasks_finished\":%llu,"
             "\"circuits\":%s}",
             w->id, w->amqp_up ? "up" : "down", w->pg_usable > 0 ? "up" : "down", w->pg_usable,
             w->pg != NULL ? lr_pg_pool_pending(w->pg) : (size_t)0,
             w->schema_state > 0 ? "ok" : w->schema_state < 0 ? "incompatible" : "unknown", lr_schema_version_known(),
             w->nruns, w->cfg.max_in_flight, w->draining ? "true" : "false", (unsigned long long)w->steps_done,
             (unsigned long long)w->tasks_finished, circuits);
    lr_health_set_snapshot(w->health, snap);
    if (ticks % 60 == 0) {
        lr_info("worker.stats", "in flight %d, steps %llu, tasks finished %llu, postgres %d connection(s) with %zu "
                "pending, rabbitmq %s%s", w->nruns, (unsigned long long)w->steps_done,
                (unsigned long long)w->tasks_finished, w->pg_usable, w->pg != NULL ? lr_pg_pool_pending(w->pg) : (size_t)0,
                w->amqp_up ? "up" : "down", w->draining ? ", draining" : "");
    }
}

static void on_pg_state(int usable, void *arg) {
    lr_worker_t *w = arg;
    if (usable == 0 && w->pg_usable > 0) {
        lr_warn("pg.disconnected", "PostgreSQL unavailable: in-flight checkpoints wait, reconnecting");
    } else if (usable > 0 && w->pg_usable == 0) {
        lr_info("pg.connected", "PostgreSQL connected (%d connections)", usable);
    }
    w->pg_usable = usable;
}

int lr_worker_run(const lr_config_t *cfg, const char *const *queues) {
    lr_worker_t *w = calloc(1, sizeof(*w));
    uv_loop_t loop;
    lr_pg_opts_t pgo;
    lr_amqp_opts_t ao;
    char err[512];
    int rc = 1;
    size_t off = 0;

    if (w == NULL || uv_loop_init(&loop) != 0) {
        free(w);
        return 1;
    }
    w->loop = &loop;
    w->cfg = *cfg;
    lr_wm_init();
    lr_breakers_configure(cfg->breaker_failures, (long)cfg->breaker_open_seconds * 1000);
    w->test_hooks = getenv("LONGRUN_TEST_HOOKS") != NULL && strcmp(getenv("LONGRUN_TEST_HOOKS"), "1") == 0;
    if (w->test_hooks && getenv("LONGRUN_TEST_STATE_VERSION") != NULL &&
        lr_state_set_version(atoi(getenv("LONGRUN_TEST_STATE_VERSION"))) != 0) {
        lr_error("worker.config", "LONGRUN_TEST_STATE_VERSION=%s: not a state version this build knows (1..%d)",
                 getenv("LONGRUN_TEST_STATE_VERSION"), LR_STATE_VERSION_MAX);
    }
    gethostname(w->hostname, sizeof(w->hostname) - 1);
    if (cfg->worker_id[0] != '\0') {
        snprintf(w->id, sizeof(w->id), "%s", cfg->worker_id);
    } else {
        snprintf(w->id, sizeof(w->id), "%.100s-%d", w->hostname, (int)getpid());
    }
    for (w->nqueues = 0; queues[w->nqueues] != NULL; w->nqueues++) {
    }
    w->queue_names = calloc((size_t)w->nqueues + 1, sizeof(char *));
    w->queue_short = calloc((size_t)w->nqueues + 1, sizeof(char *));
    if (w->queue_names == NULL || w->queue_short == NULL) {
        goto out;
    }
    for (int i = 0; i < w->nqueues; i++) {
        char *full = malloc(strlen(LR_AMQP_QUEUE_PREFIX) + strlen(queues[i]) + 1);
        if (full == NULL) {
            goto out;
        }
        sprintf(full, "%s%s", LR_AMQP_QUEUE_PREFIX, queues[i]);
        w->queue_names[i] = full;
        w->queue_short[i] = queues[i];
        off += (size_t)snprintf(w->queues_csv + off, sizeof(w->queues_csv) - off, "%s%s", i ? "," : "",
                                queues[i]);
    }
    lr_log_init("worker", w->id, lr_log_level_parse(cfg->log_level), strcmp(cfg->log_format, "json") == 0);

    memset(&pgo, 0, sizeof(pgo));
    pgo.conninfo = cfg->database_url;
    pgo.size = cfg->pg_pool_size;
    pgo.application_name = "longrun-worker";
    pgo.on_state = on_pg_state;
    pgo.state_arg = w;
    if (lr_pg_pool_init(&w->pg, &loop, &pgo, err, sizeof(err)) != 0) {
        lr_error("worker.config", "LONGRUN_DATABASE_URL: %s", err);
        rc = 2;
        goto out;
    }
    if (lr_pg_listen(w->pg, "longrun_flags", on_flags_notify, w) != 0) {
        goto out;
    }
    on_flags_notify("longrun_flags", NULL, w);
    if (lr_http_init(&w->http, &loop) != 0) {
        lr_error("worker.http_init", "cannot initialize the HTTP client");
        goto out;
    }
    memset(&ao, 0, sizeof(ao));
    ao.url = cfg->amqp_url;
    ao.consume = w->queue_names;
    ao.declare = w->queue_short;
    ao.prefetch = cfg->max_in_flight;
    ao.delivery_limit = cfg->delivery_limit;
    ao.on_delivery = on_delivery;
    ao.on_state = on_amqp_state;
    ao.arg = w;
    if (lr_amqp_start(&w->amqp, &loop, &ao, err, sizeof(err)) != 0) {
        lr_error("worker.config", "LONGRUN_AMQP_URL: %s", err);
        rc = 2;
        goto out;
    }
    if (lr_health_start(&w->health, cfg->http_port, "worker", 10000, err, sizeof(err)) != 0) {
        lr_error("worker.config", "%s", err);
        rc = 2;
        goto out;
    }
    uv_signal_init(&loop, &w->sigterm);
    uv_signal_init(&loop, &w->sigint);
    uv_signal_init(&loop, &w->sigquit);
    uv_signal_init(&loop, &w->sighup);
    w->sigterm.data = w->sigint.data = w->sigquit.data = w->sighup.data = w;
    uv_signal_start(&w->sigterm, on_signal, SIGTERM);
    uv_signal_start(&w->sigint, on_signal, SIGINT);
    uv_signal_start(&w->sigquit, on_signal, SIGQUIT);
    uv_signal_start(&w->sighup, on_signal, SIGHUP);
    uv_timer_init(&loop, &w->lease_timer);
    uv_timer_init(&loop, &w->drain_timer);
    w->lease_timer.data = w->drain_timer.data = w;
    uv_timer_start(&w->lease_timer, lease_timer_cb, 200, renew_every_ms(w));
    uv_timer_init(&loop, &w->health_timer);
    w->health_timer.data = w;
    uv_timer_start(&w->health_timer, health_timer_cb, 0, 1000);
    lr_info("worker.started", "longrun-worker %s: queues %s, max in flight %d, lease %d s, slice %d steps / %d s, "
            "schema v%d", LONGRUN_VERSION, w->queues_csv, cfg->max_in_flight, cfg->lease_seconds,
            cfg->slice_steps, cfg->slice_seconds, lr_schema_version_known());
    uv_run(&loop, UV_RUN_DEFAULT);
    /* Everything closed: let the close callbacks run. */
    uv_run(&loop, UV_RUN_DEFAULT);
    rc = 0;
    lr_info("worker.exit", "exiting: %llu steps, %llu tasks finished by this worker",
            (unsigned long long)w->steps_done, (unsigned long long)w->tasks_finished);
out:
    if (rc != 0 && !w->stopping) {
        /* Start-up failure: close what was opened. */
        w->closing = 3;
        lr_http_close(w->http, component_closed, w);
        lr_pg_pool_close(w->pg, component_closed, w);
        if (w->amqp != NULL) {
            lr_amqp_stop(w->amqp, 1000, component_closed, w);
        } else {
            component_closed(w);
        }
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    while (w->runs != NULL) {
        lr_run_t *r = w->runs;
        w->runs = r->next;
        if (r->exec != NULL && r->exec->release != NULL) {
            r->exec->release(r);
        }
        lr_amqp_delivery_free(r->d);
        lr_task_msg_free(&r->msg);
        lr_step_reset(&r->out);
        cJSON_Delete(r->input);
        cJSON_Delete(r->history);
        free(r->budgets_json);
        free(r->reply_to);
        free(r->correlation_id);
        free(r);
    }
    lr_health_stop(w->health);
    w->health = NULL;
    if (uv_loop_close(&loop) != 0) {
        uv_walk(&loop, (uv_walk_cb)uv_close, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
        (void)uv_loop_close(&loop);
    }
    if (w->queue_names != NULL) {
        for (int i = 0; i < w->nqueues; i++) {
            free((void *)w->queue_names[i]);
        }
    }
    free(w->queue_names);
    free(w->queue_short);
    free(w);
    lr_metrics_free();
    return rc;
}
