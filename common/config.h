/*
 * config.h - configuration of every longrun program, as one declarative
 * table (common/config.c, documented in docs/configuration.md).
 *
 * Each entry: environment variable, type, default, bounds, flags (sensitive:
 * masked when printed).  Sources in order: built-in default, the
 * environment, then command-line overrides (lr_config_set).  Errors name the
 * variable, the bad value and why.
 */
#ifndef LR_CONFIG_H
#define LR_CONFIG_H

#include <stdbool.h>
#include <stdio.h>

#include "err.h"

/* The embedded default: the local servers started by `scripts/dev up`. */
#define LR_DEFAULT_DATABASE_URL "postgresql://longrun@127.0.0.1:55432/longrun"
#define LR_DEFAULT_AMQP_URL "amqp://longrun:longrun@127.0.0.1:55672/"

typedef struct lr_config {
    char database_url[1024];
    char amqp_url[1024];
    char log_level[16];
    char log_format[16];
    char queues[1024]; /* comma-separated queue short names */
    char worker_id[128];
    char agents_file[1024];
    int max_in_flight;
    int lease_seconds;
    int slice_steps;
    int slice_seconds;
    int drain_seconds;
    int max_claims;
    int max_attempts;
    int retry_base_ms;
    int retry_max_ms;
    int pg_pool_size;
    int http_port;
    int delivery_limit;
    int heartbeat_seconds;
    int max_steps;
    int max_tool_calls;
    int max_seconds;
    int max_tokens;
    double max_cost_usd;
    int sweep_interval_ms;
    int sweep_batch;
    int outbox_grace_seconds;
    int retention_days;
    int tenant_max_running;   /* running tasks per tenant, fleet-wide; 0 = no cap */
    int tenant_tpm;           /* tokens per minute per tenant, fleet-wide; 0 = no cap */
    int step_timeout_seconds; /* a running task without a checkpoint this long is flagged; twice: no_progress */
    /* operator ceilings over every task's and agent's budgets; 0 = none */
    int ceiling_max_steps;
    int ceiling_max_tool_calls;
    int ceiling_max_seconds;
    int ceiling_max_tokens;
    double ceiling_max_cost_usd;
    int breaker_failures;           /* consecutive failures that open a circuit */
    int breaker_open_seconds;       /* how long an open circuit stays open before a trial */
    int ready_window_seconds;       /* the call-statistics window of readiness and /health (worker/callstats.h) */
    int ready_auth_min_calls;       /* 401/403 answers in that window, on every model call, that make it not ready */
    int model_concurrency;          /* in-process calls in flight per (provider, model); 0 = no gate */
    int long_wait_seconds;          /* a provider wait longer than this suspends the task */
    double log_payloads;            /* share of tasks whose payloads are logged (0 = never) */
    char log_redact[128];           /* redaction classes of logged payloads: all, none, email,api_key,card (redact.h) */
    char log_redact_patterns[4096]; /* custom redaction regexes, one per line, [name=]regex (redact.h) */
    char reply_to_prefix[256];      /* comma-separated queue-name prefixes reply_to may name (common/amqp.h) */
    int allow_plaintext;            /* 1: plain-text PostgreSQL/AMQP to other hosts allowed (common/transport.h) */
    int allow_unsafe_durability;    /* 1: the worker runs on fsync=off / synchronous_commit=off */
    int queue_max_length;           /* x-max-length of new task queues (reject-publish); 0 = unlimited */
    int memory_budget_mb;           /* worker memory budget; -1 = half the cgroup/RLIMIT_AS limit, 0 = none */
    int max_response_bytes;         /* largest model response body kept; a bigger one fails the step */
} lr_config_t;

/* Fills cfg with defaults, then the environment.  Returns 0 or LR_ECONFIG
 * with "LONGRUN_X=value: why" in errbuf. */
int lr_config_load(lr_config_t *cfg, char *errbuf, size_t errlen) LR_MUSTCHECK;

/* Sets one entry by environment variable name (command-line override).
 * Returns 0, LR_ENOTFOUND (unknown name) or LR_ECONFIG. */
int lr_config_set(lr_config_t *cfg, const char *env_name, const char *value, char *errbuf, size_t errlen) LR_MUSTCHECK;

/* Prints "NAME=value" lines, secrets masked (lr_config_mask_secrets). */
void lr_config_print(const lr_config_t *cfg, FILE *out);

/* Copies text into buf (buflen bytes; always NUL-terminated when buflen > 0,
 * cut to fit) with every secret replaced by "***".  The one masking function:
 * every log line (lr_log_emit), /readyz and /health reason, CLI error and
 * --print-config output goes through it.
 *
 * text may be a PostgreSQL conninfo (postgres[ql]:// URI or key=value
 * pairs), any URL (amqp[s]://, http[s]://, ...), or free text such as an
 * error message holding those.  Secrets are found by parsing, with libpq's
 * PQconninfoParse (the options libpq marks secret: password, sslpassword)
 * and libcurl's URL API (the userinfo password; query and fragment
 * parameters named like password, secret, token, key, sig, credential);
 * what could hold a secret but does not parse is masked whole.  Text without
 * a secret is copied unchanged.  A conninfo that libpq would read
 * differently once masked in place is printed as key=value from libpq's
 * parse (the order of libpq's table).
 *
 * Returns the length written.  text NULL: "".  Thread-safe. */
size_t lr_config_mask_secrets(const char *text, char *buf, size_t buflen);

#endif
