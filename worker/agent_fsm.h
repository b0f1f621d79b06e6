/*
 * agent_fsm.h - the states of an agent step and its table of legal moves.
 *
 * The agent executor (exec_agent.c) keeps one of these states per task; every
 * change goes through its set_state(), which checks the move here and traces
 * it.  This file knows nothing of the worker, so that a unit test
 * (tests/unit/test_agent_fsm.c) can check the table alone.
 */
#ifndef LR_AGENT_FSM_H
#define LR_AGENT_FSM_H

#include <stdbool.h>

enum lr_agent_state {
    LR_AGENT_IDLE = 0,  /* no step in flight: none yet, the last one ended
                           (done ran or start returned), or it was cancelled */
    LR_AGENT_PREPARING, /* synchronous work of a step: budgets, conversation,
                           choosing the model of the chain and building its
                           request; never waits in this state */
    LR_AGENT_CAP_CHECK, /* a spend cap applies to the task: the reservation
                             of the call's worst-case cost (spend.h) is in
                             flight */
    LR_AGENT_CAP_WAIT,  /* the spend ledger did not answer (fail closed: no
                             call without a reservation), or the reservations
                             of calls in flight fill a cap whose settled spend
                             has room: the timer, then PREPARING again */
    LR_AGENT_RESERVING, /* a rate-window reservation (ratewin.h) is in flight
                           for the current model (and the tenant) */
    LR_AGENT_RATE_WAIT, /* over the fleet-wide limit of this minute: the timer
                           waits for the next window, then PREPARING again */
    LR_AGENT_GATE_WAIT, /* queued at the endpoint's concurrency gate with the
                           request body; the timer bounds the wait
                           (long_wait_seconds, then the task suspends) */
    LR_AGENT_MEM_WAIT,  /* the request body waits for room in the worker's
                           memory budget (membudget.h) */
    LR_AGENT_CALLING,   /* the model request is in flight, holding a slot of
                           the endpoint's gate when it has one */
    LR_AGENT_BACKOFF,   /* the timer waits before the next try of the same
                           model (jittered exponential backoff, Retry-After) */
    LR_AGENT_TOOLS,     /* the tool calls the model asked for are in flight
                           (each retried at once up to its retries) */
    LR_AGENT_RELEASED,  /* the run is gone: the timer is closing and maybe a
                           reservation query still refers to the state; freed
                           when nothing does.  Final. */
    LR_AGENT_NSTATES
};

/* Is from -> to a legal move?  A state to itself is not a move (set_state
 * ignores it); out-of-range values are never legal. */
bool lr_agent_transition_ok(int from, int to);

/* The state's name for traces ("idle", "calling", ...), or "?". */
const char *lr_agent_state_name(int s);

#endif
