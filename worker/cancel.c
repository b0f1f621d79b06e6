/*
 * cancel.c - immediate cancellation.  `longrun cancel ID` (without
 * --after-step) sends NOTIFY longrun_cancel, '<task id>' in the transaction
 * that sets tasks.cancel_requested, so the notification arrives only once
 * that is committed.  Every worker LISTENs on the channel (lr_pg_listen: a
 * connection of its own, LISTENed again after every reconnect); the run that
 * holds the task here ends it now instead of at its next step boundary:
 *
 *   the run is                         on the notification
 *   stepping (a step in flight)        lr_step_cancel_task: the executor's
 *                                      cancel aborts the step (its HTTP
 *                                      requests removed from curl, its
 *                                      timers stopped, its memory charges
 *                                      released; done() never runs), then
 *                                      the fenced transition to cancelled
 *   claiming, inserting, admitting,    marked (r->cancel_now): where the next
 *   loading, checkpointing             step would start, the same transition
 *   anything else                      nothing: it is already ending (its
 *                                      transition or follow-up decides), or
 *                                      it is not claimed (its claim will see
 *                                      cancel_requested)
 *
 * A notification for a task this worker does not hold, or holds no more,
 * changes nothing.  One lost while the LISTEN connection was down (no
 * re-scan: --after-step cancels look the same in the row) still ends the
 * task at its next step boundary: the checkpoint statement turns
 * cancel_requested into cancelled, and so does the next claim.
 *
 * Thread affinity: the loop thread (lr_pg_listen's callback).
 */
#include "core.h"

#include <string.h>

/* NOTIFY longrun_cancel: payload is the task's id (NULL after a (re)LISTEN:
 * nothing to re-scan, above). */
static void on_cancel_notify(const char *channel, const char *payload, void *arg) {
    lr_worker_t *w = arg;
    int held = 0;
    (void)channel;
    if (payload == NULL || w->stopping) {
        return;
    }
    if (!lr_uuid_valid(payload)) {
        lr_warn("task.cancel_ignored", "longrun_cancel notification without a task id (%zu bytes): ignored",
                strlen(payload));
        return;
    }
    lr_list_foreach_safe(it, nx, &w->runs) {
        lr_run_t *r = lr_list_entry(it, lr_run_t, link);
        if (strcmp(r->id, payload) != 0 || r->fenced) {
            continue;
        }
        held++;
        switch (r->state) {
        case LR_RUN_STEPPING:
            if (r->io & LR_IO_STEP) {
                lr_step_cancel_task(r);
            }
            break;
        case LR_RUN_CLAIMING:
        case LR_RUN_INSERTING:
        case LR_RUN_ADMITTING:
        case LR_RUN_LOADING:
        case LR_RUN_CHECKPOINTING:
            LR_LOG(LR_LOG_INFO, &r->log, "task.cancel_pending",
                   "cancelled by an operator while %s: ending before the next step", lr_run_state_name((int)r->state));
            r->cancel_now = true;
            break;
        default:
            LR_LOG(LR_LOG_DEBUG, &r->log, "task.cancel_ignored", "cancel notification while %s: nothing to stop here",
                   lr_run_state_name((int)r->state));
            break;
        }
    }
    if (held == 0) {
        lr_debug("task.cancel_ignored", "cancel notification for task %s, which this worker does not hold", payload);
    }
}

int lr_cancel_listen(lr_worker_t *w) { return lr_pg_listen(w->pg, "longrun_cancel", on_cancel_notify, w); }
