/*
 * task.h - the task message contract (docs/task-contract.md,
 * docs/task.schema.json): one validation function used by the worker, the
 * scheduler and the CLI.
 *
 * A message body is either a full task
 *   {"id":"<uuid>"?, "agent":"name", "input":<json>, "budgets":{..}?,
 *    "deadline":"RFC3339"?, "tenant":"t"?, "metadata":{..}?,
 *    "callback_url":"https://..."?, "max_attempts":N?}
 * or a continuation {"id":"<uuid>"} that continues an existing task.
 */
#ifndef LR_TASK_H
#define LR_TASK_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#include "err.h"

#define LR_TASK_MAX_BODY (256 * 1024) /* bytes of one message body */
#define LR_TASK_MAX_METADATA 16384    /* bytes of serialized metadata */
#define LR_TASK_MAX_DEPTH 32          /* JSON nesting depth */
#define LR_TASK_MAX_AGENT 64
#define LR_TASK_MAX_TENANT 64
#define LR_TASK_MAX_URL 2048
#define LR_UUID_LEN 36

/* Budget limits of one task; -1 means "not set, use the agent's/operator's". */
typedef struct lr_budgets {
    long max_steps;      /* 1 .. 10000 */
    long max_tool_calls; /* 0 .. 100000 */
    long max_tokens;     /* 1 .. 1e9 (input + output) */
    double max_cost_usd; /* 0 .. 100000 */
    long max_seconds;    /* 1 .. 2592000 (30 days) of active time */
} lr_budgets_t;

typedef struct lr_task_msg {
    bool continuation; /* body held only an id */
    bool has_id;
    char id[LR_UUID_LEN + 1]; /* lowercase canonical uuid when has_id */
    const char *agent;        /* borrowed from root */
    const cJSON *input;       /* borrowed from root; NULL for continuations */
    lr_budgets_t budgets;
    int max_attempts;         /* -1 when absent */
    const char *deadline;     /* borrowed; RFC 3339 text or NULL */
    const char *tenant;       /* borrowed or NULL */
    const cJSON *metadata;    /* borrowed or NULL */
    const char *callback_url; /* borrowed or NULL */
    cJSON *root;              /* owned: free with lr_task_msg_free */
} lr_task_msg_t;

/* Parses and validates a message body.  On success returns 0 and out owns the
 * parsed tree (free with lr_task_msg_free).  On failure returns LR_EPARSE (not
 * JSON), LR_ETOOBIG (body, metadata or depth over its limit) or LR_EINVAL
 * (schema violation), with a precise message in errbuf naming the field, and
 * out holds nothing to free. */
int lr_task_parse(const char *body, size_t len, lr_task_msg_t *out, char *errbuf, size_t errlen) LR_MUSTCHECK;
void lr_task_msg_free(lr_task_msg_t *m);

/* The outcome message of a task that ended (docs/task-contract.md,
 * "Results without polling"), as malloc'd JSON text:
 *   {"id","status","result","error","stop_reason",
 *    "usage":{"steps","tokens_in","tokens_out","cost_usd"}}
 * result_json: the task's result as JSON text (kept as a string if it does
 * not parse), or NULL for null; error and stop_reason: NULL or "" for null.
 * Sent by the worker, the scheduler (deadline, no_progress) and `longrun
 * cancel`.  Returns NULL on out of memory. */
char *lr_outcome_json(const char *id, const char *status, const char *result_json, const char *error,
                      const char *stop_reason, long steps, long tokens_in, long tokens_out, double cost_usd);

/* The task_events row that records an outcome not published because its
 * reply_to is not an allowed queue (lr_amqp_reply_allowed, common/amqp.h):
 * reason reply_to_refused, the task's status as from and to, detail
 * {"reply_to", "error"}.  $1 task id, $2 actor, $3 reply_to, $4 the reason.
 * Written by the worker, the scheduler and `longrun cancel`. */
#define LR_SQL_REPLY_REFUSED                                                           \
    "INSERT INTO task_events (task_id, from_status, to_status, reason, actor, detail)" \
    " SELECT id, status, status, 'reply_to_refused', $2,"                              \
    "  jsonb_build_object('reply_to', $3::text, 'error', $4::text) FROM tasks WHERE id = $1::uuid"

/* The budgets object as JSON text with only the fields that are set
 * (malloc'd, caller frees), e.g. {"max_steps":50}. */
char *lr_budgets_to_json(const lr_budgets_t *b);
void lr_budgets_init(lr_budgets_t *b);
/* Validates one budget field by name ("max_steps", ...) and value. */
int lr_budget_set(lr_budgets_t *b, const char *name, double value, char *errbuf, size_t errlen);

/* uuid helpers */
bool lr_uuid_valid(const char *s);
/* Writes a random (v4) uuid into out (37 bytes).  Returns 0 or LR_EIO. */
int lr_uuid_v4(char out[LR_UUID_LEN + 1]);
/* Agent and queue names: ^[a-z0-9][a-z0-9_.-]{0,63}$ */
bool lr_name_valid(const char *s);
/* Tenant names: 1-64 characters of [A-Za-z0-9_.:-]. */
bool lr_tenant_valid(const char *s);
/* RFC 3339 timestamp shape check (YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM)). */
bool lr_rfc3339_valid(const char *s);

#endif
