/*
 * run_fsm.h - the states of a run (one delivery of a task, worker/run.c),
 * the outcomes it can end with, and the table of legal moves.
 *
 * run.c keeps one of these states per run; every change goes through
 * lr_run_set_state(), which checks the move against this table and traces
 * it.  This file knows nothing of the worker, so that a unit test
 * (tests/unit/test_run_fsm.c) checks the table alone, and the diagram in
 * docs/architecture.md is generated from it (lr_run_fsm_describe) and tested
 * to agree.
 */
#ifndef LR_RUN_FSM_H
#define LR_RUN_FSM_H

#include <stdbool.h>
#include <stddef.h>

#define LR_RUN_STATES(X)                                                                          \
    X(NEW, "new", "the delivery arrived; its body is being parsed")                               \
    X(HELD, "held", "over the memory budget: the delivery waits, unclaimed, for room")            \
    X(CLAIMING, "claiming", "the claim statement is in flight")                                   \
    X(DEFERRED, "deferred", "a suspect waits, unclaimed, for this worker's suspect slot")         \
    X(INSERTING, "inserting", "creating the row of a task first seen on the broker, claimed")     \
    X(ADMITTING, "admitting", "counting the tenant's running tasks again after the claim")        \
    X(LOADING, "loading", "loading the step log (executors that need history)")                   \
    X(STEPPING, "stepping", "a step is running in the executor")                                  \
    X(CHECKPOINTING, "checkpointing", "the step's checkpoint is in flight")                       \
    X(TRANSITION, "transition", "a status change without a step is in flight")                    \
    X(PUBLISHING, "publishing", "the follow-up (continuation or dead letter) is being published") \
    X(BACKOFF, "backoff", "the follow-up's publish failed; waiting to try again")                 \
    X(MARKING, "marking", "recording that the continuation was published (outbox)")               \
    X(DONE, "done", "acked or given back; freed once no I/O refers to the run")

enum lr_run_state {
#define LR_RUN_STATE_ENUM(id, name, what) LR_RUN_##id,
    LR_RUN_STATES(LR_RUN_STATE_ENUM)
#undef LR_RUN_STATE_ENUM
        LR_RUN_NSTATES
};

/* How a run ended (set with the move to DONE). */
#define LR_RUN_OUTCOMES(X)                                                                                          \
    X(NONE, "none", "not ended")                                                                                    \
    X(SUCCEEDED, "succeeded", "the task succeeded; its outcome was sent")                                           \
    X(CANCELLED, "cancelled", "an operator cancelled the task; its outcome was sent")                               \
    X(DEAD, "dead", "the task was dead-lettered (budget, exhausted, permanent error, ...)")                         \
    X(SUSPENDED, "suspended", "the task waits (sleep, approval, event, rate window, tenant cap)")                   \
    X(RETRY_WAIT, "retry_wait", "a transient failure: the task retries later (attempt + 1)")                        \
    X(HANDED_BACK, "handed_back", "the task is queued again (slice end, drain) for any worker")                     \
    X(REQUEUED, "requeued",                                                                                         \
      "given back undecided (database trouble, lost lease): a continuation, or the delivery itself before a claim") \
    X(FENCED, "fenced", "a newer owner holds the task: abandoned locally")                                          \
    X(DROPPED, "dropped", "nothing to do: a duplicate delivery, or the task is not runnable")                       \
    X(REJECTED, "rejected", "a malformed message: recorded as a dead letter with its reason")

enum lr_run_outcome {
#define LR_RUN_OUTCOME_ENUM(id, name, what) LR_RUN_OUT_##id,
    LR_RUN_OUTCOMES(LR_RUN_OUTCOME_ENUM)
#undef LR_RUN_OUTCOME_ENUM
        LR_RUN_NOUTCOMES
};

/* One legal move and why it happens (for traces and the docs diagram). */
typedef struct lr_run_move {
    int from, to;
    const char *why;
} lr_run_move_t;

/* The table, in order; *n gets its length. */
const lr_run_move_t *lr_run_fsm_moves(size_t *n);

/* Is from -> to a legal move?  A state to itself only where the table says
 * so (claiming again); DONE is final; out-of-range values are never legal. */
bool lr_run_move_ok(int from, int to);

/* May a run in state `from` end (move to DONE) with outcome o? */
bool lr_run_outcome_ok(int from, int o);

const char *lr_run_state_name(int s);   /* "claiming", ... or "?" */
const char *lr_run_outcome_name(int o); /* "succeeded", ... or "?" */

/* The state diagram as Markdown (states, moves with their reasons, the
 * outcomes and the states they end from), as docs/architecture.md carries it
 * between its "run-fsm" markers.  Returns the length it needed (like
 * snprintf); writes at most cap bytes, NUL-terminated. */
size_t lr_run_fsm_describe(char *buf, size_t cap);

#endif
