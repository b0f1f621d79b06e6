/*
 * store.c - the worker's typed statement layer (store.h).
 *
 * Every statement is one heap request (req_t) that owns the text of its
 * numeric parameters, borrows its string parameters, and is freed once its
 * callback ran.  req_send() issues it; req_pg_cb() hands the PostgreSQL
 * answer to the statement's own decode function, which either sends the
 * request again (the ambiguous-commit rules of store.h) or builds the typed
 * result and calls the caller back.
 */
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sql.h"
#include "log.h"
#include "task.h"
#include "text.h"

#define STORE_RETRIES 5         /* resends after a lost connection */
#define STORE_VERIFY_RETRIES 20 /* checkpoint: step-row checks after losses */
#define MAX_PARAMS 26
#define NUM_LEN 32

typedef struct req req_t;
typedef void (*decode_fn)(req_t *q, int err, const PGresult *res);

struct req {
    lr_pg_pool_t *pg;
    const char *sql;
    int nparams;
    bool batched;
    long timeout_ms;
    int tries;
    decode_fn decode;
    void (*cb)(void); /* the caller's callback, cast back by decode */
    void *arg;
    const char *params[MAX_PARAMS];
    char num[MAX_PARAMS][NUM_LEN]; /* text of numeric parameters */
    /* the check of whether a lost write committed (checkpoint: the step
     * row; transition: the task's status and epoch) */
    bool verifying;
    const char *vsql;
    int vnparams;
    const char *vparams[3];
    char *owned; /* a parameter this request allocated */
};

static void req_pg_cb(int err, const PGresult *res, void *arg) {
    req_t *q = arg;
    q->decode(q, err, res);
}

static void req_free(req_t *q) {
    free(q->owned);
    free(q);
}

static req_t *req_new(lr_pg_pool_t *pg, const char *sql, int nparams, decode_fn decode, void (*cb)(void), void *arg) {
    req_t *q = calloc(1, sizeof(*q));
    if (q == NULL) {
        return NULL;
    }
    q->pg = pg;
    q->sql = sql;
    q->nparams = nparams;
    q->decode = decode;
    q->cb = cb;
    q->arg = arg;
    return q;
}

/* Parameter i as the text of a number (kept by the request). */
static void req_num(req_t *q, int i, long long v) {
    snprintf(q->num[i], NUM_LEN, "%lld", v);
    q->params[i] = q->num[i];
}

static void req_bool(req_t *q, int i, bool v) { q->params[i] = v ? "true" : "false"; }

static int req_send(req_t *q) {
    if (q->verifying) {
        return lr_pg_query(q->pg, q->vsql, q->vnparams, q->vparams, 0, req_pg_cb, q);
    }
    if (q->batched) {
        return lr_pg_query_batched(q->pg, q->sql, q->nparams, q->params, q->timeout_ms, req_pg_cb, q);
    }
    return lr_pg_query(q->pg, q->sql, q->nparams, q->params, q->timeout_ms, req_pg_cb, q);
}

/* Sends a new request; on failure frees it and returns the code. */
static int req_start(req_t *q) {
    int rc = req_send(q);
    if (rc != 0) {
        req_free(q);
    }
    return rc;
}

/* Sends q again after a lost connection if it has tries left.  True: sent
 * (the decode function runs again later). */
static bool req_resend(req_t *q, int limit) {
    if (q->tries >= limit) {
        return false;
    }
    q->tries++;
    return req_send(q) == 0;
}

static const char *errmsg_of(int err, const PGresult *res) {
    return res != NULL ? PQresultErrorMessage(res) : lr_strerror(err);
}

static long long get_ll(const PGresult *res, const char *col) {
    const char *v = lr_pg_getn(res, 0, col);
    return v != NULL ? atoll(v) : 0;
}

static bool get_bool(const PGresult *res, const char *col) {
    const char *v = lr_pg_getn(res, 0, col);
    return v != NULL && v[0] == 't';
}

/* ------------------------------------------------------------ claim, insert */

static void task_from_row(const PGresult *res, lr_store_task_t *t) {
    const char *tr = lr_pg_getn(res, 0, "tenant_running");
    t->epoch = get_ll(res, "lease_epoch");
    t->step = (int)get_ll(res, "step");
    t->claims = lr_pg_getn(res, 0, "claims") != NULL ? (int)get_ll(res, "claims") : 1;
    t->attempt = (int)get_ll(res, "attempt");
    t->max_attempts = (int)get_ll(res, "max_attempts");
    t->state_version = (int)get_ll(res, "state_version");
    t->tokens_in = (long)get_ll(res, "tokens_in");
    t->tokens_out = (long)get_ll(res, "tokens_out");
    t->tool_calls = (long)get_ll(res, "tool_calls");
    t->active_ms = (long)get_ll(res, "active_ms");
    t->wall_ms = lr_pg_getn(res, 0, "wall_ms") != NULL ? (long)get_ll(res, "wall_ms") : 0;
    t->age_ms = lr_pg_getn(res, 0, "age_ms") != NULL ? (long)get_ll(res, "age_ms") : 0;
    t->queue_wait_ms = lr_pg_getn(res, 0, "queue_wait_ms") != NULL ? (long)get_ll(res, "queue_wait_ms") : -1;
    t->cost_usd = lr_pg_getn(res, 0, "cost_usd") != NULL ? atof(lr_pg_getn(res, 0, "cost_usd")) : 0.0;
    t->past_deadline = get_bool(res, "past_deadline");
    t->cancel_requested = get_bool(res, "cancel_requested");
    t->tenant_running = tr != NULL ? atoi(tr) : -1;
    t->outage_ms = lr_pg_getn(res, 0, "outage_ms") != NULL ? (long)get_ll(res, "outage_ms") : -1;
    t->agent = lr_pg_getn(res, 0, "agent");
    t->queue = lr_pg_getn(res, 0, "queue");
    t->input = lr_pg_getn(res, 0, "input");
    t->budgets = lr_pg_getn(res, 0, "budgets");
    t->reply_to = lr_pg_getn(res, 0, "reply_to");
    t->correlation_id = lr_pg_getn(res, 0, "correlation_id");
    t->callback_url = lr_pg_getn(res, 0, "callback_url");
    t->tenant = lr_pg_getn(res, 0, "tenant");
}

/* The server refused the new task's row for what the message holds (a value
 * PostgreSQL cannot store: invalid UTF-8, \u0000 in JSON, an RFC 3339-shaped
 * but impossible deadline, ...): SQLSTATE class 22 (data exception) or 23
 * (integrity).  Retrying cannot help: the message is malformed. */
static bool insert_refused(int err, const PGresult *res, char *why, size_t len) {
    static const char *const fields[] = {NULL,           "id",           "queue",         "agent",  "input",
                                         "budgets",      "max_attempts", "deadline",      "tenant", "metadata",
                                         "callback_url", "reply_to",     "correlation_id"};
    const char *state = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res != NULL ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *ctx = res != NULL ? PQresultErrorField(res, PG_DIAG_CONTEXT) : NULL;
    const char *p = ctx != NULL ? strstr(ctx, "parameter $") : NULL;
    int n = p != NULL ? atoi(p + strlen("parameter $")) : 0;
    if (err != LR_EDB || state == NULL || (strncmp(state, "22", 2) != 0 && strncmp(state, "23", 2) != 0)) {
        return false;
    }
    snprintf(why, len, "%s: PostgreSQL cannot store it: %s",
             n > 0 && n < (int)(sizeof(fields) / sizeof(fields[0])) ? fields[n] : "message",
             msg != NULL ? msg : "data exception");
    return true;
}

/* The answer to a claim or (insert) an insert. */
static void claimed_decode(req_t *q, int err, const PGresult *res, bool insert) {
    lr_store_claim_res_t r;
    memset(&r, 0, sizeof(r));
    r.err = err;
    if (err != 0) {
        r.errmsg = errmsg_of(err, res);
        r.lost = err == LR_ECONN;
        r.refused = insert && insert_refused(err, res, r.why, sizeof(r.why));
    } else if (insert ? PQntuples(res) > 0 : lr_pg_getn(res, 0, "lease_epoch") != NULL) {
        r.claimed = true;
        task_from_row(res, &r.task);
    } else if (!insert) {
        r.cur_status = lr_pg_getn(res, 0, "cur_status");
        r.cur_claims = (int)get_ll(res, "cur_claims");
        r.cur_leased = get_bool(res, "cur_leased");
    }
    ((lr_store_claim_cb)q->cb)(&r, q->arg);
    req_free(q);
}

static void claim_decode(req_t *q, int err, const PGresult *res) { claimed_decode(q, err, res, false); }

int lr_store_claim(lr_pg_pool_t *pg, const lr_store_claim_args_t *a, lr_store_claim_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_CLAIM, 5, claim_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->params[0] = a->id;
    q->params[1] = a->worker;
    req_num(q, 2, a->lease_seconds);
    req_num(q, 3, a->claims_below);
    req_bool(q, 4, a->reclaim);
    return req_start(q);
}

static void insert_decode(req_t *q, int err, const PGresult *res) { claimed_decode(q, err, res, true); }

int lr_store_insert(lr_pg_pool_t *pg, const lr_store_insert_args_t *a, lr_store_claim_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_INSERT_CLAIMED, 14, insert_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->params[0] = a->id;
    q->params[1] = a->queue;
    q->params[2] = a->agent;
    q->params[3] = a->input;
    q->params[4] = a->budgets;
    req_num(q, 5, a->max_attempts);
    q->params[6] = a->deadline;
    q->params[7] = a->tenant;
    q->params[8] = a->metadata;
    q->params[9] = a->callback_url;
    q->params[10] = a->reply_to;
    q->params[11] = a->correlation_id;
    q->params[12] = a->worker;
    req_num(q, 13, a->lease_seconds);
    return req_start(q);
}

/* ---------------------------------------------------------- reads of a task */

static void history_decode(req_t *q, int err, const PGresult *res) {
    lr_store_history_res_t r;
    if (err == LR_ECONN && req_resend(q, STORE_RETRIES)) {
        return; /* a read: ask again */
    }
    memset(&r, 0, sizeof(r));
    r.err = err;
    if (err != 0) {
        r.errmsg = errmsg_of(err, res);
    } else {
        r.n = PQntuples(res);
        r.rows = res;
    }
    ((lr_store_history_cb)q->cb)(&r, q->arg);
    req_free(q);
}

int lr_store_history(lr_pg_pool_t *pg, const char *id, lr_store_history_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_HISTORY, 1, history_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->params[0] = id;
    return req_start(q);
}

void lr_store_history_row(const lr_store_history_res_t *res, int i, const char **body, int *version) {
    const PGresult *r = res->rows;
    *body = lr_pg_get(r, i, 2);
    *version = atoi(lr_pg_get(r, i, 3) != NULL ? lr_pg_get(r, i, 3) : "1");
}

static void count_decode(req_t *q, int err, const PGresult *res) {
    lr_store_count_res_t r;
    if (err == LR_ECONN && req_resend(q, STORE_RETRIES)) {
        return;
    }
    memset(&r, 0, sizeof(r));
    r.err = err;
    if (err == 0 && PQntuples(res) != 1) {
        r.err = LR_EDB;
    }
    if (r.err != 0) {
        r.errmsg = err != 0 ? errmsg_of(err, res) : "unexpected result";
    } else {
        r.count = atol(lr_pg_get(res, 0, 0) != NULL ? lr_pg_get(res, 0, 0) : "0");
    }
    ((lr_store_count_cb)q->cb)(&r, q->arg);
    req_free(q);
}

int lr_store_tenant_running(lr_pg_pool_t *pg, const char *tenant, lr_store_count_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_TENANT_RUNNING, 1, count_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->params[0] = tenant;
    return req_start(q);
}

int lr_store_schema_version(lr_pg_pool_t *pg, lr_store_count_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_SCHEMA_VERSION, 0, count_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->tries = STORE_RETRIES; /* a periodic check: no resend */
    q->timeout_ms = 5000;
    return req_start(q);
}

static void durability_decode(req_t *q, int err, const PGresult *res) {
    lr_store_durability_res_t r;
    if (err == LR_ECONN && req_resend(q, STORE_RETRIES)) {
        return;
    }
    memset(&r, 0, sizeof(r));
    r.err = err;
    if (err == 0 &&
        (PQntuples(res) != 1 || PQnfields(res) != 4 || lr_pg_get(res, 0, 0) == NULL || lr_pg_get(res, 0, 1) == NULL)) {
        r.err = LR_EDB;
    }
    if (r.err != 0) {
        r.errmsg = err != 0 ? errmsg_of(err, res) : "unexpected result";
    } else {
        r.fsync = lr_pg_get(res, 0, 0);
        r.synchronous_commit = lr_pg_get(res, 0, 1);
        r.user = lr_pg_get(res, 0, 2) != NULL ? lr_pg_get(res, 0, 2) : "?";
        r.database = lr_pg_get(res, 0, 3) != NULL ? lr_pg_get(res, 0, 3) : "?";
        /* "local", "remote_write", "remote_apply" and "on" all flush the
         * local WAL before the commit returns; only "off" does not. */
        r.unsafe = strcmp(r.fsync, "off") == 0 || strcmp(r.synchronous_commit, "off") == 0;
    }
    ((lr_store_durability_cb)q->cb)(&r, q->arg);
    req_free(q);
}

int lr_store_durability(lr_pg_pool_t *pg, lr_store_durability_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_DURABILITY, 0, durability_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->timeout_ms = 10000;
    return req_start(q);
}

/* ------------------------------------------------------------------- writes */

static void write_done(req_t *q, const lr_store_write_res_t *r) {
    ((lr_store_write_cb)q->cb)(r, q->arg);
    req_free(q);
}

static void checkpoint_decode(req_t *q, int err, const PGresult *res) {
    lr_store_write_res_t r;
    memset(&r, 0, sizeof(r));
    if (err == LR_ECONN) {
        /* It may or may not have committed: look for the step row of this
         * epoch (and again, after another loss). */
        q->verifying = true;
        if (req_resend(q, STORE_VERIFY_RETRIES)) {
            return;
        }
        r.err = err;
        r.errmsg = errmsg_of(err, res);
        write_done(q, &r);
        return;
    }
    if (err != 0) {
        r.err = err;
        r.errmsg = errmsg_of(err, res);
        write_done(q, &r);
        return;
    }
    if (q->verifying) {
        q->verifying = false;
        if (PQntuples(res) == 0) {
            /* Not committed: write it again (still fenced on epoch and step). */
            if (req_send(q) != 0) {
                r.err = LR_ECONN;
                r.errmsg = "cannot queue the checkpoint again";
                write_done(q, &r);
            }
            return;
        }
        write_done(q, &r); /* committed; its status is not known here */
        return;
    }
    if (PQntuples(res) == 0) {
        r.fenced = true;
    } else {
        r.status = lr_pg_getn(res, 0, "status");
        r.error = lr_pg_getn(res, 0, "error");
    }
    write_done(q, &r);
}

int lr_store_checkpoint(lr_pg_pool_t *pg, const lr_store_checkpoint_args_t *a, lr_store_write_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_CHECKPOINT, 26, checkpoint_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->batched = true;
    q->params[0] = a->id;
    req_num(q, 1, a->epoch);
    req_num(q, 2, a->step_no);
    q->params[3] = a->status;
    q->params[4] = a->worker;
    q->params[5] = a->messages;
    q->params[6] = a->tool_calls;
    q->params[7] = a->model;
    req_num(q, 8, a->tokens_in);
    req_num(q, 9, a->tokens_out);
    req_num(q, 10, a->tokens_cached);
    snprintf(q->num[11], NUM_LEN, "%.6f", a->cost_usd);
    q->params[11] = q->num[11];
    req_num(q, 12, a->latency_ms);
    req_bool(q, 13, a->release);
    q->params[14] = a->result;
    q->params[15] = a->error;
    q->params[16] = a->stop_reason;
    q->params[17] = a->suspend_reason;
    if (a->resume_in_ms >= 0) {
        req_num(q, 18, a->resume_in_ms);
    }
    q->params[19] = a->wait_event;
    q->params[20] = a->event_reason;
    req_num(q, 21, a->tool_calls_count);
    req_num(q, 22, a->active_ms);
    req_num(q, 23, a->lease_seconds);
    req_num(q, 24, a->state_version);
    q->params[25] = a->fallback;
    q->vsql = SQL_STEP_EXISTS;
    q->vnparams = 3;
    q->vparams[0] = q->params[0];
    q->vparams[1] = q->params[2];
    q->vparams[2] = q->params[1];
    return req_start(q);
}

static void transition_decode(req_t *q, int err, const PGresult *res) {
    lr_store_write_res_t r;
    memset(&r, 0, sizeof(r));
    if (err == LR_ECONN) {
        /* Ambiguous; fenced on the epoch and status = running, so running
         * it again is safe (it waits for the reconnection). */
        lr_warn("task.transition_retry", "task %s: connection lost during the transition to %s; running it again",
                q->params[0], q->params[2]);
        q->verifying = false;
        if (req_resend(q, STORE_RETRIES)) {
            return;
        }
    }
    r.err = err;
    if (err != 0) {
        r.errmsg = errmsg_of(err, res);
    } else if (q->verifying) {
        /* After a resend found nothing to change: did the first attempt
         * commit?  Our status under our epoch says it did (nobody else
         * writes a task while its epoch is ours). */
        const char *st = PQntuples(res) == 1 ? lr_pg_get(res, 0, 0) : NULL;
        const char *ep = PQntuples(res) == 1 ? lr_pg_get(res, 0, 1) : NULL;
        bool ours = st != NULL && ep != NULL && strcmp(st, q->params[2]) == 0 && strcmp(ep, q->params[1]) == 0;
        r.ambiguous = !ours;
        r.recovered = ours;
    } else if (PQntuples(res) == 0 && q->tries > 0) {
        q->verifying = true;
        if (req_send(q) == 0) {
            return;
        }
        r.ambiguous = true;
    } else if (PQntuples(res) == 0) {
        r.fenced = true;
    } else {
        r.status = lr_pg_getn(res, 0, "status");
        r.error = lr_pg_getn(res, 0, "error");
    }
    write_done(q, &r);
}

int lr_store_transition(lr_pg_pool_t *pg, const lr_store_transition_args_t *a, lr_store_write_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_TRANSITION, 10, transition_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->params[0] = a->id;
    req_num(q, 1, a->epoch);
    q->params[2] = a->status;
    q->params[3] = a->worker;
    q->params[4] = a->reason;
    q->params[5] = a->error;
    q->params[6] = a->stop_reason;
    if (a->resume_in_ms >= 0) {
        req_num(q, 7, a->resume_in_ms);
    }
    req_num(q, 8, a->attempt_inc);
    q->params[9] = a->suspend_reason;
    q->vsql = SQL_TASK_STATUS;
    q->vnparams = 1;
    q->vparams[0] = a->id;
    return req_start(q);
}

static void done_decode(req_t *q, int err, const PGresult *res) {
    (void)res;
    if (q->cb != NULL) {
        ((lr_store_done_cb)q->cb)(err, q->arg);
    }
    req_free(q);
}

int lr_store_mark_published(lr_pg_pool_t *pg, const char *id, lr_store_done_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_MARK_PUBLISHED, 1, done_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->batched = true;
    q->params[0] = id;
    return req_start(q);
}

/* ------------------------------------------------------ malformed messages */

static void dead_message_decode(req_t *q, int err, const PGresult *res) {
    lr_store_dead_message_res_t r;
    if (err == LR_ECONN && req_resend(q, STORE_RETRIES - 1)) {
        return; /* the upsert is idempotent */
    }
    memset(&r, 0, sizeof(r));
    r.err = err;
    if (err != 0) {
        r.errmsg = errmsg_of(err, res);
    } else {
        r.key = lr_pg_get(res, 0, 0) != NULL ? lr_pg_get(res, 0, 0) : "";
    }
    ((lr_store_dead_message_cb)q->cb)(&r, q->arg);
    req_free(q);
}

int lr_store_dead_message(lr_pg_pool_t *pg, const lr_store_dead_message_args_t *a, lr_store_dead_message_cb cb,
                          void *arg) {
    req_t *q = req_new(pg, SQL_DEAD_MESSAGE, 9, dead_message_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->owned = lr_bytea_hex(a->body, a->body_len);
    if (q->owned == NULL) {
        req_free(q);
        return LR_ENOMEM;
    }
    q->params[0] = q->owned;
    q->params[1] = a->message_id;
    q->params[2] = a->queue;
    q->params[3] = a->reason;
    q->params[4] = a->error;
    q->params[5] = a->headers_json;
    if (a->delivery_count >= 0) {
        req_num(q, 6, a->delivery_count);
    }
    req_bool(q, 7, a->body_is_json);
    q->params[8] = a->task_id;
    return req_start(q);
}

/* ------------------------------------------------------ leases and worker */

static void renew_decode(req_t *q, int err, const PGresult *res) {
    lr_store_renew_res_t r;
    lr_store_lease_t *lost = NULL;
    int n = 0;
    memset(&r, 0, sizeof(r));
    r.err = err;
    if (err != 0) {
        r.errmsg = errmsg_of(err, res);
    } else {
        int rows = PQntuples(res);
        lost = rows > 0 ? calloc((size_t)rows, sizeof(*lost)) : NULL;
        if (rows > 0 && lost == NULL) {
            r.err = LR_ENOMEM;
            r.errmsg = lr_strerror(LR_ENOMEM);
        }
        for (int i = 0; lost != NULL && i < rows; i++) {
            const char *renewed = lr_pg_get(res, i, 2);
            if (renewed != NULL && renewed[0] == 't') {
                continue;
            }
            lost[n].id = lr_pg_get(res, i, 0);
            lost[n].epoch = atoll(lr_pg_get(res, i, 1));
            n++;
        }
        r.nfenced = n;
        r.fenced = lost;
    }
    ((lr_store_renew_cb)q->cb)(&r, q->arg);
    free(lost);
    req_free(q);
}

int lr_store_renew(lr_pg_pool_t *pg, const lr_store_lease_t *leases, int n, int lease_seconds, long timeout_ms,
                   lr_store_renew_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_RENEW, 3, renew_decode, (void (*)(void))cb, arg);
    size_t idcap = (size_t)n * (LR_UUID_LEN + 1) + 3; /* "{id,id}" */
    char *ids, *epochs;
    size_t ni = 0, ne = 0;
    /* one buffer owned by the request: the ids' array text, then the epochs' */
    if (q == NULL || (q->owned = malloc(idcap + (size_t)n * 21 + 3)) == NULL) {
        if (q != NULL) {
            req_free(q);
        }
        return LR_ENOMEM;
    }
    ids = q->owned;
    epochs = q->owned + idcap;
    ids[ni++] = '{';
    epochs[ne++] = '{';
    for (int i = 0; i < n; i++) {
        ni += (size_t)sprintf(ids + ni, "%s%.*s", i ? "," : "", LR_UUID_LEN, leases[i].id);
        ne += (size_t)sprintf(epochs + ne, "%s%lld", i ? "," : "", (long long)leases[i].epoch);
    }
    ids[ni++] = '}';
    ids[ni] = '\0';
    epochs[ne++] = '}';
    epochs[ne] = '\0';
    q->params[0] = ids;
    q->params[1] = epochs;
    req_num(q, 2, lease_seconds);
    q->timeout_ms = timeout_ms;
    return req_start(q);
}

static void heartbeat_decode(req_t *q, int err, const PGresult *res) {
    if (err != 0) {
        lr_debug("worker.heartbeat_failed", "heartbeat failed: %s", errmsg_of(err, res));
    }
    req_free(q);
}

int lr_store_heartbeat(lr_pg_pool_t *pg, const lr_store_heartbeat_args_t *a) {
    req_t *q = req_new(pg, SQL_HEARTBEAT, 8, heartbeat_decode, NULL, NULL);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->params[0] = a->worker;
    q->params[1] = a->hostname;
    req_num(q, 2, a->pid);
    q->params[3] = a->version;
    q->params[4] = a->queues_csv;
    req_num(q, 5, a->in_flight);
    req_num(q, 6, a->max_in_flight);
    req_bool(q, 7, a->draining);
    q->timeout_ms = 5000;
    return req_start(q);
}

static void reply_refused_decode(req_t *q, int err, const PGresult *res) {
    if (err != 0) {
        lr_warn("task.reply_refused_unrecorded", "the refused reply_to of a task was not recorded: %s",
                errmsg_of(err, res));
    }
    req_free(q);
}

int lr_store_reply_refused(lr_pg_pool_t *pg, const char *id, const char *actor, const char *reply_to, const char *why) {
    req_t *q = req_new(pg, LR_SQL_REPLY_REFUSED, 4, reply_refused_decode, NULL, NULL);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    q->params[0] = id;
    q->params[1] = actor;
    q->params[2] = reply_to;
    q->params[3] = why;
    q->timeout_ms = 10000;
    return req_start(q);
}

static void flags_decode(req_t *q, int err, const PGresult *res) {
    lr_store_flags_res_t r;
    const char *entries[512];
    memset(&r, 0, sizeof(r));
    r.err = err;
    if (err != 0) {
        r.errmsg = errmsg_of(err, res);
    } else {
        for (int i = 0; i < PQntuples(res) && r.n < 512; i++) {
            entries[r.n++] = lr_pg_get(res, i, 0);
        }
        r.entries = entries;
    }
    ((lr_store_flags_cb)q->cb)(&r, q->arg);
    req_free(q);
}

int lr_store_flags(lr_pg_pool_t *pg, lr_store_flags_cb cb, void *arg) {
    req_t *q = req_new(pg, SQL_FLAGS, 0, flags_decode, (void (*)(void))cb, arg);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    return req_start(q);
}
