/*
 * store.h - the worker's typed statement layer over the async pool
 * (common/pg.h): one function per statement in worker/sql.h, a struct of
 * named arguments in, a struct result out.
 *
 * The ambiguous-commit rule lives here, once per statement: when the
 * connection is lost after a statement was sent, it may or may not have
 * committed.  Each statement says what it does about it:
 *
 *   statement         on a lost connection
 *   ---------------   ---------------------------------------------------
 *   claim / insert    reported (res.lost); the caller claims again with
 *                     reclaim = true, which takes back a live lease of its
 *                     own (it needs to know whether another run of the
 *                     worker holds the same task, which only it knows)
 *   checkpoint        asks SQL_STEP_EXISTS whether the step row of this
 *                     epoch is there: yes = committed, no = sent again
 *                     (still fenced on epoch and step)
 *   transition        sent again (fenced on epoch and status = running);
 *                     zero rows after a resend: the row is read, and our
 *                     status under our epoch = committed (res.recovered),
 *                     anything else = res.ambiguous
 *   history, tenant   read again
 *   dead message      sent again (an idempotent upsert)
 *   mark published,   not retried (the outbox sweep and the next beat
 *   renew, heartbeat  cover them)
 *
 * Each is sent again at most STORE_RETRIES times (every resend waits for the
 * pool to reconnect); then the result reports err = LR_ECONN.
 *
 * Callbacks: a function that returns 0 calls its cb exactly once, later,
 * never inside the call; arg must stay valid until then.  A non-zero return
 * (LR_ENOMEM, or lr_pg_query's LR_EBUSY / LR_ESHUTDOWN / LR_EINVAL) means the
 * callback never runs.  String arguments are copied when the statement is
 * queued, but one that may be sent again (checkpoint, transition, history,
 * tenant count, dead message) reads them again: keep those valid until the
 * callback (they are a run's fields).  Numbers are copied.  Strings in a
 * result are borrowed for the duration of the callback: copy what you keep.
 *
 * Thread affinity: the loop thread (the pool's).
 */
#ifndef LR_WORKER_STORE_H
#define LR_WORKER_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "pg.h"

/* ------------------------------------------------------------ claim, insert */

typedef struct lr_store_claim_args {
    const char *id;
    const char *worker;
    int lease_seconds;
    int claims_below; /* claim only if claims without progress < this */
    bool reclaim;     /* may take back a live lease of this worker */
} lr_store_claim_args_t;

/* The claimed task row. */
typedef struct lr_store_task {
    int64_t epoch;
    int step, claims, attempt, max_attempts, state_version;
    long tokens_in, tokens_out, tool_calls, active_ms;
    long wall_ms; /* since started_at (0 for a task inserted by this claim) */
    long age_ms;  /* since created_at (0 for a task inserted by this claim) */
    /* the first claim of a task enqueued with a row (longrun enqueue):
     * created_at to now; -1 for any later claim and for a task inserted by
     * this claim (its enqueue time is unknown) */
    long queue_wait_ms;
    double cost_usd;
    bool past_deadline;
    bool cancel_requested; /* an operator's cancel is pending (claim only) */
    int tenant_running;    /* running tasks of the tenant (others), -1 unknown */
    long outage_ms;        /* parked for provider_unavailable since then (ms before the claim), -1: not */
    const char *agent, *queue, *input, *budgets;                   /* input, budgets: JSON text */
    const char *reply_to, *correlation_id, *callback_url, *tenant; /* NULL when unset */
} lr_store_task_t;

typedef struct lr_store_claim_res {
    int err;            /* 0, or LR_E* (the statement failed) */
    const char *errmsg; /* with err: the server's message or lr_strerror(err) */
    bool lost;          /* err == LR_ECONN: it may have committed */
    bool claimed;       /* err == 0: task holds the row */
    lr_store_task_t task;
    /* err == 0 && !claimed: why (claim only; an insert that lost the race
     * to another creator has no row and cur_status NULL) */
    const char *cur_status; /* NULL: no such task */
    int cur_claims;
    bool cur_leased; /* a live lease */
    /* insert only: PostgreSQL refused a value of the message (SQLSTATE
     * class 22 or 23); why names the field.  Retrying cannot help. */
    bool refused;
    char why[512];
} lr_store_claim_res_t;

typedef void (*lr_store_claim_cb)(const lr_store_claim_res_t *res, void *arg);

int lr_store_claim(lr_pg_pool_t *pg, const lr_store_claim_args_t *a, lr_store_claim_cb cb, void *arg) LR_MUSTCHECK;

/* A task first seen on the broker: create its row, already claimed. */
typedef struct lr_store_insert_args {
    const char *id, *queue, *agent;
    const char *input, *budgets, *metadata; /* JSON text; metadata may be NULL */
    int max_attempts;
    const char *deadline, *tenant, *callback_url, *reply_to, *correlation_id; /* or NULL */
    const char *worker;
    int lease_seconds;
} lr_store_insert_args_t;

int lr_store_insert(lr_pg_pool_t *pg, const lr_store_insert_args_t *a, lr_store_claim_cb cb, void *arg) LR_MUSTCHECK;

/* ---------------------------------------------------------- reads of a task */

typedef struct lr_store_history_res {
    int err;
    const char *errmsg;
    int n;            /* entries: steps in order, then signals */
    const void *rows; /* opaque: read with lr_store_history_row */
} lr_store_history_res_t;

typedef void (*lr_store_history_cb)(const lr_store_history_res_t *res, void *arg);

int lr_store_history(lr_pg_pool_t *pg, const char *id, lr_store_history_cb cb, void *arg) LR_MUSTCHECK;
/* Entry i: its JSON text and the state version it was written in. */
void lr_store_history_row(const lr_store_history_res_t *res, int i, const char **body, int *version);

typedef struct lr_store_count_res {
    int err;
    const char *errmsg;
    long count;
} lr_store_count_res_t;

typedef void (*lr_store_count_cb)(const lr_store_count_res_t *res, void *arg);

/* Running tasks of a tenant (the caller's own included once committed). */
int lr_store_tenant_running(lr_pg_pool_t *pg, const char *tenant, lr_store_count_cb cb, void *arg) LR_MUSTCHECK;

/* ------------------------------------------------------------------- writes */

typedef struct lr_store_checkpoint_args {
    const char *id;
    int64_t epoch;
    int step_no;        /* the step being written (last + 1) */
    const char *status; /* the task's status after it */
    const char *worker;
    const char *messages;   /* JSON array text, or NULL */
    const char *tool_calls; /* JSON text, or NULL */
    const char *model;      /* or NULL */
    const char *fallback;   /* JSON array of the calls that did not answer, or NULL */
    long tokens_in, tokens_out, tokens_cached, tool_calls_count;
    double cost_usd;
    long latency_ms, active_ms;
    bool release;               /* give up the lease (any status but running) */
    const char *result;         /* JSON text, succeeded only */
    const char *error;          /* dead on a budget: the error, or NULL */
    const char *stop_reason;    /* dead on a budget, or NULL */
    const char *suspend_reason; /* suspended, or NULL */
    long resume_in_ms;          /* suspended: -1 = no timer */
    const char *wait_event;     /* suspended on an event, or NULL */
    const char *event_reason;   /* the task_events reason, or NULL */
    int lease_seconds;
    int state_version;
} lr_store_checkpoint_args_t;

typedef struct lr_store_write_res {
    int err; /* 0, or LR_E*: not committed (or unknown after the
                retries: LR_ECONN) */
    const char *errmsg;
    bool fenced;        /* err == 0, nothing written: a newer owner holds
                           the task (or it left running) */
    bool ambiguous;     /* transition: zero rows after a resend, and the
                           task's row does not show our status under our
                           epoch: fenced, or changed since; not told apart */
    bool recovered;     /* transition: zero rows after a resend, and the
                           row shows our status under our epoch: the first
                           attempt committed (treat as committed) */
    const char *status; /* committed: the task's status as written (an
                           operator's cancel shows here); NULL when the
                           commit was found by a check (step row, status) */
    const char *error;  /* committed: the row's error as written (an
                           operator's cancel reason), or NULL; NULL also
                           when the commit was found by a check */
} lr_store_write_res_t;

typedef void (*lr_store_write_cb)(const lr_store_write_res_t *res, void *arg);

/* Appends the step row and advances the task (batched with other
 * checkpoints when the pool can). */
int lr_store_checkpoint(lr_pg_pool_t *pg, const lr_store_checkpoint_args_t *a, lr_store_write_cb cb,
                        void *arg) LR_MUSTCHECK;

typedef struct lr_store_transition_args {
    const char *id;
    int64_t epoch;
    const char *status; /* new status */
    const char *worker;
    const char *reason;      /* the task_events reason */
    const char *error;       /* or NULL */
    const char *stop_reason; /* or NULL (dead: the dead letter's reason) */
    long resume_in_ms;       /* -1 = none */
    int attempt_inc;
    const char *suspend_reason; /* or NULL */
} lr_store_transition_args_t;

/* A status change without a step. */
int lr_store_transition(lr_pg_pool_t *pg, const lr_store_transition_args_t *a, lr_store_write_cb cb,
                        void *arg) LR_MUSTCHECK;

typedef void (*lr_store_done_cb)(int err, void *arg);

/* Outbox bookkeeping: the continuation of a queued task is confirmed. */
int lr_store_mark_published(lr_pg_pool_t *pg, const char *id, lr_store_done_cb cb, void *arg) LR_MUSTCHECK;

/* ------------------------------------------------------ malformed messages */

typedef struct lr_store_dead_message_args {
    const void *body;
    size_t body_len;        /* stored raw (bytea) */
    const char *message_id; /* or NULL */
    const char *queue;
    const char *reason, *error;
    const char *headers_json; /* or NULL */
    long long delivery_count; /* -1 = unknown */
    bool body_is_json;        /* store the body parsed too */
    const char *task_id;      /* a valid UUID, or NULL */
} lr_store_dead_message_args_t;

typedef struct lr_store_dead_message_res {
    int err;
    const char *errmsg;
    const char *key; /* err == 0: the dead letter's dedupe key */
} lr_store_dead_message_res_t;

typedef void (*lr_store_dead_message_cb)(const lr_store_dead_message_res_t *res, void *arg);

int lr_store_dead_message(lr_pg_pool_t *pg, const lr_store_dead_message_args_t *a, lr_store_dead_message_cb cb,
                          void *arg) LR_MUSTCHECK;

/* ------------------------------------------------------ leases and worker */

typedef struct lr_store_lease {
    const char *id;
    int64_t epoch;
} lr_store_lease_t;

typedef struct lr_store_renew_res {
    int err;
    const char *errmsg;
    int nfenced;                    /* leases positively lost */
    const lr_store_lease_t *fenced; /* borrowed for the callback */
} lr_store_renew_res_t;

typedef void (*lr_store_renew_cb)(const lr_store_renew_res_t *res, void *arg);

/* Renews n leases (each fenced on its epoch) in one statement. */
int lr_store_renew(lr_pg_pool_t *pg, const lr_store_lease_t *leases, int n, int lease_seconds, long timeout_ms,
                   lr_store_renew_cb cb, void *arg) LR_MUSTCHECK;

typedef struct lr_store_heartbeat_args {
    const char *worker, *hostname, *version, *queues_csv;
    int pid, in_flight, max_in_flight;
    bool draining;
} lr_store_heartbeat_args_t;

/* The worker's row in `workers` (fire and forget; failures are logged at
 * debug level). */
int lr_store_heartbeat(lr_pg_pool_t *pg, const lr_store_heartbeat_args_t *a) LR_MUSTCHECK;

/* The task_events row of an outcome refused for its reply_to
 * (LR_SQL_REPLY_REFUSED); fire and forget: a failure is logged.  Strings are
 * copied.  Returns 0 or the pool's error (nothing sent). */
int lr_store_reply_refused(lr_pg_pool_t *pg, const char *id, const char *actor, const char *reply_to,
                           const char *why) LR_MUSTCHECK;

typedef struct lr_store_flags_res {
    int err;
    const char *errmsg;
    int n;
    const char *const *entries; /* "kind:name" of each disabled flag */
} lr_store_flags_res_t;

typedef void (*lr_store_flags_cb)(const lr_store_flags_res_t *res, void *arg);

/* The kill switches that are on. */
int lr_store_flags(lr_pg_pool_t *pg, lr_store_flags_cb cb, void *arg) LR_MUSTCHECK;

/* The database's schema version (res.count). */
int lr_store_schema_version(lr_pg_pool_t *pg, lr_store_count_cb cb, void *arg) LR_MUSTCHECK;

/* ------------------------------------------------------- durability check */

typedef struct lr_store_durability_res {
    int err;            /* 0, or LR_E* (the statement failed) */
    const char *errmsg; /* with err */
    /* err == 0: the settings as the worker's connection sees them (role and
     * database settings applied), and whose they are.  Borrowed. */
    const char *fsync, *synchronous_commit, *user, *database;
    bool unsafe; /* fsync = off or synchronous_commit = off */
} lr_store_durability_res_t;

typedef void (*lr_store_durability_cb)(const lr_store_durability_res_t *res, void *arg);

/* Reads fsync and synchronous_commit (SQL_DURABILITY).  A lost connection
 * is read again (STORE_RETRIES times). */
int lr_store_durability(lr_pg_pool_t *pg, lr_store_durability_cb cb, void *arg) LR_MUSTCHECK;

#endif
