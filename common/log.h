/*
 * log.h - structured logging.
 *
 * Daemons write one JSON object per line to stdout:
 *   {"ts":"2026-11-22T04:40:01.123Z","level":"info","component":"worker",
 *    "worker":"host-123","event":"task.claimed","task_id":"...","step":3,
 *    "epoch":7,"msg":"..."}
 * The event name is stable (dashboards and tests key on it); msg is for humans.
 * Payloads (prompts, tool results) and secrets never go through here unless
 * payload logging is switched on by the caller.  Every msg is passed through
 * lr_config_mask_secrets (common/config.h) before it is written, so a DSN or
 * URL in an error message shows no password or token.  With
 * LONGRUN_LOG_FORMAT=text the same fields are printed as one readable line.
 *
 * Thread safety: every function may be called from any thread; each line is
 * written with a single fwrite.
 */
#ifndef LR_LOG_H
#define LR_LOG_H

#include <stdint.h>

#include "err.h"

enum lr_log_level { LR_LOG_DEBUG = 0, LR_LOG_INFO, LR_LOG_WARN, LR_LOG_ERROR, LR_LOG_OFF };

/* Optional per-task context of a log line; any field may be NULL / -1. */
typedef struct lr_log_ctx {
    const char *task_id;
    int64_t step;
    int64_t epoch;
} lr_log_ctx_t;

extern int lr_log_threshold;

/* component: "worker", "scheduler", "cli"; instance: worker id or NULL.
 * Both strings are copied. */
void lr_log_init(const char *component, const char *instance, int level, int json);
/* Log lines go to stderr instead of stdout (the CLI, whose stdout is its
 * output: --json must stay parseable when a library warns). */
void lr_log_to_stderr(void);
/* Parses "debug|info|warn|error|off"; returns -1 when unknown. */
int lr_log_level_parse(const char *s);

void lr_log_emit(int level, const lr_log_ctx_t *ctx, const char *event, const char *fmt, ...) LR_PRINTF(4, 5);

#define LR_LOG(level, ctx, event, ...)                         \
    do {                                                       \
        if ((level) >= lr_log_threshold) {                     \
            lr_log_emit((level), (ctx), (event), __VA_ARGS__); \
        }                                                      \
    } while (0)

#define lr_debug(event, ...) LR_LOG(LR_LOG_DEBUG, NULL, event, __VA_ARGS__)
#define lr_info(event, ...) LR_LOG(LR_LOG_INFO, NULL, event, __VA_ARGS__)
#define lr_warn(event, ...) LR_LOG(LR_LOG_WARN, NULL, event, __VA_ARGS__)
#define lr_error(event, ...) LR_LOG(LR_LOG_ERROR, NULL, event, __VA_ARGS__)

/* Appends s to buf (capacity cap, always NUL-terminated) as JSON string
 * contents (without quotes), escaping as needed.  Returns the new length. */
size_t lr_json_escape(char *buf, size_t len, size_t cap, const char *s);

#endif
