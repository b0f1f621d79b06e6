/*
 * run_fsm.c - the legal moves between the states of a run and the states
 * each outcome may end from (the enums and what they mean: run_fsm.h).
 *
 * Design.  The table below is the one statement of the machine: run.c's
 * lr_run_set_state() refuses (and logs) any move missing here, the unit test
 * checks it against a copy written out independently, and the diagram in
 * docs/architecture.md is generated from it.  Pure functions: any thread.
 */
#include "run_fsm.h"

#include <stdarg.h>
#include <stdio.h>

#define S(x) LR_RUN_##x

static const lr_run_move_t moves[] = {
    {S(NEW), S(HELD), "over the worker's memory budget: held unclaimed"},
    {S(NEW), S(CLAIMING), "a well-formed task message: claim it"},
    {S(HELD), S(CLAIMING), "room in the memory budget"},
    {S(HELD), S(DONE), "draining: given back unclaimed"},
    {S(NEW), S(DONE), "malformed, oversized or without an id: dead-lettered"},
    {S(CLAIMING), S(CLAIMING), "the connection was lost: claim again (reclaim)"},
    {S(CLAIMING), S(DEFERRED), "a suspect while another suspect holds the slot"},
    {S(CLAIMING), S(INSERTING), "no row yet: first sight of a task"},
    {S(CLAIMING), S(ADMITTING), "claimed; the tenant is capped: count again"},
    {S(CLAIMING), S(LOADING), "claimed; the executor needs the step log"},
    {S(CLAIMING), S(STEPPING), "claimed: the next step starts"},
    {S(CLAIMING), S(TRANSITION),
     "claimed but not to run: too new, crash loop, deadline, unknown agent, tenant "
     "cap, draining, cancelled"},
    {S(CLAIMING), S(DONE), "not runnable, a duplicate, an unknown continuation, or the claim failed"},
    {S(DEFERRED), S(CLAIMING), "the suspect slot is free"},
    {S(DEFERRED), S(DONE), "draining: given back unclaimed"},
    {S(INSERTING), S(CLAIMING), "another creator won the race, or the connection was lost"},
    {S(INSERTING), S(ADMITTING), "created; the tenant is capped: count again"},
    {S(INSERTING), S(LOADING), "created; the executor needs the step log"},
    {S(INSERTING), S(STEPPING), "created: the first step starts"},
    {S(INSERTING), S(TRANSITION), "created but not to run (as from claiming)"},
    {S(INSERTING), S(DONE), "PostgreSQL refused a value (dead-lettered), or the insert failed"},
    {S(ADMITTING), S(LOADING), "within the tenant's cap; the executor needs the step log"},
    {S(ADMITTING), S(STEPPING), "within the tenant's cap: the next step starts"},
    {S(ADMITTING), S(TRANSITION), "over the tenant's cap: suspended briefly; or cancelled meanwhile"},
    {S(ADMITTING), S(PUBLISHING), "the count failed: handed back through a continuation"},
    {S(ADMITTING), S(DONE), "the count failed: given back"},
    {S(LOADING), S(STEPPING), "the step log is loaded: the next step starts"},
    {S(LOADING), S(TRANSITION), "a step newer than this worker reads, draining, or cancelled meanwhile"},
    {S(LOADING), S(PUBLISHING), "the step log could not be read: handed back through a continuation"},
    {S(LOADING), S(DONE), "the step log could not be read: given back"},
    {S(STEPPING), S(CHECKPOINTING), "the step ended with a state to write"},
    {S(STEPPING), S(TRANSITION),
     "the step failed (retry, dead), was abandoned at the drain deadline, or was aborted by an immediate "
     "cancel"},
    {S(STEPPING), S(PUBLISHING), "no lease renewal for a lease period: handed back through a continuation"},
    {S(STEPPING), S(DONE), "the lease was lost (renewal fenced, or none for a lease period)"},
    {S(CHECKPOINTING), S(STEPPING), "committed, and the task goes on in this slice"},
    {S(CHECKPOINTING), S(PUBLISHING),
     "committed with an end (slice, finish, suspend, stop, cancel), or "
     "failed: handed back through a continuation"},
    {S(CHECKPOINTING), S(TRANSITION),
     "committed, and the task goes on, but an immediate cancel arrived meanwhile: cancelled instead of the next "
     "step"},
    {S(CHECKPOINTING), S(DONE), "fenced, or the checkpoint failed: given back"},
    {S(TRANSITION), S(PUBLISHING),
     "committed (or found committed after a lost connection): send what the new "
     "status calls for; or failed: handed back through a continuation"},
    {S(TRANSITION), S(DONE), "fenced, ambiguous, or failed before any claim"},
    {S(PUBLISHING), S(BACKOFF), "the publish failed: try again later"},
    {S(PUBLISHING), S(MARKING), "the continuation is confirmed"},
    {S(PUBLISHING), S(DONE), "confirmed (or nothing to publish): acked"},
    {S(BACKOFF), S(PUBLISHING), "the backoff is over"},
    {S(BACKOFF), S(DONE), "the worker stops: acked (the outbox sweep republishes)"},
    {S(MARKING), S(DONE), "recorded: acked"},
};

#define NMOVES (sizeof(moves) / sizeof(moves[0]))
#define IN(x) (1u << LR_RUN_##x)

/* The states each outcome may end from. */
static const unsigned outcome_from[LR_RUN_NOUTCOMES] = {
    [LR_RUN_OUT_NONE] = 0,
    [LR_RUN_OUT_SUCCEEDED] = IN(PUBLISHING) | IN(BACKOFF),
    [LR_RUN_OUT_CANCELLED] = IN(PUBLISHING) | IN(BACKOFF),
    [LR_RUN_OUT_DEAD] = IN(PUBLISHING) | IN(BACKOFF),
    [LR_RUN_OUT_SUSPENDED] = IN(PUBLISHING) | IN(BACKOFF),
    [LR_RUN_OUT_RETRY_WAIT] = IN(PUBLISHING) | IN(BACKOFF),
    [LR_RUN_OUT_HANDED_BACK] = IN(PUBLISHING) | IN(BACKOFF) | IN(MARKING),
    [LR_RUN_OUT_REQUEUED] = IN(HELD) | IN(CLAIMING) | IN(DEFERRED) | IN(INSERTING) | IN(ADMITTING) | IN(LOADING) |
                            IN(STEPPING) | IN(CHECKPOINTING) | IN(TRANSITION) | IN(PUBLISHING) | IN(BACKOFF) |
                            IN(MARKING),
    [LR_RUN_OUT_FENCED] = IN(STEPPING) | IN(CHECKPOINTING) | IN(TRANSITION),
    [LR_RUN_OUT_DROPPED] = IN(CLAIMING) | IN(TRANSITION),
    [LR_RUN_OUT_REJECTED] = IN(NEW) | IN(CLAIMING) | IN(INSERTING),
};

static const char *const state_names[LR_RUN_NSTATES] = {
#define NAME(id, name, what) name,
    LR_RUN_STATES(NAME)
#undef NAME
};

static const char *const state_what[LR_RUN_NSTATES] = {
#define WHAT(id, name, what) what,
    LR_RUN_STATES(WHAT)
#undef WHAT
};

static const char *const outcome_names[LR_RUN_NOUTCOMES] = {
#define NAME(id, name, what) name,
    LR_RUN_OUTCOMES(NAME)
#undef NAME
};

static const char *const outcome_what[LR_RUN_NOUTCOMES] = {
#define WHAT(id, name, what) what,
    LR_RUN_OUTCOMES(WHAT)
#undef WHAT
};

const lr_run_move_t *lr_run_fsm_moves(size_t *n) {
    *n = NMOVES;
    return moves;
}

bool lr_run_move_ok(int from, int to) {
    if (from < 0 || from >= LR_RUN_NSTATES || to < 0 || to >= LR_RUN_NSTATES) {
        return false;
    }
    for (size_t i = 0; i < NMOVES; i++) {
        if (moves[i].from == from && moves[i].to == to) {
            return true;
        }
    }
    return false;
}

bool lr_run_outcome_ok(int from, int o) {
    if (from < 0 || from >= LR_RUN_NSTATES || o <= LR_RUN_OUT_NONE || o >= LR_RUN_NOUTCOMES) {
        return false;
    }
    return (outcome_from[o] & (1u << from)) != 0 && lr_run_move_ok(from, LR_RUN_DONE);
}

const char *lr_run_state_name(int s) { return s >= 0 && s < LR_RUN_NSTATES ? state_names[s] : "?"; }

const char *lr_run_outcome_name(int o) { return o >= 0 && o < LR_RUN_NOUTCOMES ? outcome_names[o] : "?"; }

typedef struct out {
    char *buf;
    size_t cap, len;
} out_t;

static void put(out_t *o, const char *fmt, ...) {
    va_list ap;
    size_t room = o->len < o->cap ? o->cap - o->len : 0;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(room > 0 ? o->buf + o->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0) {
        o->len += (size_t)n;
    }
}

size_t lr_run_fsm_describe(char *buf, size_t cap) {
    out_t o = {buf, cap, 0};
    if (cap > 0) {
        buf[0] = '\0';
    }
    put(&o, "| state | what it means |\n|---|---|\n");
    for (int s = 0; s < LR_RUN_NSTATES; s++) {
        put(&o, "| `%s` | %s |\n", state_names[s], state_what[s]);
    }
    put(&o, "\n| from | to | when |\n|---|---|---|\n");
    for (size_t i = 0; i < NMOVES; i++) {
        put(&o, "| `%s` | `%s` | %s |\n", state_names[moves[i].from], state_names[moves[i].to], moves[i].why);
    }
    put(&o, "\n| outcome | what it means | ends from |\n|---|---|---|\n");
    for (int k = 1; k < LR_RUN_NOUTCOMES; k++) {
        bool first = true;
        put(&o, "| `%s` | %s | ", outcome_names[k], outcome_what[k]);
        for (int s = 0; s < LR_RUN_NSTATES; s++) {
            if (outcome_from[k] & (1u << s)) {
                put(&o, "%s`%s`", first ? "" : ", ", state_names[s]);
                first = false;
            }
        }
        put(&o, " |\n");
    }
    return o.len;
}
