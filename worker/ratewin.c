/*
 * ratewin.c - the rate-window store (table rate_reservations): typed
 * reservation and settlement for the agent executor's fleet-wide rate
 * limits; see ratewin.h.
 *
 * Design.  Each function formats its named arguments as the text parameters
 * of one statement of sql.h and queues it on the worker's pool in autocommit
 * (lr_pg_query).  The reservation is one call of the SQL function
 * lr_rate_reserve (migration 0007), which takes each key's advisory lock,
 * prunes the rows that left the window, and admits or refuses with the wait;
 * the settlement is one UPDATE by row id.  A reservation carries a small
 * heap context (the caller's callback) that the pool callback turns the
 * PGresult into an lr_ratewin_result_t with, calls back and frees.  Nothing
 * of libpq reaches the caller.  Loop thread only.
 */
#include "ratewin.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sql.h"

/* How long a statement may wait for a connection (ms). */
#define RATEWIN_QUERY_TIMEOUT_MS 10000

typedef struct reserve_req {
    lr_ratewin_cb cb;
    void *arg;
} reserve_req_t;

/* A bigint column, 0 when NULL. */
static long long get_id(const PGresult *res, int col) {
    const char *v = lr_pg_get(res, 0, col);
    return v != NULL ? strtoll(v, NULL, 10) : 0;
}

static void reserve_cb(int err, const PGresult *res, void *arg) {
    reserve_req_t *rq = arg;
    lr_ratewin_result_t r = {0};
    const char *granted = err == 0 ? lr_pg_get(res, 0, 0) : NULL;
    if (err == 0 && granted == NULL) {
        err = LR_EDB; /* no row: not what lr_rate_reserve answers */
    }
    if (err != 0) {
        r.err = err;
        r.errmsg = res != NULL && PQresultErrorMessage(res)[0] != '\0' ? PQresultErrorMessage(res) : lr_strerror(err);
    } else if (strcmp(granted, "t") == 0) {
        r.granted = true;
        r.ticket.model_id = get_id(res, 2);
        r.ticket.tenant_id = get_id(res, 3);
    } else {
        const char *w = lr_pg_get(res, 0, 1);
        r.wait_ms = w != NULL ? strtol(w, NULL, 10) : 1;
        if (r.wait_ms < 1) {
            r.wait_ms = 1;
        }
    }
    rq->cb(&r, rq->arg);
    free(rq);
}

int lr_ratewin_reserve(lr_pg_pool_t *pg, const lr_ratewin_reserve_t *a, lr_ratewin_cb cb, void *arg) {
    char rpm[24], tpm[24], est[24], ttpm[24], win[16];
    reserve_req_t *rq = malloc(sizeof(*rq));
    int rc;
    if (rq == NULL) {
        return LR_ENOMEM;
    }
    rq->cb = cb;
    rq->arg = arg;
    snprintf(rpm, sizeof(rpm), "%ld", a->rpm);
    snprintf(tpm, sizeof(tpm), "%ld", a->tpm);
    snprintf(ttpm, sizeof(ttpm), "%ld", a->tenant_tpm);
    snprintf(est, sizeof(est), "%ld", a->estimate > 0 ? a->estimate : 0);
    snprintf(win, sizeof(win), "%d", LR_RATEWIN_WINDOW_SECONDS);
    rc = lr_pg_query(pg, SQL_RATE_RESERVE, 7,
                     (const char *const[]){a->model_key, rpm, tpm, a->tenant_key, ttpm, est, win},
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

int lr_ratewin_settle(lr_pg_pool_t *pg, const lr_ratewin_ticket_t *t, long tokens) {
    char mid[24], tid[24], tok[24];
    if (t->model_id <= 0 && t->tenant_id <= 0) {
        return 0;
    }
    snprintf(mid, sizeof(mid), "%lld", t->model_id);
    snprintf(tid, sizeof(tid), "%lld", t->tenant_id);
    snprintf(tok, sizeof(tok), "%ld", tokens > 0 ? tokens : 0);
    return lr_pg_query(pg, SQL_RATE_SETTLE, 3, (const char *const[]){mid, tid, tok}, RATEWIN_QUERY_TIMEOUT_MS,
                       settle_cb, NULL);
}
