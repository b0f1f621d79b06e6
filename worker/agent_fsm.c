/*
 * agent_fsm.c - the legal moves between the states of an agent step (the
 * enum and what each state means are in agent_fsm.h).
 *
 * Design.  One row per state: the set of states it may move to, each move
 * with the reason it happens.  exec_agent.c's set_state() asks
 * lr_agent_transition_ok() before every change; a move missing here is a bug
 * in the executor, which set_state() logs (and asserts in debug builds).
 * "Cancelled" appears as a move to IDLE from every state where a step is in
 * flight: the worker may cancel a step at any time (drain deadline, lost
 * lease).  Pure functions, no worker dependencies: any thread.
 */
#include "agent_fsm.h"

#include <stddef.h>

#define TO(s) (1u << (s))

static const unsigned moves[LR_AGENT_NSTATES] = {
    [LR_AGENT_IDLE] = TO(LR_AGENT_PREPARING)        /* a step starts */
                      | TO(LR_AGENT_RELEASED),      /* the run is freed */
    [LR_AGENT_PREPARING] = TO(LR_AGENT_CAP_CHECK)   /* the agent or tenant has a spend cap */
                           | TO(LR_AGENT_CAP_WAIT)  /* the ledger's query could not be queued */
                           | TO(LR_AGENT_RESERVING) /* the model or tenant has a rate limit */
                           | TO(LR_AGENT_GATE_WAIT) /* the endpoint's gate is full */
                           | TO(LR_AGENT_MEM_WAIT)  /* no room in the memory budget */
                           | TO(LR_AGENT_CALLING)   /* a slot at once, or no gate */
                           | TO(LR_AGENT_TOOLS)     /* approved calls of a resume run first */
                           | TO(LR_AGENT_IDLE),     /* ended before any wait: budget, suspend,
                                                       every model skipped, out of memory */
    [LR_AGENT_CAP_CHECK] = TO(LR_AGENT_PREPARING)   /* within every cap: reserved */
                           | TO(LR_AGENT_CAP_WAIT)  /* ledger down, or calls in flight fill a cap */
                           | TO(LR_AGENT_IDLE),     /* over a cap: suspend (spend_cap); or cancelled */
    [LR_AGENT_CAP_WAIT] = TO(LR_AGENT_PREPARING)    /* ask the ledger again */
                          | TO(LR_AGENT_IDLE),      /* cancelled */
    [LR_AGENT_RESERVING] = TO(LR_AGENT_PREPARING)   /* reserved, or the limiter is down */
                           | TO(LR_AGENT_RATE_WAIT) /* over the limit: wait for the next minute */
                           | TO(LR_AGENT_IDLE),     /* over the limit and the wait is long:
                                                       suspend; or cancelled */
    [LR_AGENT_RATE_WAIT] = TO(LR_AGENT_PREPARING)   /* the next window opened */
                           | TO(LR_AGENT_IDLE),     /* cancelled */
    [LR_AGENT_GATE_WAIT] = TO(LR_AGENT_CALLING)     /* a slot was granted */
                           | TO(LR_AGENT_MEM_WAIT)  /* a slot, but no room in the memory budget */
                           | TO(LR_AGENT_IDLE),     /* no slot in time: suspend; or cancelled */
    [LR_AGENT_MEM_WAIT] = TO(LR_AGENT_CALLING)      /* room was granted */
                          | TO(LR_AGENT_IDLE),      /* cancelled */
    [LR_AGENT_CALLING] = TO(LR_AGENT_PREPARING)     /* failed over to the next model */
                         | TO(LR_AGENT_BACKOFF)     /* a retryable failure: try again later */
                         | TO(LR_AGENT_TOOLS)       /* the model asked for tools */
                         | TO(LR_AGENT_IDLE),       /* answered, summarized, failed for good,
                                                       suspended, or cancelled */
    [LR_AGENT_BACKOFF] = TO(LR_AGENT_PREPARING)     /* the backoff is over */
                         | TO(LR_AGENT_IDLE),       /* cancelled */
    [LR_AGENT_TOOLS] = TO(LR_AGENT_IDLE),           /* every call answered (step done), or cancelled */
    [LR_AGENT_RELEASED] = 0,                        /* final */
};

static const char *const names[LR_AGENT_NSTATES] = {
    [LR_AGENT_IDLE] = "idle",           [LR_AGENT_PREPARING] = "preparing", [LR_AGENT_CAP_CHECK] = "cap_check",
    [LR_AGENT_CAP_WAIT] = "cap_wait",   [LR_AGENT_RESERVING] = "reserving", [LR_AGENT_RATE_WAIT] = "rate_wait",
    [LR_AGENT_GATE_WAIT] = "gate_wait", [LR_AGENT_MEM_WAIT] = "mem_wait",   [LR_AGENT_CALLING] = "calling",
    [LR_AGENT_BACKOFF] = "backoff",     [LR_AGENT_TOOLS] = "tools",         [LR_AGENT_RELEASED] = "released",
};

bool lr_agent_transition_ok(int from, int to) {
    if (from < 0 || from >= LR_AGENT_NSTATES || to < 0 || to >= LR_AGENT_NSTATES || from == to) {
        return false;
    }
    return (moves[from] & TO(to)) != 0;
}

const char *lr_agent_state_name(int s) {
    if (s < 0 || s >= LR_AGENT_NSTATES || names[s] == NULL) {
        return "?";
    }
    return names[s];
}
