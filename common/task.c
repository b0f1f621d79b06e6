/* task.c - validation of task message bodies; see task.h and
 * docs/task-contract.md.  Every error names the offending field. */
#include "task.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

static const struct budget_def {
    const char *name;
    double min, max;
    bool integer;
} budget_defs[] = {
    {"max_steps", 1, 10000, true},
    {"max_tool_calls", 0, 100000, true},
    {"max_tokens", 1, 1e9, true},
    {"max_cost_usd", 0, 100000, false},
    {"max_seconds", 1, 2592000, true},
};

void lr_budgets_init(lr_budgets_t *b) {
    b->max_steps = -1;
    b->max_tool_calls = -1;
    b->max_tokens = -1;
    b->max_cost_usd = -1;
    b->max_seconds = -1;
}

int lr_budget_set(lr_budgets_t *b, const char *name, double v, char *errbuf, size_t errlen) {
    for (size_t i = 0; i < sizeof(budget_defs) / sizeof(budget_defs[0]); i++) {
        const struct budget_def *d = &budget_defs[i];
        if (strcmp(d->name, name) != 0) {
            continue;
        }
        if (!isfinite(v) || v < d->min || v > d->max) {
            return lr_seterr(errbuf, errlen, LR_EINVAL, "budgets.%s: %g is out of range [%g, %g]",
                             name, v, d->min, d->max);
        }
        if (d->integer && v != floor(v)) {
            return lr_seterr(errbuf, errlen, LR_EINVAL, "budgets.%s: must be an integer, got %g",
                             name, v);
        }
        switch (i) {
        case 0: b->max_steps = (long)v; break;
        case 1: b->max_tool_calls = (long)v; break;
        case 2: b->max_tokens = (long)v; break;
        case 3: b->max_cost_usd = v; break;
        default: b->max_seconds = (long)v; break;
        }
        return 0;
    }
    return lr_seterr(errbuf, errlen, LR_EINVAL,
                     "budgets.%s: unknown budget (known: max_steps, max_tool_calls, max_tokens, "
                     "max_cost_usd, max_seconds)",
                     name);
}

char *lr_budgets_to_json(const lr_budgets_t *b) {
    cJSON *o = cJSON_CreateObject();
    char *s = NULL;
    if (o == NULL) {
        return NULL;
    }
    if (b->max_steps >= 0) {
        cJSON_AddNumberToObject(o, "max_steps", (double)b->max_steps);
    }
    if (b->max_tool_calls >= 0) {
        cJSON_AddNumberToObject(o, "max_tool_calls", (double)b->max_tool_calls);
    }
    if (b->max_tokens >= 0) {
        cJSON_AddNumberToObject(o, "max_tokens", (double)b->max_tokens);
    }
    if (b->max_cost_usd >= 0) {
        cJSON_AddNumberToObject(o, "max_cost_usd", b->max_cost_usd);
    }
    if (b->max_seconds >= 0) {
        cJSON_AddNumberToObject(o, "max_seconds", (double)b->max_seconds);
    }
    s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

bool lr_uuid_valid(const char *s) {
    if (s == NULL || strlen(s) != LR_UUID_LEN) {
        return false;
    }
    for (int i = 0; i < LR_UUID_LEN; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-') {
                return false;
            }
        } else if (!isxdigit((unsigned char)s[i])) {
            return false;
        }
    }
    return true;
}

int lr_uuid_v4(char out[LR_UUID_LEN + 1]) {
    unsigned char b[16];
    if (getrandom(b, sizeof(b), 0) != (ssize_t)sizeof(b)) {
        return LR_EIO;
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    snprintf(out, LR_UUID_LEN + 1,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
             b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
             b[15]);
    return 0;
}

bool lr_name_valid(const char *s) {
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n > LR_TASK_MAX_AGENT) {
        return false;
    }
    if (!(islower((unsigned char)s[0]) || isdigit((unsigned char)s[0]))) {
        return false;
    }
    for (size_t i = 1; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(islower(c) || isdigit(c) || c == '_' || c == '.' || c == '-')) {
            return false;
        }
    }
    return true;
}

static bool digits(const char *s, int n) {
    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i])) {
            return false;
        }
    }
    return true;
}

bool lr_rfc3339_valid(const char *s) {
    size_t n = s != NULL ? strlen(s) : 0;
    const char *p;
    if (n < 20 || n > 40) {
        return false;
    }
    if (!digits(s, 4) || s[4] != '-' || !digits(s + 5, 2) || s[7] != '-' || !digits(s + 8, 2) ||
        (s[10] != 'T' && s[10] != 't' && s[10] != ' ') || !digits(s + 11, 2) || s[13] != ':' ||
        !digits(s + 14, 2) || s[16] != ':' || !digits(s + 17, 2)) {
        return false;
    }
    p = s + 19;
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p)) {
            return false;
        }
        while (isdigit((unsigned char)*p)) {
            p++;
        }
    }
    if ((*p == 'Z' || *p == 'z') && p[1] == '\0') {
        return true;
    }
    return (*p == '+' || *p == '-') && digits(p + 1, 2) && p[3] == ':' && digits(p + 4, 2) &&
           p[6] == '\0';
}

static int json_depth(const cJSON *j) {
    int max = 0;
    for (const cJSON *c = j->child; c != NULL; c = c->next) {
        int d = json_depth(c);
        if (d > max) {
            max = d;
        }
    }
    return (cJSON_IsArray(j) || cJSON_IsObject(j)) ? max + 1 : 0;
}

/* Depth check without recursion blow-up: cJSON itself refuses nesting beyond
 * CJSON_NESTING_LIMIT (1000), so the recursion above is bounded. */

static const char *const known_keys[] = {"id",       "agent",    "input",        "budgets",
                                         "deadline", "tenant",   "metadata",     "callback_url",
                                         "max_attempts", NULL};

int lr_task_parse(const char *body, size_t len, lr_task_msg_t *out, char *errbuf, size_t errlen) {
    int rc = 0;
    cJSON *root = NULL;
    const cJSON *f;
    const char *end = NULL;
    int nkeys = 0;

    memset(out, 0, sizeof(*out));
    lr_budgets_init(&out->budgets);
    out->max_attempts = -1;
    if (len > LR_TASK_MAX_BODY) {
        return lr_seterr(errbuf, errlen, LR_ETOOBIG,
                         "message body is %zu bytes, over the limit of %d bytes", len,
                         LR_TASK_MAX_BODY);
    }
    if (len == 0) {
        return lr_seterr(errbuf, errlen, LR_EPARSE, "message body is empty, expected a JSON object");
    }
    if (memmem(body, len, "\\u0000", 6) != NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL,
                         "message body contains \\u0000, which PostgreSQL cannot store in JSON");
    }
    root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (root == NULL) {
        size_t off = (end != NULL && end >= body) ? (size_t)(end - body) : 0;
        return lr_seterr(errbuf, errlen, LR_EPARSE, "message body is not valid JSON (error near byte %zu)",
                         off);
    }
    if (end != NULL) {
        while ((size_t)(end - body) < len && isspace((unsigned char)*end)) {
            end++;
        }
        if ((size_t)(end - body) < len) { /* a NUL byte is trailing data too */
            rc = lr_seterr(errbuf, errlen, LR_EPARSE,
                           "message body has trailing data after the JSON value (byte %zu)",
                           (size_t)(end - body));
            goto out;
        }
    }
    if (!cJSON_IsObject(root)) {
        rc = lr_seterr(errbuf, errlen, LR_EINVAL, "message body must be a JSON object");
        goto out;
    }
    if (json_depth(root) > LR_TASK_MAX_DEPTH) {
        rc = lr_seterr(errbuf, errlen, LR_ETOOBIG, "message body nests deeper than %d levels",
                       LR_TASK_MAX_DEPTH);
        goto out;
    }
    for (f = root->child; f != NULL; f = f->next) {
        bool known = false;
        nkeys++;
        for (int i = 0; known_keys[i] != NULL; i++) {
            if (strcmp(f->string, known_keys[i]) == 0) {
                known = true;
            }
        }
        if (!known) {
            rc = lr_seterr(errbuf, errlen, LR_EINVAL, "unknown field \"%.64s\"", f->string);
            goto out;
        }
    }

    f = cJSON_GetObjectItemCaseSensitive(root, "id");
    if (f != NULL) {
        if (!cJSON_IsString(f) || !lr_uuid_valid(f->valuestring)) {
            rc = lr_seterr(errbuf, errlen, LR_EINVAL,
                           "id: must be a UUID string like 7f1c1a52-8f3e-4c2b-9b7a-1e2d3c4b5a69");
            goto out;
        }
        out->has_id = true;
        for (int i = 0; i <= LR_UUID_LEN; i++) {
            out->id[i] = (char)tolower((unsigned char)f->valuestring[i]);
        }
    }
    if (nkeys == 1 && out->has_id) {
        out->continuation = true;
        out->root = root;
        return 0;
    }

    f = cJSON_GetObjectItemCaseSensitive(root, "agent");
    if (f == NULL) {
        rc = lr_seterr(errbuf, errlen, LR_EINVAL, "agent: required field is missing");
        goto out;
    }
    if (!cJSON_IsString(f) || !lr_name_valid(f->valuestring)) {
        rc = lr_seterr(errbuf, errlen, LR_EINVAL,
                       "agent: must be a string matching ^[a-z0-9][a-z0-9_.-]{0,63}$");
        goto out;
    }
    out->agent = f->valuestring;

    f = cJSON_GetObjectItemCaseSensitive(root, "input");
    if (f == NULL || cJSON_IsNull(f)) {
        rc = lr_seterr(errbuf, errlen, LR_EINVAL, "input: required field is missing");
        goto out;
    }
    if (!cJSON_IsObject(f) && !cJSON_IsString(f) && !cJSON_IsArray(f)) {
        rc = lr_seterr(errbuf, errlen, LR_EINVAL, "input: must be an object, an array or a string");
        goto out;
    }
    out->input = f;

    f = cJSON_GetObjectItemCaseSensitive(root, "budgets");
    if (f != NULL) {
        if (!cJSON_IsObject(f)) {
            rc = lr_seterr(errbuf, errlen, LR_EINVAL, "budgets: must be an object");
            goto out;
        }
        for (const cJSON *b = f->child; b != NULL; b = b->next) {
            if (!cJSON_IsNumber(b)) {
                rc = lr_seterr(errbuf, errlen, LR_EINVAL, "budgets.%.64s: must be a number",
                               b->string);
                goto out;
            }
            rc = lr_budget_set(&out->budgets, b->string, b->valuedouble, errbuf, errlen);
            if (rc != 0) {
                goto out;
            }
        }
    }

    f = cJSON_GetObjectItemCaseSensitive(root, "max_attempts");
    if (f != NULL) {
        if (!cJSON_IsNumber(f) || f->valuedouble != floor(f->valuedouble) || f->valuedouble < 1 ||
            f->valuedouble > 100) {
            rc = lr_seterr(errbuf, errlen, LR_EINVAL, "max_attempts: must be an integer in [1, 100]");
            goto out;
        }
        out->max_attempts = (int)f->valuedouble;
    }

    f = cJSON_GetObjectItemCaseSensitive(root, "deadline");
    if (f != NULL) {
        if (!cJSON_IsString(f) || !lr_rfc3339_valid(f->valuestring)) {
            rc = lr_seterr(errbuf, errlen, LR_EINVAL,
                           "deadline: must be an RFC 3339 timestamp like 2026-11-22T10:00:00Z");
            goto out;
        }
        out->deadline = f->valuestring;
    }

    f = cJSON_GetObjectItemCaseSensitive(root, "tenant");
    if (f != NULL) {
        size_t n;
        bool ok = cJSON_IsString(f);
        n = ok ? strlen(f->valuestring) : 0;
        ok = ok && n >= 1 && n <= LR_TASK_MAX_TENANT;
        for (size_t i = 0; ok && i < n; i++) {
            unsigned char c = (unsigned char)f->valuestring[i];
            ok = isalnum(c) || c == '_' || c == '.' || c == '-' || c == ':';
        }
        if (!ok) {
            rc = lr_seterr(errbuf, errlen, LR_EINVAL,
                           "tenant: must be 1-64 characters of [A-Za-z0-9_.:-]");
            goto out;
        }
        out->tenant = f->valuestring;
    }

    f = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (f != NULL) {
        char *s;
        size_t n;
        if (!cJSON_IsObject(f)) {
            rc = lr_seterr(errbuf, errlen, LR_EINVAL, "metadata: must be an object");
            goto out;
        }
        s = cJSON_PrintUnformatted(f);
        if (s == NULL) {
            rc = LR_ENOMEM;
            goto out;
        }
        n = strlen(s);
        free(s);
        if (n > LR_TASK_MAX_METADATA) {
            rc = lr_seterr(errbuf, errlen, LR_ETOOBIG, "metadata: %zu bytes, over the limit of %d",
                           n, LR_TASK_MAX_METADATA);
            goto out;
        }
        out->metadata = f;
    }

    f = cJSON_GetObjectItemCaseSensitive(root, "callback_url");
    if (f != NULL) {
        if (!cJSON_IsString(f) || strlen(f->valuestring) > LR_TASK_MAX_URL ||
            (strncmp(f->valuestring, "http://", 7) != 0 &&
             strncmp(f->valuestring, "https://", 8) != 0)) {
            rc = lr_seterr(errbuf, errlen, LR_EINVAL,
                           "callback_url: must be an http:// or https:// URL of at most %d bytes",
                           LR_TASK_MAX_URL);
            goto out;
        }
        out->callback_url = f->valuestring;
    }
    out->root = root;
    return 0;
out:
    cJSON_Delete(root);
    memset(out, 0, sizeof(*out));
    return rc;
}

void lr_task_msg_free(lr_task_msg_t *m) {
    if (m == NULL) {
        return;
    }
    cJSON_Delete(m->root);
    memset(m, 0, sizeof(*m));
}

char *lr_outcome_json(const char *id, const char *status, const char *result_json, const char *error,
                      const char *stop_reason, long steps, long tokens_in, long tokens_out, double cost_usd) {
    cJSON *o = cJSON_CreateObject();
    cJSON *usage;
    char *text;
    if (o == NULL) {
        return NULL;
    }
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "status", status);
    if (result_json != NULL) {
        cJSON *res = cJSON_Parse(result_json);
        cJSON_AddItemToObject(o, "result", res != NULL ? res : cJSON_CreateString(result_json));
    } else {
        cJSON_AddNullToObject(o, "result");
    }
    if (error != NULL && error[0] != '\0') {
        cJSON_AddStringToObject(o, "error", error);
    } else {
        cJSON_AddNullToObject(o, "error");
    }
    if (stop_reason != NULL && stop_reason[0] != '\0') {
        cJSON_AddStringToObject(o, "stop_reason", stop_reason);
    } else {
        cJSON_AddNullToObject(o, "stop_reason");
    }
    usage = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(usage, "steps", (double)steps);
    cJSON_AddNumberToObject(usage, "tokens_in", (double)tokens_in);
    cJSON_AddNumberToObject(usage, "tokens_out", (double)tokens_out);
    cJSON_AddNumberToObject(usage, "cost_usd", cost_usd);
    text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return text;
}
