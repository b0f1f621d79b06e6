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
    lr_list_foreach_safe(it, nx, &w->runs) {
        lr_run_t *r = lr_list_entry(it, lr_run_t, link);
        lr_store_lease_t key = {r->id, r->epoch};
        if (lost == NULL || w->stopping) {
            break;
        }
        if (r->state != LR_RUN_STEPPING || !(r->io & LR_IO_STEP) || r->fenced) {
            continue;
        }
        if (bsearch(&key, lost, (size_t)res->nfenced, sizeof(key), lease_cmp) != NULL) {
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
    lr_list_foreach(it, &w->runs) {
        lr_run_t *r = lr_list_entry(it, lr_run_t, link);
        if (r->epoch <= 0 || r->state == LR_RUN_DONE || r->fenced) {
            continue;
        }
        if (r->lease_from_ms != 0 && lr_worker_now(w) - r->lease_from_ms < lr_lease_every_ms(w)) {
            continue; /* renewing it again would only cost a row update */
        }
        leases[n].id = r->id;
        leases[n].epoch = r->epoch;
        n++;
    }
    rn->w = w;
    rn->sent_ms = lr_worker_now(w);
    if (n == 0) {
        w->renew_failing = false; /* no lease held, none to lose */
        w->renew_ok_sent_ms = lr_worker_now(w);
        free(rn);
    } else if (lr_store_renew(w->pg, leases, n, w->cfg.lease_seconds, (long)w->cfg.lease_seconds * 500, renew_cb,
                              rn) != 0) {
        lr_warn("lease.renew_failed", "cannot queue the lease renewal");
        free(rn);
    }
    free(leases);
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
    lease_renew(w);
    if (lr_store_heartbeat(w->pg, &hb) != 0) {
        lr_debug("worker.heartbeat_failed", "cannot queue the heartbeat");
    }
}

