/*
 * drain.c - SIGTERM: stop taking work, let the steps in flight finish and
 * checkpoint (each hands its task back with a continuation), give back what
 * has not started, and exit within the grace period (LONGRUN_DRAIN_SECONDS).
 *
 *   first SIGTERM/SIGINT   lr_drain_start (the daemon's on_drain hook):
 *                          cancel the consumer, start the drain deadline,
 *                          give deferred suspects back to the broker
 *   last run freed         lr_drain_maybe_exit: shut down (common/daemon)
 *   drain deadline         steps still running are cancelled and their
 *                          tasks released (queued, "abandoned"), so another
 *                          worker takes them now; 3 s later the shutdown
 *                          starts whatever is left
 *   second signal          the daemon exits at once (lr_drain_exit_note
 *                          says what that leaves behind)
 */
#include "core.h"

#include <stdio.h>

static void drain_close_cb(uv_timer_t *t) { lr_daemon_shutdown(((lr_worker_t *)t->data)->d); }

/* Drain deadline: steps still running are abandoned without a checkpoint;
 * their leases are released so that another worker can take them now. */
static void drain_deadline_cb(uv_timer_t *t) {
    lr_worker_t *w = t->data;
    lr_warn("worker.drain_deadline",
            "drain deadline reached with %d tasks in flight; abandoning their "
            "running steps (they run again elsewhere)",
            w->nruns);
    lr_list_foreach_safe(it, nx, &w->runs) {
        lr_run_t *r = lr_list_entry(it, lr_run_t, link);
        if (r->state == LR_RUN_STEPPING && (r->io & LR_IO_STEP)) {
            r->abandon = true;
            lr_step_cancel(r);
            lr_step_transition(r, LR_ST_QUEUED, "abandoned", NULL, NULL, -1, 0);
        }
    }
    /* Whatever is still pending gets a few more seconds via amqp stop. */
    uv_timer_start(&w->drain_timer, drain_close_cb, 3000, 0);
}

void lr_drain_maybe_exit(lr_worker_t *w) {
    if (w->draining && w->nruns == 0 && !w->stopping) {
        lr_info("worker.drained", "every in-flight task is checkpointed and handed back");
        lr_daemon_shutdown(w->d);
    }
}

void lr_drain_start(lr_daemon_t *d, const char *why, void *arg) {
    lr_worker_t *w = arg;
    (void)d;
    if (w->draining) {
        return;
    }
    w->draining = true;
    lr_info("worker.draining",
            "%s: stop consuming, finish and checkpoint in-flight steps (%d), "
            "hand the rest back, exit within %d s",
            why, w->nruns, w->cfg.drain_seconds);
    lr_amqp_cancel_consume(w->amqp);
    uv_timer_start(&w->drain_timer, drain_deadline_cb, (uint64_t)w->cfg.drain_seconds * 1000u, 0);
    lr_claim_release_deferred(w);
    lr_drain_maybe_exit(w);
}

void lr_drain_exit_note(char *buf, size_t len, void *arg) {
    const lr_worker_t *w = arg;
    snprintf(buf, len, "without draining (%d tasks in flight run again elsewhere after their leases expire)", w->nruns);
}
