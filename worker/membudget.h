/*
 * membudget.h - the worker's memory budget (LONGRUN_MEMORY_BUDGET_MB): the
 * bytes it holds for its runs' conversations and for the model responses it
 * reads, charged against one budget, so that a pod at its limit stops
 * taking work instead of being killed by the kernel.
 *
 * What is charged (estimates of the heap it costs, not malloc's own count):
 *   - each run's step log and conversation, from the sizes of the states
 *     it loaded and checkpointed (lr_mem_charge / lr_mem_release);
 *   - each model call: a reservation before it is sent, grown as its
 *     response arrives to LR_MEM_RESPONSE_FACTOR times the bytes read (the
 *     body, its parse, the copies the step keeps), held until the step ends.
 *
 * Three controls keep the worker within the budget:
 *   - claims: a delivery is claimed only while the budget has room
 *     (lr_mem_room); else its run is held unclaimed (HELD) and claimed when
 *     a release makes room (the on_room hook);
 *   - calls: a model call is sent only when its reservation fits
 *     (lr_mem_call_begin), else it waits in a FIFO;
 *   - responses: a response read past its reservation grows its charge
 *     (lr_mem_call_grow); when that does not fit, the transfer is paused
 *     (TCP holds the server back) until a release makes room.
 * Progress: when nothing else would free memory (no answer waits for its
 * checkpoint: "settling"), a call waiting to start is admitted if no call
 * is in flight, and the oldest call in flight does not wait to grow.
 * So the worker is over its budget by at most one response, and never stuck.
 *
 * Wake-ups run from a zero timer on the loop, never inside the release
 * that made the room (a release can happen inside an HTTP callback, where
 * resuming another transfer is not allowed).
 *
 * A budget of 0 means none: everything fits; the accounting still runs for
 * the gauges.  Thread affinity: the loop thread.
 */
#ifndef LR_WORKER_MEMBUDGET_H
#define LR_WORKER_MEMBUDGET_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "list.h"

/* Charge of a response per byte read, measured on 4 MiB answers: while it
 * is parsed, the body, the answer's text and its message; while it is
 * checkpointed, the step's messages and result texts and libpq's copy of
 * them in its output buffer (which grows by doubling). */
#define LR_MEM_RESPONSE_FACTOR 6
/* Charge of a run per byte of state text it holds (tree plus text). */
#define LR_MEM_STATE_FACTOR 3
/* Smallest reservation of a call (the first calls, before any answer). */
#define LR_MEM_MIN_RESERVE (64 * 1024)

enum lr_mem_call_state {
    LR_MEM_CALL_IDLE = 0, /* not charged, in no list */
    LR_MEM_CALL_STARTING, /* waits to be admitted (begin did not fit) */
    LR_MEM_CALL_ACTIVE,   /* admitted: charged, in flight */
    LR_MEM_CALL_PAUSED,   /* in flight, waits for room to grow */
};

/* One model call's account: embed it in the object that makes the call. */
typedef struct lr_mem_call {
    lr_list_t link;                       /* in the active list, or in a waiting list */
    lr_list_t active;                     /* in the active list (oldest first) while admitted */
    int state;                            /* enum lr_mem_call_state */
    size_t charged;                       /* bytes charged now */
    size_t want;                          /* STARTING, PAUSED: the bytes asked for in all */
    void (*ready)(struct lr_mem_call *c); /* the wait is over (from the loop) */
} lr_mem_call_t;

typedef struct lr_mem {
    uv_timer_t wake; /* zero timer: wake-ups outside the releasing callback */
    size_t budget;   /* 0 = none */
    size_t used;
    size_t peak;
    size_t settling;            /* bytes detached from calls whose checkpoints are not written yet */
    size_t estimate;            /* a new call's reservation: a decaying maximum of calls' peaks */
    lr_list_t active;           /* admitted calls, oldest first (lr_mem_call_t.active) */
    lr_list_t starting;         /* calls waiting to be admitted, FIFO (link) */
    lr_list_t paused;           /* calls waiting to grow, FIFO (link) */
    unsigned long long waits;   /* calls that had to wait (start or grow) */
    bool over;                  /* the last lr_mem_room() answer was no (for the log) */
    void (*on_room)(void *arg); /* after a release, when there is room (claims held) */
    void *arg;
} lr_mem_t;

/* Initializes m with budget bytes (0 = none) and its timer on loop; close
 * the timer (m->wake) like any handle. */
void lr_mem_init(lr_mem_t *m, uv_loop_t *loop, size_t budget, void (*on_room)(void *arg), void *arg);

/* The default budget when none is configured: half of the cgroup memory
 * limit of this process's cgroup (v2 memory.max, v1 memory.limit_in_bytes),
 * or half of what RLIMIT_AS leaves above the address space already mapped,
 * whichever is lower; 0 when neither limit is set.  *source gets "cgroup",
 * "rlimit" or "none". */
size_t lr_mem_default_budget(const char **source);

/* Whether a new claim fits: used below the budget (always with none). */
bool lr_mem_room(lr_mem_t *m);

/* Charges n bytes / releases n bytes a run holds. */
void lr_mem_charge(lr_mem_t *m, size_t n);
void lr_mem_release(lr_mem_t *m, size_t n);

/* Admits call c with its reservation (the current estimate): returns true
 * when admitted now (ACTIVE), else queues it (STARTING) and returns false;
 * ready(c) runs on the loop once it is admitted. */
bool lr_mem_call_begin(lr_mem_t *m, lr_mem_call_t *c, void (*ready)(lr_mem_call_t *c));

/* An ACTIVE call needs total bytes charged: returns true when it has them
 * (charged now if they fit or c is the oldest call in flight), else marks
 * it PAUSED and returns false; ready(c) runs once they are charged. */
bool lr_mem_call_grow(lr_mem_t *m, lr_mem_call_t *c, size_t total);

/* Ends c in any state: uncharges it, leaves every list (IDLE again). */
void lr_mem_call_end(lr_mem_t *m, lr_mem_call_t *c);

/* Ends c but keeps its bytes charged: returns them, now the caller's to
 * release (lr_mem_release), and counts them as settling until the caller
 * says lr_mem_settled.  A call that was not admitted is just ended
 * (returns 0). */
size_t lr_mem_call_detach(lr_mem_t *m, lr_mem_call_t *c);
/* n detached bytes are settled (their checkpoint is written or given up);
 * release them, or what replaces them, with lr_mem_release. */
void lr_mem_settled(lr_mem_t *m, size_t n);

#endif
