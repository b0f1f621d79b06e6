/*
 * core.h - the worker's two objects (lr_worker_t, lr_run_t) and the
 * functions its files call in one another.  Header only: the state lives in
 * these structs, the code in the files named below.
 *
 * The files, bottom up (each calls only those above it in this list, and
 * upward only through the hooks in lr_worker_t):
 *
 *   run_fsm.c    the run's states, outcomes and table of legal moves
 *   store.c      the typed statements (worker/sql.h), ambiguous commits
 *   deadletter.c malformed messages: recorded in dead_letters, to the DLX
 *   run.c        a run's life: creation, the checked state setter, its
 *                I/O, the one place it is freed; the executors' accessors
 *   followup.c   what a decided run publishes (continuation, dead letter,
 *                outcome to reply_to / callback_url), then the ack
 *   step.c       steps: start, checkpoint, the transitions without a step
 *   claim.c      from a delivery to a started step: parse, claim or insert,
 *                suspects, tenant cap, step log
 *   lease.c      batched lease renewal, lost leases, the heartbeat
 *   drain.c      SIGTERM: stop consuming, hand back, the drain deadline
 *   cancel.c     immediate cancellation (NOTIFY longrun_cancel)
 *   worker.c     wiring: components, the daemon skeleton, readiness
 *
 * Ownership.  The worker owns its runs (list w->runs).  A run owns its
 * delivery until it is acked or given back, its parsed message, its copies
 * of the task's fields and its executor state.  A run is freed in exactly
 * one place (run.c, run_maybe_free): when its state is DONE and none of its
 * I/O is outstanding (r->io: a statement, a publish, a step in the executor,
 * the backoff timer; each kind at most one at a time).
 *
 * Thread affinity: the loop thread, everything.
 */
#ifndef LR_WORKER_CORE_H
#define LR_WORKER_CORE_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "daemon.h"
#include "list.h"
#include "log.h"
#include "membudget.h"
#include "run_fsm.h"
#include "urlguard.h"
#include "worker.h"

/* The task's status as the worker writes it (tasks.status). */
enum lr_status {
    LR_ST_RUNNING = 0,
    LR_ST_QUEUED,
    LR_ST_SUCCEEDED,
    LR_ST_FAILED,
    LR_ST_DEAD,
    LR_ST_SUSPENDED,
    LR_ST_RETRY_WAIT,
    LR_ST_CANCELLED,
    LR_ST_COUNT
};

/* "running", ... (the database's spelling). */
const char *lr_status_name(enum lr_status s);
/* The status named s; LR_ST_COUNT when unknown. */
enum lr_status lr_status_parse(const char *s);

/* What the run publishes once its state is committed (followup.c). */
enum lr_followup {
    LR_FOLLOW_NONE = 0,
    LR_FOLLOW_CONTINUATION, /* {"id"} to the task queue, then ack */
    LR_FOLLOW_DEAD,         /* the dead letter to longrun.dlx, then ack */
    LR_FOLLOW_OUTCOME,      /* the outcome (reply_to, callback), then ack */
    LR_FOLLOW_ACK,          /* just ack */
};

/* A run's outstanding I/O (r->io bits). */
enum {
    LR_IO_DB = 1u << 0,      /* a store statement */
    LR_IO_PUBLISH = 1u << 1, /* a publish awaiting its confirm */
    LR_IO_STEP = 1u << 2,    /* the executor holds a step */
    LR_IO_TIMER = 1u << 3,   /* the backoff timer is running */
};

struct lr_run {
    lr_worker_t *w;
    lr_list_t link;              /* in w->runs */
    lr_list_t defer_link;        /* in w->deferred while DEFERRED, in w->held while HELD */
    lr_amqp_delivery_t *d;       /* owned until acked or given back */
    lr_task_msg_t msg;           /* parsed body (owned) */
    enum lr_run_state state;     /* written only by lr_run_set_state */
    enum lr_run_outcome outcome; /* set with the move to DONE */
    enum lr_followup follow;
    unsigned io; /* LR_IO_* outstanding */
    bool fenced;
    bool abandon;           /* stop at the next boundary (drain deadline) */
    bool cancel_now;        /* an immediate cancel arrived between steps (cancel.c): cancelled
                               instead of the next step */
    bool claim_may_suspect; /* its claim in flight may take a suspect task */
    bool reclaim;           /* our claim may have committed: take our own live lease back */
    bool handing_back;      /* given back undecided through a continuation (REQUEUED) */
    int db_retries;         /* claims sent again after a lost connection */
    char id[LR_UUID_LEN + 1];
    char queue[LR_TASK_MAX_AGENT + 1];
    char agent[LR_TASK_MAX_AGENT + 1];
    char *reply_to;
    char *correlation_id;
    char *callback_url;
    char *tenant;
    int64_t epoch;
    int step; /* last checkpointed step */
    int attempt, max_attempts;
    lr_run_usage_t used; /* usage so far, before the step in flight (its .step unused: r->step) */
    int slice_steps;     /* steps done in this delivery */
    uint64_t slice_start_ms;
    uint64_t step_start_ms;
    uint64_t ckpt_sent_ms;
    uint64_t lease_from_ms;  /* the last committed checkpoint that extended the lease was sent then */
    uint64_t claim_sent_ms;  /* the claim (or insert) statement was sent then */
    long claim_age_ms;       /* the task's age (since created_at) at that claim */
    uint64_t lease_until_ms; /* the lease surely holds until then (loop clock; 0 = none) */
    cJSON *input;            /* owned */
    char *budgets_json;      /* owned: the task's budgets object as stored */
    long outage_ms;          /* from the claim: parked for provider_unavailable that long, -1: not */
    cJSON *history;          /* owned: array of per-step message arrays */
    size_t mem_charged;      /* bytes charged to w->mem for it (membudget.h), in all */
    size_t mem_step;         /* of which the last step's answer, until its checkpoint */
    const lr_executor_t *exec;
    void *exec_state;
    lr_step_t out;         /* the current step's output */
    enum lr_status status; /* status written by the last checkpoint / transition */
    char reason[32];
    char error[512];
    char tr_reason[40], tr_stop[40]; /* the last transition's arguments (the store reads them
                                        again on a resend) */
    int publish_tries;
    uv_timer_t retry_timer; /* publish backoff */
    bool timer_init;        /* retry_timer initialised (on first use) */
    lr_log_ctx_t log;
};

struct lr_worker {
    uv_loop_t *loop;
    lr_config_t cfg;
    lr_daemon_t *d;
    char id[128];
    char hostname[128];
    char queues_csv[1024];
    const char **queue_names; /* full names longrun.q.<name> */
    const char **queue_short;
    int nqueues;
    /* Components, NULL once the shutdown reached them (lr_daemon_add_*). */
    lr_pg_pool_t *pg;
    lr_amqp_t *amqp;
    lr_http_t *http;
    struct lr_mcp *mcp;    /* MCP servers' sessions (worker/mcp.h), owned */
    bool amqp_after_mcp;   /* the durability check passed: RabbitMQ starts once MCP is ready */
    lr_urlguard_t *egress; /* LONGRUN_EGRESS_ALLOW (worker/egress.h), owned */
    uv_timer_t lease_timer;
    uv_timer_t drain_timer;
    lr_list_t runs;
    int nruns;
    bool draining;
    bool stopping;
    bool amqp_up;
    int pg_usable;
    bool test_hooks;
    uint64_t steps_done;
    uint64_t tasks_finished;
    int schema_state; /* 0 unknown, 1 ok, -1 incompatible */
    char schema_msg[160];
    /* The durability self-check (worker.c): 0 not answered yet, 1 passed
     * (RabbitMQ is started only then), -1 refused (the worker exits 2). */
    int durability_state;
    bool durability_pending;   /* the check's statement is in flight */
    int exit_code;             /* non-zero: lr_worker_run returns it */
    bool renew_failing;        /* the last lease renewal failed */
    uint64_t renew_ok_sent_ms; /* when the last successful renewal was sent */
    /* Crash-loop attribution (claim.c): a task whose last suspect_claims()
     * claims made no progress is a suspect.  At most one suspect runs per
     * worker until its first checkpoint; the others wait unclaimed, so a
     * poison task that kills the process cannot drag the claim counts of the
     * tasks that share its worker up to crash_loop with it.  A single crash
     * makes no suspect, so the recovery of a dead worker's tasks is not
     * serialized. */
    lr_run_t *suspect;     /* the suspect claimed and not yet checkpointed */
    bool suspect_claiming; /* a claim that may take a suspect is in flight */
    lr_list_t deferred;    /* suspects waiting for the slot, oldest first */
    /* The memory budget (membudget.h); deliveries held unclaimed while it
     * has no room (HELD), oldest first. */
    lr_mem_t mem;
    lr_list_t held;
    int nheld; /* its length at the last tick (metrics) */
    /* Hooks into the files above run.c (set by worker.c), so that the lower
     * files need not call upward: */
    void (*on_progress)(lr_run_t *r);     /* the run checkpointed or ended: frees the suspect slot */
    void (*on_run_freed)(lr_worker_t *w); /* a run was freed: the drain may be complete */
    void (*hand_back)(lr_run_t *r);       /* gives a claimed run back through a continuation */
    const lr_executor_t *(*find_executor)(const char *agent);
};

/* ---- run.c ----------------------------------------------------------- */

uint64_t lr_worker_now(lr_worker_t *w);
/* Full-jitter exponential backoff: random in [0, min(max, base * 2^n)]. */
long lr_backoff_ms(long base, long max, int n);

/* A new run for delivery d (owned from now on), in state NEW, in w->runs. */
lr_run_t *lr_run_new(lr_worker_t *w, lr_amqp_delivery_t *d);
/* The only writer of r->state: checks the move against run_fsm.c's table
 * and traces it (debug, with the task and the caller's line); a move the
 * table refuses is logged as an error and not made. */
#define lr_run_set_state(r, s) lr_run_set_state_at((r), (s), __func__, __LINE__)
bool lr_run_set_state_at(lr_run_t *r, enum lr_run_state s, const char *fn, int line);
/* Marks the start / end of one kind of I/O (LR_IO_*). */
void lr_run_io_begin(lr_run_t *r, unsigned io);
void lr_run_io_end(lr_run_t *r, unsigned io);
/* Ends the run: acks its delivery (ack = true) or gives it back to the
 * broker (false), moves to DONE with outcome o, frees it when no I/O is
 * left. */
void lr_run_finish(lr_run_t *r, enum lr_run_outcome o, bool ack);
/* Gives the task back undecided (database trouble, lost lease): REQUEUED.
 * A run that holds a claim publishes a continuation and acks (w->hand_back),
 * so infrastructure trouble never counts against the queue's delivery limit
 * (the poison budget); one that never claimed gives the delivery back. */
void lr_run_requeue(lr_run_t *r);
/* Sets the bytes the run is charged to the memory budget (0 at its end). */
void lr_run_mem_set(lr_run_t *r, size_t n);
/* The step's answer is checkpointed (or given up): its adopted charge is
 * replaced by state_bytes of resident state. */
void lr_run_mem_step_done(lr_run_t *r, size_t state_bytes);
/* The run's agent as a metric label: its name when this worker knows the
 * agent (the agents file, a built-in kind), so the label's values are
 * bounded by configuration; "unknown" otherwise (a task's agent field is
 * anyone's input).  Borrowed: valid while the run lives. */
const char *lr_run_agent_label(const lr_run_t *r);
/* Ends a run whose delivery was handed over elsewhere (dead letter). */
void lr_run_drop(lr_run_t *r, enum lr_run_outcome o);
/* Frees r if it is DONE with no I/O left (called after each I/O ends). */
void lr_run_maybe_free(lr_run_t *r);
/* Frees every run at exit, whatever its state (the loop is gone). */
void lr_run_free_all(lr_worker_t *w);

/* ---- deadletter.c ---------------------------------------------------- */

/* Records a malformed message (takes ownership of d) and publishes it to
 * longrun.dlx, then acks it; requeues it when it cannot be recorded. */
void lr_deadletter_message(lr_pg_pool_t *pg, lr_amqp_t *amqp, lr_amqp_delivery_t *d, const char *reason,
                           const char *error);

/* ---- followup.c ------------------------------------------------------ */

/* Publishes what r->follow calls for, then acks (and ends the run). */
void lr_followup_publish(lr_run_t *r);
/* lr_worker_t.hand_back: a continuation for the task, then the ack. */
void lr_followup_hand_back(lr_run_t *r);

/* ---- step.c ---------------------------------------------------------- */

/* Starts the next step, or hands the task back when draining. */
void lr_step_next(lr_run_t *r);
/* A status change without a step (store.h lr_store_transition). */
void lr_step_transition(lr_run_t *r, enum lr_status status, const char *reason, const char *error,
                        const char *stop_reason, long resume_in_ms, int attempt_inc);
/* Cancels the step in flight (done(r) never runs). */
void lr_step_cancel(lr_run_t *r);
/* A statement found a newer owner: abandon locally. */
void lr_step_fenced(lr_run_t *r, const char *what);
/* The operator cancelled the task: aborts the step in flight, if any
 * (lr_step_cancel), and writes the cancellation (the fenced transition to
 * cancelled, which needs tasks.cancel_requested); the outcome follows as for
 * any terminal status.  Only for a claimed run that is about to start a step
 * or is running one (state STEPPING, or on its way to it). */
void lr_step_cancel_task(lr_run_t *r);

/* ---- claim.c --------------------------------------------------------- */

/* amqp on_delivery: a new run for d. */
void lr_claim_delivery(lr_amqp_delivery_t *d, void *arg);
/* Frees the suspect slot if r holds it (lr_worker_t.on_progress). */
void lr_claim_progress(lr_run_t *r);
/* Gives every deferred suspect and every held delivery back to the broker
 * (drain). */
void lr_claim_release_deferred(lr_worker_t *w);
/* The memory budget has room again: claims held deliveries while it does
 * (lr_mem_t.on_room). */
void lr_claim_room(void *arg);

/* ---- lease.c --------------------------------------------------------- */

/* The renewal period: min(lease / 3, heartbeat), in ms. */
uint64_t lr_lease_every_ms(const lr_worker_t *w);
void lr_lease_timer_cb(uv_timer_t *t);

/* ---- drain.c --------------------------------------------------------- */

/* The daemon's on_drain hook (first SIGTERM/SIGINT). */
void lr_drain_start(lr_daemon_t *d, const char *why, void *arg);
/* Shuts down once draining with no run left (lr_worker_t.on_run_freed). */
void lr_drain_maybe_exit(lr_worker_t *w);
/* What exiting at once leaves behind (the daemon's exit_note hook). */
void lr_drain_exit_note(char *buf, size_t len, void *arg);

/* ---- cancel.c -------------------------------------------------------- */

/* LISTENs on longrun_cancel: a notification names a task an operator
 * cancelled; the run that holds it here ends now (cancel.c).  Returns 0 or
 * the error of lr_pg_listen. */
int lr_cancel_listen(lr_worker_t *w) LR_MUSTCHECK;

#endif
