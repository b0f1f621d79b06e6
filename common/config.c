/* config.c - the configuration table; see config.h. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

enum cfg_type { CFG_STR, CFG_INT, CFG_DOUBLE };
#define CFG_SENSITIVE 1u

struct cfg_entry {
    const char *env;
    enum cfg_type type;
    size_t offset;
    size_t size; /* for strings */
    const char *def;
    double min, max;
    unsigned flags;
};

#define S(env, field, def, fl) {env, CFG_STR, offsetof(lr_config_t, field), sizeof(((lr_config_t *)0)->field), def, 0, 0, fl}
#define I(env, field, def, lo, hi) {env, CFG_INT, offsetof(lr_config_t, field), 0, def, lo, hi, 0}
#define D(env, field, def, lo, hi) {env, CFG_DOUBLE, offsetof(lr_config_t, field), 0, def, lo, hi, 0}

/* Keep in sync with docs/configuration.md (a test checks that every name here
 * is documented there). */
static const struct cfg_entry entries[] = {
    S("LONGRUN_DATABASE_URL", database_url, "", CFG_SENSITIVE),
    S("LONGRUN_AMQP_URL", amqp_url, LR_DEFAULT_AMQP_URL, CFG_SENSITIVE),
    S("LONGRUN_LOG_LEVEL", log_level, "info", 0),
    S("LONGRUN_LOG_FORMAT", log_format, "json", 0),
    S("LONGRUN_QUEUES", queues, "default", 0),
    S("LONGRUN_WORKER_ID", worker_id, "", 0),
    S("LONGRUN_AGENTS_FILE", agents_file, "", 0),
    I("LONGRUN_MAX_IN_FLIGHT", max_in_flight, "256", 1, 10000),
    I("LONGRUN_LEASE_SECONDS", lease_seconds, "30", 3, 3600),
    I("LONGRUN_SLICE_STEPS", slice_steps, "20", 1, 10000),
    I("LONGRUN_SLICE_SECONDS", slice_seconds, "60", 1, 3600),
    I("LONGRUN_DRAIN_SECONDS", drain_seconds, "25", 0, 3600),
    I("LONGRUN_MAX_CLAIMS", max_claims, "5", 1, 1000),
    I("LONGRUN_MAX_ATTEMPTS", max_attempts, "5", 1, 100),
    I("LONGRUN_RETRY_BASE_MS", retry_base_ms, "1000", 1, 3600000),
    I("LONGRUN_RETRY_MAX_MS", retry_max_ms, "300000", 1, 86400000),
    I("LONGRUN_PG_POOL_SIZE", pg_pool_size, "4", 1, 64),
    I("LONGRUN_HTTP_PORT", http_port, "0", 0, 65535),
    I("LONGRUN_DELIVERY_LIMIT", delivery_limit, "20", 1, 1000),
    I("LONGRUN_HEARTBEAT_SECONDS", heartbeat_seconds, "5", 1, 3600),
    I("LONGRUN_MAX_STEPS", max_steps, "25", 1, 10000),
    I("LONGRUN_MAX_TOOL_CALLS", max_tool_calls, "12", 0, 100000),
    I("LONGRUN_MAX_SECONDS", max_seconds, "600", 1, 2592000),
    I("LONGRUN_MAX_TOKENS", max_tokens, "200000", 1, 1000000000),
    D("LONGRUN_MAX_COST_USD", max_cost_usd, "5", 0, 100000),
    I("LONGRUN_SWEEP_INTERVAL_MS", sweep_interval_ms, "1000", 50, 600000),
    I("LONGRUN_SWEEP_BATCH", sweep_batch, "500", 1, 100000),
    I("LONGRUN_OUTBOX_GRACE_SECONDS", outbox_grace_seconds, "30", 1, 86400),
    I("LONGRUN_RETENTION_DAYS", retention_days, "30", 0, 36500),
    I("LONGRUN_TENANT_MAX_RUNNING", tenant_max_running, "0", 0, 1000000),
    I("LONGRUN_TENANT_TPM", tenant_tpm, "0", 0, 2000000000),
    I("LONGRUN_STEP_TIMEOUT_SECONDS", step_timeout_seconds, "600", 5, 86400),
    I("LONGRUN_CEILING_MAX_STEPS", ceiling_max_steps, "0", 0, 10000),
    I("LONGRUN_CEILING_MAX_TOOL_CALLS", ceiling_max_tool_calls, "0", 0, 100000),
    I("LONGRUN_CEILING_MAX_SECONDS", ceiling_max_seconds, "0", 0, 2592000),
    I("LONGRUN_CEILING_MAX_TOKENS", ceiling_max_tokens, "0", 0, 1000000000),
    D("LONGRUN_CEILING_MAX_COST_USD", ceiling_max_cost_usd, "0", 0, 100000),
    I("LONGRUN_BREAKER_FAILURES", breaker_failures, "5", 1, 1000),
    I("LONGRUN_BREAKER_OPEN_SECONDS", breaker_open_seconds, "30", 1, 3600),
    I("LONGRUN_MODEL_CONCURRENCY", model_concurrency, "0", 0, 100000),
    I("LONGRUN_LONG_WAIT_SECONDS", long_wait_seconds, "30", 1, 86400),
    D("LONGRUN_LOG_PAYLOADS", log_payloads, "0", 0, 1),
};

static const struct cfg_entry *find(const char *env) {
    for (size_t i = 0; i < sizeof(entries) / sizeof(entries[0]); i++) {
        if (strcmp(entries[i].env, env) == 0) {
            return &entries[i];
        }
    }
    return NULL;
}

static int apply(lr_config_t *cfg, const struct cfg_entry *e, const char *value, char *errbuf,
                 size_t errlen) {
    char *base = (char *)cfg + e->offset;
    char *end = NULL;
    const char *shown = (e->flags & CFG_SENSITIVE) ? "(hidden)" : value;

    if (e->type == CFG_STR) {
        if (strlen(value) >= e->size) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s: value is longer than %zu bytes",
                             e->env, e->size - 1);
        }
        memcpy(base, value, strlen(value) + 1);
        return 0;
    }
    errno = 0;
    if (e->type == CFG_INT) {
        long v = strtol(value, &end, 10);
        if (errno != 0 || end == value || *end != '\0') {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s=%s: not an integer", e->env, shown);
        }
        if ((double)v < e->min || (double)v > e->max) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s=%s: out of range [%.0f, %.0f]", e->env,
                             shown, e->min, e->max);
        }
        *(int *)(void *)base = (int)v;
        return 0;
    }
    {
        double v = strtod(value, &end);
        if (errno != 0 || end == value || *end != '\0' || !isfinite(v)) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s=%s: not a number", e->env, shown);
        }
        if (v < e->min || v > e->max) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s=%s: out of range [%g, %g]", e->env,
                             shown, e->min, e->max);
        }
        *(double *)(void *)base = v;
    }
    return 0;
}

static int validate(lr_config_t *cfg, char *errbuf, size_t errlen) {
    if (strcmp(cfg->log_format, "json") != 0 && strcmp(cfg->log_format, "text") != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "LONGRUN_LOG_FORMAT=%s: must be json or text",
                         cfg->log_format);
    }
    if (strcmp(cfg->log_level, "debug") != 0 && strcmp(cfg->log_level, "info") != 0 &&
        strcmp(cfg->log_level, "warn") != 0 && strcmp(cfg->log_level, "error") != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "LONGRUN_LOG_LEVEL=%s: must be debug, info, warn or error", cfg->log_level);
    }
    if (strncmp(cfg->amqp_url, "amqp://", 7) != 0 && strncmp(cfg->amqp_url, "amqps://", 8) != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "LONGRUN_AMQP_URL: must start with amqp:// or amqps://");
    }
    {
        /* A default budget above its ceiling is a contradiction, not a clamp. */
        static const struct {
            const char *name, *ceiling;
            size_t value, max;
        } pairs[] = {
            {"LONGRUN_MAX_STEPS", "LONGRUN_CEILING_MAX_STEPS", offsetof(lr_config_t, max_steps),
             offsetof(lr_config_t, ceiling_max_steps)},
            {"LONGRUN_MAX_TOOL_CALLS", "LONGRUN_CEILING_MAX_TOOL_CALLS", offsetof(lr_config_t, max_tool_calls),
             offsetof(lr_config_t, ceiling_max_tool_calls)},
            {"LONGRUN_MAX_SECONDS", "LONGRUN_CEILING_MAX_SECONDS", offsetof(lr_config_t, max_seconds),
             offsetof(lr_config_t, ceiling_max_seconds)},
            {"LONGRUN_MAX_TOKENS", "LONGRUN_CEILING_MAX_TOKENS", offsetof(lr_config_t, max_tokens),
             offsetof(lr_config_t, ceiling_max_tokens)},
        };
        for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++) {
            int v = *(const int *)(const void *)((const char *)cfg + pairs[i].value);
            int c = *(const int *)(const void *)((const char *)cfg + pairs[i].max);
            if (c > 0 && v > c) {
                return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s=%d: above the operator's ceiling %s=%d",
                                 pairs[i].name, v, pairs[i].ceiling, c);
            }
        }
        if (cfg->ceiling_max_cost_usd > 0 && cfg->max_cost_usd > cfg->ceiling_max_cost_usd) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG,
                             "LONGRUN_MAX_COST_USD=%g: above the operator's ceiling LONGRUN_CEILING_MAX_COST_USD=%g",
                             cfg->max_cost_usd, cfg->ceiling_max_cost_usd);
        }
    }
    if (cfg->retry_max_ms < cfg->retry_base_ms) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "LONGRUN_RETRY_MAX_MS=%d: must be >= LONGRUN_RETRY_BASE_MS (%d)",
                         cfg->retry_max_ms, cfg->retry_base_ms);
    }
    return 0;
}

int lr_config_load(lr_config_t *cfg, char *errbuf, size_t errlen) {
    int rc;
    memset(cfg, 0, sizeof(*cfg));
    for (size_t i = 0; i < sizeof(entries) / sizeof(entries[0]); i++) {
        rc = apply(cfg, &entries[i], entries[i].def, errbuf, errlen);
        if (rc != 0) {
            return rc;
        }
    }
    for (size_t i = 0; i < sizeof(entries) / sizeof(entries[0]); i++) {
        const char *v = getenv(entries[i].env);
        if (v != NULL && v[0] != '\0') {
            rc = apply(cfg, &entries[i], v, errbuf, errlen);
            if (rc != 0) {
                return rc;
            }
        }
    }
    /* LONGRUN_DATABASE_URL unset: libpq's own PG* variables if any is set,
     * else the local embedded default. */
    if (cfg->database_url[0] == '\0' && getenv("PGHOST") == NULL &&
        getenv("PGSERVICE") == NULL && getenv("PGDATABASE") == NULL && getenv("PGPORT") == NULL) {
        snprintf(cfg->database_url, sizeof(cfg->database_url), "%s", LR_DEFAULT_DATABASE_URL);
    }
    return validate(cfg, errbuf, errlen);
}

int lr_config_set(lr_config_t *cfg, const char *env_name, const char *value, char *errbuf,
                  size_t errlen) {
    const struct cfg_entry *e = find(env_name);
    int rc;
    if (e == NULL) {
        return lr_seterr(errbuf, errlen, LR_ENOTFOUND, "%s: unknown configuration variable",
                         env_name);
    }
    rc = apply(cfg, e, value, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    return validate(cfg, errbuf, errlen);
}

void lr_config_mask_url(const char *url, char *buf, size_t buflen) {
    const char *scheme = strstr(url, "://");
    const char *at, *colon;
    if (scheme == NULL) {
        /* key=value conninfo: mask password=... */
        const char *pw = strstr(url, "password=");
        if (pw == NULL) {
            snprintf(buf, buflen, "%s", url);
        } else {
            const char *end = strchr(pw, ' ');
            snprintf(buf, buflen, "%.*spassword=***%s", (int)(pw - url), url, end ? end : "");
        }
        return;
    }
    at = strchr(scheme + 3, '@');
    colon = strchr(scheme + 3, ':');
    if (at == NULL || colon == NULL || colon > at) {
        snprintf(buf, buflen, "%s", url);
        return;
    }
    snprintf(buf, buflen, "%.*s:***%s", (int)(colon - url), url, at);
}

void lr_config_print(const lr_config_t *cfg, FILE *out) {
    for (size_t i = 0; i < sizeof(entries) / sizeof(entries[0]); i++) {
        const struct cfg_entry *e = &entries[i];
        const char *base = (const char *)cfg + e->offset;
        if (e->type == CFG_STR) {
            char masked[1100];
            if (e->flags & CFG_SENSITIVE) {
                lr_config_mask_url(base, masked, sizeof(masked));
                fprintf(out, "%s=%s\n", e->env, masked);
            } else {
                fprintf(out, "%s=%s\n", e->env, base);
            }
        } else if (e->type == CFG_INT) {
            fprintf(out, "%s=%d\n", e->env, *(const int *)(const void *)base);
        } else {
            fprintf(out, "%s=%g\n", e->env, *(const double *)(const void *)base);
        }
    }
}
