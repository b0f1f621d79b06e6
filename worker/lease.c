/*
 * lease.c - the worker's leases and heartbeat, every min(lease / 3,
 * heartbeat) seconds (lease_timer).
 *
 * One statement renews the leases of every run that holds one (each fenced
 * on its epoch), skipping those whose last checkpoint already extended it
 * this period.  A lease the renewal finds lost (a newer epoch, or the task
 * left running) stops the step in flight at once (FENCED).  When no renewal
 * succeeded for longer than the lease (the database is unreachable), every
 * running step stops and its delivery goes back (REQUEUED): the leases may
 * have expired and the tasks been taken over, so the work could not be
 * checkpointed anyway.
 */
#include "core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store.h"

/* One batch renewal: when it was sent and the leases it asked for, sorted
 * (lease_cmp), their ids copied into ids (one allocation with the struct). */
typedef struct renew {
    lr_worker_t *w;
    uint64_t sent_ms;
    int n;
    char (*ids)[LR_UUID_LEN + 1];
    lr_store_lease_t items[];
} renew_t;

static int lease_cmp(const void *a, const void *b) {
    const lr_store_lease_t *x = a, *y = b;
    int c = strcmp(x->id, y->id);
    return c != 0 ? c : (x->epoch > y->epoch) - (x->epoch < y->epoch);
}

static void renew_cb(const lr_store_renew_res_t *res, void *arg) {
    renew_t *rn = arg;
    lr_worker_t *w = rn->w;
    uint64_t until = rn->sent_ms + (uint64_t)w->cfg.lease_seconds * 1000u;
    lr_store_lease_t *lost = NULL;
    size_t nlost = 0;
    if (res->err != 0) {
        lr_warn("lease.renew_failed", "lease renewal failed: %s", res->errmsg);
        w->renew_failing = true;
        free(rn);
        return;
    }
    w->renew_failing = false;
    w->renew_ok_sent_ms = rn->sent_ms;
    if (res->nfenced > 0 && (lost = malloc((size_t)res->nfenced * sizeof(*lost))) != NULL) {
        nlost = (size_t)res->nfenced;
        memcpy(lost, res->fenced, nlost * sizeof(*lost));
        qsort(lost, nlost, sizeof(*lost), lease_cmp);
    }
    if (res->nfenced > 0 && lost == NULL) {
        free(rn); /* out of memory: extend nothing; the fenced learn it at their next statement */
        return;
    }
    lr_list_foreach_safe(it, nx, &w->runs) {
        lr_run_t *r = lr_list_entry(it, lr_run_t, link);
        lr_store_lease_t key = {r->id, r->epoch};
        bool is_lost = lost != NULL && bsearch(&key, lost, nlost, sizeof(key), lease_cmp) != NULL;
        if (r->epoch <= 0) {
            continue;
        }
        if (!is_lost && until > r->lease_until_ms &&
            bsearch(&key, rn->items, (size_t)rn->n, sizeof(key), lease_cmp) != NULL) {
            /* asked for and not lost: it holds a lease from when it was sent */
            r->lease_until_ms = until;
        }
        /* A lease that a newer owner holds (or whose task left `running`): a
         * step in flight stops now rather than run to its end for nothing;
         * other states learn it from their next fenced statement. */
        if (is_lost && !w->stopping && r->state == LR_RUN_STEPPING && (r->io & LR_IO_STEP) && !r->fenced) {
            lr_step_cancel(r);
            lr_step_fenced(r, "lease renewal");
        }
    }
    free(lost);
    free(rn);
}

uint64_t lr_lease_every_ms(const lr_worker_t *w) {
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
    if (!w->renew_failing || lr_worker_now(w) - w->renew_ok_sent_ms <= (uint64_t)w->cfg.lease_seconds * 1000u) {
        return;
    }
    lr_list_foreach_safe(it, nx, &w->runs) {
        lr_run_t *r = lr_list_entry(it, lr_run_t, link);
        if (r->state == LR_RUN_STEPPING && (r->io & LR_IO_STEP) && !r->fenced) {
            lr_step_cancel(r);
            r->abandon = true;
            stopped++;
            lr_run_requeue(r);
        }
    }
    if (stopped > 0) {
        lr_warn("lease.lost",
                "no lease renewal for more than %d s (database unreachable): stopped %d "
                "running step(s); their tasks resume from the last checkpoint",
                w->cfg.lease_seconds, stopped);
    }
}

/* Steps whose lease ran out by this worker's own clock (the process was
 * paused, or its loop starved, past the lease): another worker may own the
 * task by now, so the step stops at once (its requests in flight are
 * cancelled) and the task is handed back; the transition is fenced, so it
 * changes nothing when the task has a new owner already. */
static void lease_check_expired(lr_worker_t *w) {
    int stopped = 0;
    uint64_t now = lr_worker_now(w);
    lr_list_foreach_safe(it, nx, &w->runs) {
        lr_run_t *r = lr_list_entry(it, lr_run_t, link);
        if (r->state == LR_RUN_STEPPING && (r->io & LR_IO_STEP) && !r->fenced && r->lease_until_ms != 0 &&
            now >= r->lease_until_ms) {
            LR_LOG(LR_LOG_WARN, &r->log, "lease.expired_locally",
                   "the lease ran out %llu ms ago by this "
                   "worker's clock (paused or starved?): stopping the step",
                   (unsigned long long)(now - r->lease_until_ms));
            lr_step_cancel(r);
            r->abandon = true;
            stopped++;
            lr_step_transition(r, LR_ST_QUEUED, "lease_expired", NULL, NULL, -1, 0);
        }
    }
    if (stopped > 0) {
        lr_warn("lease.expired", "%d step(s) stopped: their leases ran out by this worker's clock", stopped);
    }
}

/* Renews, in one statement, the leases whose last checkpoint did not
 * already extend them this period. */
static void lease_renew(lr_worker_t *w) {
    size_t cap = (size_t)w->nruns + 1;
    renew_t *rn = malloc(sizeof(*rn) + cap * (sizeof(lr_store_lease_t) + LR_UUID_LEN + 1));
    int n = 0;
    if (rn == NULL) {
        return;
    }
    rn->ids = (char(*)[LR_UUID_LEN + 1])(void *)(rn->items + cap);
    lr_list_foreach(it, &w->runs) {
        lr_run_t *r = lr_list_entry(it, lr_run_t, link);
        if (r->epoch <= 0 || r->state == LR_RUN_DONE || r->fenced) {
            continue;
        }
        if (r->lease_from_ms != 0 && lr_worker_now(w) - r->lease_from_ms < lr_lease_every_ms(w)) {
            continue; /* renewing it again would only cost a row update */
        }
        snprintf(rn->ids[n], sizeof(rn->ids[n]), "%s", r->id);
        rn->items[n].id = rn->ids[n];
        rn->items[n].epoch = r->epoch;
        n++;
    }
    rn->w = w;
    rn->n = n;
    rn->sent_ms = lr_worker_now(w);
    qsort(rn->items, (size_t)n, sizeof(rn->items[0]), lease_cmp);
    if (n == 0) {
        w->renew_failing = false; /* no lease held, none to lose */
        w->renew_ok_sent_ms = lr_worker_now(w);
        free(rn);
    } else if (lr_store_renew(w->pg, rn->items, n, w->cfg.lease_seconds, (long)w->cfg.lease_seconds * 500, renew_cb,
                              rn) != 0) {
        lr_warn("lease.renew_failed", "cannot queue the lease renewal");
        free(rn);
    }
}

void lr_lease_timer_cb(uv_timer_t *t) {
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
    lease_check_expired(w);
    lease_renew(w);
    if (lr_store_heartbeat(w->pg, &hb) != 0) {
        lr_debug("worker.heartbeat_failed", "cannot queue the heartbeat");
    }
}
