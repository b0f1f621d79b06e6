/*
 * exec_agent.c - the agent loop: one step = answer pending tool calls, call
 * the model (fallback chain, retries, circuit breakers), run the tools it
 * asks for, and report what the step added.  The worker checkpoints it.
 *
 * Design.  Runs on the loop thread as an lr_executor_t.  Per task, an
 * agent_state_t (agent_state.h; allocated on the first step) holds the step
 * in flight as a state machine (agent_fsm.h), every change through
 * agent_set_state(), which checks it against the table of legal moves and traces
 * it:
 *
 *   IDLE -> PREPARING  budgets, conversation (agent_context.c), answers to
 *                      pending calls from signals (agent_tools.c), then the
 *                      model i of the chain, attempt k:
 *        -> CAP_CHECK  the call's worst case reserved against the spend
 *                        caps of the agent and tenant (agent_spend.c), if capped
 *           -> CAP_WAIT  the ledger did not answer, or calls in flight fill
 *                          a cap: the timer, then PREPARING
 *           -> IDLE        over a cap: suspended (spend_cap) until its period rolls over
 *        -> RESERVING  the fleet-wide rate window (ratewin.h), if limited
 *           -> RATE_WAIT  over the limit: the timer, then PREPARING again
 *        -> GATE_WAIT  the endpoint's concurrency gate is full
 *        -> MEM_WAIT   no room in the worker's memory budget (membudget.h)
 *        -> CALLING    the request in flight
 *           -> BACKOFF    retryable failure: the timer, then PREPARING
 *           -> PREPARING  failed for good: the next model of the chain
 *           -> TOOLS      the model asked for tools (agent_tools.c)
 *        -> IDLE       the step ended: done(outcome)
 *   IDLE -> RELEASED   the run is gone; freed when nothing refers to it
 *
 * One timer serves CAP_WAIT, RATE_WAIT, GATE_WAIT and BACKOFF: the state
 * says what it waits for.  A step that ends inside start() (a budget, a resume without
 * its signal, every model skipped, every tool answered at once) makes start
 * return LR_EPERM with the outcome in out: done() never runs inside start.
 * The freeing rule is agent_unref(): the state holds a reference for its
 * timer (dropped by the close callback after release) and one for each
 * reservation query in flight (rate window, spend ledger); HTTP requests never outlive a step (cancel
 * aborts them, their callbacks do not run).
 *
 * Budgets (agent_budget.c) are checked before the step, before every model
 * call (time, and the call's worst-case cost) and before the tool calls; a
 * step that reaches one ends the task with its stop_reason (the worker
 * dead-letters it for the operator).  A rate-limit wait longer than
 * long_wait_seconds suspends the task (rate_limited, resume_at) without
 * counting an attempt.  Circuit breakers are per model endpoint: 5
 * consecutive failures open it for 30 s, then one trial call (half-open).
 * A chain exhausted while every model's circuit is open or half-open parks
 * the task (provider_park: suspended, provider_unavailable, no attempt);
 * the scheduler resumes it after a growing backoff and its first model call
 * is the next trial; past the agent's max_outage_seconds it is
 * dead-lettered (stop_reason provider_unavailable).
 *
 * Nothing here logs prompts, tool arguments or results (privacy): only
 * names, sizes, statuses and timings; payloads only for sampled tasks, and
 * redacted (payload_log.h).
 */
#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent_state.h"
#include "payload_log.h"
#include "ratewin.h"
#include "text.h"
#include "wmetrics.h"

/* The one transition function: checks the move (agent_fsm.h), traces
 * "old -> new (line N)" at debug level with the task's log context. */
#define agent_set_state(st, s) agent_set_state_at((st), (s), __LINE__)
static void agent_set_state_at(agent_state_t *st, enum lr_agent_state s, int line);
static void agent_finish(agent_state_t *st, int outcome);
static void agent_step_complete(agent_state_t *st);
static void agent_log_payload(agent_state_t *st, const char *event, const char *what, const char *text, size_t len);
static void spend_answered(agent_state_t *st, enum lr_agent_spend_verdict v);

/* What agent_tools.c, agent_context.c and agent_spend.c call back (agent_state.h). */
static void timer_cb(uv_timer_t *t);
static const agent_ops_t agent_ops = {
    .finish = agent_finish,
    .on_timer = timer_cb,
    .step_complete = agent_step_complete,
    .log_payload = agent_log_payload,
    .spend_answered = spend_answered,
};

static lr_breaker_t *model_breaker(const lr_model_ref_t *m) {
    char key[400];
    snprintf(key, sizeof(key), "model:%s", m->endpoint_key);
    return lr_breaker_get(key, m->endpoint_label);
}

/* ------------------------------------------------------------------ state */

static void agent_set_state_at(agent_state_t *st, enum lr_agent_state s, int line) {
    if (st->state == s) {
        return;
    }
    if (!lr_agent_transition_ok((int)st->state, (int)s)) {
        /* A bug in this executor: say where, and go on as asked. */
        LR_LOG(LR_LOG_ERROR, &st->log, "agent.bad_transition", "illegal move %s -> %s (line %d)",
               lr_agent_state_name((int)st->state), lr_agent_state_name((int)s), line);
        assert(!"illegal agent state transition");
    }
    LR_LOG(LR_LOG_DEBUG, &st->log, "agent.state", "%s -> %s (line %d)", lr_agent_state_name((int)st->state),
           lr_agent_state_name((int)s), line);
    st->state = s;
}

/* The freeing rule, in one place: the state is freed once, when nothing
 * refers to it any more.  Its timer holds a reference until the close
 * callback that release() starts, so the count reaches 0 only once the
 * state is RELEASED; a reservation query holds one until its answer. */
static void agent_unref(agent_state_t *st) {
    if (--st->refs > 0) {
        return;
    }
    free(st);
}

static void agent_timer_closed(uv_handle_t *h) { agent_unref(h->data); }

#define jitter lr_agent_jitter

static void agent_log_payload(agent_state_t *st, const char *event, const char *what, const char *text, size_t len) {
    if (st->log_payloads) {
        lr_payload_log(&st->log, event, what, text, len); /* redacted: payload_log.h */
    }
}

/* Frees what a step builds (the conversation goes too: the next step
 * rebuilds it from the step log). */
static void step_drop(agent_state_t *st) {
    cJSON_Delete(st->conv);
    cJSON_Delete(st->added);
    cJSON_Delete(st->calls_log);
    cJSON_Delete(st->fallback);
    st->conv = st->added = st->calls_log = st->fallback = NULL;
}

static void agent_finish(agent_state_t *st, int outcome) {
    lr_step_t *out = st->out;
    lr_step_done_cb done = st->done;
    out->outcome = outcome;
    if (cJSON_GetArraySize(st->added) > 0 || outcome == LR_STEP_CONTINUE || outcome == LR_STEP_FINISHED ||
        outcome == LR_STEP_SUSPEND || outcome == LR_STEP_STOP) {
        out->messages = cJSON_PrintUnformatted(st->added);
    }
    if (cJSON_GetArraySize(st->calls_log) > 0) {
        out->tool_calls = cJSON_PrintUnformatted(st->calls_log);
    }
    if (st->fallback != NULL) {
        out->fallback = cJSON_PrintUnformatted(st->fallback);
        cJSON_Delete(st->fallback);
        st->fallback = NULL;
    }
    if (st->answered != NULL && out->model == NULL) {
        out->model = strdup(st->answered->model);
    }
    out->tool_calls_count = st->tool_calls_made;
    if (outcome == LR_STEP_CONTINUE) {
        /* The next step of this delivery starts from here (if this one's
         * checkpoint commits) instead of rebuilding from the step log. */
        st->conv_step = st->step_no;
    } else {
        cJSON_Delete(st->conv);
        st->conv = NULL;
        st->conv_step = -1;
    }
    cJSON_Delete(st->added);
    cJSON_Delete(st->calls_log);
    st->added = st->calls_log = NULL;
    lr_model_reply_free(&st->reply);
    st->ncalls = 0;
    /* What the answer costs stays charged until the checkpoint is written. */
    lr_run_mem_adopt(st->run, lr_mem_call_detach(lr_worker_mem(st->w), &st->mem_call));
    lr_agent_spend_settle(st, 0); /* a reservation still held was not used by a call */
    agent_set_state(st, LR_AGENT_IDLE);
    if (done != NULL) {
        done(st->run); /* may release the run: st is not touched after this */
    }
}

static void agent_step_complete(agent_state_t *st) {
    char why[160];
    const char *reason;
    long park = 0;
    for (int i = 0; i < st->ncalls; i++) {
        park = st->calls[i].park_ms > park ? st->calls[i].park_ms : park;
    }
    if (park > 0) {
        /* A tool asked for a long wait: free the slot; the resume runs the
         * calls that have no result yet (lr_agent_answer_pending). */
        snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "rate_limited");
        st->out->resume_in_ms = park;
        agent_finish(st, LR_STEP_SUSPEND);
        return;
    }
    for (int i = 0; i < st->ncalls; i++) {
        if (st->calls[i].suspends) {
            snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "%s", st->suspend_reason);
            snprintf(st->out->wait_event, sizeof(st->out->wait_event), "%s", st->wait_event);
            st->out->resume_in_ms = st->suspend_ms;
            agent_finish(st, LR_STEP_SUSPEND);
            return;
        }
    }
    /* After the step: does it end the task on a budget? */
    st->usage.step += 1;
    st->usage.tokens_in += st->out->tokens_in;
    st->usage.tokens_out += st->out->tokens_out;
    st->usage.cost_usd += st->out->cost_usd;
    reason = lr_agent_budget_spent(st, why, sizeof(why));
    if (reason != NULL) {
        snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "%s", reason);
        snprintf(st->out->error, sizeof(st->out->error), "budget exhausted: %s", why);
        agent_finish(st, LR_STEP_STOP);
        return;
    }
    agent_finish(st, LR_STEP_CONTINUE);
}

/* ------------------------------------------------------------ model calls */

static void model_call(agent_state_t *st);
static void model_send(agent_state_t *st, char *body);
static void rate_settle(agent_state_t *st, const lr_model_ref_t *m, long actual);

/* CALLING: gives the endpoint's slot back (the oldest waiter, maybe another
 * task's step, gets it before this returns). */
static void gate_done(agent_state_t *st) {
    lr_gate_t *g = st->gate;
    st->gate = NULL;
    if (g != NULL) {
        lr_gate_release(g);
    }
}

/* GATE_WAIT: the gate granted us a slot. */
static void gate_ready(lr_gate_waiter_t *wt) {
    agent_state_t *st = (agent_state_t *)(void *)((char *)wt - offsetof(agent_state_t, gate_wait));
    char *body = st->pending_send;
    st->pending_send = NULL;
    uv_timer_stop(&st->timer);
    model_send(st, body);
}

/* GATE_WAIT, timer: no slot within the long-wait threshold; give the
 * task's place back. */
static void gate_timeout(agent_state_t *st) {
    rate_settle(st, &st->agent->models[st->model_idx], 0); /* its reservation used no tokens */
    lr_gate_forget(&st->gate_wait);
    st->gate = NULL;
    free(st->pending_send);
    st->pending_send = NULL;
    LR_LOG(LR_LOG_INFO, &st->log, "model.gate_suspend", "no free slot for %s within %d s: suspending the task",
           st->agent->models[st->model_idx].endpoint_label, lr_worker_config(st->w)->long_wait_seconds);
    snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "rate_limited");
    st->out->resume_in_ms = 1000 + (long)(jitter() * 2000.0);
    agent_finish(st, LR_STEP_SUSPEND);
}

/* The one timer: what it waited for is the state. */
static void timer_cb(uv_timer_t *t) {
    agent_state_t *st = t->data;
    switch (st->state) {
    case LR_AGENT_GATE_WAIT: gate_timeout(st); break;
    case LR_AGENT_CAP_WAIT:  /* ask the ledger again */
    case LR_AGENT_RATE_WAIT: /* the window has room now */
    case LR_AGENT_BACKOFF: /* time for the next try */ model_call(st); break;
    case LR_AGENT_TOOLS: /* tool retries due */ lr_agent_tools_timer(st); break;
    default:
        LR_LOG(LR_LOG_ERROR, &st->log, "agent.stray_timer", "timer fired in state %s",
               lr_agent_state_name((int)st->state));
        break;
    }
}

/* Park backoff bounds: the first resume comes after the circuit's open time
 * (the worker's breaker), later ones after as long again as the task has
 * been parked so far (doubling), at most PARK_MAX_MS apart. */
#define PARK_MAX_MS (5L * 60 * 1000)

/* The failure reasons that say the endpoint is unavailable (a provider
 * outage), as opposed to answering wrongly: provider.c and model_response. */
static bool unavailable_reason(const char *reason) {
    static const char *const r[] = {"connection",          "timeout",      "overloaded", "server_error",
                                    "conflict_or_timeout", "rate_limited", NULL};
    for (int i = 0; r[i] != NULL; i++) {
        if (strcmp(reason, r[i]) == 0) {
            return true;
        }
    }
    return false;
}

/* Records in the step (task_steps.fallback) and in
 * longrun_model_fallbacks_total that a call of model (or the model itself,
 * skipped) did not answer, why, and what followed. */
static void fallback_note(agent_state_t *st, const char *model, const char *reason, const char *action) {
    cJSON *o;
    if (st->fallback == NULL && (st->fallback = cJSON_CreateArray()) == NULL) {
        return;
    }
    o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "model", model);
    cJSON_AddStringToObject(o, "reason", reason);
    cJSON_AddStringToObject(o, "action", action);
    cJSON_AddNumberToObject(o, "attempt", st->attempt + 1);
    cJSON_AddItemToArray(st->fallback, o);
    lr_metric_add(lr_wm.model_fallbacks, (const char *const[]){model, reason, action}, 1);
}

/* The chain is exhausted.  When every model of it sits behind a circuit
 * opened by availability failures (unavailable_reason), the provider is out, not this task: park it
 * (suspended, provider_unavailable, no attempt) and let its resume be the
 * next trial, or dead-letter it (stop_reason provider_unavailable) once it
 * has been parked longer than the agent's max_outage_seconds.  Returns
 * false when some circuit is closed (the old path: retry_wait, attempt + 1). */
static bool provider_park(agent_state_t *st) {
    const lr_agent_t *ag = st->agent;
    const lr_config_t *cfg = lr_worker_config(st->w);
    lr_run_usage_t u;
    long parked, max_ms = ag->max_outage_seconds * 1000, wait;
    for (int i = 0; i < ag->nmodels; i++) {
        if (!lr_breaker_outage(model_breaker(&ag->models[i]))) {
            return false;
        }
    }
    lr_run_usage(st->run, &u);
    parked = u.outage_ms > 0 ? u.outage_ms : 0;
    st->answered = NULL;
    lr_metric_inc1(lr_wm.provider_parks, ag->name);
    if (parked >= max_ms) {
        snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "provider_unavailable");
        snprintf(st->out->error, sizeof(st->out->error),
                 "every model unavailable for %ld s (max_outage_seconds %ld); last: %s", parked / 1000,
                 ag->max_outage_seconds, st->last_error);
        LR_LOG(LR_LOG_WARN, &st->log, "model.outage_exceeded",
               "every model of %s unavailable for %ld s, over max_outage_seconds %ld: dead-lettering", ag->name,
               parked / 1000, ag->max_outage_seconds);
        agent_finish(st, LR_STEP_STOP);
        return true;
    }
    wait = (long)cfg->breaker_open_seconds * 1000;
    if (parked > wait) {
        wait = parked;
    }
    if (wait > PARK_MAX_MS) {
        wait = PARK_MAX_MS;
    }
    wait = wait / 2 + (long)(jitter() * (double)wait); /* [0.5, 1.5) x: the parked tasks do not wake together */
    if (parked + wait > max_ms) {
        wait = max_ms - parked + 100; /* wake just past the bound, to end it */
    }
    snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "provider_unavailable");
    st->out->resume_in_ms = wait;
    LR_LOG(LR_LOG_INFO, &st->log, "model.provider_park",
           "every model of %s unavailable (last: %s); parked %ld s so far: suspending for %ld ms", ag->name,
           st->last_error, parked / 1000, wait);
    agent_finish(st, LR_STEP_SUSPEND);
    return true;
}

/* Moves to the next model of the chain, or ends the step. */
static void model_next(agent_state_t *st) {
    st->model_idx++;
    st->attempt = 0;
    if (st->model_idx < st->agent->nmodels) {
        model_call(st);
        return;
    }
    if (st->any_transient && provider_park(st)) {
        return;
    }
    snprintf(st->out->error, sizeof(st->out->error), "every model failed; last: %s", st->last_error);
    if ((strcmp(st->last_reason, "context_length") == 0 || strcmp(st->last_reason, "content_filter") == 0) &&
        !st->any_transient) {
        snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "%s", st->last_reason);
    }
    agent_finish(st, st->any_transient ? LR_STEP_FAIL_TRANSIENT : LR_STEP_FAIL_PERMANENT);
}

/* A call of the current model failed (class cls): end the step, suspend,
 * back off and try again, or go on to the next model. */
static void model_failed(agent_state_t *st, int cls, const char *reason, const char *detail, long wait_ms) {
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    const lr_config_t *cfg = lr_worker_config(st->w);
    long suspend_after = (long)cfg->long_wait_seconds * 1000;
    /* a bad request or a refusal: the endpoint itself works */
    bool endpoint_ok = cls == LR_CALL_PERMANENT || strcmp(reason, "content_filter") == 0;
    snprintf(st->last_reason, sizeof(st->last_reason), "%s", reason);
    snprintf(st->last_error, sizeof(st->last_error), "%s (%s): %s", m->model, reason, detail);
    lr_breaker_result(model_breaker(m), endpoint_ok, lr_agent_now());
    if (cls != LR_CALL_PERMANENT && !unavailable_reason(reason)) {
        lr_breaker_not_outage(model_breaker(m));
    }
    LR_LOG(LR_LOG_WARN, &st->log, "model.call_failed", "model %s attempt %d failed: %s: %s", m->model, st->attempt + 1,
           reason, detail);
    if (cls == LR_CALL_PERMANENT) {
        fallback_note(st, m->model, reason, "stop");
        snprintf(st->out->error, sizeof(st->out->error), "%s", st->last_error);
        if (strcmp(reason, "context_length") == 0) {
            snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "context_length");
        }
        agent_finish(st, LR_STEP_FAIL_PERMANENT);
        return;
    }
    if (cls == LR_CALL_RETRY) {
        st->any_transient = true;
        if (wait_ms > suspend_after && st->model_idx + 1 < st->agent->nmodels) {
            /* A long wait, and a later model may answer now: skip this one
             * until then (every step of every task on this worker). */
            lr_breaker_cool(model_breaker(m), lr_agent_now() + (uint64_t)wait_ms);
            LR_LOG(LR_LOG_INFO, &st->log, "model.rate_limited", "model %s asks to wait %ld ms: falling back", m->model,
                   wait_ms);
            fallback_note(st, m->model, reason, "next_model");
            model_next(st);
            return;
        }
        if (wait_ms > suspend_after) {
            /* A long wait and no model after this one: free the slot, come
             * back at resume_at. */
            fallback_note(st, m->model, reason, "suspend");
            snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "rate_limited");
            st->out->resume_in_ms = wait_ms;
            LR_LOG(LR_LOG_INFO, &st->log, "model.rate_limited", "model %s asks to wait %ld ms: suspending the task",
                   m->model, wait_ms);
            st->answered = NULL;
            agent_finish(st, LR_STEP_SUSPEND);
            return;
        }
        if (st->attempt < m->retries) {
            long base = (long)(fmin(500.0 * pow(2.0, st->attempt), 8000.0) * jitter());
            long delay = wait_ms > 0 ? (wait_ms > base ? wait_ms : base) : base;
            fallback_note(st, m->model, reason, "retry");
            st->attempt++;
            agent_set_state(st, LR_AGENT_BACKOFF);
            uv_timer_start(&st->timer, timer_cb, (uint64_t)delay + 1, 0);
            return;
        }
    }
    fallback_note(st, m->model, reason, st->model_idx + 1 < st->agent->nmodels ? "next_model" : "give_up");
    model_next(st);
}

/* ------------------------------------------------------ fleet rate limits */

static void rate_key(const lr_model_ref_t *m, char *buf, size_t len) {
    snprintf(buf, len, "model:%s:%s", m->provider == LR_PROVIDER_OPENAI ? "openai" : "anthropic", m->model);
}

/* The tenant's rate key when its tokens are capped, else "". */
static void tenant_key(agent_state_t *st, char *buf, size_t len) {
    const char *t = lr_run_tenant(st->run);
    buf[0] = '\0';
    if (t != NULL && lr_worker_config(st->w)->tenant_tpm > 0) {
        snprintf(buf, len, "tenant:%s", t);
    }
}

/* Does a call of model m need a reservation first? */
static bool rate_limited(agent_state_t *st, const lr_model_ref_t *m) {
    return m->rpm > 0 || m->tpm > 0 || (lr_run_tenant(st->run) != NULL && lr_worker_config(st->w)->tenant_tpm > 0);
}

/* After the call: the reservation's tokens become the actual count (only
 * when some token limit reads them). */
static void rate_settle(agent_state_t *st, const lr_model_ref_t *m, long actual) {
    char tkey[100];
    lr_ratewin_ticket_t t = st->ticket;
    bool settle = st->reserved_est > 0;
    st->reserved_est = 0;
    st->ticket = (lr_ratewin_ticket_t){0};
    tenant_key(st, tkey, sizeof(tkey));
    if (!settle || (m->tpm <= 0 && tkey[0] == '\0')) {
        return;
    }
    if (lr_ratewin_settle(lr_worker_pg(st->w), &t, actual) != 0) {
        lr_debug("ratelimit.settle_failed", "cannot queue the settlement");
    }
}

/* The limiter is advisory: without the database, call anyway (the
 * provider's own 429s still bound us). */
static void rate_unavailable(agent_state_t *st, const char *why) {
    LR_LOG(LR_LOG_WARN, &st->log, "ratelimit.unavailable", "rate limit reservation failed (%s); calling anyway", why);
    st->reserved = true;
    st->reserved_est = 0;
    model_call(st);
}

/* Over the fleet-wide limit: wait until enough reservations have left the
 * window (wait_ms, the limiter's answer), or suspend the task when that is
 * longer than long_wait_seconds.  A few ms more, and up to 100 ms of jitter,
 * so that tasks refused together do not all ask again at the same moment. */
static void rate_over(agent_state_t *st, long wait_ms) {
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    long wait = wait_ms + 5 + (long)(jitter() * 100.0);
    st->reserved_est = 0;
    lr_metric_inc1(lr_wm.rate_limit_waits, m->model);
    if (wait > (long)lr_worker_config(st->w)->long_wait_seconds * 1000) {
        LR_LOG(LR_LOG_INFO, &st->log, "ratelimit.suspend", "fleet-wide limit of %s reached; suspending for %ld ms",
               m->model, wait);
        snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "rate_limited");
        st->out->resume_in_ms = wait;
        agent_finish(st, LR_STEP_SUSPEND);
        return;
    }
    LR_LOG(LR_LOG_DEBUG, &st->log, "ratelimit.wait", "fleet-wide limit of %s reached; waiting %ld ms", m->model, wait);
    agent_set_state(st, LR_AGENT_RATE_WAIT);
    uv_timer_start(&st->timer, timer_cb, (uint64_t)wait, 0);
}

static void reserve_done(const lr_ratewin_result_t *res, void *arg) {
    agent_state_t *st = arg;
    if (st->state != LR_AGENT_RESERVING) {
        agent_unref(st); /* cancelled or released meanwhile: the answer is moot (st may be gone now) */
        return;
    }
    agent_unref(st); /* not the last reference: the timer's lasts until release */
    if (res->err != 0) {
        rate_unavailable(st, res->errmsg);
        return;
    }
    if (res->granted) {
        st->ticket = res->ticket;
        st->reserved = true;
        model_call(st); /* builds the request again, and sends it */
        return;
    }
    rate_over(st, res->wait_ms);
}

/* Reserves a request of body_len bytes to m in the sliding window of the
 * model's key (when the model has limits) and of the tenant's (when capped). */
static void rate_reserve(agent_state_t *st, const lr_model_ref_t *m, size_t body_len) {
    char key[300], tkey[100];
    lr_ratewin_reserve_t a;
    long e = (long)body_len / 4 + (m->max_tokens > 0 ? m->max_tokens : 256);
    int rc;
    rate_key(m, key, sizeof(key));
    tenant_key(st, tkey, sizeof(tkey));
    a = (lr_ratewin_reserve_t){
        .model_key = m->rpm > 0 || m->tpm > 0 ? key : NULL,
        .rpm = m->rpm,
        .tpm = m->tpm,
        .estimate = e,
        .tenant_key = tkey[0] != '\0' ? tkey : NULL,
        .tenant_tpm = lr_worker_config(st->w)->tenant_tpm,
    };
    st->reserved_est = e;
    st->ticket = (lr_ratewin_ticket_t){0};
    rc = lr_ratewin_reserve(lr_worker_pg(st->w), &a, reserve_done, st);
    if (rc != 0) {
        rate_unavailable(st, lr_strerror(rc));
        return;
    }
    st->refs++; /* the query's, until reserve_done */
    agent_set_state(st, LR_AGENT_RESERVING);
}

/* ------------------------------------------------------------ spend caps */

/* PREPARING, CAP_CHECK: the ledger did not answer; no call without a
 * reservation (fail closed), ask again after a backoff. */
static void spend_wait(agent_state_t *st) {
    agent_set_state(st, LR_AGENT_CAP_WAIT);
    uv_timer_start(&st->timer, timer_cb, (uint64_t)lr_agent_spend_backoff(st), 0);
}

/* CAP_CHECK: the answer to the spend reservation (agent_spend.c). */
static void spend_answered(agent_state_t *st, enum lr_agent_spend_verdict v) {
    bool ours = v != LR_AGENT_SPEND_MOOT && st->state == LR_AGENT_CAP_CHECK;
    long wait;
    agent_unref(st); /* the query's; while ours not the last (the timer's lasts until release) */
    if (!ours) {
        return; /* (st may be gone now) */
    }
    if (v == LR_AGENT_SPEND_BUSY && (wait = lr_agent_spend_busy_wait(st)) > 0) {
        /* calls in flight fill the cap: their settlements may free it */
        agent_set_state(st, LR_AGENT_CAP_WAIT);
        uv_timer_start(&st->timer, timer_cb, (uint64_t)wait, 0);
        return;
    }
    switch (v) {
    case LR_AGENT_SPEND_GRANTED: model_call(st); break; /* builds the request again, and goes on */
    case LR_AGENT_SPEND_BUSY:                           /* for long_wait_seconds already */
    case LR_AGENT_SPEND_REFUSED:
        rate_settle(st, &st->agent->models[st->model_idx], 0); /* a rate window reserved before it is not used */
        st->reserved = false;
        lr_agent_spend_suspend(st);
        agent_finish(st, LR_STEP_SUSPEND);
        break;
    default: spend_wait(st); break;
    }
}

/* ---------------------------------------------------------- the request */

/* Skips the models of the chain that cannot be called now (kill switch,
 * open circuit).  Returns the current model, or NULL past the end. */
static const lr_model_ref_t *model_pick(agent_state_t *st) {
    while (st->model_idx < st->agent->nmodels) {
        const lr_model_ref_t *mm = &st->agent->models[st->model_idx];
        if (lr_flag_disabled("model", mm->model)) {
            snprintf(st->last_reason, sizeof(st->last_reason), "model_disabled");
            snprintf(st->last_error, sizeof(st->last_error), "%s: disabled by an operator (kill switch)", mm->model);
            st->any_transient = true;
            fallback_note(st, mm->model, "model_disabled", "next_model");
        } else if (st->model_idx + 1 < st->agent->nmodels &&
                   lr_breaker_cooling(model_breaker(mm), lr_agent_now()) > 0) {
            /* it asked for a long wait (429 Retry-After) and a later model may answer now */
            snprintf(st->last_reason, sizeof(st->last_reason), "rate_limited");
            snprintf(st->last_error, sizeof(st->last_error), "%s: rate limited for another %ld ms", mm->model,
                     lr_breaker_cooling(model_breaker(mm), lr_agent_now()));
            st->any_transient = true;
            fallback_note(st, mm->model, "rate_limited", "next_model");
        } else if (!lr_breaker_allows(model_breaker(mm), lr_agent_now())) {
            snprintf(st->last_reason, sizeof(st->last_reason), "circuit_open");
            snprintf(st->last_error, sizeof(st->last_error), "%s: circuit open", mm->model);
            st->any_transient = true;
            fallback_note(st, mm->model, "circuit_open", "next_model");
        } else {
            return mm;
        }
        st->model_idx++;
        st->attempt = 0;
    }
    return NULL;
}

/* The request body for m: the summary request on a summary step, else the
 * conversation as the context strategy sends it.  NULL: out of memory. */
static char *model_request(agent_state_t *st, const lr_model_ref_t *m) {
    cJSON *conv;
    char *body;
    if (st->summarizing) {
        conv = lr_agent_summary_request(st);
        body = conv != NULL ? lr_provider_request(m, lr_agent_summary_system, conv, NULL, 0) : NULL;
    } else {
        bool owned;
        conv = lr_agent_context_of(st, &owned);
        body = lr_provider_request(m, st->agent->system, conv, st->agent->tools, st->agent->ntools);
        if (!owned) {
            conv = NULL;
        }
    }
    cJSON_Delete(conv);
    return body;
}

static void out_of_memory(agent_state_t *st) {
    snprintf(st->out->error, sizeof(st->out->error), "out of memory building the model request");
    agent_finish(st, LR_STEP_FAIL_TRANSIENT);
}

/* Sends body (owned) once the endpoint's concurrency gate has a slot. */
static void model_admit(agent_state_t *st, char *body) {
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    const lr_config_t *cfg = lr_worker_config(st->w);
    if (body == NULL) {
        out_of_memory(st);
        return;
    }
    st->gate = lr_gate_get(m->endpoint_key, m->endpoint_label,
                           m->max_concurrency > 0 ? m->max_concurrency : cfg->model_concurrency);
    if (st->gate != NULL) {
        st->gate_wait.ready = gate_ready;
        if (!lr_gate_acquire(st->gate, &st->gate_wait, lr_agent_now())) {
            st->pending_send = body;
            agent_set_state(st, LR_AGENT_GATE_WAIT);
            uv_timer_start(&st->timer, timer_cb, (uint64_t)cfg->long_wait_seconds * 1000u, 0);
            return;
        }
    }
    model_send(st, body);
}

/* PREPARING: calls the current model of the chain (or the next one that
 * can be called), through its rate window and gate. */
static void model_call(agent_state_t *st) {
    const lr_model_ref_t *m;
    const char *key, *budget;
    char *body, why[256];

    agent_set_state(st, LR_AGENT_PREPARING);
    if (!lr_run_lease_ok(st->run)) {
        /* paused past the lease: the task may be another worker's now */
        LR_LOG(LR_LOG_WARN, &st->log, "lease.expired_locally",
               "the lease ran out by this worker's clock: "
               "the model is not called");
        snprintf(st->out->error, sizeof(st->out->error), "the lease ran out before the model call");
        agent_finish(st, LR_STEP_ABANDONED);
        return;
    }
    m = model_pick(st);
    if (m == NULL) {
        model_next(st);
        return;
    }
    if (m->api_key_env != NULL) {
        key = getenv(m->api_key_env);
        if (key == NULL || key[0] == '\0') {
            snprintf(st->last_reason, sizeof(st->last_reason), "no_api_key");
            snprintf(st->last_error, sizeof(st->last_error), "%s: environment variable %s is not set", m->model,
                     m->api_key_env);
            fallback_note(st, m->model, "no_api_key", "next_model");
            model_next(st);
            return;
        }
    }
    body = model_request(st, m);
    if (body != NULL && m->context_tokens > 0 && (long)strlen(body) / 4 > m->context_tokens) {
        /* Never sent blindly over the context limit. */
        snprintf(st->last_reason, sizeof(st->last_reason), "context_length");
        snprintf(st->last_error, sizeof(st->last_error), "%s: about %ld tokens, over its context of %ld", m->model,
                 (long)strlen(body) / 4, m->context_tokens);
        free(body);
        fallback_note(st, m->model, "context_length", "next_model");
        model_next(st);
        return;
    }
    if (body != NULL && (budget = lr_agent_budget_before_model(st, m, strlen(body), why, sizeof(why))) != NULL) {
        /* The call would (or could) go over a budget: stop before it. */
        free(body);
        st->reserved = false;
        snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "%s", budget);
        snprintf(st->out->error, sizeof(st->out->error), "budget exhausted before calling the model: %s", why);
        LR_LOG(LR_LOG_INFO, &st->log, "budget.stop", "%s: %s", budget, why);
        agent_finish(st, LR_STEP_STOP);
        return;
    }
    if (body != NULL && lr_agent_spend_needed(st)) {
        /* A spend cap applies: reserve the call's worst case first; the
         * answer builds the request again. */
        size_t len = strlen(body);
        free(body);
        if (lr_agent_spend_reserve(st, m, len) != 0) {
            spend_wait(st);
            return;
        }
        st->refs++; /* the query's, until spend_answered */
        agent_set_state(st, LR_AGENT_CAP_CHECK);
        return;
    }
    if (body != NULL && !st->reserved && rate_limited(st, m)) {
        /* The reservation's answer builds the request again. */
        size_t len = strlen(body);
        free(body);
        rate_reserve(st, m, len);
        return;
    }
    st->reserved = false;
    model_admit(st, body);
}

static void model_response(const lr_http_response_t *resp, void *arg);

/* Reading the answer: each chunk must fit the memory budget, else the
 * transfer pauses until mem_ready. */
static bool model_admit_bytes(size_t total, void *arg) {
    agent_state_t *st = arg;
    return lr_mem_call_grow(lr_worker_mem(st->w), &st->mem_call, total * LR_MEM_RESPONSE_FACTOR);
}

static void model_post(agent_state_t *st, char *body);

/* MEM_WAIT: room for the call; CALLING: room for more of its answer. */
static void mem_ready(lr_mem_call_t *c) {
    agent_state_t *st = (agent_state_t *)(void *)((char *)c - offsetof(agent_state_t, mem_call));
    if (st->state == LR_AGENT_MEM_WAIT) {
        char *body = st->pending_send;
        st->pending_send = NULL;
        model_post(st, body);
    } else if (st->state == LR_AGENT_CALLING) {
        lr_http_resume(st->model_req);
    }
}

/* Sends body (owned) once the memory budget has room for the call. */
static void model_send(agent_state_t *st, char *body) {
    if (st->mem_call.state == LR_MEM_CALL_IDLE && !lr_mem_call_begin(lr_worker_mem(st->w), &st->mem_call, mem_ready)) {
        st->pending_send = body;
        agent_set_state(st, LR_AGENT_MEM_WAIT);
        return;
    }
    model_post(st, body);
}

/* Sends body (owned) to the current model: CALLING, with the gate's slot
 * (if the endpoint has a gate) ours until the response. */
static void model_post(agent_state_t *st, char *body) {
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    const char *key = m->api_key_env != NULL ? getenv(m->api_key_env) : NULL;
    char *url;
    char auth[600], idem[128];
    const char *headers[6];
    lr_http_opts_t o;
    int nh = 0, rc;

    agent_set_state(st, LR_AGENT_CALLING);
    url = lr_provider_url(m);
    if (url == NULL) {
        free(body);
        gate_done(st);
        out_of_memory(st);
        return;
    }
    headers[nh++] = "Content-Type: application/json";
    if (m->provider == LR_PROVIDER_OPENAI) {
        if (key != NULL && key[0] != '\0') {
            if (m->auth_api_key) {
                snprintf(auth, sizeof(auth), "api-key: %s", key); /* Azure OpenAI */
            } else {
                snprintf(auth, sizeof(auth), "Authorization: Bearer %s", key);
            }
            headers[nh++] = auth;
        }
    } else {
        headers[nh++] = "anthropic-version: 2023-06-01";
        if (key != NULL && key[0] != '\0') {
            snprintf(auth, sizeof(auth), "x-api-key: %s", key);
            headers[nh++] = auth;
        }
    }
    snprintf(idem, sizeof(idem), "X-Longrun-Task-Id: %s", lr_run_id(st->run));
    headers[nh++] = idem;
    headers[nh] = NULL;
    lr_http_opts_post(&o, url, headers, body);
    st->req_bytes = (long)o.body_len;
    o.timeout_ms = m->timeout_ms;
    o.max_body = (size_t)lr_worker_config(st->w)->max_response_bytes;
    o.admit = model_admit_bytes;
    o.admit_arg = st;
    lr_worker_egress(st->w, &o);
    agent_log_payload(st, "payload.model_request", m->endpoint_label, body, o.body_len);
    rc = lr_http_send(lr_worker_http(st->w), &o, model_response, st, &st->model_req);
    memset(auth, 0, sizeof(auth));
    free(url);
    free(body);
    if (rc != 0) {
        gate_done(st);
        model_failed(st, LR_CALL_RETRY, "send_failed", lr_strerror(rc), -1);
    }
}

/* ---------------------------------------------------------- the response */

/* A transport error or a non-2xx answer. */
static void model_http_failed(agent_state_t *st, const lr_http_response_t *resp) {
    char reason[32], detail[384], sr[16], ra[32], ram[32];
    const char *should;
    long wait;
    int cls;
    if (resp->err != 0) {
        snprintf(detail, sizeof(detail), "%s: %s", lr_strerror(resp->err), resp->errmsg);
        /* a refused address is configuration, not an outage: the next model */
        model_failed(st, resp->err == LR_EPERM ? LR_CALL_NEXT_MODEL : LR_CALL_RETRY,
                     resp->err == LR_ETIMEOUT ? "timeout"
                     : resp->err == LR_EPERM  ? "egress_refused"
                                              : "connection",
                     detail, -1);
        return;
    }
    should = lr_http_header(resp, "x-should-retry", sr, sizeof(sr)) == 0 ? sr : NULL;
    cls = lr_provider_classify(resp->status, resp->body, should, reason, sizeof(reason), detail, sizeof(detail));
    wait = lr_retry_after_ms(lr_http_header(resp, "retry-after-ms", ram, sizeof(ram)) == 0 ? ram : NULL,
                             lr_http_header(resp, "retry-after", ra, sizeof(ra)) == 0 ? ra : NULL);
    model_failed(st, cls, reason, detail, wait);
}

static bool finish_is_length(const char *finish) {
    return strcmp(finish, "length") == 0 || strcmp(finish, "max_tokens") == 0;
}

/* A parsed answer (st->reply) of model m: the summary of a summary step,
 * the final answer, or tool calls to run. */
static void model_answered(agent_state_t *st, const lr_model_ref_t *m) {
    cJSON *res;
    if (st->summarizing) {
        if (st->reply.text == NULL || st->reply.text[0] == '\0' || st->reply.ntool_calls > 0) {
            lr_model_reply_free(&st->reply);
            model_failed(st, LR_CALL_RETRY, "malformed_response", "the summary is empty", -1);
            return;
        }
        lr_agent_summary_add(st, st->reply.text);
        LR_LOG(LR_LOG_INFO, &st->log, "context.summarized", "summarized %d messages (%d assistant turns) with %s",
               st->summary_cut, st->summary_turns, m->model);
        st->ncalls = 0;
        agent_step_complete(st); /* the summary is a step of its own */
        return;
    }
    if (st->reply.ntool_calls > 0 && finish_is_length(st->reply.finish)) {
        /* Arguments may be cut: never execute them, and keep the message out
         * of the conversation (a retry must not carry unanswered calls). */
        lr_model_reply_free(&st->reply);
        model_failed(st, LR_CALL_RETRY, "truncated_tool_call", "tool call cut by the token limit", -1);
        return;
    }
    if (st->reply.ntool_calls > 0) {
        /* Run the requested tools; the conversation goes on from here. */
        cJSON_AddItemToArray(st->added, cJSON_Duplicate(st->reply.assistant, true));
        cJSON_AddItemToArray(st->conv, cJSON_Duplicate(st->reply.assistant, true));
        lr_agent_tools_collect(st);
        agent_set_state(st, LR_AGENT_TOOLS);
        lr_agent_tools_start(st);
        return;
    }
    /* The final answer (it may be megabytes: no copies the step does not
     * need): the message moves into the step's delta, and the conversation,
     * which ends here, does not get it. */
    cJSON_AddItemToArray(st->added, st->reply.assistant);
    st->reply.assistant = NULL;
    res = cJSON_CreateObject();
    cJSON_AddItemToObject(res, "answer", cJSON_CreateStringReference(st->reply.text != NULL ? st->reply.text : ""));
    cJSON_AddStringToObject(res, "model", m->model);
    cJSON_AddStringToObject(res, "finish_reason", st->reply.finish);
    if (finish_is_length(st->reply.finish)) {
        cJSON_AddTrueToObject(res, "truncated");
    }
    st->out->result = cJSON_PrintUnformatted(res);
    cJSON_Delete(res);
    agent_finish(st, LR_STEP_FINISHED);
}

/* CALLING: the model's answer, or a failure to get one. */
static void model_response(const lr_http_response_t *resp, void *arg) {
    agent_state_t *st = arg;
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    char err[512];
    bool ok = resp->err == 0 && resp->status >= 200 && resp->status < 300;
    double cost;

    st->model_req = NULL;
    gate_done(st);
    agent_log_payload(st, "payload.model_response", m->endpoint_label, resp->body, resp->body_len);
    if (!ok) {
        rate_settle(st, m, 0); /* a 2xx is settled once its usage is parsed */
        /* a timeout may have been billed; an error answer is not */
        lr_agent_spend_settle(st, resp->err == LR_ETIMEOUT ? LR_AGENT_SPEND_AT_RESERVATION : 0);
        lr_mem_call_end(lr_worker_mem(st->w), &st->mem_call); /* nothing of it is kept */
    }
    lr_agent_count_request(m, resp);
    if (!ok) {
        model_http_failed(st, resp);
        return;
    }
    if (resp->truncated) {
        /* Not retried: the same question gets the same too-long answer. */
        rate_settle(st, m, 0);
        lr_agent_spend_settle(st, LR_AGENT_SPEND_AT_RESERVATION); /* billed, usage unknown */
        lr_mem_call_end(lr_worker_mem(st->w), &st->mem_call);
        snprintf(err, sizeof(err), "the answer is over LONGRUN_MAX_RESPONSE_BYTES (%d bytes); not read further",
                 lr_worker_config(st->w)->max_response_bytes);
        model_failed(st, LR_CALL_PERMANENT, "response_too_large", err, -1);
        return;
    }
    if (lr_provider_parse(m, resp->body, resp->body_len, st->step_no, &st->reply, err, sizeof(err)) != 0) {
        lr_agent_spend_settle(st, LR_AGENT_SPEND_AT_RESERVATION); /* billed, usage unknown */
        model_failed(st, LR_CALL_RETRY, "malformed_response", err, -1);
        return;
    }
    lr_breaker_result(model_breaker(m), true, lr_agent_now());
    st->answered = m;
    cost = lr_agent_account_usage(st, m, resp->body_len); /* (estimates the tokens of an answer without usage) */
    rate_settle(st, m, st->reply.tokens_in + st->reply.tokens_out);
    lr_agent_spend_settle(st, cost);
    if (st->reply.refused) {
        /* Declined (content filter, refusal): paid for, not an answer; the
         * next model of the chain may answer it. */
        snprintf(err, sizeof(err), "the model declined to answer (finish reason %s)", st->reply.finish);
        st->answered = NULL;
        lr_model_reply_free(&st->reply);
        model_failed(st, LR_CALL_NEXT_MODEL, "content_filter", err, -1);
        return;
    }
    LR_LOG(LR_LOG_DEBUG, &st->log, "model.answered", "model %s: %d tool calls, finish %s, tokens %ld/%ld, %.0f ms",
           m->model, st->reply.ntool_calls, st->reply.finish, st->reply.tokens_in, st->reply.tokens_out,
           resp->total_ms);
    model_answered(st, m);
}

/* --------------------------------------------------------------- executor */

static agent_state_t *state_new(lr_worker_t *w) {
    agent_state_t *st = calloc(1, sizeof(*st));
    if (st == NULL) {
        return NULL;
    }
    st->ops = &agent_ops;
    st->state = LR_AGENT_IDLE;
    st->w = w;
    st->conv_step = -1;
    uv_timer_init(lr_worker_loop(w), &st->timer);
    st->timer.data = st;
    st->refs = 1; /* the timer's, until agent_timer_closed */
    return st;
}

/* Resets what one step tracks. */
static void step_begin(agent_state_t *st, lr_run_t *r, lr_step_t *out) {
    st->run = r;
    st->out = out;
    st->done = NULL; /* armed when start returns 0 */
    st->agent = lr_agents_find(lr_run_agent(r));
    st->step_no = lr_run_step_no(r) + 1;
    st->log = (lr_log_ctx_t){lr_run_id(r), st->step_no, lr_run_epoch(r)};
    st->model_idx = 0;
    st->attempt = 0;
    st->any_transient = false;
    st->answered = NULL;
    st->tool_calls_made = 0;
    st->suspend_reason[0] = st->wait_event[0] = '\0';
    st->suspend_ms = -1;
    st->ncalls = 0;
    st->calls_running = 0;
    st->summarizing = false;
    st->step_started = lr_agent_now();
}

/* PREPARING: budgets, the conversation, and the answers to the calls a
 * resumed task waited on.  Returns 0, or LR_EPERM when the step ends here
 * (out says how; the state is IDLE again). */
static int step_prepare(agent_state_t *st) {
    lr_step_t *out = st->out;
    char why[160];
    const char *reason;

    st->log_payloads = lr_payload_sampled(lr_run_id(st->run), lr_worker_config(st->w)->log_payloads);
    lr_run_usage(st->run, &st->usage);
    lr_agent_budgets_resolve(st);
    reason = lr_agent_budget_spent(st, why, sizeof(why));
    if (reason != NULL) {
        out->outcome = LR_STEP_FAIL_PERMANENT;
        snprintf(out->stop_reason, sizeof(out->stop_reason), "%s", reason);
        snprintf(out->error, sizeof(out->error), "budget exhausted before step %d: %s", st->step_no, why);
        agent_set_state(st, LR_AGENT_IDLE);
        return LR_EPERM;
    }
    st->added = cJSON_CreateArray();
    st->calls_log = cJSON_CreateArray();
    if (lr_agent_conv_load(st) != 0) {
        step_drop(st);
        agent_set_state(st, LR_AGENT_IDLE);
        return LR_EPERM;
    }
    if (lr_agent_answer_pending(st) != 0) {
        /* Resumed without what it waits for: wait again. */
        snprintf(out->suspend_reason, sizeof(out->suspend_reason), "%s", st->suspend_reason);
        snprintf(out->wait_event, sizeof(out->wait_event), "%s", st->wait_event);
        out->resume_in_ms = -1;
        step_drop(st);
        out->outcome = LR_STEP_SUSPEND;
        out->messages = strdup("[]");
        agent_set_state(st, LR_AGENT_IDLE);
        return LR_EPERM; /* the worker checkpoints out->outcome */
    }
    return 0;
}

static int agent_start(lr_run_t *r, lr_step_t *out, lr_step_done_cb done) {
    agent_state_t **sp = (agent_state_t **)lr_run_exec_state(r);
    agent_state_t *st = *sp;

    if (st == NULL) {
        st = state_new(lr_run_worker(r));
        if (st == NULL) {
            return LR_ENOMEM;
        }
        *sp = st;
    }
    step_begin(st, r, out);
    if (st->agent == NULL) {
        out->outcome = LR_STEP_FAIL_PERMANENT;
        snprintf(out->error, sizeof(out->error), "unknown agent '%s'", lr_run_agent(r));
        return LR_EPERM;
    }
    agent_set_state(st, LR_AGENT_PREPARING);
    if (step_prepare(st) != 0) {
        return LR_EPERM;
    }
    if (st->ncalls > 0) {
        /* Approved tool calls run first; the model is called next step. */
        agent_set_state(st, LR_AGENT_TOOLS);
        lr_agent_tools_start(st);
    } else {
        st->summarizing = lr_agent_summary_needed(st);
        model_call(st);
    }
    if (st->state == LR_AGENT_IDLE) {
        return LR_EPERM; /* it ended already (agent_finish filled out): the worker takes it from here */
    }
    st->done = done;
    return 0;
}

static void agent_cancel(lr_run_t *r) {
    agent_state_t *st = *(agent_state_t **)lr_run_exec_state(r);
    if (st == NULL) {
        return;
    }
    uv_timer_stop(&st->timer);
    /* the reservation held: a call in flight may have been billed */
    lr_agent_spend_cancel(st, st->state == LR_AGENT_CALLING && st->model_req != NULL);
    switch (st->state) {
    case LR_AGENT_GATE_WAIT:
        lr_gate_forget(&st->gate_wait);
        st->gate = NULL;
        free(st->pending_send);
        st->pending_send = NULL;
        break;
    case LR_AGENT_MEM_WAIT:
        free(st->pending_send);
        st->pending_send = NULL;
        gate_done(st);
        break;
    case LR_AGENT_CALLING:
        if (st->model_req != NULL) {
            lr_http_cancel(st->model_req);
            st->model_req = NULL;
            /* a trial call that never finished: allow another trial */
            lr_breaker_abandon(model_breaker(&st->agent->models[st->model_idx]), lr_agent_now());
        }
        gate_done(st);
        break;
    case LR_AGENT_TOOLS: lr_agent_tools_cancel(st); break;
    default:
        /* RESERVING, CAP_CHECK: the query keeps its reference; its answer
         * finds the step gone.  The timer of a wait is stopped above. */
        break;
    }
    lr_mem_call_end(lr_worker_mem(st->w), &st->mem_call);
    step_drop(st);
    lr_model_reply_free(&st->reply);
    agent_set_state(st, LR_AGENT_IDLE);
}

static void agent_release(lr_run_t *r) {
    agent_state_t **sp = (agent_state_t **)lr_run_exec_state(r);
    agent_state_t *st = *sp;
    if (st == NULL) {
        return;
    }
    agent_cancel(r);
    *sp = NULL;
    agent_set_state(st, LR_AGENT_RELEASED);
    uv_close((uv_handle_t *)&st->timer, agent_timer_closed);
}

const lr_executor_t lr_exec_agent = {
    .name = "agent",
    .needs_history = true,
    .keeps_conversation = true,
    .start = agent_start,
    .cancel = agent_cancel,
    .release = agent_release,
};
