/*
 * spend.h - the spend ledger (migration 0011): typed statements for the
 * fleet-wide spend caps of agents and tenants, and the worker's cache of
 * which of them have a cap.
 *
 * Before a model call of a task whose agent or tenant has a cap, the agent
 * executor reserves the call's worst-case cost (lr_spend_reserve: one call
 * of the SQL function lr_spend_reserve, under each scope's advisory lock);
 * it is granted only when, for every cap of the agent and of the tenant
 * (per UTC day and month), the period's settled spend plus the live
 * reservations plus this one fit the cap.  After the call the executor
 * settles it with the actual cost (lr_spend_settle: the reservation
 * deleted, the cost added to the ledger of every capped scope, at once).
 * Concurrent workers therefore exceed a cap only by what calls cost beyond
 * their reservations (docs/architecture.md, "Spend caps").
 *
 * The ledger is not advisory: when it cannot answer, the caller must not
 * make the call (fail closed: back off and ask again).
 *
 * The cache (lr_spend_capped) is loaded at start, after every reconnect of
 * the LISTEN connection and on NOTIFY longrun_spend (lr_spend_start), and
 * answers "capped" for everything until its first load.
 *
 * Thread affinity: the loop thread (the pool's, common/pg.h).
 */
#ifndef LR_SPEND_H
#define LR_SPEND_H

#include <stdbool.h>

#include "err.h"
#include "pg.h"

/* How long a reservation counts at least, whatever the call's timeout: a
 * worker killed between a reservation and its settlement blocks a cap for
 * at most this long (or the call's own bound when that is longer). */
#define LR_SPEND_RESERVATION_MIN_SECONDS (15 * 60)

/* What to reserve.  Strings are copied by lr_spend_reserve. */
typedef struct lr_spend_reserve {
    const char *agent;  /* the task's agent (required) */
    const char *tenant; /* the task's tenant, or NULL */
    double amount_usd;  /* the call's worst-case cost (>= 0) */
    long ttl_seconds;   /* how long the reservation counts at most (>= 1) */
} lr_spend_reserve_t;

/* The answer to a reservation; borrowed by the callback (copy what you keep). */
typedef struct lr_spend_result {
    int err;            /* 0, or the LR_E* code of a failed query: the ledger is
                           unavailable, nothing was reserved; do not call */
    const char *errmsg; /* with err: the server's message or lr_strerror(err) */
    bool granted;       /* err == 0: every cap of the agent and the tenant has room */
    long long id;       /* granted: the reservation, for the settlement (0: no cap
                           applies to the task, nothing was reserved) */
    /* err == 0 && !granted: the cap that binds (of those whose settled
     * spend alone leaves no room, else of those the reservations fill, the
     * one whose period rolls over last) */
    const char *scope;     /* "agent" or "tenant" */
    const char *name;      /* the agent's or tenant's name */
    const char *period;    /* "day" or "month" (UTC) */
    const char *resets_at; /* when the period rolls over, "YYYY-MM-DDTHH:MM:SSZ" */
    double cap_usd;
    double spent_usd;    /* settled in the period */
    double reserved_usd; /* live reservations (calls in flight) */
    long wait_ms;        /* until resets_at (>= 1) */
    bool in_flight;      /* the settled spend leaves room for this call: only the
                            reservations of calls in flight fill the cap (room may
                            come back within seconds, as they settle) */
} lr_spend_result_t;

typedef void (*lr_spend_cb)(const lr_spend_result_t *res, void *arg);

/* Reserves a->amount_usd for one model call of a task of a->agent and
 * a->tenant.  Returns 0: cb(res, arg) runs exactly once later (never inside
 * this call), and arg must stay valid until it has.  Returns LR_EINVAL (no
 * agent), LR_ENOMEM or lr_pg_query's codes (LR_EBUSY queue full,
 * LR_ESHUTDOWN): cb never runs; treat it as an unavailable ledger.  A
 * refused reservation leaves nothing behind. */
int lr_spend_reserve(lr_pg_pool_t *pg, const lr_spend_reserve_t *a, lr_spend_cb cb, void *arg) LR_MUSTCHECK;

/* Settles reservation id (from a granted result; 0 queues nothing) with the
 * call's actual cost in USD (0 for a call that cost nothing; never below
 * 0).  Fire and forget; sent again after a connection loss (the statement
 * is idempotent), at most 3 times; a settlement that fails for good leaves
 * the reservation counted until it expires and the cost missing from the
 * ledger (logged; task_steps still has it).  Returns 0 (queued, or nothing
 * to do) or lr_pg_query's codes (nothing queued). */
int lr_spend_settle(lr_pg_pool_t *pg, long long id, double actual_usd) LR_MUSTCHECK;

/* Starts the cache and the agents file's caps: LISTENs on longrun_spend
 * (each notification, and every reconnect, reloads the set of capped
 * scopes) and writes the caps of the loaded agents file (lr_agents_*) to
 * spend_caps with source 'file' (never over an operator's row), once it
 * succeeds (again on every reload until then).  worker names the writer
 * (updated_by).  Call once, after the pool exists.  Returns 0, or
 * lr_pg_listen's codes. */
int lr_spend_start(lr_pg_pool_t *pg, const char *worker) LR_MUSTCHECK;

/* Every 30 s or so: loads the cache again if its last load failed, and
 * writes the agents file's caps if that has not succeeded yet (a schema
 * migrated after the worker started, a statement error). */
void lr_spend_tick(void);

/* Does a call of a task of agent (and tenant, or NULL) need a reservation:
 * the agent or the tenant has a cap, or the cache has not loaded yet. */
bool lr_spend_capped(const char *agent, const char *tenant);

/* Frees the cache (at exit). */
void lr_spend_free(void);

#endif
