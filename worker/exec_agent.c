/*
 * exec_agent.c - the agent loop: one step = answer pending tool calls, call
 * the model (fallback chain, retries, circuit breakers), run the tools it
 * asks for, and report what the step added.  The worker checkpoints it.
 *
 * Design.  Runs on the loop thread as an lr_executor_t.  Per task, an
 * agent_state_t (allocated on the first step, freed in its timer's close
 * callback) holds the step in flight:
 *
 *   start -> [budget checks] -> [answer pending calls from signals]
 *         -> MODEL (model i, attempt k; timer for backoff)
 *         -> TOOLS (HTTP calls in parallel, each with retries)
 *         -> done(outcome)
 *
 * Budgets are checked before the model call and before every tool call; a
 * step that reaches a budget ends the task with its stop_reason (the worker
 * dead-letters it for the operator).  A rate-limit wait longer than
 * 30 s (fixed) suspends the task (rate_limited, resume_at)
 * without counting an attempt.  Circuit breakers are per model endpoint:
 * 5 consecutive failures open it for 30 s, then one trial call (half-open).
 *
 * Nothing here logs prompts, tool arguments or results (privacy): only
 * names, sizes, statuses and timings.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "agents.h"
#include "breaker.h"
#include "jsonschema.h"
#include "text.h"
#include "log.h"
#include "provider.h"
#include "wmetrics.h"
#include "worker.h"

#define MAX_CALLS 16
#define PAYLOAD_LOG_MAX 4096

static lr_breaker_t *model_breaker(const lr_model_ref_t *m) {
    char key[400];
    snprintf(key, sizeof(key), "model:%s", m->endpoint_key);
    return lr_breaker_get(key, m->endpoint_label);
}

static lr_breaker_t *tool_breaker(const lr_tool_def_t *d) {
    char key[100];
    snprintf(key, sizeof(key), "tool:%s", d->name);
    return lr_breaker_get(key, key);
}

/* ------------------------------------------------------------------ state */

typedef struct tool_call {
    struct agent_state *st;
    int index;
    const char *id;              /* borrowed from the assistant message */
    const char *name;
    const char *args;
    const lr_tool_def_t *def;
    lr_http_req_t *req;
    int tries;
    bool running;
    bool suspends;
    bool approved;               /* requires_approval and approved: run it */
    double sig_id;               /* the approval signal it consumes (0: none) */
    uint64_t started;
} tool_call_t;

typedef struct agent_state {
    lr_run_t *run;
    lr_worker_t *w;
    lr_step_t *out;
    lr_step_done_cb done;
    const lr_agent_t *agent;
    uv_timer_t timer;
    bool active;                 /* a step is in flight */
    int step_no;                 /* the step being made */
    cJSON *conv;                 /* conversation sent to the model */
    int conv_step;               /* conv is the whole conversation through this step (-1: rebuild) */
    cJSON *added;                /* messages this step added */
    cJSON *calls_log;            /* tool_calls column */
    lr_budgets_t budgets;
    lr_run_usage_t usage;
    int model_idx;
    int attempt;
    lr_http_req_t *model_req;
    char last_reason[32];
    char last_error[384];
    int last_class;
    bool any_transient;
    long wait_ms;                /* Retry-After of the last failure */
    lr_model_reply_t reply;
    const lr_model_ref_t *answered;
    tool_call_t calls[MAX_CALLS];
    int ncalls;
    int calls_running;
    long tool_calls_made;
    char suspend_reason[32];
    char wait_event[128];
    long suspend_ms;
    long req_bytes;              /* size of the last request body (token estimates) */
    /* fleet-wide rate limit of the current model (table rate_windows) */
    char *pending_body;          /* request body waiting for its reservation */
    bool reserved;               /* the next send is covered by a reservation */
    long reserved_est;           /* tokens reserved (settled after the call) */
    char window[48];             /* window_start of the reservation */
    bool reserving;              /* a reservation query is in flight */
    bool tenant_reserved;        /* the reservation also covers the tenant */
    bool released;               /* the run is gone; free when the query returns */
    bool timer_closed;
    /* in-process concurrency gate of the current model endpoint */
    lr_gate_waiter_t gate_wait;
    lr_gate_t *gate;
    bool gate_held;              /* a slot is ours until the response */
    bool gate_waiting;           /* queued; the timer bounds the wait */
    char *pending_send;          /* request body waiting for its slot */
    bool log_payloads;           /* this task is sampled (LONGRUN_LOG_PAYLOADS) */
    bool summarizing;            /* this step writes a summary (context "summarize") */
    int summary_cut;             /* it summarizes conv[0 .. cut) */
    int summary_turns;           /* assistant messages in conv[0 .. cut) */
    bool clamp_logged;
} agent_state_t;

static void model_call(agent_state_t *st);
static void model_send(agent_state_t *st, char *body);
static void tools_start(agent_state_t *st);
static void tools_maybe_done(agent_state_t *st);
static void finish(agent_state_t *st, int outcome);

static uint64_t loop_now(agent_state_t *st) {
    (void)st;
    return uv_hrtime() / 1000000u;
}

static double jitter(void) {
    unsigned int r = 0;
    if (getrandom(&r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        r = (unsigned int)rand();
    }
    return (double)r / (double)UINT32_MAX;
}

/* Sampled payload logging: the whole task or nothing, by a hash of its id. */
static bool payload_sampled(const char *id, double rate) {
    uint32_t h = 2166136261u;
    if (rate <= 0) {
        return false;
    }
    for (const char *p = id; *p != '\0'; p++) {
        h = (h ^ (uint8_t)*p) * 16777619u;
    }
    return (double)h / (double)UINT32_MAX < rate;
}

static void log_payload(agent_state_t *st, const char *event, const char *what, const char *text, size_t len) {
    lr_log_ctx_t ctx = {lr_run_id(st->run), st->step_no, lr_run_epoch(st->run)};
    bool cut = false;
    char *clean;
    if (!st->log_payloads) {
        return;
    }
    clean = lr_utf8_clean(text != NULL ? text : "", text != NULL ? len : 0, PAYLOAD_LOG_MAX, &cut);
    LR_LOG(LR_LOG_INFO, &ctx, event, "%s (%zu bytes%s): %s", what, len, cut ? ", cut at 4096" : "",
           clean != NULL ? clean : "");
    lr_metric_add(lr_wm.payloads_logged, NULL, 1);
    free(clean);
}

static void gate_done(agent_state_t *st) {
    if (st->gate_held) {
        st->gate_held = false;
        lr_gate_release(st->gate);
    }
}

static void gate_ready(lr_gate_waiter_t *wt) {
    agent_state_t *st = (agent_state_t *)(void *)((char *)wt - offsetof(agent_state_t, gate_wait));
    char *body = st->pending_send;
    st->pending_send = NULL;
    st->gate_waiting = false;
    st->gate_held = true;
    uv_timer_stop(&st->timer);
    model_send(st, body);
}

static long budget_of(long task, long agent, long dflt) {
    return task >= 0 ? task : agent >= 0 ? agent : dflt;
}

static void finish(agent_state_t *st, int outcome) {
    lr_step_t *out = st->out;
    out->outcome = outcome;
    if (cJSON_GetArraySize(st->added) > 0 || outcome == LR_STEP_CONTINUE || outcome == LR_STEP_FINISHED ||
        outcome == LR_STEP_SUSPEND || outcome == LR_STEP_STOP) {
        out->messages = cJSON_PrintUnformatted(st->added);
    }
    if (cJSON_GetArraySize(st->calls_log) > 0) {
        out->tool_calls = cJSON_PrintUnformatted(st->calls_log);
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
    st->active = false;
    st->done(st->run);
}

/* Budget checks that need no new step: returns a reason or NULL. */
static const char *budget_exceeded(agent_state_t *st, char *why, size_t whylen) {
    const lr_budgets_t *b = &st->budgets;
    long tokens = st->usage.tokens_in + st->usage.tokens_out;
    if (b->max_tokens >= 0 && tokens >= b->max_tokens) {
        snprintf(why, whylen, "used %ld tokens, budget %ld", tokens, b->max_tokens);
        return "max_tokens";
    }
    if (b->max_cost_usd >= 0 && st->usage.cost_usd >= b->max_cost_usd) {
        snprintf(why, whylen, "cost $%.4f, budget $%.4f", st->usage.cost_usd, b->max_cost_usd);
        return "max_cost";
    }
    if (b->max_seconds >= 0 && st->usage.active_ms >= b->max_seconds * 1000) {
        snprintf(why, whylen, "active %ld s, budget %ld s", st->usage.active_ms / 1000, b->max_seconds);
        return "max_seconds";
    }
    if (b->max_steps >= 0 && st->usage.step >= b->max_steps) {
        snprintf(why, whylen, "ran %d steps, budget %ld", st->usage.step, b->max_steps);
        return "max_steps";
    }
    return NULL;
}

static void resolve_budgets(agent_state_t *st) {
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
    st->budgets.max_cost_usd = task.max_cost_usd >= 0 ? task.max_cost_usd
                               : st->agent->budgets.max_cost_usd >= 0 ? st->agent->budgets.max_cost_usd
                                                                      : cfg->max_cost_usd;
    /* The operator's ceilings bind every budget, whoever set it. */
    {
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
        lr_log_ctx_t ctx = {lr_run_id(st->run), st->step_no, lr_run_epoch(st->run)};
        for (size_t i = 0; i < sizeof(cl) / sizeof(cl[0]); i++) {
            if (cl[i].ceiling > 0 && (*cl[i].value < 0 || *cl[i].value > cl[i].ceiling)) {
                if (!st->clamp_logged) {
                    LR_LOG(LR_LOG_INFO, &ctx, "budget.clamped", "%s %ld lowered to the operator's ceiling %ld",
                           cl[i].name, *cl[i].value, cl[i].ceiling);
                }
                *cl[i].value = cl[i].ceiling;
            }
        }
        if (cfg->ceiling_max_cost_usd > 0 &&
            (st->budgets.max_cost_usd < 0 || st->budgets.max_cost_usd > cfg->ceiling_max_cost_usd)) {
            if (!st->clamp_logged) {
                LR_LOG(LR_LOG_INFO, &ctx, "budget.clamped", "max_cost_usd %.4f lowered to the operator's ceiling %.4f",
                       st->budgets.max_cost_usd, cfg->ceiling_max_cost_usd);
            }
            st->budgets.max_cost_usd = cfg->ceiling_max_cost_usd;
        }
        st->clamp_logged = true;
    }
}

/* The first user message of a task, from its input. */
static cJSON *user_message(const cJSON *input) {
    cJSON *m = cJSON_CreateObject();
    const char *text = NULL;
    char *owned = NULL;
    cJSON_AddStringToObject(m, "role", "user");
    if (cJSON_IsString(input)) {
        text = input->valuestring;
    } else {
        static const char *const keys[] = {"prompt", "question", "message", "task", NULL};
        for (int i = 0; keys[i] != NULL && text == NULL; i++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(input, keys[i]);
            if (cJSON_IsString(v)) {
                text = v->valuestring;
            }
        }
        if (text == NULL) {
            owned = cJSON_PrintUnformatted(input);
            text = owned != NULL ? owned : "";
        }
    }
    cJSON_AddStringToObject(m, "content", text);
    free(owned);
    return m;
}

/* Window context: keep the first user message and the last N messages,
 * starting the window at a user or assistant message so that no tool result
 * is separated from the call that asked for it. */
static cJSON *apply_window(const cJSON *conv, int n) {
    int total = cJSON_GetArraySize(conv);
    int start = total - n;
    cJSON *out = cJSON_CreateArray();
    if (start <= 1) {
        cJSON_Delete(out);
        return cJSON_Duplicate(conv, true);
    }
    while (start < total) {
        const char *role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(conv, start), "role"));
        if (role != NULL && strcmp(role, "tool") != 0) {
            break;
        }
        start++;
    }
    cJSON_AddItemToArray(out, cJSON_Duplicate(cJSON_GetArrayItem(conv, 0), true));
    for (int i = start; i < total; i++) {
        cJSON_AddItemToArray(out, cJSON_Duplicate(cJSON_GetArrayItem(conv, i), true));
    }
    return out;
}

/* ---------------------------------------------------- summarize context */

#define SUMMARY_SYSTEM                                                                         \
    "[longrun:summarize] You condense the transcript of an AI agent's work so far into a "   \
    "summary that lets the agent continue without the transcript: the goal, what was done "   \
    "and found (with the tool results that still matter, quoted exactly where exact values "  \
    "count), decisions made, and what remains open.  Plain text, at most 400 words."
#define SUMMARY_PIECE_MAX 4000

static const char *role_of(const cJSON *m) {
    return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
}

/* The last summary message of conv (NULL if none) and where it applies. */
static const cJSON *last_summary(const cJSON *conv, int *covers, int *turns) {
    const cJSON *found = NULL;
    const cJSON *m;
    *covers = 0;
    *turns = 0;
    cJSON_ArrayForEach(m, conv) {
        const char *role = role_of(m);
        if (role != NULL && strcmp(role, "summary") == 0) {
            const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "covers");
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(m, "turns");
            int n = cJSON_GetArraySize(conv);
            if (cJSON_IsNumber(c) && c->valuedouble >= 1 && c->valuedouble <= n) {
                found = m;
                *covers = (int)c->valuedouble;
                *turns = cJSON_IsNumber(t) && t->valuedouble >= 0 ? (int)t->valuedouble : 0;
            }
        }
    }
    return found;
}

/* Summarize context: the first (user) message carries the latest summary,
 * followed by every message after the part it covers. */
static cJSON *apply_summary(const cJSON *conv) {
    int covers, turns, n = cJSON_GetArraySize(conv);
    const cJSON *sum = last_summary(conv, &covers, &turns);
    cJSON *out, *first;
    const char *orig, *text;
    size_t len;
    char *merged;
    if (sum == NULL || n == 0) {
        return cJSON_Duplicate(conv, true);
    }
    out = cJSON_CreateArray();
    first = cJSON_Duplicate(cJSON_GetArrayItem(conv, 0), true);
    orig = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first, "content"));
    text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(sum, "content"));
    len = (orig != NULL ? strlen(orig) : 0) + (text != NULL ? strlen(text) : 0) + 128;
    merged = malloc(len);
    if (merged != NULL) {
        snprintf(merged, len, "%s\n\n[longrun summary of %d earlier messages, %d assistant turns]\n%s",
                 orig != NULL ? orig : "", covers, turns, text != NULL ? text : "");
        cJSON_ReplaceItemInObjectCaseSensitive(first, "content", cJSON_CreateString(merged));
        free(merged);
    }
    cJSON_AddItemToArray(out, first);
    for (int i = covers; i < n; i++) {
        const cJSON *m = cJSON_GetArrayItem(conv, i);
        const char *role = role_of(m);
        if (i == 0 || (role != NULL && strcmp(role, "summary") == 0)) {
            continue;
        }
        cJSON_AddItemToArray(out, cJSON_Duplicate(m, true));
    }
    return out;
}

/* The conversation as the agent's context strategy sends it: a new array
 * (*owned) or st->conv itself when it is sent whole. */
static cJSON *context_of(const agent_state_t *st, bool *owned) {
    int covers, turns;
    *owned = true;
    if (st->agent->context == LR_CONTEXT_WINDOW) {
        return apply_window(st->conv, st->agent->context_messages);
    }
    if (last_summary(st->conv, &covers, &turns) != NULL) {
        return apply_summary(st->conv);
    }
    *owned = false;
    return st->conv;
}

/* Does the conversation need a summary before the next model call?  Sets
 * summary_cut (keep the last N messages verbatim, starting at an assistant
 * message so that no tool result loses its call) and summary_turns. */
static bool summary_needed(agent_state_t *st) {
    int n = cJSON_GetArraySize(st->conv), covers, turns, cut;
    cJSON *ctx;
    char *txt;
    long est;
    if (st->agent->context != LR_CONTEXT_SUMMARIZE) {
        return false;
    }
    ctx = apply_summary(st->conv);
    txt = ctx != NULL ? cJSON_PrintUnformatted(ctx) : NULL;
    est = txt != NULL ? (long)strlen(txt) / 4 : 0;
    free(txt);
    cJSON_Delete(ctx);
    if (est <= st->agent->summarize_tokens) {
        return false;
    }
    (void)last_summary(st->conv, &covers, &turns);
    cut = n - st->agent->context_messages;
    while (cut < n) {
        const char *role = role_of(cJSON_GetArrayItem(st->conv, cut));
        if (role != NULL && strcmp(role, "assistant") == 0) {
            break;
        }
        cut++;
    }
    if (cut >= n || cut <= (covers > 1 ? covers : 1)) {
        return false; /* nothing new to summarize: send as is (the context check still applies) */
    }
    turns = 0;
    for (int i = 0; i < cut; i++) {
        const char *role = role_of(cJSON_GetArrayItem(st->conv, i));
        if (role != NULL && strcmp(role, "assistant") == 0) {
            turns++;
        }
    }
    st->summary_cut = cut;
    st->summary_turns = turns;
    return true;
}

static void append_piece(char **buf, size_t *len, size_t *cap, const char *a, const char *b) {
    size_t need = strlen(a) + (b != NULL ? (strlen(b) < SUMMARY_PIECE_MAX ? strlen(b) : SUMMARY_PIECE_MAX) : 0) + 8;
    if (*buf == NULL) {
        return;
    }
    if (*len + need > *cap) {
        size_t ncap = (*cap + need) * 2;
        char *nb = realloc(*buf, ncap);
        if (nb == NULL) {
            free(*buf);
            *buf = NULL;
            return;
        }
        *buf = nb;
        *cap = ncap;
    }
    *len += (size_t)snprintf(*buf + *len, *cap - *len, "%s%.*s%s\n", a, SUMMARY_PIECE_MAX, b != NULL ? b : "",
                             b != NULL && strlen(b) > SUMMARY_PIECE_MAX ? " [...]" : "");
}

/* The summarization request: one user message with the transcript of
 * conv[0 .. cut), the previous summary standing for what it covered. */
static cJSON *summary_request_conv(const agent_state_t *st) {
    int covers, turns;
    const cJSON *prev = last_summary(st->conv, &covers, &turns);
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    cJSON *conv, *u;
    const cJSON *first = cJSON_GetArrayItem(st->conv, 0);
    if (buf == NULL) {
        return NULL;
    }
    buf[0] = '\0';
    append_piece(&buf, &len, &cap, "The agent's task:\n",
                 cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first, "content")));
    if (prev != NULL) {
        append_piece(&buf, &len, &cap, "\nSummary of the earlier work:\n",
                     cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(prev, "content")));
    }
    append_piece(&buf, &len, &cap, "\nTranscript since then:", NULL);
    for (int i = prev != NULL ? covers : 1; i < st->summary_cut; i++) {
        const cJSON *m = cJSON_GetArrayItem(st->conv, i);
        const char *role = role_of(m);
        const cJSON *c;
        if (role == NULL || strcmp(role, "summary") == 0) {
            continue;
        }
        if (strcmp(role, "tool") == 0) {
            char head[160];
            snprintf(head, sizeof(head), "tool %s returned: ",
                     cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "name")) != NULL
                         ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "name")) : "?");
            append_piece(&buf, &len, &cap, head, cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content")));
            continue;
        }
        if (cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content")) != NULL) {
            append_piece(&buf, &len, &cap, strcmp(role, "assistant") == 0 ? "assistant: " : "user: ",
                         cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content")));
        }
        cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(m, "tool_calls")) {
            char head[160];
            snprintf(head, sizeof(head), "assistant called %s with ",
                     cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name")) != NULL
                         ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name")) : "?");
            append_piece(&buf, &len, &cap, head, cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "arguments")));
        }
    }
    if (buf == NULL) {
        return NULL;
    }
    conv = cJSON_CreateArray();
    u = cJSON_CreateObject();
    cJSON_AddStringToObject(u, "role", "user");
    cJSON_AddStringToObject(u, "content", buf);
    cJSON_AddItemToArray(conv, u);
    free(buf);
    return conv;
}

static void add_tool_result(agent_state_t *st, const char *id, const char *name, const char *content, bool is_error) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "role", "tool");
    cJSON_AddStringToObject(m, "tool_call_id", id != NULL ? id : "");
    cJSON_AddStringToObject(m, "name", name != NULL ? name : "");
    cJSON_AddStringToObject(m, "content", content);
    if (is_error) {
        cJSON_AddTrueToObject(m, "is_error");
    }
    cJSON_AddItemToArray(st->added, m);
    cJSON_AddItemToArray(st->conv, cJSON_Duplicate(m, true));
}

static void log_call(agent_state_t *st, const char *id, const char *name, const char *status, long http, long ms,
                     const char *idem) {
    cJSON *o = cJSON_CreateObject();
    {
        const char *lv[2] = {name != NULL ? name : "", status};
        lr_metric_add(lr_wm.tool_calls, lv, 1);
        if (http > 0) {
            lr_metric_observe(lr_wm.tool_seconds, lv, (double)ms / 1000.0);
        }
    }
    cJSON_AddStringToObject(o, "id", id != NULL ? id : "");
    cJSON_AddStringToObject(o, "name", name != NULL ? name : "");
    cJSON_AddStringToObject(o, "status", status);
    if (http > 0) {
        cJSON_AddNumberToObject(o, "http_status", (double)http);
    }
    cJSON_AddNumberToObject(o, "ms", (double)ms);
    if (idem != NULL) {
        cJSON_AddStringToObject(o, "idempotency_key", idem);
    }
    cJSON_AddItemToArray(st->calls_log, o);
}

/* Was signal `id` already used to answer a wait?  (The tool result that
 * consumed it records "signal_id".) */
static bool signal_consumed(const agent_state_t *st, double id) {
    const cJSON *m;
    for (int i = 0; i < st->ncalls; i++) {
        if (st->calls[i].sig_id == id) {
            return true; /* taken by an approved call of this step */
        }
    }
    cJSON_ArrayForEach(m, st->conv) {
        const cJSON *sid = cJSON_GetObjectItemCaseSensitive(m, "signal_id");
        if (cJSON_IsNumber(sid) && sid->valuedouble == id) {
            return true;
        }
    }
    return false;
}

/* Signals delivered to the task (approval decisions, events): from the
 * history the worker loaded, entries {"signal": name, "payload": ..., "id": N}
 * in arrival order.  Each wait consumes one: the oldest not yet used. */
static const cJSON *find_signal(agent_state_t *st, const char *name, double *sig_id) {
    const cJSON *h = lr_run_history(st->run);
    const cJSON *e;
    cJSON_ArrayForEach(e, h) {
        const char *sig = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "signal"));
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (sig != NULL && strcmp(sig, name) == 0 && cJSON_IsNumber(id) && !signal_consumed(st, id->valuedouble)) {
            *sig_id = id->valuedouble;
            return cJSON_GetObjectItemCaseSensitive(e, "payload");
        }
    }
    return NULL;
}

/* Marks the tool result just added as the consumer of signal sig_id. */
static void mark_consumed(agent_state_t *st, double sig_id) {
    cJSON *a = cJSON_GetArrayItem(st->added, cJSON_GetArraySize(st->added) - 1);
    cJSON *c = cJSON_GetArrayItem(st->conv, cJSON_GetArraySize(st->conv) - 1);
    cJSON_AddNumberToObject(a, "signal_id", sig_id);
    cJSON_AddNumberToObject(c, "signal_id", sig_id);
}

/* The result of tool call tc (recording the approval it used, if any). */
static void tool_result(tool_call_t *tc, const char *content, bool is_error) {
    add_tool_result(tc->st, tc->id, tc->name, content, is_error);
    if (tc->sig_id != 0) {
        mark_consumed(tc->st, tc->sig_id);
    }
}

/* The last assistant message may have tool calls that are not answered yet:
 * those that suspended the task.  Answer them from the resume's signal.
 * Returns 0, or 1 when the task must stay suspended (nothing arrived). */
static int answer_pending(agent_state_t *st) {
    int n = cJSON_GetArraySize(st->conv);
    const cJSON *last_asst = NULL;
    int last_idx = -1;
    const cJSON *c;
    for (int i = n - 1; i >= 0; i--) {
        const cJSON *m = cJSON_GetArrayItem(st->conv, i);
        const char *role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
        if (role != NULL && strcmp(role, "assistant") == 0) {
            last_asst = m;
            last_idx = i;
            break;
        }
    }
    if (last_asst == NULL) {
        return 0;
    }
    st->ncalls = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(last_asst, "tool_calls")) {
        const char *id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "id"));
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name"));
        const char *args = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "arguments"));
        bool answered = false;
        const lr_tool_def_t *def;
        for (int i = last_idx + 1; i < n && !answered; i++) {
            const char *tid = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(st->conv, i), "tool_call_id"));
            answered = tid != NULL && id != NULL && strcmp(tid, id) == 0;
        }
        if (answered) {
            continue;
        }
        def = name != NULL ? lr_agent_tool(st->agent, name) : NULL;
        if (def == NULL) {
            add_tool_result(st, id, name, "error: tool not available", true);
            continue;
        }
        if (def->builtin == LR_TOOL_SLEEP) {
            add_tool_result(st, id, name, "{\"slept\":true}", false);
            log_call(st, id, name, "resumed", 0, 0, NULL);
        } else if (def->builtin == LR_TOOL_WAIT_EVENT) {
            cJSON *a = args != NULL ? cJSON_Parse(args) : NULL;
            const char *ev = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(a, "name"));
            char sig[160];
            const cJSON *p;
            double sig_id = 0;
            snprintf(sig, sizeof(sig), "event:%s", ev != NULL ? ev : "");
            p = find_signal(st, sig, &sig_id);
            if (p == NULL) {
                snprintf(st->suspend_reason, sizeof(st->suspend_reason), "event");
                snprintf(st->wait_event, sizeof(st->wait_event), "%s", ev != NULL ? ev : "");
                cJSON_Delete(a);
                return 1;
            }
            {
                char *txt = cJSON_PrintUnformatted(p);
                add_tool_result(st, id, name, txt != NULL ? txt : "null", false);
                mark_consumed(st, sig_id);
                free(txt);
            }
            log_call(st, id, name, "resumed", 0, 0, NULL);
            cJSON_Delete(a);
        } else if (def->builtin == LR_TOOL_APPROVAL || def->requires_approval) {
            double sig_id = 0;
            const cJSON *p = find_signal(st, "approval", &sig_id);
            bool approved;
            if (p == NULL) {
                snprintf(st->suspend_reason, sizeof(st->suspend_reason), "approval");
                return 1;
            }
            approved = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(p, "approved"));
            if (def->builtin == LR_TOOL_APPROVAL || !approved) {
                char *txt = cJSON_PrintUnformatted(p);
                add_tool_result(st, id, name, txt != NULL ? txt : "{}", !approved);
                mark_consumed(st, sig_id);
                free(txt);
                log_call(st, id, name, approved ? "approved" : "denied", 0, 0, NULL);
            } else if (st->ncalls < MAX_CALLS) {
                /* approved: run the HTTP tool now */
                tool_call_t *tc = &st->calls[st->ncalls++];
                memset(tc, 0, sizeof(*tc));
                tc->st = st;
                tc->index = st->ncalls - 1;
                tc->id = id;
                tc->name = name;
                tc->args = args;
                tc->def = def;
                tc->approved = true;
                tc->sig_id = sig_id;
            }
        } else if (st->ncalls < MAX_CALLS) {
            tool_call_t *tc = &st->calls[st->ncalls++];
            memset(tc, 0, sizeof(*tc));
            tc->st = st;
            tc->index = st->ncalls - 1;
            tc->id = id;
            tc->name = name;
            tc->args = args;
            tc->def = def;
        }
    }
    return 0;
}

/* ------------------------------------------------------------ model calls */

static void model_next(agent_state_t *st);
static void rate_settle(agent_state_t *st, const lr_model_ref_t *m, long actual);

static void timer_cb(uv_timer_t *t) {
    agent_state_t *st = t->data;
    if (st->gate_waiting) {
        /* No slot within the long-wait threshold: give the task's place back. */
        lr_log_ctx_t ctx = {lr_run_id(st->run), st->step_no, lr_run_epoch(st->run)};
        lr_gate_forget(&st->gate_wait);
        st->gate_waiting = false;
        free(st->pending_send);
        st->pending_send = NULL;
        LR_LOG(LR_LOG_INFO, &ctx, "model.gate_suspend", "no free slot for %s within %d s: suspending the task",
               st->agent->models[st->model_idx].endpoint_label, lr_worker_config(st->w)->long_wait_seconds);
        snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "rate_limited");
        st->out->resume_in_ms = 1000 + (long)(jitter() * 2000.0);
        finish(st, LR_STEP_SUSPEND);
        return;
    }
    model_call(st);
}

static void model_failed(agent_state_t *st, int cls, const char *reason, const char *detail, long wait_ms) {
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    const lr_config_t *cfg = lr_worker_config(st->w);
    long suspend_after = (long)cfg->long_wait_seconds * 1000;
    lr_log_ctx_t ctx = {lr_run_id(st->run), st->step_no, lr_run_epoch(st->run)};
    snprintf(st->last_reason, sizeof(st->last_reason), "%s", reason);
    snprintf(st->last_error, sizeof(st->last_error), "%s (%s): %s", m->model, reason, detail);
    st->last_class = cls;
    lr_breaker_result(model_breaker(m), cls == LR_CALL_PERMANENT, loop_now(st));
    LR_LOG(LR_LOG_WARN, &ctx, "model.call_failed", "model %s attempt %d failed: %s: %s", m->model, st->attempt + 1,
           reason, detail);
    if (cls == LR_CALL_PERMANENT) {
        snprintf(st->out->error, sizeof(st->out->error), "%s", st->last_error);
        if (strcmp(reason, "context_length") == 0) {
            snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "context_length");
        }
        finish(st, LR_STEP_FAIL_PERMANENT);
        return;
    }
    if (cls == LR_CALL_RETRY) {
        st->any_transient = true;
        if (wait_ms > suspend_after) {
            /* A long wait: free the slot, come back at resume_at. */
            snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "rate_limited");
            st->out->resume_in_ms = wait_ms;
            LR_LOG(LR_LOG_INFO, &ctx, "model.rate_limited", "model %s asks to wait %ld ms: suspending the task",
                   m->model, wait_ms);
            st->answered = NULL;
            finish(st, LR_STEP_SUSPEND);
            return;
        }
        if (st->attempt < m->retries) {
            long base = (long)(fmin(500.0 * pow(2.0, st->attempt), 8000.0) * jitter());
            long delay = wait_ms > 0 ? (wait_ms > base ? wait_ms : base) : base;
            st->attempt++;
            uv_timer_start(&st->timer, timer_cb, (uint64_t)delay + 1, 0);
            return;
        }
    }
    model_next(st);
}

/* Moves to the next model of the chain, or ends the step. */
static void model_next(agent_state_t *st) {
    st->model_idx++;
    st->attempt = 0;
    if (st->model_idx < st->agent->nmodels) {
        model_call(st);
        return;
    }
    snprintf(st->out->error, sizeof(st->out->error), "every model failed; last: %s", st->last_error);
    if (strcmp(st->last_reason, "context_length") == 0 && !st->any_transient) {
        snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "context_length");
    }
    finish(st, st->any_transient ? LR_STEP_FAIL_TRANSIENT : LR_STEP_FAIL_PERMANENT);
}

static double cost_of(const lr_model_ref_t *m, long in, long cached, long out) {
    double uncached = (double)(in - cached > 0 ? in - cached : 0);
    return (uncached * m->price_in + (double)cached * m->price_cached + (double)out * m->price_out) / 1e6;
}

static void model_response(const lr_http_response_t *resp, void *arg) {
    agent_state_t *st = arg;
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    char err[512], reason[32], detail[384], sr[16], ra[32], ram[32];
    long wait;
    int rc;
    lr_log_ctx_t ctx = {lr_run_id(st->run), st->step_no, lr_run_epoch(st->run)};

    st->model_req = NULL;
    gate_done(st);
    log_payload(st, "payload.model_response", m->endpoint_label, resp->body, resp->body_len);
    if (resp->err != 0 || resp->status < 200 || resp->status >= 300) {
        rate_settle(st, m, 0); /* a 2xx is settled once its usage is parsed */
    }
    {
        char status[16];
        const char *lv[3] = {m->provider == LR_PROVIDER_OPENAI ? "openai" : "anthropic", m->model, status};
        snprintf(status, sizeof(status), "%ld", resp->err != 0 ? 0L : resp->status);
        lr_metric_add(lr_wm.model_requests, lv, 1);
        lr_metric_observe(lr_wm.model_seconds, lv, resp->total_ms / 1000.0);
        if (resp->status == 429) {
            lr_metric_inc1(lr_wm.rate_limit_waits, m->model);
        }
    }
    if (resp->err != 0) {
        snprintf(detail, sizeof(detail), "%s: %s", lr_strerror(resp->err), resp->errmsg);
        model_failed(st, LR_CALL_RETRY, resp->err == LR_ETIMEOUT ? "timeout" : "connection", detail, -1);
        return;
    }
    if (resp->status < 200 || resp->status >= 300) {
        const char *should = lr_http_header(resp, "x-should-retry", sr, sizeof(sr)) == 0 ? sr : NULL;
        int cls = lr_provider_classify(resp->status, resp->body, should, reason, sizeof(reason), detail, sizeof(detail));
        wait = lr_retry_after_ms(lr_http_header(resp, "retry-after-ms", ram, sizeof(ram)) == 0 ? ram : NULL,
                                 lr_http_header(resp, "retry-after", ra, sizeof(ra)) == 0 ? ra : NULL);
        model_failed(st, cls, reason, detail, wait);
        return;
    }
    rc = lr_provider_parse(m, resp->body, resp->body_len, st->step_no, &st->reply, err, sizeof(err));
    if (rc != 0) {
        model_failed(st, LR_CALL_RETRY, "malformed_response", err, -1);
        return;
    }
    lr_breaker_result(model_breaker(m), true, loop_now(st));
    st->answered = m;
    rate_settle(st, m, st->reply.tokens_in + st->reply.tokens_out);
    if (st->reply.usage_missing) {
        /* Estimate (about 4 bytes a token) so that budgets still bind. */
        st->reply.tokens_in = st->req_bytes / 4 + 1;
        st->reply.tokens_out = (long)(resp->body_len / 4 + 1);
    }
    st->out->tokens_in += st->reply.tokens_in;
    st->out->tokens_out += st->reply.tokens_out;
    st->out->tokens_cached += st->reply.tokens_cached;
    st->out->cost_usd += cost_of(m, st->reply.tokens_in, st->reply.tokens_cached, st->reply.tokens_out);
    {
        const char *in[2] = {m->model, "input"}, *outv[2] = {m->model, "output"}, *ca[2] = {m->model, "cached"};
        lr_metric_add(lr_wm.tokens, in, (double)st->reply.tokens_in);
        lr_metric_add(lr_wm.tokens, outv, (double)st->reply.tokens_out);
        lr_metric_add(lr_wm.tokens, ca, (double)st->reply.tokens_cached);
        lr_metric_add(lr_wm.cost, (const char *const[]){m->model}, cost_of(m, st->reply.tokens_in,
                                                                            st->reply.tokens_cached,
                                                                            st->reply.tokens_out));
    }
    LR_LOG(LR_LOG_DEBUG, &ctx, "model.answered", "model %s: %d tool calls, finish %s, tokens %ld/%ld, %.0f ms",
           m->model, st->reply.ntool_calls, st->reply.finish, st->reply.tokens_in, st->reply.tokens_out,
           resp->total_ms);
    if (st->summarizing) {
        cJSON *sm;
        if (st->reply.text == NULL || st->reply.text[0] == '\0' || st->reply.ntool_calls > 0) {
            lr_model_reply_free(&st->reply);
            model_failed(st, LR_CALL_RETRY, "malformed_response", "the summary is empty", -1);
            return;
        }
        sm = cJSON_CreateObject();
        cJSON_AddStringToObject(sm, "role", "summary");
        cJSON_AddStringToObject(sm, "content", st->reply.text);
        cJSON_AddNumberToObject(sm, "covers", st->summary_cut);
        cJSON_AddNumberToObject(sm, "turns", st->summary_turns);
        cJSON_AddItemToArray(st->added, cJSON_Duplicate(sm, true));
        cJSON_AddItemToArray(st->conv, sm);
        LR_LOG(LR_LOG_INFO, &ctx, "context.summarized", "summarized %d messages (%d assistant turns) with %s",
               st->summary_cut, st->summary_turns, m->model);
        st->ncalls = 0;
        tools_maybe_done(st); /* the summary is a step of its own */
        return;
    }
    if (st->reply.ntool_calls > 0 &&
        (strcmp(st->reply.finish, "length") == 0 || strcmp(st->reply.finish, "max_tokens") == 0)) {
        /* Arguments may be cut: never execute them, and keep the message out
         * of the conversation (a retry must not carry unanswered calls). */
        lr_model_reply_free(&st->reply);
        model_failed(st, LR_CALL_RETRY, "truncated_tool_call", "tool call cut by the token limit", -1);
        return;
    }
    cJSON_AddItemToArray(st->added, cJSON_Duplicate(st->reply.assistant, true));
    cJSON_AddItemToArray(st->conv, cJSON_Duplicate(st->reply.assistant, true));
    if (st->reply.ntool_calls == 0) {
        cJSON *res = cJSON_CreateObject();
        cJSON_AddStringToObject(res, "answer", st->reply.text != NULL ? st->reply.text : "");
        cJSON_AddStringToObject(res, "model", m->model);
        cJSON_AddStringToObject(res, "finish_reason", st->reply.finish);
        if (strcmp(st->reply.finish, "length") == 0 || strcmp(st->reply.finish, "max_tokens") == 0) {
            cJSON_AddTrueToObject(res, "truncated");
        }
        st->out->result = cJSON_PrintUnformatted(res);
        cJSON_Delete(res);
        finish(st, LR_STEP_FINISHED);
        return;
    }
    /* Run the requested tools. */
    st->ncalls = 0;
    {
        const cJSON *c;
        cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(st->conv, cJSON_GetArraySize(st->conv) - 1),
                                                               "tool_calls")) {
            tool_call_t *tc;
            if (st->ncalls == MAX_CALLS) {
                break;
            }
            tc = &st->calls[st->ncalls++];
            memset(tc, 0, sizeof(*tc));
            tc->st = st;
            tc->index = st->ncalls - 1;
            tc->id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "id"));
            tc->name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name"));
            tc->args = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "arguments"));
            tc->def = tc->name != NULL ? lr_agent_tool(st->agent, tc->name) : NULL;
        }
    }
    tools_start(st);
}

/* ------------------------------------------------------ fleet rate limits */

/* One statement reserves on the model's key and, when the tenant is capped,
 * on the tenant's key.  $1 model key, $2 rpm, $3 tpm, $4 estimate,
 * $5 tenant key or NULL, $6 tenant tpm. */
#define SQL_RATE_RESERVE                                                                       \
    "WITH m AS (INSERT INTO rate_windows AS w (key, window_start, requests, tokens)"           \
    " VALUES ($1, date_trunc('minute', now()), 1, $4::bigint)"                                 \
    " ON CONFLICT (key, window_start) DO UPDATE SET requests = w.requests + 1,"                \
    "  tokens = w.tokens + $4::bigint"                                                         \
    " WHERE ($2::int = 0 OR w.requests < $2::int) AND ($3::bigint = 0 OR w.tokens + $4::bigint <= $3::bigint)" \
    " RETURNING window_start::text AS ws),"                                                    \
    " t AS (INSERT INTO rate_windows AS w (key, window_start, requests, tokens)"               \
    " SELECT $5, date_trunc('minute', now()), 1, $4::bigint WHERE $5::text IS NOT NULL"        \
    " ON CONFLICT (key, window_start) DO UPDATE SET requests = w.requests + 1,"                \
    "  tokens = w.tokens + $4::bigint WHERE w.tokens + $4::bigint <= $6::bigint RETURNING 1)"  \
    " SELECT (SELECT ws FROM m), (SELECT count(*) FROM t)"

#define SQL_RATE_SETTLE                                                                        \
    "UPDATE rate_windows SET tokens = greatest(0, tokens + $3::bigint)"                        \
    " WHERE key IN ($1, $4) AND window_start = $2::timestamptz"

static void model_call(agent_state_t *st);

static void settle_cb(int err, const PGresult *res, void *arg) {
    (void)err;
    (void)res;
    (void)arg;
}

/* After the call: replace the estimate by the actual token count. */
/* The tenant's rate key when its tokens are capped, else "". */
static void tenant_key(agent_state_t *st, char *buf, size_t len) {
    const char *t = lr_run_tenant(st->run);
    buf[0] = '\0';
    if (t != NULL && lr_worker_config(st->w)->tenant_tpm > 0) {
        snprintf(buf, len, "tenant:%s", t);
    }
}

static void rate_settle(agent_state_t *st, const lr_model_ref_t *m, long actual) {
    char key[300], delta[32], tkey[100];
    tenant_key(st, tkey, sizeof(tkey));
    if (st->reserved_est <= 0 || (m->tpm <= 0 && tkey[0] == '\0')) {
        st->reserved_est = 0;
        return;
    }
    snprintf(key, sizeof(key), "model:%s:%s", m->provider == LR_PROVIDER_OPENAI ? "openai" : "anthropic", m->model);
    snprintf(delta, sizeof(delta), "%ld", actual - st->reserved_est);
    st->reserved_est = 0;
    if (lr_pg_query(lr_worker_pg(st->w), SQL_RATE_SETTLE, 4, (const char *const[]){key, st->window, delta, tkey},
                    10000, settle_cb, NULL) != 0) {
        lr_debug("ratelimit.settle_failed", "cannot queue the settlement");
    }
}

static void reserve_cb(int err, const PGresult *res, void *arg) {
    agent_state_t *st = arg;
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    lr_log_ctx_t ctx = {lr_run_id(st->run), st->step_no, lr_run_epoch(st->run)};
    char *body = st->pending_body;
    st->reserving = false;
    if (st->released) {
        free(body);
        st->pending_body = NULL;
        if (st->timer_closed) {
            free(st);
        }
        return;
    }
    if (!st->active) {
        free(body);
        st->pending_body = NULL;
        return;
    }
    if (err != 0) {
        /* The limiter is advisory: without the database, call anyway (the
         * provider's own 429s still bound us). */
        LR_LOG(LR_LOG_WARN, &ctx, "ratelimit.unavailable", "rate limit reservation failed (%s); calling anyway",
               res != NULL ? PQresultErrorMessage(res) : lr_strerror(err));
        st->reserved = true;
        st->reserved_est = 0;
        model_call(st);
        free(body);
        st->pending_body = NULL;
        return;
    }
    if (lr_pg_get(res, 0, 0) != NULL && (!st->tenant_reserved || atoi(lr_pg_get(res, 0, 1)) == 1)) {
        snprintf(st->window, sizeof(st->window), "%s", lr_pg_get(res, 0, 0));
        st->reserved = true;
        free(body);
        st->pending_body = NULL;
        model_call(st);
        return;
    }
    /* Over the fleet-wide limit for this minute: wait for the next window,
     * or suspend the task when that is far. */
    free(body);
    st->pending_body = NULL;
    st->reserved_est = 0;
    {
        struct timespec now;
        long wait;
        clock_gettime(CLOCK_REALTIME, &now);
        wait = 60000 - (long)((now.tv_sec % 60) * 1000 + now.tv_nsec / 1000000) + (long)(jitter() * 1000.0) + 50;
        lr_metric_inc1(lr_wm.rate_limit_waits, m->model);
        if (wait > (long)lr_worker_config(st->w)->long_wait_seconds * 1000) {
            LR_LOG(LR_LOG_INFO, &ctx, "ratelimit.suspend", "fleet-wide limit of %s reached; suspending for %ld ms",
                   m->model, wait);
            snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "rate_limited");
            st->out->resume_in_ms = wait;
            finish(st, LR_STEP_SUSPEND);
            return;
        }
        LR_LOG(LR_LOG_DEBUG, &ctx, "ratelimit.wait", "fleet-wide limit of %s reached; waiting %ld ms", m->model, wait);
        uv_timer_start(&st->timer, timer_cb, (uint64_t)wait, 0);
    }
}

static void rate_reserve(agent_state_t *st, const lr_model_ref_t *m) {
    char key[300], rpm[24], tpm[24], est[24], tkey[100], ttpm[24];
    long e = (long)strlen(st->pending_body) / 4 + (m->max_tokens > 0 ? m->max_tokens : 256);
    snprintf(key, sizeof(key), "model:%s:%s", m->provider == LR_PROVIDER_OPENAI ? "openai" : "anthropic", m->model);
    snprintf(rpm, sizeof(rpm), "%ld", m->rpm);
    snprintf(tpm, sizeof(tpm), "%ld", m->tpm);
    snprintf(est, sizeof(est), "%ld", e);
    tenant_key(st, tkey, sizeof(tkey));
    snprintf(ttpm, sizeof(ttpm), "%d", lr_worker_config(st->w)->tenant_tpm);
    st->tenant_reserved = tkey[0] != '\0';
    st->reserved_est = e;
    st->reserving = true;
    if (lr_pg_query(lr_worker_pg(st->w), SQL_RATE_RESERVE, 6,
                    (const char *const[]){key, rpm, tpm, est, tkey[0] ? tkey : NULL, ttpm}, 10000, reserve_cb,
                    st) != 0) {
        reserve_cb(LR_EBUSY, NULL, st);
    }
}

static void model_call(agent_state_t *st) {
    const lr_model_ref_t *m;
    const char *key = NULL;
    char *body = NULL;
    cJSON *conv = NULL;

    while (st->model_idx < st->agent->nmodels) {
        const lr_model_ref_t *mm = &st->agent->models[st->model_idx];
        if (lr_flag_disabled("model", mm->model)) {
            snprintf(st->last_reason, sizeof(st->last_reason), "model_disabled");
            snprintf(st->last_error, sizeof(st->last_error), "%s: disabled by an operator (kill switch)", mm->model);
            st->any_transient = true;
        } else if (!lr_breaker_allows(model_breaker(mm), loop_now(st))) {
            snprintf(st->last_reason, sizeof(st->last_reason), "circuit_open");
            snprintf(st->last_error, sizeof(st->last_error), "%s: circuit open", mm->model);
            st->any_transient = true;
        } else {
            break;
        }
        st->model_idx++;
        st->attempt = 0;
    }
    if (st->model_idx >= st->agent->nmodels) {
        model_next(st);
        return;
    }
    m = &st->agent->models[st->model_idx];
    if (m->api_key_env != NULL) {
        key = getenv(m->api_key_env);
        if (key == NULL || key[0] == '\0') {
            snprintf(st->last_reason, sizeof(st->last_reason), "no_api_key");
            snprintf(st->last_error, sizeof(st->last_error), "%s: environment variable %s is not set", m->model,
                     m->api_key_env);
            model_next(st);
            return;
        }
    }
    if (st->summarizing) {
        conv = summary_request_conv(st);
        body = conv != NULL ? lr_provider_request(m, SUMMARY_SYSTEM, conv, NULL, 0) : NULL;
    } else {
        bool owned;
        conv = context_of(st, &owned);
        body = lr_provider_request(m, st->agent->system, conv, st->agent->tools, st->agent->ntools);
        if (!owned) {
            conv = NULL;
        }
    }
    cJSON_Delete(conv);
    if (body != NULL && m->context_tokens > 0 && (long)strlen(body) / 4 > m->context_tokens) {
        /* Never sent blindly over the context limit. */
        snprintf(st->last_reason, sizeof(st->last_reason), "context_length");
        snprintf(st->last_error, sizeof(st->last_error), "%s: about %ld tokens, over its context of %ld",
                 m->model, (long)strlen(body) / 4, m->context_tokens);
        free(body);
        model_next(st);
        return;
    }
    if (body != NULL && !st->reserved &&
        (m->rpm > 0 || m->tpm > 0 || (lr_run_tenant(st->run) != NULL && lr_worker_config(st->w)->tenant_tpm > 0))) {
        st->pending_body = body;
        rate_reserve(st, m);
        return;
    }
    st->reserved = false;
    model_send(st, body);
}

/* Sends body (owned) to the current model once the concurrency gate has a
 * slot for it. */
static void model_send(agent_state_t *st, char *body) {
    const lr_model_ref_t *m = &st->agent->models[st->model_idx];
    const lr_config_t *cfg = lr_worker_config(st->w);
    const char *key = m->api_key_env != NULL ? getenv(m->api_key_env) : NULL;
    char *url;
    char auth[600], idem[128];
    const char *headers[6];
    lr_http_opts_t o;
    int nh = 0, rc;

    if (!st->gate_held && body != NULL) {
        st->gate = lr_gate_get(m->endpoint_key, m->endpoint_label,
                               m->max_concurrency > 0 ? m->max_concurrency : cfg->model_concurrency);
        if (st->gate != NULL) {
            st->gate_wait.ready = gate_ready;
            if (!lr_gate_acquire(st->gate, &st->gate_wait, loop_now(st))) {
                st->pending_send = body;
                st->gate_waiting = true;
                uv_timer_start(&st->timer, timer_cb, (uint64_t)cfg->long_wait_seconds * 1000u, 0);
                return;
            }
            st->gate_held = true;
        }
    }
    url = lr_provider_url(m);
    if (body == NULL || url == NULL) {
        free(body);
        free(url);
        gate_done(st);
        snprintf(st->out->error, sizeof(st->out->error), "out of memory building the model request");
        finish(st, LR_STEP_FAIL_TRANSIENT);
        return;
    }
    headers[nh++] = "Content-Type: application/json";
    if (m->provider == LR_PROVIDER_OPENAI) {
        if (key != NULL && key[0] != '\0') {
            snprintf(auth, sizeof(auth), "Authorization: Bearer %s", key);
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
    memset(&o, 0, sizeof(o));
    o.method = "POST";
    o.url = url;
    o.headers = headers;
    o.body = body;
    o.body_len = strlen(body);
    st->req_bytes = (long)o.body_len;
    o.timeout_ms = m->timeout_ms;
    log_payload(st, "payload.model_request", m->endpoint_label, body, o.body_len);
    rc = lr_http_send(lr_worker_http(st->w), &o, model_response, st, &st->model_req);
    memset(auth, 0, sizeof(auth));
    free(url);
    free(body);
    if (rc != 0) {
        gate_done(st);
        model_failed(st, LR_CALL_RETRY, "send_failed", lr_strerror(rc), -1);
    }
}

/* ------------------------------------------------------------------ tools */

static void tool_send(tool_call_t *tc);

static void tools_maybe_done(agent_state_t *st) {
    char why[160];
    const char *reason;
    if (st->calls_running > 0) {
        return;
    }
    for (int i = 0; i < st->ncalls; i++) {
        if (st->calls[i].suspends) {
            snprintf(st->out->suspend_reason, sizeof(st->out->suspend_reason), "%s", st->suspend_reason);
            snprintf(st->out->wait_event, sizeof(st->out->wait_event), "%s", st->wait_event);
            st->out->resume_in_ms = st->suspend_ms;
            finish(st, LR_STEP_SUSPEND);
            return;
        }
    }
    /* After the step: does it end the task on a budget? */
    st->usage.step += 1;
    st->usage.tokens_in += st->out->tokens_in;
    st->usage.tokens_out += st->out->tokens_out;
    st->usage.cost_usd += st->out->cost_usd;
    reason = budget_exceeded(st, why, sizeof(why));
    if (reason != NULL) {
        snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "%s", reason);
        snprintf(st->out->error, sizeof(st->out->error), "budget exhausted: %s", why);
        finish(st, LR_STEP_STOP);
        return;
    }
    finish(st, LR_STEP_CONTINUE);
}

static void tool_response(const lr_http_response_t *resp, void *arg) {
    tool_call_t *tc = arg;
    agent_state_t *st = tc->st;
    char idem[160];
    long ms = (long)(loop_now(st) - tc->started);
    bool retry = resp->err != 0 || resp->status >= 500 || resp->status == 408 || resp->status == 429;
    tc->req = NULL;
    snprintf(idem, sizeof(idem), "%s:%d:%d", lr_run_id(st->run), st->step_no, tc->index);
    if (retry && tc->tries <= tc->def->retries) {
        tool_send(tc);
        return;
    }
    tc->running = false;
    st->calls_running--;
    /* The tool works if it answered anything but a transport error, 5xx,
     * 408 or 429 (a 4xx is the caller's mistake). */
    lr_breaker_result(tool_breaker(tc->def), !retry, loop_now(st));
    log_payload(st, "payload.tool_result", tc->name, resp->body, resp->body_len);
    if (resp->err == 0 && resp->status >= 200 && resp->status < 300) {
        bool cut = false;
        char *clean = lr_utf8_clean(resp->body, resp->body_len, (size_t)tc->def->max_result_bytes, &cut);
        if (clean == NULL) {
            tool_result(tc, "error: out of memory reading the tool result", true);
        } else if (cut || resp->truncated) {
            size_t n = strlen(clean);
            char *marked = malloc(n + 64);
            if (marked != NULL) {
                snprintf(marked, n + 64, "%s...[truncated: result over %ld bytes]", clean, tc->def->max_result_bytes);
                tool_result(tc, marked, false);
                free(marked);
            }
            log_call(st, tc->id, tc->name, "truncated", resp->status, ms, idem);
        } else {
            tool_result(tc, clean, false);
            log_call(st, tc->id, tc->name, "ok", resp->status, ms, idem);
        }
        free(clean);
    } else {
        char msg[600];
        if (resp->err != 0) {
            snprintf(msg, sizeof(msg), "error: tool %s failed: %s", tc->name, lr_strerror(resp->err));
        } else {
            bool cut;
            char *clean = lr_utf8_clean(resp->body, resp->body_len, 400, &cut);
            snprintf(msg, sizeof(msg), "error: tool %s answered HTTP %ld: %s", tc->name, resp->status,
                     clean != NULL ? clean : "");
            free(clean);
        }
        tool_result(tc, msg, true);
        log_call(st, tc->id, tc->name, "error", resp->status, ms, idem);
    }
    tools_maybe_done(st);
}

static void tool_send(tool_call_t *tc) {
    agent_state_t *st = tc->st;
    char idem[160], h_task[96], h_epoch[64];
    const char *headers[5];
    lr_http_opts_t o;
    int rc;
    snprintf(idem, sizeof(idem), "Idempotency-Key: %s:%d:%d", lr_run_id(st->run), st->step_no, tc->index);
    snprintf(h_task, sizeof(h_task), "X-Longrun-Task-Id: %s", lr_run_id(st->run));
    snprintf(h_epoch, sizeof(h_epoch), "X-Longrun-Epoch: %lld", (long long)lr_run_epoch(st->run));
    headers[0] = "Content-Type: application/json";
    headers[1] = idem;
    headers[2] = h_task;
    headers[3] = h_epoch;
    headers[4] = NULL;
    memset(&o, 0, sizeof(o));
    o.method = "POST";
    o.url = tc->def->url;
    o.headers = headers;
    o.body = tc->args != NULL && tc->args[0] != '\0' ? tc->args : "{}";
    o.body_len = strlen(o.body);
    o.timeout_ms = tc->def->timeout_ms;
    o.max_body = (size_t)tc->def->max_result_bytes + 1;
    tc->tries++;
    tc->started = loop_now(st);
    rc = lr_http_send(lr_worker_http(st->w), &o, tool_response, tc, &tc->req);
    if (rc != 0) {
        lr_http_response_t fake;
        memset(&fake, 0, sizeof(fake));
        fake.err = rc;
        fake.body = "";
        fake.errmsg = "";
        tc->tries = tc->def->retries + 1;
        tool_response(&fake, tc);
    }
}

static void tools_start(agent_state_t *st) {
    int started = 0;
    st->calls_running = 0;
    for (int i = 0; i < st->ncalls; i++) {
        tool_call_t *tc = &st->calls[i];
        cJSON *parsed;
        if (tc->def != NULL && (lr_flag_disabled("tool", tc->def->name) ||
                                (tc->def->writes && lr_flag_disabled("writes", tc->def->name)))) {
            char msg[200];
            snprintf(msg, sizeof(msg), "error: tool \"%s\" is disabled by an operator (kill switch)", tc->name);
            tool_result(tc, msg, true);
            log_call(st, tc->id, tc->name, "disabled", 0, 0, NULL);
            continue;
        }
        if (tc->def == NULL) {
            char msg[200];
            snprintf(msg, sizeof(msg), "error: tool \"%s\" is unknown or not allowed for this agent", tc->name ? tc->name : "");
            tool_result(tc, msg, true);
            log_call(st, tc->id, tc->name, "unknown_tool", 0, 0, NULL);
            continue;
        }
        parsed = tc->args != NULL ? cJSON_Parse(tc->args) : NULL;
        if (!cJSON_IsObject(parsed)) {
            /* Never run a tool on arguments that do not parse. */
            tool_result(tc, "error: the arguments are not a valid JSON object; call the tool again with valid JSON",
                        true);
            log_call(st, tc->id, tc->name, "invalid_arguments", 0, 0, NULL);
            cJSON_Delete(parsed);
            continue;
        }
        {
            /* The arguments must match the tool's parameters schema: a tool
             * never runs on arguments it did not declare. */
            const cJSON *schema = tc->def->builtin == LR_TOOL_HTTP ? tc->def->parameters
                                                                   : lr_builtin_parameters(tc->def->builtin);
            char verr[300], msg[512];
            int vrc = schema != NULL ? lr_schema_validate(schema, parsed, verr, sizeof(verr)) : 0;
            if (vrc != 0) {
                snprintf(msg, sizeof(msg), "error: the arguments do not match the parameters of tool \"%s\": %s; "
                         "call it again with arguments that do", tc->name,
                         vrc == LR_EINVAL ? verr : lr_strerror(vrc));
                tool_result(tc, msg, true);
                log_call(st, tc->id, tc->name, "invalid_arguments", 0, 0, NULL);
                cJSON_Delete(parsed);
                continue;
            }
        }
        if (st->budgets.max_tool_calls >= 0 && st->usage.tool_calls + st->tool_calls_made >= st->budgets.max_tool_calls) {
            char msg[160];
            snprintf(msg, sizeof(msg), "error: tool-call budget exhausted (%ld)", st->budgets.max_tool_calls);
            tool_result(tc, msg, true);
            log_call(st, tc->id, tc->name, "budget", 0, 0, NULL);
            snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "max_tool_calls");
            cJSON_Delete(parsed);
            continue;
        }
        if (tc->def->builtin == LR_TOOL_HTTP && !(tc->def->requires_approval && !tc->approved) &&
            !lr_breaker_allows(tool_breaker(tc->def), loop_now(st))) {
            char msg[200];
            snprintf(msg, sizeof(msg), "error: tool \"%s\" is unavailable (circuit open after repeated failures); "
                     "try again later or do without it", tc->name);
            tool_result(tc, msg, true);
            log_call(st, tc->id, tc->name, "circuit_open", 0, 0, NULL);
            cJSON_Delete(parsed);
            continue;
        }
        if (tc->def->builtin == LR_TOOL_SLEEP) {
            const cJSON *s = cJSON_GetObjectItemCaseSensitive(parsed, "seconds");
            double secs = cJSON_IsNumber(s) ? s->valuedouble : -1;
            if (secs < 0 || secs > 30 * 86400.0) {
                tool_result(tc, "error: seconds must be a number in [0, 2592000]", true);
                cJSON_Delete(parsed);
                continue;
            }
            tc->suspends = true;
            snprintf(st->suspend_reason, sizeof(st->suspend_reason), "sleep");
            st->suspend_ms = (long)(secs * 1000.0);
            log_call(st, tc->id, tc->name, "suspended", 0, 0, NULL);
        } else if (tc->def->builtin == LR_TOOL_WAIT_EVENT) {
            const char *ev = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(parsed, "name"));
            tc->suspends = true;
            snprintf(st->suspend_reason, sizeof(st->suspend_reason), "event");
            snprintf(st->wait_event, sizeof(st->wait_event), "%s", ev != NULL ? ev : "");
            st->suspend_ms = -1;
            log_call(st, tc->id, tc->name, "suspended", 0, 0, NULL);
        } else if (tc->def->builtin == LR_TOOL_APPROVAL || (tc->def->requires_approval && !tc->approved)) {
            tc->suspends = true;
            snprintf(st->suspend_reason, sizeof(st->suspend_reason), "approval");
            st->suspend_ms = -1;
            log_call(st, tc->id, tc->name, "awaiting_approval", 0, 0, NULL);
        } else {
            tc->running = true;
            st->calls_running++;
            st->tool_calls_made++;
            started++;
        }
        cJSON_Delete(parsed);
    }
    if (st->out->stop_reason[0] != '\0' && started == 0) {
        snprintf(st->out->error, sizeof(st->out->error), "budget exhausted: %ld tool calls", st->budgets.max_tool_calls);
        finish(st, LR_STEP_STOP);
        return;
    }
    for (int i = 0; i < st->ncalls; i++) {
        if (st->calls[i].running && st->calls[i].tries == 0) {
            tool_send(&st->calls[i]);
        }
    }
    tools_maybe_done(st);
}

/* --------------------------------------------------------------- executor */

static void state_closed(uv_handle_t *h) {
    agent_state_t *st = h->data;
    st->timer_closed = true;
    if (!st->reserving) {
        free(st->pending_body);
        free(st);
    }
}

static int agent_start(lr_run_t *r, lr_step_t *out, lr_step_done_cb done) {
    agent_state_t **sp = (agent_state_t **)lr_run_exec_state(r);
    agent_state_t *st = *sp;
    const cJSON *h, *e;
    char why[160];
    const char *reason;

    if (st == NULL) {
        st = calloc(1, sizeof(*st));
        if (st == NULL) {
            return LR_ENOMEM;
        }
        st->w = lr_run_worker(r);
        uv_timer_init(lr_worker_loop(st->w), &st->timer);
        st->timer.data = st;
        *sp = st;
    }
    st->run = r;
    st->out = out;
    st->done = done;
    st->agent = lr_agents_find(lr_run_agent(r));
    st->step_no = lr_run_step_no(r) + 1;
    st->model_idx = 0;
    st->attempt = 0;
    st->any_transient = false;
    st->answered = NULL;
    st->tool_calls_made = 0;
    st->suspend_reason[0] = st->wait_event[0] = '\0';
    st->suspend_ms = -1;
    st->ncalls = 0;
    st->summarizing = false;
    st->active = true;
    if (st->agent == NULL) {
        out->outcome = LR_STEP_FAIL_PERMANENT;
        snprintf(out->error, sizeof(out->error), "unknown agent '%s'", lr_run_agent(r));
        st->active = false;
        return LR_EPERM;
    }
    st->log_payloads = payload_sampled(lr_run_id(r), lr_worker_config(st->w)->log_payloads);
    lr_run_usage(r, &st->usage);
    resolve_budgets(st);
    reason = budget_exceeded(st, why, sizeof(why));
    if (reason != NULL) {
        out->outcome = LR_STEP_FAIL_PERMANENT;
        snprintf(out->stop_reason, sizeof(out->stop_reason), "%s", reason);
        snprintf(out->error, sizeof(out->error), "budget exhausted before step %d: %s", st->step_no, why);
        st->active = false;
        return LR_EPERM;
    }
    st->added = cJSON_CreateArray();
    st->calls_log = cJSON_CreateArray();
    if (st->conv == NULL || st->conv_step != lr_run_step_no(r)) {
        int nsteps = 0;
        cJSON_Delete(st->conv);
        st->conv = cJSON_CreateArray();
        h = lr_run_history(r);
        cJSON_ArrayForEach(e, h) {
            const cJSON *m;
            if (!cJSON_IsArray(e)) {
                continue; /* signals */
            }
            nsteps++;
            cJSON_ArrayForEach(m, e) {
                cJSON_AddItemToArray(st->conv, cJSON_Duplicate(m, true));
            }
        }
        if (nsteps != lr_run_step_no(r)) {
            /* The history holds the steps loaded at the claim; later ones
             * live only in st->conv.  Never send a conversation with a hole:
             * hand the task back to be loaded again. */
            LR_LOG(LR_LOG_ERROR, &((lr_log_ctx_t){lr_run_id(r), st->step_no, lr_run_epoch(r)}), "agent.history_gap",
                   "conversation has %d of %d steps; retrying the task", nsteps, lr_run_step_no(r));
            cJSON_Delete(st->conv);
            cJSON_Delete(st->added);
            cJSON_Delete(st->calls_log);
            st->conv = st->added = st->calls_log = NULL;
            st->active = false;
            out->outcome = LR_STEP_FAIL_TRANSIENT;
            snprintf(out->error, sizeof(out->error), "conversation out of sync with the step log");
            return LR_EPERM;
        }
    }
    st->conv_step = -1; /* until this step finishes */
    if (cJSON_GetArraySize(st->conv) == 0) {
        cJSON *u = user_message(lr_run_input(r));
        cJSON_AddItemToArray(st->conv, cJSON_Duplicate(u, true));
        cJSON_AddItemToArray(st->added, u);
    }
    if (answer_pending(st) != 0) {
        /* Resumed without what it waits for: wait again. */
        snprintf(out->suspend_reason, sizeof(out->suspend_reason), "%s", st->suspend_reason);
        snprintf(out->wait_event, sizeof(out->wait_event), "%s", st->wait_event);
        out->resume_in_ms = -1;
        cJSON_Delete(st->conv);
        cJSON_Delete(st->added);
        cJSON_Delete(st->calls_log);
        st->conv = st->added = st->calls_log = NULL;
        st->active = false;
        out->outcome = LR_STEP_SUSPEND;
        out->messages = strdup("[]");
        return LR_EPERM; /* the worker checkpoints out->outcome */
    }
    if (st->ncalls > 0) {
        /* Approved tool calls run first; the model is called next step. */
        tools_start(st);
        return 0;
    }
    st->summarizing = summary_needed(st);
    model_call(st);
    return 0;
}

static void agent_cancel(lr_run_t *r) {
    agent_state_t *st = *(agent_state_t **)lr_run_exec_state(r);
    if (st == NULL) {
        return;
    }
    uv_timer_stop(&st->timer);
    lr_gate_forget(&st->gate_wait);
    if (st->model_req != NULL) {
        lr_http_cancel(st->model_req);
        st->model_req = NULL;
        /* a trial call that never finished: allow another trial */
        lr_breaker_abandon(model_breaker(&st->agent->models[st->model_idx]), loop_now(st));
    }
    gate_done(st);
    free(st->pending_send);
    st->pending_send = NULL;
    for (int i = 0; i < st->ncalls; i++) {
        if (st->calls[i].req != NULL) {
            lr_http_cancel(st->calls[i].req);
            st->calls[i].req = NULL;
            lr_breaker_abandon(tool_breaker(st->calls[i].def), loop_now(st));
        }
    }
    cJSON_Delete(st->conv);
    cJSON_Delete(st->added);
    cJSON_Delete(st->calls_log);
    st->conv = st->added = st->calls_log = NULL;
    lr_model_reply_free(&st->reply);
    st->active = false;
}

static void agent_release(lr_run_t *r) {
    agent_state_t **sp = (agent_state_t **)lr_run_exec_state(r);
    agent_state_t *st = *sp;
    if (st == NULL) {
        return;
    }
    agent_cancel(r);
    *sp = NULL;
    st->released = true;
    uv_close((uv_handle_t *)&st->timer, state_closed);
}

const lr_executor_t lr_exec_agent = {
    .name = "agent",
    .needs_history = true,
    .keeps_conversation = true,
    .start = agent_start,
    .cancel = agent_cancel,
    .release = agent_release,
};
