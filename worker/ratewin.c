/*
 * ratewin.c - the rate-window store (table rate_windows): typed reservation
 * and settlement for the agent executor's fleet-wide rate limits; see
 * ratewin.h.
 *
 * Design.  Each function formats its named arguments as the text parameters
 * of one statement of sql.h and queues it on the worker's pool in autocommit
 * (lr_pg_query).  A reservation carries a small heap context (the caller's
 * callback and whether a tenant was asked for) that the pool callback turns
 * the PGresult into an lr_ratewin_result_t with, calls back and frees.
 * Nothing of libpq reaches the caller.  Loop thread only.
 */
#include "ratewin.h"

#include <stdio.h>
#include <stdlib.h>

#include "sql.h"

/* How long a statement may wait for a connection (ms). */
#define RATEWIN_QUERY_TIMEOUT_MS 10000

typedef struct reserve_req {
    lr_ratewin_cb cb;
    void *arg;
    bool tenant; /* a tenant key was reserved on too */
} reserve_req_t;

static void reserve_cb(int err, const PGresult *res, void *arg) {
    reserve_req_t *rq = arg;
    lr_ratewin_result_t r = {0};
    if (err != 0) {
        r.err = err;
        r.errmsg = res != NULL ? PQresultErrorMessage(res) : lr_strerror(err);
    } else {
        const char *ws = lr_pg_get(res, 0, 0);
        const char *tenant_rows = lr_pg_get(res, 0, 1);
        r.granted = ws != NULL && (!rq->tenant || (tenant_rows != NULL && atoi(tenant_rows) == 1));
        if (r.granted) {
            snprintf(r.window, sizeof(r.window), "%s", ws);
        }
    }
    rq->cb(&r, rq->arg);
    free(rq);
}

int lr_ratewin_reserve(lr_pg_pool_t *pg, const lr_ratewin_reserve_t *a, lr_ratewin_cb cb, void *arg) {
    char rpm[24], tpm[24], est[24], ttpm[24];
    reserve_req_t *rq = malloc(sizeof(*rq));
    int rc;
    if (rq == NULL) {
        return LR_ENOMEM;
    }
    rq->cb = cb;
    rq->arg = arg;
    rq->tenant = a->tenant_key != NULL;
    snprintf(rpm, sizeof(rpm), "%ld", a->rpm);
    snprintf(tpm, sizeof(tpm), "%ld", a->tpm);
    snprintf(est, sizeof(est), "%ld", a->estimate);
    snprintf(ttpm, sizeof(ttpm), "%ld", a->tenant_tpm);
    rc = lr_pg_query(pg, SQL_RATE_RESERVE, 6, (const char *const[]){a->model_key, rpm, tpm, est, a->tenant_key, ttpm},
                     RATEWIN_QUERY_TIMEOUT_MS, reserve_cb, rq);
    if (rc != 0) {
        free(rq);
    }
    return rc;
}

static void settle_cb(int err, const PGresult *res, void *arg) {
    (void)err;
    (void)res;
    (void)arg;
}

int lr_ratewin_settle(lr_pg_pool_t *pg, const lr_ratewin_settle_t *a) {
    char delta[32];
    snprintf(delta, sizeof(delta), "%ld", a->delta);
    return lr_pg_query(pg, SQL_RATE_SETTLE, 4,
                       (const char *const[]){a->model_key, a->window, delta,
                                             a->tenant_key != NULL ? a->tenant_key : ""},
                       RATEWIN_QUERY_TIMEOUT_MS, settle_cb, NULL);
}
