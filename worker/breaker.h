/*
 * breaker.h - per-process protection of model endpoints and tools:
 * circuit breakers (closed, open, half-open) and an in-process concurrency
 * gate per model endpoint.
 *
 * Keys are strings: "model:<provider> <base_url> <model>" (one endpoint,
 * shared by every agent that uses it) and "tool:<name>".  Both tables are
 * bounded (LR_BREAKERS_MAX entries; beyond that a key is unprotected, which
 * is logged once) and live on the loop thread only; lr_breakers_cjson() is
 * called from the loop too (the health snapshot is built there).
 */
#ifndef LR_BREAKER_H
#define LR_BREAKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "list.h"

#define LR_BREAKERS_MAX 512

enum lr_cb_state { LR_CB_CLOSED = 0, LR_CB_HALF_OPEN = 1, LR_CB_OPEN = 2 };

typedef struct lr_breaker lr_breaker_t;

/* Thresholds: failures in a row that open a circuit, and for how long. */
void lr_breakers_configure(int failures, long open_ms);

/* The breaker for key, created closed on first use; label names it in logs
 * and metrics (the model or tool name).  NULL when the table is full. */
lr_breaker_t *lr_breaker_get(const char *key, const char *label);

/* May a call go out now?  An open circuit past its time turns half-open and
 * lets exactly one trial call through. */
bool lr_breaker_allows(lr_breaker_t *b, uint64_t now_ms);

/* Is the circuit open or half-open because the endpoint is unavailable?
 * True when it is not closed and no failure since it was last closed was
 * marked lr_breaker_not_outage.  NULL (unprotected key): false. */
bool lr_breaker_outage(const lr_breaker_t *b);

/* The failure just reported to lr_breaker_result was not an availability
 * failure (a malformed answer, a rejected key): until the next success the
 * circuit does not count as an outage. */
void lr_breaker_not_outage(lr_breaker_t *b);

/* The outcome of a call that went out (after its retries). */
void lr_breaker_result(lr_breaker_t *b, bool ok, uint64_t now_ms);

/* The endpoint answered 429 asking to wait until until_ms (a long
 * Retry-After): a fallback chain skips it meanwhile.  Not a failure: the
 * circuit is untouched. */
void lr_breaker_cool(lr_breaker_t *b, uint64_t until_ms);
/* How long (ms) the endpoint still asks callers to wait; 0: not cooling. */
long lr_breaker_cooling(const lr_breaker_t *b, uint64_t now_ms);

/* A trial call was cancelled before it finished: allow another trial. */
void lr_breaker_abandon(lr_breaker_t *b, uint64_t now_ms);

/* [{"name":label,"state":"open"|"half_open","failures":N}, ...] for every
 * circuit that is not closed (the /health snapshot): a new tree the caller
 * owns (cJSON_Delete), or NULL without memory. */
struct cJSON *lr_breakers_cjson(void);

/* Readiness: how many model endpoints have a breaker (they were called or
 * picked), and how many of them refuse calls now (open, their open time
 * not yet over: past it the next call is a trial, so it counts as not
 * open).  Returns the number open; *nmodels gets the number known. */
int lr_breakers_models_open(uint64_t now_ms, int *nmodels);

/* ------------------------------------------------------ concurrency gate */

/* A waiter: embed one in the object that waits; the gate calls
 * ready(waiter) on the loop thread when a slot is granted to it. */
typedef struct lr_gate_waiter {
    lr_list_t link;       /* in the gate's queue while gate != NULL */
    struct lr_gate *gate; /* the gate queued at, or NULL */
    void (*ready)(struct lr_gate_waiter *wt);
    uint64_t since_ms;
} lr_gate_waiter_t;

typedef struct lr_gate lr_gate_t;

/* The gate for key with limit calls in flight (0: no gate, returns NULL);
 * label names it in metrics. */
lr_gate_t *lr_gate_get(const char *key, const char *label, int limit);

/* Takes a slot: returns true when one is free now (the caller must
 * lr_gate_release it), else queues wt (FIFO) and returns false. */
bool lr_gate_acquire(lr_gate_t *g, lr_gate_waiter_t *wt, uint64_t now_ms);

/* Gives a slot back; the oldest waiter, if any, gets it (its ready() runs
 * before this returns). */
void lr_gate_release(lr_gate_t *g);

/* Removes a queued waiter (cancelled while waiting); no-op if not queued. */
void lr_gate_forget(lr_gate_waiter_t *wt);

#endif
