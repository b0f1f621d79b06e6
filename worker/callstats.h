/*
 * callstats.h - a rolling window of the calls this process made to each
 * model endpoint and each tool: per bucket, the calls, the errors among
 * them and the authentication failures (401/403).  /health shows the error
 * rates; readiness uses the model endpoints' auth failures (worker.c).
 *
 * The window is LR_CALLSTATS_BUCKETS buckets of window/6 each: the last 6
 * buckets (the current one included) are "the last window" (readiness and
 * the "last_window" figures of /health), all of them "the last 5 windows".
 * With the default window of 60 s that is 10 s buckets, the last minute
 * and the last 5 minutes.
 *
 * Keys are names (the endpoint label "<provider>/<model>", the tool name),
 * copied.  The table is bounded (LR_CALLSTATS_MAX entries per kind; beyond
 * that a name is not counted, logged once).  Loop thread only.
 */
#ifndef LR_CALLSTATS_H
#define LR_CALLSTATS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LR_CALLSTATS_MAX 256
#define LR_CALLSTATS_BUCKETS 30 /* 5 windows of 6 buckets */
#define LR_CALLSTATS_WINDOW_BUCKETS 6

enum lr_callstats_kind { LR_CALLSTATS_MODEL = 0, LR_CALLSTATS_TOOL = 1 };

/* The window's length (ms, > 0; default 60000).  Call before any count:
 * it resets the counts. */
void lr_callstats_configure(long window_ms);

/* Counts one call of name that went out and ended at now_ms: status is its
 * HTTP status, or 0 without a response (a transport error).  An error is
 * anything but a 2xx; 401 and 403 are also counted as auth failures. */
void lr_callstats_add(enum lr_callstats_kind kind, const char *name, long status, uint64_t now_ms);

/* The auth storm of readiness: over the last window, at least one model
 * endpoint was called, every call of every endpoint called got a 401 or a
 * 403, and there were at least min_calls of them.  Returns true and writes
 * "model API key rejected: <endpoint> N/N calls 401/403, ..." into why (cut
 * to len); else false (why untouched). */
bool lr_callstats_auth_storm(uint64_t now_ms, long min_calls, char *why, size_t len);

/* [{"name":..., "last_window": {"calls","errors","auth_failures",
 * "error_rate"}, "last_5_windows": {...}}, ...] for every name of kind
 * with a call in the last 5 windows: a new tree the caller owns
 * (cJSON_Delete), or NULL without memory. */
struct cJSON *lr_callstats_cjson(enum lr_callstats_kind kind, uint64_t now_ms);

#endif
