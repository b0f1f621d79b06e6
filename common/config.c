/* config.c - the configuration table; see config.h. */
#include "config.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <libpq-fe.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "redact.h"

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

/* clang-format off */
#define S(env, field, def, fl) {env, CFG_STR, offsetof(lr_config_t, field), sizeof(((lr_config_t *)0)->field), def, 0, 0, fl}
#define I(env, field, def, lo, hi) {env, CFG_INT, offsetof(lr_config_t, field), 0, def, lo, hi, 0}
#define D(env, field, def, lo, hi) {env, CFG_DOUBLE, offsetof(lr_config_t, field), 0, def, lo, hi, 0}
/* clang-format on */

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
    I("LONGRUN_READY_WINDOW_SECONDS", ready_window_seconds, "60", 1, 3600),
    I("LONGRUN_READY_AUTH_MIN_CALLS", ready_auth_min_calls, "3", 1, 100000),
    I("LONGRUN_MODEL_CONCURRENCY", model_concurrency, "0", 0, 100000),
    I("LONGRUN_LONG_WAIT_SECONDS", long_wait_seconds, "30", 1, 86400),
    D("LONGRUN_LOG_PAYLOADS", log_payloads, "0", 0, 1),
    S("LONGRUN_LOG_REDACT", log_redact, "all", 0),
    S("LONGRUN_LOG_REDACT_PATTERNS", log_redact_patterns, "", 0),
    S("LONGRUN_REPLY_TO_PREFIX", reply_to_prefix, "reply.", 0),
    I("LONGRUN_ALLOW_PLAINTEXT", allow_plaintext, "0", 0, 1),
    I("LONGRUN_ALLOW_UNSAFE_DURABILITY", allow_unsafe_durability, "0", 0, 1),
    I("LONGRUN_QUEUE_MAX_LENGTH", queue_max_length, "100000", 0, 100000000),
    I("LONGRUN_MEMORY_BUDGET_MB", memory_budget_mb, "-1", -1, 1048576),
    I("LONGRUN_MAX_RESPONSE_BYTES", max_response_bytes, "8388608", 1024, 1073741824),
};

static const struct cfg_entry *find(const char *env) {
    for (size_t i = 0; i < sizeof(entries) / sizeof(entries[0]); i++) {
        if (strcmp(entries[i].env, env) == 0) {
            return &entries[i];
        }
    }
    return NULL;
}

static int apply(lr_config_t *cfg, const struct cfg_entry *e, const char *value, char *errbuf, size_t errlen) {
    char *base = (char *)cfg + e->offset;
    char *end = NULL;
    const char *shown = (e->flags & CFG_SENSITIVE) ? "(hidden)" : value;

    if (e->type == CFG_STR) {
        if (strlen(value) >= e->size) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s: value is longer than %zu bytes", e->env, e->size - 1);
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
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s=%s: out of range [%.0f, %.0f]", e->env, shown, e->min,
                             e->max);
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
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s=%s: out of range [%g, %g]", e->env, shown, e->min, e->max);
        }
        *(double *)(void *)base = v;
    }
    return 0;
}

static int validate(lr_config_t *cfg, char *errbuf, size_t errlen) {
    if (strcmp(cfg->log_format, "json") != 0 && strcmp(cfg->log_format, "text") != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "LONGRUN_LOG_FORMAT=%s: must be json or text", cfg->log_format);
    }
    if (strcmp(cfg->log_level, "debug") != 0 && strcmp(cfg->log_level, "info") != 0 &&
        strcmp(cfg->log_level, "warn") != 0 && strcmp(cfg->log_level, "error") != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "LONGRUN_LOG_LEVEL=%s: must be debug, info, warn or error",
                         cfg->log_level);
    }
    if (strncmp(cfg->amqp_url, "amqp://", 7) != 0 && strncmp(cfg->amqp_url, "amqps://", 8) != 0) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "LONGRUN_AMQP_URL: must start with amqp:// or amqps://");
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
                return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s=%d: above the operator's ceiling %s=%d", pairs[i].name,
                                 v, pairs[i].ceiling, c);
            }
        }
        if (cfg->ceiling_max_cost_usd > 0 && cfg->max_cost_usd > cfg->ceiling_max_cost_usd) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG,
                             "LONGRUN_MAX_COST_USD=%g: above the operator's ceiling LONGRUN_CEILING_MAX_COST_USD=%g",
                             cfg->max_cost_usd, cfg->ceiling_max_cost_usd);
        }
    }
    if (strcmp(cfg->reply_to_prefix, "none") != 0) {
        /* Each prefix names reply queues only: never empty (every queue) nor
           one that longrun's own queues start with. */
        for (const char *p = cfg->reply_to_prefix;; p++) {
            size_t n = strcspn(p, ",");
            if (n == 0 || strncmp(p, "longrun.", n < 8 ? n : 8) == 0) {
                return lr_seterr(errbuf, errlen, LR_ECONFIG,
                                 "LONGRUN_REPLY_TO_PREFIX=%s: %s; give comma-separated prefixes such as "
                                 "reply., or none",
                                 cfg->reply_to_prefix,
                                 n == 0 ? "an empty prefix would allow every queue"
                                        : "a prefix of longrun's own queue names (longrun.*)");
            }
            p += n;
            if (*p == '\0') {
                break;
            }
        }
    }
    {
        /* Compiled here too, so --check-config and every program refuse what
         * the worker would; each variable alone, so the error names it. */
        char why[400];
        lr_redact_t *r = NULL;
        int rc = lr_redact_new(&r, cfg->log_redact, NULL, why, sizeof(why));
        lr_redact_free(r);
        r = NULL;
        if (rc != 0) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "LONGRUN_LOG_REDACT=%s: %s", cfg->log_redact, why);
        }
        rc = lr_redact_new(&r, "none", cfg->log_redact_patterns, why, sizeof(why));
        lr_redact_free(r);
        if (rc != 0) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "LONGRUN_LOG_REDACT_PATTERNS: %s", why);
        }
    }
    if (cfg->retry_max_ms < cfg->retry_base_ms) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "LONGRUN_RETRY_MAX_MS=%d: must be >= LONGRUN_RETRY_BASE_MS (%d)",
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
    if (cfg->database_url[0] == '\0' && getenv("PGHOST") == NULL && getenv("PGSERVICE") == NULL &&
        getenv("PGDATABASE") == NULL && getenv("PGPORT") == NULL) {
        snprintf(cfg->database_url, sizeof(cfg->database_url), "%s", LR_DEFAULT_DATABASE_URL);
    }
    return validate(cfg, errbuf, errlen);
}

int lr_config_set(lr_config_t *cfg, const char *env_name, const char *value, char *errbuf, size_t errlen) {
    const struct cfg_entry *e = find(env_name);
    int rc;
    if (e == NULL) {
        return lr_seterr(errbuf, errlen, LR_ENOTFOUND, "%s: unknown configuration variable", env_name);
    }
    rc = apply(cfg, e, value, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    return validate(cfg, errbuf, errlen);
}

/* ---- secret masking -------------------------------------------------------
 *
 * Secrets are found by the parsers that will read the text, not by patterns:
 *
 *   - A PostgreSQL conninfo (a postgres[ql]:// URI or key=value pairs) is
 *     parsed by libpq's own PQconninfoParse; the options libpq itself marks
 *     as secret (dispchar "*": password, sslpassword) are the secrets.  The
 *     text is masked in place, then parsed again: it is kept only if libpq
 *     reads it as the original with every secret "***" (and every other value
 *     masked in turn, for a dbname that is itself a conninfo); otherwise
 *     libpq's parse is printed as key=value, which is right by construction.
 *   - Any other URL is parsed by libcurl's URL API: the userinfo password
 *     and credential-like query and fragment parameters are replaced, and
 *     the URL is rebuilt by curl.
 *   - In free text (an error message), every URL is masked as above, and
 *     each of libpq's secret keywords (and its PG* variable) followed by '='
 *     has its value, lexed as libpq lexes it (quotes, backslash escapes),
 *     replaced.
 *
 * What cannot be parsed but could hold a credential (it has an '@', '?' or
 * '#') is masked whole: masking fails closed.  Text that holds no secret is
 * copied byte for byte.
 */

#define MASK "***"
#define MASK_MAX_NAMES 8
#define MASK_MAX_DEPTH 4

/* libpq's secret keywords and their environment variables, from libpq's
 * own option table, read once. */
static struct {
    char name[MASK_MAX_NAMES][32];
    bool keyword[MASK_MAX_NAMES]; /* a conninfo keyword (else a PG* variable) */
    int n;
} pq_secrets;
static pthread_once_t pq_secrets_once = PTHREAD_ONCE_INIT;

static void pq_secret_add(const char *name, bool keyword) {
    if (pq_secrets.n < MASK_MAX_NAMES && strlen(name) < sizeof(pq_secrets.name[0])) {
        snprintf(pq_secrets.name[pq_secrets.n], sizeof(pq_secrets.name[0]), "%s", name);
        pq_secrets.keyword[pq_secrets.n++] = keyword;
    }
}

static void pq_secrets_init(void) {
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse("", &err);
    PQfreemem(err);
    if (opts == NULL) {
        /* out of memory: libpq 15's own list */
        pq_secret_add("password", true);
        pq_secret_add("sslpassword", true);
        pq_secret_add("PGPASSWORD", false);
        return;
    }
    for (const PQconninfoOption *o = opts; o->keyword != NULL; o++) {
        if (o->dispchar != NULL && o->dispchar[0] == '*') {
            pq_secret_add(o->keyword, true);
            if (o->envvar != NULL) {
                pq_secret_add(o->envvar, false);
            }
        }
    }
    PQconninfoFree(opts);
}

static bool pq_secret_keyword(const char *kw) {
    pthread_once(&pq_secrets_once, pq_secrets_init);
    for (int i = 0; i < pq_secrets.n; i++) {
        if (pq_secrets.keyword[i] && strcmp(pq_secrets.name[i], kw) == 0) {
            return true;
        }
    }
    return false;
}

/* Where masked text goes: cut at cap - 1 bytes, always NUL-terminated. */
typedef struct mask_out {
    char *p;
    size_t cap;
    size_t len;
} mask_out_t;

static void out_put(mask_out_t *o, const char *s, size_t n) {
    if (o->cap == 0) {
        return;
    }
    if (n > o->cap - 1 - o->len) {
        n = o->cap - 1 - o->len;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
    o->p[o->len] = '\0';
}

static void out_puts(mask_out_t *o, const char *s) { out_put(o, s, strlen(s)); }

/* A heap buffer with room for s masked: every secret becomes "***", so the
 * text grows by at most 3 bytes per 2 input bytes; curl may add a '/'. */
static bool out_alloc(mask_out_t *o, const char *s) {
    o->cap = strlen(s) * 2 + 64;
    o->len = 0;
    o->p = malloc(o->cap);
    if (o->p != NULL) {
        o->p[0] = '\0';
    }
    return o->p != NULL;
}

static void mask_any(mask_out_t *o, const char *s, int depth);
static void mask_text(mask_out_t *o, const char *s, int depth);

/* Query and fragment parameters that carry credentials: libpq's secret
 * keywords, and the names (alone or after '_', '-' or '.') that APIs use for
 * passwords, tokens, keys and signatures.  Compared percent-decoded,
 * ignoring case. */
static const char *const secret_words[] = {"password", "passwd", "pwd",  "pass", "secret",    "token",
                                           "key",      "apikey", "auth", "sig",  "signature", "credential"};

static int hexval(int c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

static bool secret_param(const char *name, size_t n) {
    char low[128];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)name[i];
        if (c == '%' && i + 2 < n && hexval(name[i + 1]) >= 0 && hexval(name[i + 2]) >= 0) {
            c = hexval(name[i + 1]) * 16 + hexval(name[i + 2]);
            i += 2;
        }
        if (k == sizeof(low) - 1) {
            return true; /* longer than any name here: fail closed */
        }
        low[k++] = (char)tolower(c);
    }
    low[k] = '\0';
    pthread_once(&pq_secrets_once, pq_secrets_init);
    for (int i = 0; i < pq_secrets.n; i++) {
        if (pq_secrets.keyword[i] && strcasecmp(pq_secrets.name[i], low) == 0) {
            return true;
        }
    }
    for (size_t i = 0; i < sizeof(secret_words) / sizeof(secret_words[0]); i++) {
        size_t wl = strlen(secret_words[i]);
        if (strcmp(low, secret_words[i]) == 0 ||
            (k > wl && strcmp(low + k - wl, secret_words[i]) == 0 && strchr("_-.", low[k - wl - 1]) != NULL)) {
            return true;
        }
    }
    return false;
}

/* The &-separated parameters of s with each secret value replaced;
 * *changed: whether one was.  malloc'd; NULL on out of memory. */
static char *mask_params(const char *s, bool *changed) {
    mask_out_t o;
    *changed = false;
    if (!out_alloc(&o, s)) {
        return NULL;
    }
    for (const char *p = s;;) {
        size_t n = strcspn(p, "&");
        const char *eq = memchr(p, '=', n);
        if (eq != NULL && secret_param(p, (size_t)(eq - p))) {
            out_put(&o, p, (size_t)(eq - p) + 1);
            out_puts(&o, MASK);
            *changed = true;
        } else {
            out_put(&o, p, n);
        }
        if (p[n] == '\0') {
            break;
        }
        out_put(&o, "&", 1);
        p += n + 1;
    }
    return o.p;
}

/* A URL no parser took: copied if it cannot hold a credential (no
 * userinfo, query or fragment), else its scheme and "***". */
static void mask_unparsed_url(mask_out_t *o, const char *url) {
    const char *sep = strstr(url, "://");
    if (strpbrk(url, "@?#") == NULL || sep == NULL) {
        out_puts(o, sep == NULL ? MASK : url);
        return;
    }
    out_put(o, url, (size_t)(sep - url) + 3);
    out_puts(o, MASK);
}

/* Masks a URL with libcurl's parser. */
static void mask_curl_url(mask_out_t *o, const char *url) {
    static const CURLUPart parts[] = {CURLUPART_QUERY, CURLUPART_FRAGMENT};
    CURLU *u = curl_url();
    char *part = NULL, *full = NULL, *masked = NULL;
    bool secret = false, changed = false;

    if (u == NULL || curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME | CURLU_PATH_AS_IS) != CURLUE_OK) {
        mask_unparsed_url(o, url);
        goto out;
    }
    if (curl_url_get(u, CURLUPART_PASSWORD, &part, 0) == CURLUE_OK) {
        secret = true;
        if (curl_url_set(u, CURLUPART_PASSWORD, MASK, 0) != CURLUE_OK) {
            goto fail;
        }
    }
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        curl_free(part);
        part = NULL;
        if (curl_url_get(u, parts[i], &part, 0) != CURLUE_OK) {
            continue;
        }
        masked = mask_params(part, &changed);
        if (masked == NULL || (changed && curl_url_set(u, parts[i], masked, 0) != CURLUE_OK)) {
            goto fail;
        }
        secret = secret || changed;
        free(masked);
        masked = NULL;
    }
    if (!secret) {
        out_puts(o, url);
        goto out;
    }
    if (curl_url_get(u, CURLUPART_URL, &full, 0) != CURLUE_OK) {
        goto fail;
    }
    out_puts(o, full);
    goto out;
fail:
    out_put(o, url, strcspn(url, ":"));
    out_puts(o, "://" MASK);
out:
    free(masked);
    curl_free(part);
    curl_free(full);
    curl_url_cleanup(u);
}

static bool pg_uri(const char *s) { return strncmp(s, "postgresql://", 13) == 0 || strncmp(s, "postgres://", 11) == 0; }

/* value in conninfo syntax: quoted when empty or holding a space, a quote or
 * a backslash (each escaped with a backslash). */
static void put_conninfo_value(mask_out_t *o, const char *v) {
    if (v[0] != '\0' && strpbrk(v, " \t\n\r\f\v'\\") == NULL) {
        out_puts(o, v);
        return;
    }
    out_put(o, "'", 1);
    for (; *v != '\0'; v++) {
        if (*v == '\'' || *v == '\\') {
            out_put(o, "\\", 1);
        }
        out_put(o, v, 1);
    }
    out_put(o, "'", 1);
}

/* s, which libpq parsed as opts, masked; see the comment at the top. */
static void mask_pg(mask_out_t *o, const char *s, const PQconninfoOption *opts, int depth) {
    size_t n = 0;
    char **want = NULL;
    mask_out_t cand = {NULL, 0, 0};
    PQconninfoOption *again = NULL;
    char *err = NULL;
    bool changed = false, same;

    while (opts[n].keyword != NULL) {
        n++;
    }
    want = calloc(n + 1, sizeof(*want));
    if (want == NULL) {
        out_puts(o, MASK);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        mask_out_t v;
        if (opts[i].val == NULL) {
            continue;
        }
        if (!out_alloc(&v, opts[i].val)) {
            goto fail;
        }
        if (pq_secret_keyword(opts[i].keyword)) {
            out_puts(&v, MASK);
        } else {
            mask_any(&v, opts[i].val, depth + 1);
        }
        want[i] = v.p;
        changed = changed || strcmp(v.p, opts[i].val) != 0;
    }
    if (!changed) {
        out_puts(o, s);
        goto out;
    }
    if (!out_alloc(&cand, s)) {
        goto fail;
    }
    if (pg_uri(s)) {
        mask_curl_url(&cand, s);
    } else {
        mask_text(&cand, s, depth + 1);
    }
    again = PQconninfoParse(cand.p, &err);
    same = again != NULL;
    for (size_t i = 0; same && i < n; i++) {
        const char *a = again[i].val, *w = want[i];
        same = again[i].keyword != NULL && strcmp(again[i].keyword, opts[i].keyword) == 0 &&
               (a == NULL ? w == NULL : w != NULL && strcmp(a, w) == 0);
    }
    if (same) {
        out_puts(o, cand.p);
        goto out;
    }
    /* libpq reads the masked text differently: print its parse instead */
    for (size_t i = 0, k = 0; i < n; i++) {
        if (want[i] != NULL) {
            if (k++ > 0) {
                out_put(o, " ", 1);
            }
            out_puts(o, opts[i].keyword);
            out_put(o, "=", 1);
            put_conninfo_value(o, want[i]);
        }
    }
    goto out;
fail:
    out_puts(o, MASK);
out:
    PQfreemem(err);
    PQconninfoFree(again);
    free(cand.p);
    for (size_t i = 0; i < n; i++) {
        free(want[i]);
    }
    free(want);
}

/* Masks s with mask_pg if libpq parses it as a conninfo; false if not. */
static bool mask_conninfo(mask_out_t *o, const char *s, int depth) {
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(s, &err);
    PQfreemem(err);
    if (opts == NULL) {
        return false;
    }
    mask_pg(o, s, opts, depth);
    PQconninfoFree(opts);
    return true;
}

/* One URL: a PostgreSQL URI that libpq parses goes through mask_pg, any
 * other through curl. */
static void mask_url(mask_out_t *o, const char *url, int depth) {
    if (pg_uri(url) && mask_conninfo(o, url, depth)) {
        return;
    }
    mask_curl_url(o, url);
}

static bool scheme_char(int c) { return isalnum(c) || c == '+' || c == '-' || c == '.'; }

/* Length of the URL starting at s[i] ("scheme://..." up to a space, a quote
 * or a bracket, without trailing punctuation), or 0. */
static size_t url_at(const char *s, size_t i) {
    size_t j = i, end;
    if (!isalpha((unsigned char)s[i]) || (i > 0 && scheme_char((unsigned char)s[i - 1]))) {
        return 0;
    }
    while (scheme_char((unsigned char)s[j])) {
        j++;
    }
    if (j - i < 2 || strncmp(s + j, "://", 3) != 0) {
        return 0;
    }
    end = j + 3;
    while (s[end] != '\0' && !isspace((unsigned char)s[end]) && !iscntrl((unsigned char)s[end]) &&
           strchr("\"'<>`\\", s[end]) == NULL) {
        end++;
    }
    while (end > j + 3 && strchr(",.;:!)]}", s[end - 1]) != NULL) {
        end--;
    }
    return end - i;
}

/* Length of "KEYWORD =" (a libpq secret keyword or its PG* variable, any
 * case, then '=' with optional spaces around it) at s[i], or 0. */
static size_t secret_key_at(const char *s, size_t i) {
    if (i > 0 && (isalnum((unsigned char)s[i - 1]) || s[i - 1] == '_')) {
        return 0;
    }
    pthread_once(&pq_secrets_once, pq_secrets_init);
    for (int k = 0; k < pq_secrets.n; k++) {
        size_t n = strlen(pq_secrets.name[k]);
        if (strncasecmp(s + i, pq_secrets.name[k], n) == 0) {
            while (s[i + n] == ' ' || s[i + n] == '\t') {
                n++;
            }
            if (s[i + n] == '=') {
                n++;
                while (isspace((unsigned char)s[i + n])) {
                    n++;
                }
                return n;
            }
        }
    }
    return 0;
}

/* Length of the conninfo value at s (libpq's lexing: 'quoted' with
 * backslash escapes, or up to white space with backslash escapes). */
static size_t conninfo_value_len(const char *s) {
    size_t n = 0;
    if (s[0] == '\'') {
        for (n = 1; s[n] != '\0' && s[n] != '\''; n++) {
            if (s[n] == '\\' && s[n + 1] != '\0') {
                n++;
            }
        }
        return s[n] == '\'' ? n + 1 : n;
    }
    for (; s[n] != '\0' && !isspace((unsigned char)s[n]); n++) {
        if (s[n] == '\\' && s[n + 1] != '\0') {
            n++;
        }
    }
    return n;
}

/* Free text: URLs and secret conninfo values masked, the rest copied. */
static void mask_text(mask_out_t *o, const char *s, int depth) {
    size_t i = 0, plain = 0;
    while (s[i] != '\0') {
        size_t k = secret_key_at(s, i), u = k == 0 ? url_at(s, i) : 0;
        if (k == 0 && u == 0) {
            i++;
            continue;
        }
        out_put(o, s + plain, i - plain);
        if (k > 0) {
            out_put(o, s + i, k);
            out_puts(o, MASK);
            i += k + conninfo_value_len(s + i + k);
        } else {
            char *url = strndup(s + i, u);
            if (url == NULL) {
                out_puts(o, MASK);
            } else {
                mask_url(o, url, depth + 1);
                free(url);
            }
            i += u;
        }
        plain = i;
    }
    out_put(o, s + plain, i - plain);
}

/* Could s hold a secret at all: a URL, or one of libpq's secret names. */
static bool maybe_secret(const char *s) {
    if (strstr(s, "://") != NULL) {
        return true;
    }
    pthread_once(&pq_secrets_once, pq_secrets_init);
    for (int k = 0; k < pq_secrets.n; k++) {
        if (strcasestr(s, pq_secrets.name[k]) != NULL) {
            return true;
        }
    }
    return false;
}

/* Any text: a whole key=value conninfo, else free text (which may be one
 * URL).  depth bounds the recursion through conninfo values. */
static void mask_any(mask_out_t *o, const char *s, int depth) {
    if (depth > MASK_MAX_DEPTH) {
        out_puts(o, MASK);
        return;
    }
    if (!maybe_secret(s)) {
        out_puts(o, s);
        return;
    }
    if (strchr(s, '=') != NULL && !pg_uri(s) && mask_conninfo(o, s, depth)) {
        return;
    }
    mask_text(o, s, depth);
}

size_t lr_config_mask_secrets(const char *text, char *buf, size_t buflen) {
    mask_out_t o = {buf, buflen, 0};
    if (buflen > 0) {
        buf[0] = '\0';
    }
    if (text != NULL) {
        mask_any(&o, text, 0);
    }
    return o.len;
}

void lr_config_print(const lr_config_t *cfg, FILE *out) {
    for (size_t i = 0; i < sizeof(entries) / sizeof(entries[0]); i++) {
        const struct cfg_entry *e = &entries[i];
        const char *base = (const char *)cfg + e->offset;
        if (e->type == CFG_STR) {
            char masked[2200];
            if (e->flags & CFG_SENSITIVE) {
                (void)lr_config_mask_secrets(base, masked, sizeof(masked));
                fprintf(out, "%s=%s\n", e->env, masked);
            } else {
                /* one line per variable: a newline (LONGRUN_LOG_REDACT_PATTERNS) as \n */
                fprintf(out, "%s=", e->env);
                for (const char *p = base; *p != '\0'; p++) {
                    if (*p == '\n') {
                        fputs("\\n", out);
                    } else {
                        fputc(*p, out);
                    }
                }
                fputc('\n', out);
            }
        } else if (e->type == CFG_INT) {
            fprintf(out, "%s=%d\n", e->env, *(const int *)(const void *)base);
        } else {
            fprintf(out, "%s=%g\n", e->env, *(const double *)(const void *)base);
        }
    }
}
