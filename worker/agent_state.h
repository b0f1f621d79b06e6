/*
 * agent_state.h - the agent executor's per-task state and what its files
 * share (not for the rest of the worker, which sees only lr_exec_agent in
 * worker.h):
 *
 *   exec_agent.c     the step's state machine, the executor entry points,
 *                    the model call (fallback chain, retries,
 *                    circuit breakers, concurrency gate, rate windows)
 *   agent_context.c  the conversation: built from the step log, the context
 *                    strategies (window, summarize) and the summary step
 *   agent_budget.c   the budgets: which apply, and whether the next model
 *                    or tool call may start; the usage they count
 *   agent_tools.c    tool calls: answering pending calls from signals,
 *                    checking and running the calls the model asked for
 *   agent_spend.c    the spend caps: reserving a call's worst-case cost
 *                    in the fleet-wide ledger (spend.h), settling it,
 *                    the suspension when a cap is reached
 *   agent_fsm.c      the states and their legal moves (agent_fsm.h)
 *
 * Everything runs on the loop thread.  The state (agent_state_t) belongs to
 * exec_agent.c: only its agent_set_state() changes st->state, and only its
 * agent_unref() frees it.  The other files call back into it through
 * st->ops (agent_ops_t), never by name, so that exec_agent.c depends on them
 * and not the other way round.
 */
#ifndef LR_AGENT_STATE_H
#define LR_AGENT_STATE_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "agent_fsm.h"
#include "agents.h"
#include "breaker.h"
#include "log.h"
#include "membudget.h"
#include "provider.h"
#include "ratewin.h"
#include "spend.h"
#include "worker.h"

#define LR_AGENT_MAX_CALLS 16 /* tool calls of one assistant message that run (more are dropped) */

typedef struct agent_state agent_state_t;

/* What a spend reservation's answer says (agent_ops_t.spend_answered). */
enum lr_agent_spend_verdict {
    LR_AGENT_SPEND_GRANTED = 0, /* within every cap: st->spend holds the reservation */
    LR_AGENT_SPEND_REFUSED,     /* over a cap: st->spend says which; suspend */
    LR_AGENT_SPEND_BUSY,        /* the reservations of calls in flight fill a cap that
                                   the settled spend leaves room in: wait and ask again */
    LR_AGENT_SPEND_UNAVAILABLE, /* the ledger did not answer: back off, never call */
    LR_AGENT_SPEND_MOOT         /* the step it was for is gone (anything granted is released) */
};

/* exec_agent.c's entry points for the other files of the executor. */
typedef struct agent_ops {
    /* Ends the step with outcome: fills st->out, moves to IDLE and calls
     * done (unless start is still running: then start returns LR_EPERM).
     * The caller must not touch the step afterwards (done may release the
     * run). */
    void (*finish)(agent_state_t *st, int outcome);
    /* Every call of the step has its answer: suspends if one asked to, ends
     * the task on a budget, or continues (through finish). */
    void (*step_complete)(agent_state_t *st);
    /* The state's timer callback (st->timer; the state says what is due). */
    void (*on_timer)(uv_timer_t *t);
    /* Logs a payload when the task is sampled (LONGRUN_LOG_PAYLOADS). */
    void (*log_payload)(agent_state_t *st, const char *event, const char *what, const char *text, size_t len);
    /* The answer to the spend reservation that lr_agent_spend_reserve sent
     * (in state CAP_CHECK, unless MOOT); drops the query's reference. */
    void (*spend_answered)(agent_state_t *st, enum lr_agent_spend_verdict v);
} agent_ops_t;

/* The spend reservation of the current model call (agent_spend.c). */
typedef struct agent_spend {
    bool held;           /* a granted reservation covers the next call of model_idx */
    long long id;        /* its row (0: granted with no cap to count against) */
    double amount;       /* what it reserved (USD) */
    int model_idx;       /* the model it was reserved for */
    unsigned seq;        /* of the reservation in flight: an answer with another is moot */
    long backoff_ms;     /* CAP_WAIT, the ledger unavailable: the last wait (0: none) */
    long busy_ms;        /* CAP_WAIT, LR_AGENT_SPEND_BUSY: the last wait (0: none) */
    uint64_t busy_since; /* lr_agent_now() of the first BUSY answer of this wait (0: none) */
    bool in_flight;      /* the refusal was BUSY (only reservations fill the cap) */
    /* LR_AGENT_SPEND_REFUSED: the cap that binds */
    char scope[8]; /* "agent" or "tenant" */
    char name[72];
    char period[8];     /* "day" or "month" */
    char resets_at[24]; /* "YYYY-MM-DDTHH:MM:SSZ" */
    double cap, spent, reserved;
    long wait_ms;    /* until resets_at */
    char error[160]; /* LR_AGENT_SPEND_UNAVAILABLE: why */
} agent_spend_t;

/* One tool call of the step (its strings borrowed from the assistant message
 * in st->conv, valid until the step ends). */
typedef struct tool_call {
    agent_state_t *st;
    int index; /* position in the step: part of the Idempotency-Key */
    const char *id;
    const char *name;
    const char *args;
    const lr_tool_def_t *def;  /* NULL: unknown or not allowed for the agent */
    lr_http_req_t *req;        /* in flight, or NULL */
    struct lr_mcp_call *mcall; /* an MCP tool's call in flight (worker/mcp.h), or NULL */
    int tries;
    uint64_t retry_at; /* a retry is due then (lr_agent_now(); 0: none pending) */
    long park_ms;      /* > 0: the tool asked to wait this long: the task parks, the call runs on resume */
    bool running;      /* sent (or being retried), no result yet */
    bool suspends;     /* a sleep, wait_event or approval: the step suspends */
    bool approved;     /* requires_approval and approved: run it */
    double sig_id;     /* the approval signal it consumes (0: none) */
    uint64_t started;
} tool_call_t;

/* Per task, allocated on its first step, freed once released and nothing
 * refers to it (refs). */
struct agent_state {
    enum lr_agent_state state; /* written only by agent_set_state() */
    const agent_ops_t *ops;    /* exec_agent.c's entry points */
    int refs;                  /* the timer until its close callback + reservations in flight */
    lr_run_t *run;
    lr_worker_t *w;
    lr_log_ctx_t log; /* task, step being made, epoch */
    lr_step_t *out;
    lr_step_done_cb done; /* NULL while start() runs: its return value reports a step
                             that ended inside it */
    const lr_agent_t *agent;
    /* One timer; its purpose is the state: RATE_WAIT (until the window has room), GATE_WAIT
     * (the longest wait for a slot), BACKOFF (before the next try). */
    uv_timer_t timer;
    int step_no;      /* the step being made */
    cJSON *conv;      /* conversation sent to the model */
    int conv_step;    /* conv is the whole conversation through this step (-1: rebuild) */
    cJSON *added;     /* messages this step added */
    cJSON *calls_log; /* tool_calls column */
    cJSON *fallback;  /* fallback column: the model calls that did not answer (NULL: none yet) */
    lr_budgets_t budgets;
    lr_run_usage_t usage;
    /* the model call: model_idx of the chain, attempt of that model */
    int model_idx;
    int attempt;
    lr_http_req_t *model_req; /* CALLING: the request in flight */
    char last_reason[32];
    char last_error[384];
    bool any_transient;
    lr_model_reply_t reply;
    const lr_model_ref_t *answered;
    long req_bytes; /* size of the last request body (token estimates) */
    /* tool calls */
    tool_call_t calls[LR_AGENT_MAX_CALLS];
    int ncalls;
    int calls_running;
    long tool_calls_made;
    char suspend_reason[32];
    char wait_event[128];
    long suspend_ms;
    /* fleet-wide rate limit of the current model (ratewin.h) */
    bool reserved;              /* the next send is covered by the reservation just made */
    long reserved_est;          /* tokens reserved (settled after the call); 0: nothing to settle */
    lr_ratewin_ticket_t ticket; /* the reservation's rows */
    agent_spend_t spend;        /* the spend caps' reservation (agent_spend.c) */
    /* in-process concurrency gate of the current model endpoint */
    lr_gate_waiter_t gate_wait;
    lr_gate_t *gate;        /* GATE_WAIT: the gate queued at; CALLING: the gate whose slot
                               is ours until the response; NULL otherwise */
    char *pending_send;     /* GATE_WAIT, MEM_WAIT: the request body waiting for its slot / room */
    lr_mem_call_t mem_call; /* the model call's charge to the memory budget (membudget.h) */
    bool log_payloads;      /* this task is sampled (LONGRUN_LOG_PAYLOADS) */
    /* context "summarize" */
    bool summarizing;  /* this step writes a summary */
    int summary_cut;   /* it summarizes conv[0 .. cut) */
    int summary_turns; /* assistant messages in conv[0 .. cut) */
    bool clamp_logged;
    uint64_t step_started; /* lr_agent_now() when the step began (max_seconds) */
};

/* A uniform random number in [0, 1] (backoff jitter; agent_budget.c). */
double lr_agent_jitter(void);

/* The loop's monotonic clock in ms (breakers, the gate, tool timings). */
static inline uint64_t lr_agent_now(void) { return uv_hrtime() / 1000000u; }

/* --------------------------------------------------------- agent_context.c */

/* The system prompt of a summary step. */
extern const char lr_agent_summary_system[];

/* Makes st->conv the whole conversation through the last checkpointed step:
 * kept from the previous step of this delivery, or rebuilt from the history
 * (plus the first user message, also added to st->added, for step 1).
 * Returns 0, or LR_EPERM when the history has a hole (logged; out says so). */
int lr_agent_conv_load(agent_state_t *st);

/* The conversation as the agent's context strategy sends it: a new array
 * (*owned) or st->conv itself when it is sent whole. */
cJSON *lr_agent_context_of(const agent_state_t *st, bool *owned);

/* Does the conversation need a summary before the next model call?  Sets
 * st->summary_cut and st->summary_turns when it does. */
bool lr_agent_summary_needed(agent_state_t *st);

/* The request conversation of the summary step (new array, or NULL). */
cJSON *lr_agent_summary_request(const agent_state_t *st);

/* Adds the summary text to the step and the conversation. */
void lr_agent_summary_add(agent_state_t *st, const char *text);

/* ---------------------------------------------------------- agent_budget.c */

/* Resolves st->budgets (task > agent > worker default, then the operator's
 * ceilings; logs a clamp once per task). */
void lr_agent_budgets_resolve(agent_state_t *st);

/* A budget that st->usage (the checkpointed steps, plus the step just made
 * when called after it) has used up: its stop reason ("max_tokens",
 * "max_cost", "max_seconds", "max_steps") with why, or NULL. */
const char *lr_agent_budget_spent(const agent_state_t *st, char *why, size_t whylen);

/* May model m be called now with a request of body_len bytes?  NULL, or the
 * stop reason ("max_seconds", or "max_cost" when the call's worst case does
 * not fit what is left of the budget) with why. */
const char *lr_agent_budget_before_model(const agent_state_t *st, const lr_model_ref_t *m, size_t body_len, char *why,
                                         size_t whylen);

/* May the step's tool calls start now?  NULL, or "max_seconds" with why. */
const char *lr_agent_budget_before_tools(const agent_state_t *st, char *why, size_t whylen);

/* What a call of m costs in USD (price table, per million tokens). */
double lr_agent_cost_of(const lr_model_ref_t *m, long in, long cached, long out);

/* The worst case of a call of m with a request of body_len bytes: the
 * prompt estimated at body_len / 4 + 1 tokens (uncached) and the answer at
 * max_tokens (1024 when the request does not bound it).  The estimates go
 * to *in and *out when not NULL.  What max_cost_usd and the spend caps
 * check before each call. */
double lr_agent_worst_cost(const lr_model_ref_t *m, size_t body_len, long *in, long *out);

/* Counts a model request's answer (status, latency) in the metrics and the
 * call statistics of /health. */
void lr_agent_count_request(const lr_model_ref_t *m, const lr_http_response_t *resp);

/* Counts the parsed answer in st->reply (a response of body_len bytes) into
 * the step (st->out) and the metrics; an answer without usage is estimated
 * (request bytes / 4, response bytes / 4) so that budgets still bind.
 * Returns what the call cost in USD. */
double lr_agent_account_usage(agent_state_t *st, const lr_model_ref_t *m, size_t body_len);

/* max_seconds' clock: active time (checkpointed steps plus the step in
 * flight) or, with the agent's budget_clock "wall", the time since the task
 * first started. */
long lr_agent_elapsed_ms(const agent_state_t *st);

/* ----------------------------------------------------------- agent_spend.c */

/* What lr_agent_spend_settle charges for a call that may have been billed
 * without telling its usage (timed out, aborted in flight, unreadable): its
 * reservation. */
#define LR_AGENT_SPEND_AT_RESERVATION (-1.0)

/* Does the next call of the current model (st->model_idx) need a spend
 * reservation first: the task's agent or tenant has a cap (worker cache)
 * and no reservation is held for this model. */
bool lr_agent_spend_needed(const agent_state_t *st);

/* Sends the reservation of the worst case of a call of m with a request
 * of body_len bytes (a reservation held for another model is released
 * first).  Returns 0: st->ops->spend_answered runs later, exactly once
 * (the caller takes a reference on st for it and moves to CAP_CHECK);
 * or an LR_E* code: nothing was sent, the ledger is unavailable (st->spend.error says why). */
int lr_agent_spend_reserve(agent_state_t *st, const lr_model_ref_t *m, size_t body_len);

/* LR_AGENT_SPEND_REFUSED (or BUSY for longer than long_wait_seconds):
 * fills st->out for the suspension (reason spend_cap; resume at the start
 * of the cap's next period, or after 5-15 s when only calls in flight
 * filled it), logs it and counts it.  The caller then ends the step
 * (LR_STEP_SUSPEND). */
void lr_agent_spend_suspend(agent_state_t *st);

/* LR_AGENT_SPEND_BUSY: how long to wait before asking again (100 ms
 * doubling to 2 s, jittered), or 0 when this call has waited
 * long_wait_seconds already (then suspend). */
long lr_agent_spend_busy_wait(agent_state_t *st);

/* LR_AGENT_SPEND_UNAVAILABLE (or the reservation could not be sent): logs
 * it and returns how long to wait before asking again (250 ms doubling to
 * 5 s, jittered). */
long lr_agent_spend_backoff(agent_state_t *st);

/* Settles the reservation held (if any) with what the call cost: usd, or
 * LR_AGENT_SPEND_AT_RESERVATION; 0 for a call never made or not billed.
 * Nothing is held afterwards. */
void lr_agent_spend_settle(agent_state_t *st, double usd);

/* The step is cancelled: the reservation held is settled (at its amount
 * when in_flight: the call may have been billed; else 0), and the answer
 * of a reservation in flight will be moot. */
void lr_agent_spend_cancel(agent_state_t *st, bool in_flight);

/* ----------------------------------------------------------- agent_tools.c */

/* The last assistant message may have tool calls that are not answered yet
 * (those that suspended the task): answers them from the task's signals and
 * queues approved HTTP calls in st->calls.  Returns 0, or 1 when the task
 * must stay suspended (st->suspend_reason, st->wait_event say for what). */
int lr_agent_answer_pending(agent_state_t *st);

/* Queues the tool calls of the assistant message just added to st->conv. */
void lr_agent_tools_collect(agent_state_t *st);

/* Checks and runs st->calls (state TOOLS); the step ends when every call has
 * its answer (possibly before this returns). */
void lr_agent_tools_start(agent_state_t *st);

/* TOOLS, the state's timer: sends the retries that are due. */
void lr_agent_tools_timer(agent_state_t *st);

/* Cancels the tool requests in flight (their callbacks will not run). */
void lr_agent_tools_cancel(agent_state_t *st);

#endif
