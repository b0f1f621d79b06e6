/*
 * agent_spend.c - the agent executor's part of the spend caps: before a
 * model call of a task whose agent or tenant has a cap, reserve the call's
 * worst-case cost in the fleet-wide ledger (spend.h); after it, settle the
 * reservation with what the call cost; over a cap, suspend the task until
 * the cap's period rolls over (or an operator raises the cap).
 *
 * Design.  Loop thread.  exec_agent.c calls in at three points of a model
 * call (agent_state.h): before it (lr_agent_spend_needed, then
 * lr_agent_spend_reserve in state CAP_CHECK), when the answer comes back
 * (st->ops->spend_answered: granted, refused, unavailable or moot) and when
 * the call ends (lr_agent_spend_settle; lr_agent_spend_cancel).  A cap
 * that the reservations of calls in flight fill while its settled spend
 * leaves room (BUSY) is waited for like a rate window: asked again after a
 * short backoff, and the task suspended only after long_wait_seconds (to
 * try again within seconds, not at the end of the period).  Only
 * exec_agent.c changes st->state and drops references; this file keeps
 * st->spend: the reservation held (for one model of the chain: a fallback
 * reserves again) and, after a refusal, which cap binds.
 *
 * The reservation is the same worst case as max_cost_usd's check
 * (lr_agent_worst_cost: the prompt at request bytes / 4, the answer at
 * max_tokens), made before the rate window and the gate, so a call waiting
 * there is counted.  A reservation counts for at most the call's timeout
 * plus twice LONGRUN_LONG_WAIT_SECONDS (the gate's and the rate window's
 * waits) plus a minute, and never less than 15 minutes.  The ledger is
 * not advisory: when it does not answer, no call is made (CAP_WAIT, then
 * ask again; the lease bounds how long).
 *
 * What a call is settled with: its cost from the answer's usage (estimated
 * for an answer without usage, as the budgets are); 0 for an error answer,
 * a call never sent, or a refused connection; its reservation when the
 * provider may have billed it without saying what (a timeout, a call
 * aborted in flight, an answer too large or unreadable).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent_state.h"
#include "wmetrics.h"

#define BACKOFF_FIRST_MS 250
#define BACKOFF_MAX_MS 5000
/* A cap that only calls in flight fill: ask again after this (doubling),
 * suspend after long_wait_seconds and resume after 5-15 s. */
#define BUSY_FIRST_MS 100
#define BUSY_MAX_MS 2000
#define BUSY_RESUME_MS 5000
/* Slack of a reservation's expiry beyond the call's bounds (s). */
#define TTL_SLACK_SECONDS 60

typedef struct spend_ctx {
    agent_state_t *st;
    unsigned seq;
} spend_ctx_t;

bool lr_agent_spend_needed(const agent_state_t *st) {
    if (!lr_spend_capped(st->agent->name, lr_run_tenant(st->run))) {
        return false;
    }
    return !(st->spend.held && st->spend.model_idx == st->model_idx);
}

static void reserve_done(const lr_spend_result_t *res, void *arg) {
    spend_ctx_t *c = arg;
    agent_state_t *st = c->st;
    agent_spend_t *sp = &st->spend;
    bool current = c->seq == sp->seq;
    free(c);
    if (!current) {
        /* cancelled meanwhile: give back what was granted */
        if (res->err == 0 && res->granted && lr_spend_settle(lr_worker_pg(st->w), res->id, 0) != 0) {
            lr_debug("spend.settle_failed", "cannot queue the release of reservation %lld", res->id);
        }
        st->ops->spend_answered(st, LR_AGENT_SPEND_MOOT);
        return;
    }
    if (res->err != 0) {
        snprintf(sp->error, sizeof(sp->error), "%s", res->errmsg != NULL ? res->errmsg : lr_strerror(res->err));
        st->ops->spend_answered(st, LR_AGENT_SPEND_UNAVAILABLE);
        return;
    }
    sp->backoff_ms = 0;
    if (res->granted) {
        sp->busy_ms = 0;
        sp->busy_since = 0;
        sp->held = true;
        sp->id = res->id;
        sp->model_idx = st->model_idx;
        st->ops->spend_answered(st, LR_AGENT_SPEND_GRANTED);
        return;
    }
    snprintf(sp->scope, sizeof(sp->scope), "%s", res->scope);
    snprintf(sp->name, sizeof(sp->name), "%s", res->name);
    snprintf(sp->period, sizeof(sp->period), "%s", res->period);
    snprintf(sp->resets_at, sizeof(sp->resets_at), "%s", res->resets_at);
    sp->cap = res->cap_usd;
    sp->spent = res->spent_usd;
    sp->reserved = res->reserved_usd;
    sp->wait_ms = res->wait_ms;
    sp->in_flight = res->in_flight;
    st->ops->spend_answered(st, res->in_flight ? LR_AGENT_SPEND_BUSY : LR_AGENT_SPEND_REFUSED);
}

int lr_agent_spend_reserve(agent_state_t *st, const lr_model_ref_t *m, size_t body_len) {
    const lr_config_t *cfg = lr_worker_config(st->w);
    agent_spend_t *sp = &st->spend;
    long ttl = m->timeout_ms / 1000 + 2L * cfg->long_wait_seconds + TTL_SLACK_SECONDS;
    lr_spend_reserve_t a;
    spend_ctx_t *c;
    int rc;
    lr_agent_spend_settle(st, 0); /* one held for another model of the chain was not used */
    sp->amount = lr_agent_worst_cost(m, body_len, NULL, NULL);
    a = (lr_spend_reserve_t){
        .agent = st->agent->name,
        .tenant = lr_run_tenant(st->run),
        .amount_usd = sp->amount,
        .ttl_seconds = ttl > LR_SPEND_RESERVATION_MIN_SECONDS ? ttl : LR_SPEND_RESERVATION_MIN_SECONDS,
    };
    c = malloc(sizeof(*c));
    if (c == NULL) {
        snprintf(sp->error, sizeof(sp->error), "%s", lr_strerror(LR_ENOMEM));
        return LR_ENOMEM;
    }
    c->st = st;
    c->seq = ++sp->seq;
    rc = lr_spend_reserve(lr_worker_pg(st->w), &a, reserve_done, c);
    if (rc != 0) {
        free(c);
        snprintf(sp->error, sizeof(sp->error), "cannot queue the reservation: %s", lr_strerror(rc));
    }
    return rc;
}

void lr_agent_spend_suspend(agent_state_t *st) {
    agent_spend_t *sp = &st->spend;
    const char *period = strcmp(sp->period, "day") == 0 ? "daily" : "monthly";
    snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "spend_cap");
    lr_metric_add(lr_wm.spend_suspensions, (const char *const[]){sp->scope, sp->name, sp->period}, 1);
    if (sp->in_flight) {
        /* room comes back as the calls in flight settle: try again soon */
        st->out->resume_in_ms = BUSY_RESUME_MS + (long)(lr_agent_jitter() * (double)BUSY_RESUME_MS * 2.0);
        LR_LOG(LR_LOG_INFO, &st->log, "spend.cap_reached",
               "%s %s: %s cap $%.4f held by calls in flight for %d s (spent $%.4f, reserved $%.4f, this call up "
               "to $%.4f); suspended for %ld ms",
               sp->scope, sp->name, period, sp->cap, lr_worker_config(st->w)->long_wait_seconds, sp->spent,
               sp->reserved, sp->amount, st->out->resume_in_ms);
    } else {
        st->out->resume_in_ms = sp->wait_ms;
        LR_LOG(LR_LOG_INFO, &st->log, "spend.cap_reached",
               "%s %s: %s cap $%.4f reached (spent $%.4f, reserved $%.4f, this call up to $%.4f); suspended "
               "until %s",
               sp->scope, sp->name, period, sp->cap, sp->spent, sp->reserved, sp->amount, sp->resets_at);
    }
    sp->busy_ms = 0;
    sp->busy_since = 0;
}

long lr_agent_spend_busy_wait(agent_state_t *st) {
    agent_spend_t *sp = &st->spend;
    uint64_t now = lr_agent_now();
    long limit = (long)lr_worker_config(st->w)->long_wait_seconds * 1000;
    if (sp->busy_since == 0) {
        sp->busy_since = now;
    }
    if ((long)(now - sp->busy_since) >= limit) {
        return 0;
    }
    sp->busy_ms = sp->busy_ms == 0 ? BUSY_FIRST_MS : sp->busy_ms * 2;
    if (sp->busy_ms > BUSY_MAX_MS) {
        sp->busy_ms = BUSY_MAX_MS;
    }
    LR_LOG(LR_LOG_DEBUG, &st->log, "spend.wait",
           "%s %s: %s cap $%.4f full of calls in flight (spent $%.4f, reserved $%.4f, this call up to $%.4f)",
           sp->scope, sp->name, sp->period, sp->cap, sp->spent, sp->reserved, sp->amount);
    return sp->busy_ms / 2 + (long)(lr_agent_jitter() * (double)sp->busy_ms / 2.0) + 1;
}

long lr_agent_spend_backoff(agent_state_t *st) {
    agent_spend_t *sp = &st->spend;
    bool first = sp->backoff_ms == 0;
    long wait;
    sp->backoff_ms = first ? BACKOFF_FIRST_MS : sp->backoff_ms * 2;
    if (sp->backoff_ms > BACKOFF_MAX_MS) {
        sp->backoff_ms = BACKOFF_MAX_MS;
    }
    wait = sp->backoff_ms / 2 + (long)(lr_agent_jitter() * (double)sp->backoff_ms / 2.0);
    /* the first of a streak at warn level, the rest at debug (every task of the worker waits alike) */
    LR_LOG(first ? LR_LOG_WARN : LR_LOG_DEBUG, &st->log, "spend.unavailable",
           "the spend ledger did not answer (%s): no model call without a reservation; asking again in %ld ms",
           sp->error, wait);
    return wait > 0 ? wait : 1;
}

void lr_agent_spend_settle(agent_state_t *st, double usd) {
    agent_spend_t *sp = &st->spend;
    long long id = sp->id;
    double amount = usd < 0 ? sp->amount : usd;
    if (!sp->held) {
        return;
    }
    sp->held = false;
    sp->id = 0;
    if (lr_spend_settle(lr_worker_pg(st->w), id, amount) != 0) {
        LR_LOG(LR_LOG_WARN, &st->log, "spend.settle_failed",
               "cannot queue the settlement of reservation %lld ($%.6f): it counts until it expires", id, amount);
    }
}

void lr_agent_spend_cancel(agent_state_t *st, bool in_flight) {
    lr_agent_spend_settle(st, in_flight ? LR_AGENT_SPEND_AT_RESERVATION : 0);
    st->spend.seq++; /* the answer of a reservation in flight is moot now */
    st->spend.backoff_ms = 0;
    st->spend.busy_ms = 0;
    st->spend.busy_since = 0;
}
