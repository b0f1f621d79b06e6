/*
 * provider.h - the wire formats of model providers: build a request from the
 * provider-neutral conversation, parse a response, classify an error.
 *
 * The neutral conversation (what task_steps.messages holds) is an array of
 *   {"role":"user","content":"..."}
 *   {"role":"assistant","content":"..."|null,
 *    "tool_calls":[{"id":"...","name":"...","arguments":"<raw string>"}]}
 *   {"role":"tool","tool_call_id":"...","name":"...","content":"...","is_error":bool}
 * Arguments are kept as the raw string the model produced and replayed
 * byte for byte (OpenAI); Anthropic gets the parsed object.
 *
 * Pure functions (no I/O): fuzzed and unit-tested on their own.
 */
#ifndef LR_PROVIDER_H
#define LR_PROVIDER_H

#include <cjson/cJSON.h>
#include <stdbool.h>

#include "agents.h"

/* Builds the request body (malloc'd JSON text) for model m.  system may be
 * NULL; tools: the agent's allowed tools.  Returns NULL on out of memory. */
char *lr_provider_request(const lr_model_ref_t *m, const char *system, const cJSON *conversation,
                          const lr_tool_def_t *const *tools, int ntools);

/* The endpoint URL for m (malloc'd). */
char *lr_provider_url(const lr_model_ref_t *m);

typedef struct lr_model_reply {
    cJSON *assistant; /* owned: the neutral assistant message */
    int ntool_calls;
    char finish[32]; /* finish_reason / stop_reason as received */
    long tokens_in;  /* total input tokens (cached included) */
    long tokens_out;
    long tokens_cached;
    bool usage_missing; /* estimated instead */
    char *text;         /* owned: the text content, or NULL */
    bool refused;       /* the model declined (OpenAI finish_reason content_filter
                           or a refusal; Anthropic stop_reason refusal) */
} lr_model_reply_t;

/* Parses a 2xx response body.  step_no is used to synthesize missing tool
 * call ids.  Returns 0, LR_EPARSE (not JSON / not the expected shape; detail
 * in errbuf). */
int lr_provider_parse(const lr_model_ref_t *m, const char *body, size_t len, int step_no, lr_model_reply_t *out,
                      char *errbuf, size_t errlen) LR_MUSTCHECK;
void lr_model_reply_free(lr_model_reply_t *r);

enum lr_call_class {
    LR_CALL_RETRY = 1,  /* transient: retry (backoff / Retry-After) */
    LR_CALL_NEXT_MODEL, /* this model cannot serve it (404, auth, quota): fall back */
    LR_CALL_PERMANENT,  /* the request itself is wrong: no retry anywhere */
};

/* Classifies a non-2xx response (status, body, x-should-retry header value
 * or NULL).  reason receives a short stable name (rate_limited, quota,
 * request_too_large, server_error, overloaded, not_found, auth,
 * context_length, bad_request, ...). */
enum lr_call_class lr_provider_classify(long status, const char *body, const char *should_retry, char *reason,
                                        size_t reasonlen, char *detail, size_t detaillen);

/* Parses Retry-After style headers: retry-after-ms (ms), retry-after
 * (seconds, or an HTTP date).  Returns milliseconds, or -1 when absent/bad. */
long lr_retry_after_ms(const char *retry_after_ms, const char *retry_after);

#endif
