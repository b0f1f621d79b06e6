/*
 * ratewin.h - the fleet-wide rate windows of model endpoints and tenants
 * (table rate_windows): one row per key and minute counting the requests and
 * tokens every worker reserved in it.
 *
 * A caller reserves before a model call (one request and its estimated
 * tokens) and settles after it (replacing the estimate by the actual count).
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

/* What to reserve.  Strings are copied by lr_ratewin_reserve. */
typedef struct lr_ratewin_reserve {
    const char *model_key;  /* "model:<provider>:<model>" */
    long rpm;               /* the model's requests a minute, 0 = no limit */
    long tpm;               /* the model's tokens a minute, 0 = no limit */
    long estimate;          /* tokens this call is expected to use */
    const char *tenant_key; /* "tenant:<name>", or NULL: the tenant is not capped */
    long tenant_tpm;        /* the tenant's tokens a minute (with tenant_key) */
} lr_ratewin_reserve_t;

/* The answer to a reservation; borrowed by the callback (copy what you keep). */
typedef struct lr_ratewin_result {
    int err;            /* 0, or the LR_E* code of a failed query: the limiter
                           is unavailable (nothing was reserved) */
    const char *errmsg; /* with err: the server's message or lr_strerror(err) */
    bool granted;       /* err == 0: within this minute's limits of the model
                           and (with a tenant key) of the tenant */
    char window[48];    /* granted: window_start of the reservation, for the
                           settlement */
} lr_ratewin_result_t;

typedef void (*lr_ratewin_cb)(const lr_ratewin_result_t *res, void *arg);

/* Reserves one request and a->estimate tokens in the current minute.
 * Returns 0: cb(res, arg) runs exactly once later (never inside this call),
 * and arg must stay valid until it has.  Returns LR_ENOMEM or lr_pg_query's
 * codes (LR_EBUSY queue full, LR_ESHUTDOWN, LR_EINVAL): cb never runs;
 * treat it as an unavailable limiter.  A reservation that is not granted is
 * not undone: whichever of the two keys was within its limit counted it (the
 * next minute's window starts afresh). */
int lr_ratewin_reserve(lr_pg_pool_t *pg, const lr_ratewin_reserve_t *a, lr_ratewin_cb cb, void *arg) LR_MUSTCHECK;

/* What to settle.  Strings are copied by lr_ratewin_settle. */
typedef struct lr_ratewin_settle {
    const char *model_key;  /* as reserved */
    const char *window;     /* lr_ratewin_result_t.window of the reservation */
    long delta;             /* actual tokens - estimate (may be negative) */
    const char *tenant_key; /* as reserved, or NULL */
} lr_ratewin_settle_t;

/* Corrects a granted reservation by delta tokens (never below 0).  Fire and
 * forget: nobody waits for it, a failure only leaves the estimate counted.
 * Returns 0 (queued) or lr_pg_query's codes (nothing queued). */
int lr_ratewin_settle(lr_pg_pool_t *pg, const lr_ratewin_settle_t *a) LR_MUSTCHECK;

#endif
