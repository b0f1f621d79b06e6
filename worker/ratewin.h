/*
 * ratewin.h - the fleet-wide rate limits of model endpoints and tenants, as
 * sliding windows (table rate_reservations, migration 0007): one row per
 * reservation and key, and a reservation is admitted only when the rows of
 * the last LR_RATEWIN_WINDOW_SECONDS plus this one fit the key's limits, so
 * no interval of that length (not only each wall-clock minute) holds more.
 *
 * A caller reserves before a model call (one request and its estimated
 * tokens, on the model's key and, when capped, the tenant's: both or
 * neither) and settles after it (the rows' tokens become the actual count).
 * A refusal says how long until enough old reservations leave the window
 * for this one to fit.  One round trip each.  The first request into an
 * empty window is admitted whatever its estimate, so a window can exceed a
 * token limit by at most one request's reservation (and by the amount calls
 * in flight use beyond their estimates).
 *
 * The limiter is advisory: when the database cannot answer, callers go ahead
 * (the provider's own 429s still bound them).
 *
 * Thread affinity: the loop thread (the pool's, common/pg.h).
 */
#ifndef LR_RATEWIN_H
#define LR_RATEWIN_H

#include <stdbool.h>

#include "err.h"
#include "pg.h"

/* The window's length: rpm and tpm bound the requests and tokens reserved
 * in any interval of this many seconds.  Every worker of a fleet must use
 * the same (a reservation prunes its keys' rows older than this). */
#define LR_RATEWIN_WINDOW_SECONDS 60

/* What to reserve.  Strings are copied by lr_ratewin_reserve. */
typedef struct lr_ratewin_reserve {
    const char *model_key;  /* "model:<provider>:<model>", or NULL: the model
                               has no limit (only the tenant is reserved on) */
    long rpm;               /* the model's requests a window, 0 = no limit */
    long tpm;               /* the model's tokens a window, 0 = no limit */
    long estimate;          /* tokens this call is expected to use */
    const char *tenant_key; /* "tenant:<name>", or NULL: the tenant is not capped */
    long tenant_tpm;        /* the tenant's tokens a window (with tenant_key) */
} lr_ratewin_reserve_t;

/* A granted reservation: its rows, for the settlement.  0 = no row (that key
 * was not asked for, or nothing was reserved). */
typedef struct lr_ratewin_ticket {
    long long model_id;
    long long tenant_id;
} lr_ratewin_ticket_t;

/* The answer to a reservation; borrowed by the callback (copy what you keep). */
typedef struct lr_ratewin_result {
    int err;                    /* 0, or the LR_E* code of a failed query: the
                                   limiter is unavailable (nothing was reserved) */
    const char *errmsg;         /* with err: the server's message or lr_strerror(err) */
    bool granted;               /* err == 0: within the window's limits of the model
                                   and (with a tenant key) of the tenant */
    long wait_ms;               /* err == 0 && !granted: ms (>= 1) until enough
                                   reservations leave the window for this one to
                                   fit; an upper bound, as calls in flight count at
                                   their estimate until they settle */
    lr_ratewin_ticket_t ticket; /* granted: the rows reserved */
} lr_ratewin_result_t;

typedef void (*lr_ratewin_cb)(const lr_ratewin_result_t *res, void *arg);

/* Reserves one request and a->estimate tokens now, on both keys or neither.
 * Returns 0: cb(res, arg) runs exactly once later (never inside this call),
 * and arg must stay valid until it has.  Returns LR_ENOMEM or lr_pg_query's
 * codes (LR_EBUSY queue full, LR_ESHUTDOWN, LR_EINVAL): cb never runs;
 * treat it as an unavailable limiter.  A refused reservation leaves nothing
 * behind: ask again after res->wait_ms. */
int lr_ratewin_reserve(lr_pg_pool_t *pg, const lr_ratewin_reserve_t *a, lr_ratewin_cb cb, void *arg) LR_MUSTCHECK;

/* Sets the tokens of a granted reservation's rows to tokens, the call's
 * actual count (0 for a call that used none, e.g. an error answer; never
 * below 0).  Fire and forget: nobody waits for it, a failure only leaves the
 * estimate counted until the row leaves the window.  A ticket with no rows
 * queues nothing.  Returns 0 (queued, or nothing to do) or lr_pg_query's
 * codes (nothing queued). */
int lr_ratewin_settle(lr_pg_pool_t *pg, const lr_ratewin_ticket_t *t, long tokens) LR_MUSTCHECK;

#endif
