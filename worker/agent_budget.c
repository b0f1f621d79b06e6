/*
 * agent_budget.c - the five budgets of an agent task: which applies (task >
 * agent > worker default, under the operator's ceilings), whether one is
 * used up, and whether the next model or tool call may start.
 *
 * Design.  Loop thread, no I/O.  Usage is what the task's checkpointed steps
 * used (lr_run_usage, from the claimed row) plus what the step in flight
 * used so far (st->out).  Three kinds of check:
 *
 *   spent     before a step and after it: tokens, cost, time, steps
 *   model     before every model call: time, and the call's worst case
 *             cost (prompt estimate x input price + max_tokens x output
 *             price) must fit what is left of max_cost_usd
 *   tools     before the tool calls of a step: time
 *
 * max_seconds counts active time (the task's steps, the step in flight
 * included) unless the agent's budget_clock is "wall" (the time since the
 * task first started, suspensions and queueing included).  A call in flight
 * is never cut by a budget: the task stops before the next one.
 *
 * The usage the budgets read is counted here too: each model answer's
 * tokens and cost into the step (and the metrics), and each request's
 * status and latency.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "agent_state.h"
#include "callstats.h"
#include "wmetrics.h"

/* An answer whose length the request does not bound (OpenAI without
 * max_tokens) is estimated at this many output tokens. */
#define UNBOUNDED_OUTPUT_TOKENS 1024

static long budget_of(long task, long agent, long dflt) { return task >= 0 ? task : agent >= 0 ? agent : dflt; }

double lr_agent_cost_of(const lr_model_ref_t *m, long in, long cached, long out) {
    double uncached = (double)(in - cached > 0 ? in - cached : 0);
    return (uncached * m->price_in + (double)cached * m->price_cached + (double)out * m->price_out) / 1e6;
}

double lr_agent_worst_cost(const lr_model_ref_t *m, size_t body_len, long *in, long *out) {
    long i = (long)(body_len / 4) + 1;
    long o = m->max_tokens > 0 ? m->max_tokens : UNBOUNDED_OUTPUT_TOKENS;
    if (in != NULL) {
        *in = i;
    }
    if (out != NULL) {
        *out = o;
    }
    return lr_agent_cost_of(m, i, 0, o);
}

void lr_agent_count_request(const lr_model_ref_t *m, const lr_http_response_t *resp) {
    char status[16];
    const char *lv[3] = {m->provider == LR_PROVIDER_OPENAI ? "openai" : "anthropic", m->model, status};
    snprintf(status, sizeof(status), "%ld", resp->err != 0 ? 0L : resp->status);
    lr_metric_add(lr_wm.model_requests, lv, 1);
    lr_callstats_add(LR_CALLSTATS_MODEL, m->endpoint_label, resp->err != 0 ? 0L : resp->status, lr_agent_now());
    lr_metric_observe(lr_wm.model_seconds, lv, resp->total_ms / 1000.0);
    if (resp->status == 429) {
        lr_metric_inc1(lr_wm.rate_limit_waits, m->model);
    }
}

double lr_agent_account_usage(agent_state_t *st, const lr_model_ref_t *m, size_t body_len) {
    const char *ag = st->agent->name;
    const char *in[3] = {ag, m->model, "input"}, *outv[3] = {ag, m->model, "output"}, *ca[3] = {ag, m->model, "cached"};
    double cost;
    if (st->reply.usage_missing) {
        /* Estimate (about 4 bytes a token) so that budgets still bind. */
        st->reply.tokens_in = st->req_bytes / 4 + 1;
        st->reply.tokens_out = (long)(body_len / 4 + 1);
    }
    cost = lr_agent_cost_of(m, st->reply.tokens_in, st->reply.tokens_cached, st->reply.tokens_out);
    st->out->tokens_in += st->reply.tokens_in;
    st->out->tokens_out += st->reply.tokens_out;
    st->out->tokens_cached += st->reply.tokens_cached;
    st->out->cost_usd += cost;
    lr_metric_add(lr_wm.tokens, in, (double)st->reply.tokens_in);
    lr_metric_add(lr_wm.tokens, outv, (double)st->reply.tokens_out);
    lr_metric_add(lr_wm.tokens, ca, (double)st->reply.tokens_cached);
    lr_metric_add(lr_wm.cost, (const char *const[]){ag, m->model}, cost);
    return cost;
}

long lr_agent_elapsed_ms(const agent_state_t *st) {
    if (st->agent != NULL && st->agent->budget_wall) {
        lr_run_usage_t u;
        lr_run_usage(st->run, &u);
        return u.wall_ms;
    }
    return st->usage.active_ms + (long)(lr_agent_now() - st->step_started);
}

/* The operator's ceilings bind every budget, whoever set it. */
static void clamp_budgets(agent_state_t *st, const lr_config_t *cfg) {
    struct {
        const char *name;
        long *value;
        long ceiling;
    } cl[] = {
        {"max_steps", &st->budgets.max_steps, cfg->ceiling_max_steps},
        {"max_tool_calls", &st->budgets.max_tool_calls, cfg->ceiling_max_tool_calls},
        {"max_tokens", &st->budgets.max_tokens, cfg->ceiling_max_tokens},
        {"max_seconds", &st->budgets.max_seconds, cfg->ceiling_max_seconds},
    };
    for (size_t i = 0; i < sizeof(cl) / sizeof(cl[0]); i++) {
        if (cl[i].ceiling > 0 && (*cl[i].value < 0 || *cl[i].value > cl[i].ceiling)) {
            if (!st->clamp_logged) {
                LR_LOG(LR_LOG_INFO, &st->log, "budget.clamped", "%s %ld lowered to the operator's ceiling %ld",
                       cl[i].name, *cl[i].value, cl[i].ceiling);
            }
            *cl[i].value = cl[i].ceiling;
        }
    }
    if (cfg->ceiling_max_cost_usd > 0 &&
        (st->budgets.max_cost_usd < 0 || st->budgets.max_cost_usd > cfg->ceiling_max_cost_usd)) {
        if (!st->clamp_logged) {
            LR_LOG(LR_LOG_INFO, &st->log, "budget.clamped", "max_cost_usd %.4f lowered to the operator's ceiling %.4f",
                   st->budgets.max_cost_usd, cfg->ceiling_max_cost_usd);
        }
        st->budgets.max_cost_usd = cfg->ceiling_max_cost_usd;
    }
    st->clamp_logged = true;
}

void lr_agent_budgets_resolve(agent_state_t *st) {
    const lr_config_t *cfg = lr_worker_config(st->w);
    lr_budgets_t task;
    const char *bj = lr_run_budgets_json(st->run);
    cJSON *b = bj != NULL ? cJSON_Parse(bj) : NULL;
    const cJSON *c;
    lr_budgets_init(&task);
    cJSON_ArrayForEach(c, b) {
        if (cJSON_IsNumber(c)) {
            (void)lr_budget_set(&task, c->string, c->valuedouble, NULL, 0);
        }
    }
    cJSON_Delete(b);
    st->budgets.max_steps = budget_of(task.max_steps, st->agent->budgets.max_steps, cfg->max_steps);
    st->budgets.max_tool_calls = budget_of(task.max_tool_calls, st->agent->budgets.max_tool_calls, cfg->max_tool_calls);
    st->budgets.max_tokens = budget_of(task.max_tokens, st->agent->budgets.max_tokens, cfg->max_tokens);
    st->budgets.max_seconds = budget_of(task.max_seconds, st->agent->budgets.max_seconds, cfg->max_seconds);
    st->budgets.max_cost_usd = task.max_cost_usd >= 0                 ? task.max_cost_usd
                               : st->agent->budgets.max_cost_usd >= 0 ? st->agent->budgets.max_cost_usd
                                                                      : cfg->max_cost_usd;
    clamp_budgets(st, cfg);
}

/* max_seconds, the step in flight included. */
static const char *time_up(const agent_state_t *st, char *why, size_t whylen) {
    long ms = lr_agent_elapsed_ms(st);
    if (st->budgets.max_seconds >= 0 && ms >= st->budgets.max_seconds * 1000) {
        snprintf(why, whylen, "%s %.1f s, budget %ld s", st->agent->budget_wall ? "running for" : "active",
                 (double)ms / 1000.0, st->budgets.max_seconds);
        return "max_seconds";
    }
    return NULL;
}

const char *lr_agent_budget_spent(const agent_state_t *st, char *why, size_t whylen) {
    const lr_budgets_t *b = &st->budgets;
    long tokens = st->usage.tokens_in + st->usage.tokens_out;
    const char *r;
    if (b->max_tokens >= 0 && tokens >= b->max_tokens) {
        snprintf(why, whylen, "used %ld tokens, budget %ld", tokens, b->max_tokens);
        return "max_tokens";
    }
    if (b->max_cost_usd >= 0 && st->usage.cost_usd >= b->max_cost_usd) {
        snprintf(why, whylen, "cost $%.4f, budget $%.4f", st->usage.cost_usd, b->max_cost_usd);
        return "max_cost";
    }
    if ((r = time_up(st, why, whylen)) != NULL) {
        return r;
    }
    if (b->max_steps >= 0 && st->usage.step >= b->max_steps) {
        snprintf(why, whylen, "ran %d steps, budget %ld", st->usage.step, b->max_steps);
        return "max_steps";
    }
    return NULL;
}

const char *lr_agent_budget_before_model(const agent_state_t *st, const lr_model_ref_t *m, size_t body_len, char *why,
                                         size_t whylen) {
    const char *r = time_up(st, why, whylen);
    if (r != NULL) {
        return r;
    }
    if (st->budgets.max_cost_usd >= 0) {
        long in, out;
        double spent = st->usage.cost_usd + st->out->cost_usd;
        double worst = lr_agent_worst_cost(m, body_len, &in, &out);
        if (spent + worst > st->budgets.max_cost_usd) {
            snprintf(why, whylen,
                     "a call to %s could cost $%.4f (about %ld tokens in, up to %ld out); spent $%.4f of $%.4f",
                     m->model, worst, in, out, spent, st->budgets.max_cost_usd);
            return "max_cost";
        }
    }
    return NULL;
}

const char *lr_agent_budget_before_tools(const agent_state_t *st, char *why, size_t whylen) {
    return time_up(st, why, whylen);
}

double lr_agent_jitter(void) {
    unsigned int r = 0;
    if (getrandom(&r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        r = (unsigned int)rand();
    }
    return (double)r / (double)UINT32_MAX;
}
