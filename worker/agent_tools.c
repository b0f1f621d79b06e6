/*
 * agent_tools.c - the tool calls of an agent step: answering the calls a
 * resumed task was waiting on (approvals, events, sleeps) from its signals,
 * and checking and running the calls the model asked for.
 *
 * Design.  Loop thread.  exec_agent.c moves the step to TOOLS and calls
 * lr_agent_tools_start(): every call is checked first (kill switch, known
 * and allowed tool, arguments that parse and match its schema, the
 * tool-call budget, its circuit breaker) and answered with an error result
 * when it must not run, so that the model sees why.  Built-in tools
 * (sleep, wait_event, approval, and tools that require approval) do not run
 * here: they suspend the step, and the resume answers them through
 * lr_agent_answer_pending().  HTTP tools run in parallel through curl multi,
 * each retried up to its retries on a transport error, 5xx, 408 or 429
 * (unless it answers x-should-retry: false) after max(Retry-After, full
 * jitter in [0, min(250 ms 2^k, 8 s)]), every retry ending within the step
 * timeout (its own timeout cut to what is left), with an Idempotency-Key of task:step:index so that the tool can
 * recognise the retries (and the re-runs of a step).  A Retry-After over
 * long_wait_seconds parks the call: no result, and once the other calls
 * have theirs the step suspends (rate_limited) and the resume runs it.  The
 * retries share the state's one timer (free while the state is TOOLS).  When the last call has
 * its result the step completes (step_complete).
 *
 * MCP tools (worker/mcp.c) are checked the same way (their inputSchema is
 * their parameters) and sent through lr_mcp_call() instead, with the same
 * idempotency key and the epoch in params._meta; they are not retried here
 * (mcp.c renews a lost session and sends the call once more).
 *
 * Nothing here logs tool arguments or results (privacy) unless the task's
 * payloads are sampled.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent_state.h"
#include "callstats.h"
#include "jsonschema.h"
#include "mcp.h"
#include "text.h"
#include "wmetrics.h"

/* Tool retries: full jitter in [0, min(base 2^k, max)] ms before try k+1. */
#define TOOL_BACKOFF_BASE_MS 250.0
#define TOOL_BACKOFF_MAX_MS 8000.0
/* Room left for the checkpoint at the end of the step timeout: a tenth of
 * it, at most this. */
#define TOOL_TIMEOUT_MARGIN_MS 5000L
/* The shortest retry worth making (ms of the step timeout left). */
#define TOOL_MIN_TRY_MS 1000L

static lr_breaker_t *tool_breaker(const lr_tool_def_t *d) {
    char key[100];
    snprintf(key, sizeof(key), "tool:%s", d->name);
    return lr_breaker_get(key, key);
}

/* ------------------------------------------------------------ results */

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

/* Queues call (id, name, args) to run in this step.  Returns it, or NULL
 * when LR_AGENT_MAX_CALLS are queued already (the rest are dropped). */
static tool_call_t *queue_call(agent_state_t *st, const char *id, const char *name, const char *args,
                               const lr_tool_def_t *def) {
    tool_call_t *tc;
    if (st->ncalls >= LR_AGENT_MAX_CALLS) {
        return NULL;
    }
    tc = &st->calls[st->ncalls++];
    memset(tc, 0, sizeof(*tc));
    tc->st = st;
    tc->index = st->ncalls - 1;
    tc->id = id;
    tc->name = name;
    tc->args = args;
    tc->def = def;
    return tc;
}

/* ------------------------------------------------------ answering a resume */

/* The index of the last assistant message of conv, or -1. */
static int last_assistant(const cJSON *conv) {
    for (int i = cJSON_GetArraySize(conv) - 1; i >= 0; i--) {
        const cJSON *m = cJSON_GetArrayItem(conv, i);
        const char *role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
        if (role != NULL && strcmp(role, "assistant") == 0) {
            return i;
        }
    }
    return -1;
}

/* Does conv[from .. to) hold the result of call id? */
static bool call_answered(const cJSON *conv, int from, int to, const char *id) {
    for (int i = from; i < to; i++) {
        const char *tid =
            cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(conv, i), "tool_call_id"));
        if (tid != NULL && id != NULL && strcmp(tid, id) == 0) {
            return true;
        }
    }
    return false;
}

/* A wait_event call: answered by the oldest unused "event:<name>" signal.
 * Returns 1 when none arrived (the task stays suspended). */
static int answer_event(agent_state_t *st, const char *id, const char *name, const char *args) {
    cJSON *a = args != NULL ? cJSON_Parse(args) : NULL;
    const char *ev = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(a, "name"));
    char sig[160];
    const cJSON *p;
    double sig_id = 0;
    char *txt;
    snprintf(sig, sizeof(sig), "event:%s", ev != NULL ? ev : "");
    p = find_signal(st, sig, &sig_id);
    if (p == NULL) {
        snprintf(st->suspend_reason, sizeof(st->suspend_reason), "event");
        snprintf(st->wait_event, sizeof(st->wait_event), "%s", ev != NULL ? ev : "");
        cJSON_Delete(a);
        return 1;
    }
    txt = cJSON_PrintUnformatted(p);
    add_tool_result(st, id, name, txt != NULL ? txt : "null", false);
    mark_consumed(st, sig_id);
    free(txt);
    log_call(st, id, name, "resumed", 0, 0, NULL);
    cJSON_Delete(a);
    return 0;
}

/* An approval call, or a tool that requires approval: answered by the oldest
 * unused "approval" signal; an approved HTTP tool is queued to run now.
 * Returns 1 when no decision arrived (the task stays suspended). */
static int answer_approval(agent_state_t *st, const char *id, const char *name, const char *args,
                           const lr_tool_def_t *def) {
    double sig_id = 0;
    const cJSON *p = find_signal(st, "approval", &sig_id);
    bool approved;
    tool_call_t *tc;
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
        return 0;
    }
    /* approved: run the HTTP tool now */
    tc = queue_call(st, id, name, args, def);
    if (tc != NULL) {
        tc->approved = true;
        tc->sig_id = sig_id;
    }
    return 0;
}

/* One pending call of a resumed task.  Returns 1 when the task must stay
 * suspended. */
static int answer_call(agent_state_t *st, const char *id, const char *name, const char *args) {
    const lr_tool_def_t *def = name != NULL ? lr_agent_tool(st->agent, name) : NULL;
    if (def == NULL) {
        add_tool_result(st, id, name, "error: tool not available", true);
        return 0;
    }
    if (def->builtin == LR_TOOL_SLEEP) {
        add_tool_result(st, id, name, "{\"slept\":true}", false);
        log_call(st, id, name, "resumed", 0, 0, NULL);
        return 0;
    }
    if (def->builtin == LR_TOOL_WAIT_EVENT) {
        return answer_event(st, id, name, args);
    }
    if (def->builtin == LR_TOOL_APPROVAL || def->requires_approval) {
        return answer_approval(st, id, name, args, def);
    }
    (void)queue_call(st, id, name, args, def);
    return 0;
}

int lr_agent_answer_pending(agent_state_t *st) {
    int n = cJSON_GetArraySize(st->conv);
    int last = last_assistant(st->conv);
    const cJSON *c;
    if (last < 0) {
        return 0;
    }
    st->ncalls = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(st->conv, last), "tool_calls")) {
        const char *id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "id"));
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name"));
        const char *args = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "arguments"));
        /* Only results that were there before this resume count (n). */
        if (call_answered(st->conv, last + 1, n, id)) {
            continue;
        }
        if (answer_call(st, id, name, args) != 0) {
            return 1;
        }
    }
    return 0;
}

void lr_agent_tools_collect(agent_state_t *st) {
    const cJSON *last = cJSON_GetArrayItem(st->conv, cJSON_GetArraySize(st->conv) - 1);
    const cJSON *c;
    st->ncalls = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(last, "tool_calls")) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name"));
        if (queue_call(st, cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "id")), name,
                       cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "arguments")),
                       name != NULL ? lr_agent_tool(st->agent, name) : NULL) == NULL) {
            break;
        }
    }
}

/* ---------------------------------------------------------- running calls */

static void tool_send(tool_call_t *tc);

/* The step completes once every call has its result.  Not in TOOLS any more
 * means it already did: a send that failed at once answered the last call
 * while tools_start was still sending. */
static void tools_maybe_done(agent_state_t *st) {
    if (st->state != LR_AGENT_TOOLS || st->calls_running > 0) {
        return;
    }
    st->ops->step_complete(st);
}

/* What is left of the step timeout for tool calls (ms). */
static long tool_time_left(const agent_state_t *st) {
    long total = (long)lr_worker_config(st->w)->step_timeout_seconds * 1000;
    long margin = total / 10 < TOOL_TIMEOUT_MARGIN_MS ? total / 10 : TOOL_TIMEOUT_MARGIN_MS;
    return total - margin - (long)(lr_agent_now() - st->step_started);
}

/* Arms the state's timer for the earliest retry due, if any. */
static void arm_retries(agent_state_t *st) {
    uint64_t next = 0, now = lr_agent_now();
    for (int i = 0; i < st->ncalls; i++) {
        if (st->calls[i].retry_at != 0 && (next == 0 || st->calls[i].retry_at < next)) {
            next = st->calls[i].retry_at;
        }
    }
    if (next != 0) {
        uv_timer_start(&st->timer, st->ops->on_timer, next > now ? next - now : 0, 0);
    }
}

void lr_agent_tools_timer(agent_state_t *st) {
    uint64_t now = lr_agent_now();
    for (int i = 0; i < st->ncalls && st->state == LR_AGENT_TOOLS; i++) {
        tool_call_t *tc = &st->calls[i];
        if (tc->retry_at != 0 && tc->retry_at <= now) {
            tc->retry_at = 0;
            tool_send(tc); /* may answer the call (and end the step) at once */
        }
    }
    if (st->state == LR_AGENT_TOOLS) {
        arm_retries(st);
    }
}

/* A retryable failure of tc (resp): schedules the next try after
 * max(Retry-After, full jitter in [0, min(base 2^k, cap)]), or parks it
 * (park_ms) when the tool asks for a wait over long_wait_seconds.  Returns
 * false when no retry is left: the call fails now.  *why says why not. */
static bool tool_retry(tool_call_t *tc, const lr_http_response_t *resp, char *why, size_t whylen) {
    agent_state_t *st = tc->st;
    const lr_config_t *cfg = lr_worker_config(st->w);
    char ra[64], ram[32], sr[16];
    long wait, delay, left;
    why[0] = '\0';
    if (resp->err == 0 && lr_http_header(resp, "x-should-retry", sr, sizeof(sr)) == 0 && strcmp(sr, "false") == 0) {
        snprintf(why, whylen, " (not retried: the tool said x-should-retry: false)");
        return false;
    }
    if (tc->tries > tc->def->retries) {
        if (tc->def->retries > 0) {
            snprintf(why, whylen, " (after %d tries)", tc->tries);
        }
        return false;
    }
    wait = resp->err != 0
               ? -1
               : lr_retry_after_ms(lr_http_header(resp, "retry-after-ms", ram, sizeof(ram)) == 0 ? ram : NULL,
                                   lr_http_header(resp, "retry-after", ra, sizeof(ra)) == 0 ? ra : NULL);
    if (wait > (long)cfg->long_wait_seconds * 1000) {
        tc->park_ms = wait;
        return true;
    }
    delay = (long)(lr_agent_jitter() * fmin(TOOL_BACKOFF_BASE_MS * pow(2.0, tc->tries - 1), TOOL_BACKOFF_MAX_MS));
    if (wait > delay) {
        delay = wait;
    }
    /* every try of the step ends within the step timeout (no_progress),
     * less a margin for the checkpoint: a retry starts only with at least
     * TOOL_MIN_TRY_MS of it left, and its timeout is cut to what is left */
    left = tool_time_left(st) - delay;
    if (left < TOOL_MIN_TRY_MS) {
        snprintf(why, whylen, " (not retried: the next try would end past the step timeout)");
        return false;
    }
    tc->retry_at = lr_agent_now() + (uint64_t)delay;
    arm_retries(st);
    return true;
}

static void tool_response(const lr_http_response_t *resp, void *arg) {
    tool_call_t *tc = arg;
    agent_state_t *st = tc->st;
    char idem[160], why[96];
    long ms = (long)(lr_agent_now() - tc->started);
    /* (a connection refused by the egress check is configuration: no retry) */
    bool retry = (resp->err != 0 && resp->err != LR_EPERM) || resp->status >= 500 || resp->status == 408 ||
                 resp->status == 429;
    tc->req = NULL;
    lr_callstats_add(LR_CALLSTATS_TOOL, tc->def->name, resp->err != 0 ? 0L : resp->status, lr_agent_now());
    snprintf(idem, sizeof(idem), "%s:%d:%d", lr_run_id(st->run), st->step_no, tc->index);
    why[0] = '\0';
    if (retry && tool_retry(tc, resp, why, sizeof(why))) {
        if (tc->park_ms > 0) {
            /* no result: the call runs again when the task resumes */
            tc->running = false;
            st->calls_running--;
            LR_LOG(LR_LOG_INFO, &st->log, "tool.rate_limited",
                   "tool %s asks to wait %ld ms: the task parks and calls it again on resume", tc->name, tc->park_ms);
            log_call(st, tc->id, tc->name, "parked", resp->status, ms, idem);
            tools_maybe_done(st);
        }
        return;
    }
    tc->running = false;
    st->calls_running--;
    /* The tool works if it answered anything but a transport error, 5xx,
     * 408 or 429 (a 4xx is the caller's mistake). */
    lr_breaker_result(tool_breaker(tc->def), !retry, lr_agent_now());
    st->ops->log_payload(st, "payload.tool_result", tc->name, resp->body, resp->body_len);
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
            /* (a refused connection says why: the address and its class) */
            snprintf(msg, sizeof(msg), "error: tool %s failed%s: %s%s%.300s", tc->name, why, lr_strerror(resp->err),
                     resp->err == LR_EPERM && resp->errmsg != NULL && resp->errmsg[0] != '\0' ? ": " : "",
                     resp->err == LR_EPERM && resp->errmsg != NULL ? resp->errmsg : "");
        } else {
            bool cut;
            char *clean = lr_utf8_clean(resp->body, resp->body_len, 400, &cut);
            snprintf(msg, sizeof(msg), "error: tool %s answered HTTP %ld%s: %s", tc->name, resp->status, why,
                     clean != NULL ? clean : "");
            free(clean);
        }
        tool_result(tc, msg, true);
        log_call(st, tc->id, tc->name, "error", resp->status, ms, idem);
    }
    tools_maybe_done(st);
}

/* ------------------------------------------------------------ MCP tools */

/* Adds structuredContent to the tool result just added (the checkpoint
 * keeps it beside the text the model reads). */
static void add_structured(agent_state_t *st, const cJSON *sc) {
    cJSON *a = cJSON_GetArrayItem(st->added, cJSON_GetArraySize(st->added) - 1);
    cJSON *c = cJSON_GetArrayItem(st->conv, cJSON_GetArraySize(st->conv) - 1);
    cJSON_AddItemToObject(a, "structured_content", cJSON_Duplicate(sc, true));
    cJSON_AddItemToObject(c, "structured_content", cJSON_Duplicate(sc, true));
}

static void mcp_response(const lr_mcp_result_t *res, void *arg) {
    tool_call_t *tc = arg;
    agent_state_t *st = tc->st;
    char idem[160], msg[600];
    long ms = (long)(lr_agent_now() - tc->started);
    tc->mcall = NULL;
    tc->running = false;
    st->calls_running--;
    snprintf(idem, sizeof(idem), "%s:%d:%d", lr_run_id(st->run), st->step_no, tc->index);
    lr_callstats_add(LR_CALLSTATS_TOOL, tc->def->name, res->err != 0 ? 0L : res->http_status, lr_agent_now());
    /* the server works if it answered, even with a tool error (as for
     * HTTP tools, a refused connection is configuration, not an outage) */
    lr_breaker_result(tool_breaker(tc->def), res->err == 0 || res->err == LR_EPERM, lr_agent_now());
    if (res->err != 0) {
        snprintf(msg, sizeof(msg), "error: tool %s failed: %s: %.400s", tc->name, lr_strerror(res->err), res->errmsg);
        tool_result(tc, msg, true);
        log_call(st, tc->id, tc->name, "error", res->http_status, ms, idem);
    } else {
        bool cut = false;
        char *clean;
        st->ops->log_payload(st, "payload.tool_result", tc->name, res->text, strlen(res->text));
        clean = lr_utf8_clean(res->text, strlen(res->text), (size_t)tc->def->max_result_bytes, &cut);
        if (clean == NULL) {
            tool_result(tc, "error: out of memory reading the tool result", true);
        } else {
            size_t n = strlen(clean);
            char *marked = cut ? malloc(n + 64) : NULL;
            if (marked != NULL) {
                snprintf(marked, n + 64, "%s...[truncated: result over %ld bytes]", clean, tc->def->max_result_bytes);
            }
            tool_result(tc, marked != NULL ? marked : clean, res->is_error);
            free(marked);
            if (res->structured != NULL) {
                add_structured(st, res->structured);
            }
        }
        free(clean);
        log_call(st, tc->id, tc->name, res->is_error ? "error" : cut ? "truncated" : "ok", res->http_status, ms, idem);
    }
    tools_maybe_done(st);
}

static void mcp_send(tool_call_t *tc) {
    agent_state_t *st = tc->st;
    char idem[160], err[300];
    long timeout = tc->def->timeout_ms;
    int rc;
    snprintf(idem, sizeof(idem), "%s:%d:%d", lr_run_id(st->run), st->step_no, tc->index);
    if (tool_time_left(st) < timeout) {
        timeout = tool_time_left(st) > TOOL_MIN_TRY_MS ? tool_time_left(st) : TOOL_MIN_TRY_MS;
    }
    tc->tries++;
    tc->started = lr_agent_now();
    rc = lr_mcp_call(lr_worker_mcp(st->w), tc->def, tc->args, idem, (long long)lr_run_epoch(st->run),
                     lr_run_id(st->run), timeout, mcp_response, tc, &tc->mcall, err, sizeof(err));
    if (rc != 0) {
        lr_mcp_result_t r;
        memset(&r, 0, sizeof(r));
        r.err = rc;
        r.text = "";
        r.errmsg = err;
        mcp_response(&r, tc);
    }
}

static void tool_send(tool_call_t *tc) {
    agent_state_t *st = tc->st;
    char idem[160], h_task[96], h_epoch[64];
    const char *headers[5];
    lr_http_opts_t o;
    int rc;
    if (tc->def->mcp_tool != NULL) {
        mcp_send(tc);
        return;
    }
    snprintf(idem, sizeof(idem), "Idempotency-Key: %s:%d:%d", lr_run_id(st->run), st->step_no, tc->index);
    snprintf(h_task, sizeof(h_task), "X-Longrun-Task-Id: %s", lr_run_id(st->run));
    snprintf(h_epoch, sizeof(h_epoch), "X-Longrun-Epoch: %lld", (long long)lr_run_epoch(st->run));
    headers[0] = "Content-Type: application/json";
    headers[1] = idem;
    headers[2] = h_task;
    headers[3] = h_epoch;
    headers[4] = NULL;
    lr_http_opts_post(&o, tc->def->url, headers, tc->args != NULL && tc->args[0] != '\0' ? tc->args : "{}");
    o.timeout_ms = tc->def->timeout_ms;
    if (tc->tries > 0 && tool_time_left(st) < o.timeout_ms) {
        o.timeout_ms = tool_time_left(st) > TOOL_MIN_TRY_MS ? tool_time_left(st) : TOOL_MIN_TRY_MS; /* a retry */
    }
    o.max_body = (size_t)tc->def->max_result_bytes + 1;
    lr_worker_egress(st->w, &o);
    tc->tries++;
    tc->started = lr_agent_now();
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

/* Checks call tc before it runs (time_up: why the time budget is used up,
 * or NULL).  Returns false when it must not (answered
 * with an error result that says why, and logged in the tool_calls column);
 * else true, with its parsed arguments in *parsed.  Either way *parsed, if
 * set, is the caller's to free. */
static bool tool_check(agent_state_t *st, tool_call_t *tc, const char *time_up, cJSON **parsed) {
    /* The sizes of these messages bound what a model-chosen name adds. */
    char msg[200], vmsg[512], bmsg[256], verr[300];
    const cJSON *schema;
    int vrc;
    if (tc->def != NULL &&
        (lr_flag_disabled("tool", tc->def->name) || (tc->def->writes && lr_flag_disabled("writes", tc->def->name)))) {
        snprintf(msg, sizeof(msg), "error: tool \"%s\" is disabled by an operator (kill switch)", tc->name);
        tool_result(tc, msg, true);
        log_call(st, tc->id, tc->name, "disabled", 0, 0, NULL);
        return false;
    }
    if (tc->def == NULL) {
        snprintf(msg, sizeof(msg), "error: tool \"%s\" is unknown or not allowed for this agent",
                 tc->name ? tc->name : "");
        tool_result(tc, msg, true);
        log_call(st, tc->id, tc->name, "unknown_tool", 0, 0, NULL);
        return false;
    }
    *parsed = tc->args != NULL ? cJSON_Parse(tc->args) : NULL;
    if (!cJSON_IsObject(*parsed)) {
        /* Never run a tool on arguments that do not parse. */
        tool_result(tc, "error: the arguments are not a valid JSON object; call the tool again with valid JSON", true);
        log_call(st, tc->id, tc->name, "invalid_arguments", 0, 0, NULL);
        return false;
    }
    /* The arguments must match the tool's parameters schema: a tool never
     * runs on arguments it did not declare. */
    schema = tc->def->builtin == LR_TOOL_HTTP ? tc->def->parameters : lr_builtin_parameters(tc->def->builtin);
    vrc = schema != NULL ? lr_schema_validate(schema, *parsed, verr, sizeof(verr)) : 0;
    if (vrc != 0) {
        snprintf(vmsg, sizeof(vmsg),
                 "error: the arguments do not match the parameters of tool \"%s\": %s; "
                 "call it again with arguments that do",
                 tc->name, vrc == LR_EINVAL ? verr : lr_strerror(vrc));
        tool_result(tc, vmsg, true);
        log_call(st, tc->id, tc->name, "invalid_arguments", 0, 0, NULL);
        return false;
    }
    if (st->budgets.max_tool_calls >= 0 && st->usage.tool_calls + st->tool_calls_made >= st->budgets.max_tool_calls) {
        snprintf(bmsg, sizeof(bmsg), "error: tool-call budget exhausted (%ld)", st->budgets.max_tool_calls);
        tool_result(tc, bmsg, true);
        log_call(st, tc->id, tc->name, "budget", 0, 0, NULL);
        snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "max_tool_calls");
        return false;
    }
    if (time_up != NULL) {
        snprintf(bmsg, sizeof(bmsg), "error: the task's time budget is used up (%s)", time_up);
        tool_result(tc, bmsg, true);
        log_call(st, tc->id, tc->name, "budget", 0, 0, NULL);
        snprintf(st->out->stop_reason, sizeof(st->out->stop_reason), "max_seconds");
        return false;
    }
    if (tc->def->builtin == LR_TOOL_HTTP && !(tc->def->requires_approval && !tc->approved) &&
        !lr_breaker_allows(tool_breaker(tc->def), lr_agent_now())) {
        snprintf(msg, sizeof(msg),
                 "error: tool \"%s\" is unavailable (circuit open after repeated failures); "
                 "try again later or do without it",
                 tc->name);
        tool_result(tc, msg, true);
        log_call(st, tc->id, tc->name, "circuit_open", 0, 0, NULL);
        return false;
    }
    return true;
}

/* Begins checked call tc: a built-in (or a tool awaiting approval) marks the
 * step to suspend; an HTTP tool is marked running.  Returns true for the
 * latter (it is sent after every call has been checked). */
static bool tool_begin(agent_state_t *st, tool_call_t *tc, const cJSON *parsed) {
    if (tc->def->builtin == LR_TOOL_SLEEP) {
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(parsed, "seconds");
        double secs = cJSON_IsNumber(s) ? s->valuedouble : -1;
        if (secs < 0 || secs > 30 * 86400.0) {
            tool_result(tc, "error: seconds must be a number in [0, 2592000]", true);
            return false;
        }
        tc->suspends = true;
        snprintf(st->suspend_reason, sizeof(st->suspend_reason), "sleep");
        st->suspend_ms = (long)(secs * 1000.0);
        log_call(st, tc->id, tc->name, "suspended", 0, 0, NULL);
        return false;
    }
    if (tc->def->builtin == LR_TOOL_WAIT_EVENT) {
        const char *ev = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(parsed, "name"));
        tc->suspends = true;
        snprintf(st->suspend_reason, sizeof(st->suspend_reason), "event");
        snprintf(st->wait_event, sizeof(st->wait_event), "%s", ev != NULL ? ev : "");
        st->suspend_ms = -1;
        log_call(st, tc->id, tc->name, "suspended", 0, 0, NULL);
        return false;
    }
    if (tc->def->builtin == LR_TOOL_APPROVAL || (tc->def->requires_approval && !tc->approved)) {
        tc->suspends = true;
        snprintf(st->suspend_reason, sizeof(st->suspend_reason), "approval");
        st->suspend_ms = -1;
        log_call(st, tc->id, tc->name, "awaiting_approval", 0, 0, NULL);
        return false;
    }
    tc->running = true;
    st->calls_running++;
    st->tool_calls_made++;
    return true;
}

void lr_agent_tools_start(agent_state_t *st) {
    int started = 0;
    char why[160];
    const char *time_up;
    if (!lr_run_lease_ok(st->run)) {
        /* paused past the lease: the task may be another worker's now, so
         * none of these calls may run (their side effects would be a
         * zombie's) */
        LR_LOG(LR_LOG_WARN, &st->log, "lease.expired_locally",
               "the lease ran out by this worker's clock: "
               "%d tool call(s) not started",
               st->ncalls);
        snprintf(st->out->error, sizeof(st->out->error), "the lease ran out before the tool calls");
        st->ops->finish(st, LR_STEP_ABANDONED);
        return;
    }
    st->calls_running = 0;
    time_up = lr_agent_budget_before_tools(st, why, sizeof(why));
    for (int i = 0; i < st->ncalls; i++) {
        tool_call_t *tc = &st->calls[i];
        cJSON *parsed = NULL;
        if (tool_check(st, tc, time_up != NULL ? why : NULL, &parsed) && tool_begin(st, tc, parsed)) {
            started++;
        }
        cJSON_Delete(parsed);
    }
    if (st->out->stop_reason[0] != '\0' && started == 0) {
        if (time_up != NULL) {
            snprintf(st->out->error, sizeof(st->out->error), "budget exhausted before the tool calls: %s", why);
            LR_LOG(LR_LOG_INFO, &st->log, "budget.stop", "max_seconds: %s; %d tool call(s) not started", why,
                   st->ncalls);
        } else {
            snprintf(st->out->error, sizeof(st->out->error), "budget exhausted: %ld tool calls",
                     st->budgets.max_tool_calls);
        }
        st->ops->finish(st, LR_STEP_STOP);
        return;
    }
    /* A send that fails at once answers its call here; if that was the
     * last one the step has ended (finish() emptied st->calls). */
    for (int i = 0; i < st->ncalls; i++) {
        if (st->calls[i].running && st->calls[i].tries == 0) {
            tool_send(&st->calls[i]);
        }
    }
    tools_maybe_done(st);
}

void lr_agent_tools_cancel(agent_state_t *st) {
    for (int i = 0; i < st->ncalls; i++) {
        if (st->calls[i].mcall != NULL) {
            /* the server is told (notifications/cancelled) */
            lr_mcp_abandon(st->calls[i].mcall, "the step was cancelled (task cancel, drain or lost lease)");
            st->calls[i].mcall = NULL;
            lr_breaker_abandon(tool_breaker(st->calls[i].def), lr_agent_now());
        }
        if (st->calls[i].req != NULL) {
            lr_http_cancel(st->calls[i].req);
            st->calls[i].req = NULL;
            lr_breaker_abandon(tool_breaker(st->calls[i].def), lr_agent_now());
        }
    }
}
