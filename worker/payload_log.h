/*
 * payload_log.h - the payload lines of sampled agent tasks
 * (LONGRUN_LOG_PAYLOADS): model requests, model answers (with the
 * arguments of the tool calls they ask for) and tool results, each as one
 * info line (payload.model_request, payload.model_response,
 * payload.tool_result) of at most LR_PAYLOAD_LOG_MAX bytes of text, with
 * every match of the redaction classes (LONGRUN_LOG_REDACT,
 * LONGRUN_LOG_REDACT_PATTERNS; common/redact.h) replaced by
 * "[redacted:<class>]".
 *
 * lr_payload_log_configure() compiles the redactor once at start; a line
 * then costs one pass of the compiled rules over at most LR_PAYLOAD_LOG_MAX
 * + LR_REDACT_LOOKAHEAD bytes of the payload, whatever its size (tens of
 * microseconds: tests/unit/test_redact.c).  Until it is configured (and
 * after lr_payload_log_free) nothing is logged: the log never gets a payload
 * that was not redacted as configured.
 *
 * Thread affinity: the loop thread.
 */
#ifndef LR_WORKER_PAYLOAD_LOG_H
#define LR_WORKER_PAYLOAD_LOG_H

#include <stdbool.h>
#include <stddef.h>

#include "log.h"

#define LR_PAYLOAD_LOG_MAX 4096

/* Compiles the redactor (lr_redact_new: classes, patterns).  Returns 0, or
 * LR_ECONFIG / LR_ENOMEM with why in errbuf (the worker exits 2). */
int lr_payload_log_configure(const char *classes, const char *patterns, char *errbuf, size_t errlen) LR_MUSTCHECK;
/* What is redacted, for the start-up line: "email, api_key, card + 2 patterns". */
void lr_payload_log_describe(char *buf, size_t len);
/* Frees the redactor (at exit). */
void lr_payload_log_free(void);

/* Whether task_id's payloads are logged: a task is logged whole or not at
 * all, chosen by a hash of its id below rate (0..1). */
bool lr_payload_sampled(const char *task_id, double rate);

/* Logs text[0..len) (any bytes: invalid UTF-8 is replaced) as event, "what"
 * naming its source (an endpoint, a tool), with ctx's task fields.  Counts
 * longrun_payloads_logged_total and longrun_payloads_redacted_total. */
void lr_payload_log(const lr_log_ctx_t *ctx, const char *event, const char *what, const char *text, size_t len);

#endif
