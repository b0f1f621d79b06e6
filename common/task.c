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
    {"max_steps", 1, 10000, true},      {"max_tool_calls", 0, 100000, true}, {"max_tokens", 1, 1e9, true},
    {"max_cost_usd", 0, 100000, false}, {"max_seconds", 1, 2592000, true},
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
            return lr_seterr(errbuf, errlen, LR_EINVAL, "budgets.%s: %g is out of range [%g, %g]", name, v, d->min,
                             d->max);
        }
        if (d->integer && v != floor(v)) {
            return lr_seterr(errbuf, errlen, LR_EINVAL, "budgets.%s: must be an integer, got %g", name, v);
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
    snprintf(out, LR_UUID_LEN + 1, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
             b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
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
        (s[10] != 'T' && s[10] != 't' && s[10] != ' ') || !digits(s + 11, 2) || s[13] != ':' || !digits(s + 14, 2) ||
        s[16] != ':' || !digits(s + 17, 2)) {
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
    return (*p == '+' || *p == '-') && digits(p + 1, 2) && p[3] == ':' && digits(p + 4, 2) && p[6] == '\0';
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

/* One parse in progress: the message it fills and where its error goes. */
typedef struct parse {
    lr_task_msg_t *out;
    char *errbuf;
    size_t errlen;
} parse_t;

/* The checks of a body's bytes before it is parsed: its size, that it is not
 * empty, and no \u0000.  Returns 0 or the error (errbuf set). */
static int check_bytes(const parse_t *p, const char *body, size_t len) {
    if (len > LR_TASK_MAX_BODY) {
        return lr_seterr(p->errbuf, p->errlen, LR_ETOOBIG, "message body is %zu bytes, over the limit of %d bytes", len,
                         LR_TASK_MAX_BODY);
    }
    if (len == 0) {
        return lr_seterr(p->errbuf, p->errlen, LR_EPARSE, "message body is empty, expected a JSON object");
    }
    if (memmem(body, len, "\\u0000", 6) != NULL) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL,
                         "message body contains \\u0000, which PostgreSQL cannot store in JSON");
    }
    return 0;
}

/* The offset of the first byte after the JSON value that ends at end and the
 * white space after it: len when nothing else follows. */
static size_t value_end(const char *body, size_t len, const char *end) {
    while ((size_t)(end - body) < len && isspace((unsigned char)*end)) {
        end++;
    }
    return (size_t)(end - body);
}

/* The top-level fields of a full task after "id", in the order they are
 * checked (the first error wins).  check gets the field, or NULL when it is
 * absent (only for a required one), and returns 0 or the error. */
typedef int (*field_check_fn)(const parse_t *p, const cJSON *f);
typedef struct task_field {
    const char *name;
    bool required;
    field_check_fn check;
} task_field_t;

/* "id" (optional): a UUID, kept lowercased in out->id. */
static int check_id(const parse_t *p, const cJSON *root) {
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(root, "id");
    if (f == NULL) {
        return 0;
    }
    if (!cJSON_IsString(f) || !lr_uuid_valid(f->valuestring)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL,
                         "id: must be a UUID string like 7f1c1a52-8f3e-4c2b-9b7a-1e2d3c4b5a69");
    }
    p->out->has_id = true;
    for (int i = 0; i <= LR_UUID_LEN; i++) {
        p->out->id[i] = (char)tolower((unsigned char)f->valuestring[i]);
    }
    return 0;
}

static int check_agent(const parse_t *p, const cJSON *f) {
    if (f == NULL) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "agent: required field is missing");
    }
    if (!cJSON_IsString(f) || !lr_name_valid(f->valuestring)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL,
                         "agent: must be a string matching ^[a-z0-9][a-z0-9_.-]{0,63}$");
    }
    p->out->agent = f->valuestring;
    return 0;
}

/* "input": an object, an array or a string; null counts as missing. */
static int check_input(const parse_t *p, const cJSON *f) {
    if (f == NULL || cJSON_IsNull(f)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "input: required field is missing");
    }
    if (!cJSON_IsObject(f) && !cJSON_IsString(f) && !cJSON_IsArray(f)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "input: must be an object, an array or a string");
    }
    p->out->input = f;
    return 0;
}

/* "budgets": an object of numbers, each checked by lr_budget_set(). */
static int check_budgets(const parse_t *p, const cJSON *f) {
    if (!cJSON_IsObject(f)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "budgets: must be an object");
    }
    for (const cJSON *b = f->child; b != NULL; b = b->next) {
        int rc;
        if (!cJSON_IsNumber(b)) {
            return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "budgets.%.64s: must be a number", b->string);
        }
        rc = lr_budget_set(&p->out->budgets, b->string, b->valuedouble, p->errbuf, p->errlen);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

static int check_max_attempts(const parse_t *p, const cJSON *f) {
    if (!cJSON_IsNumber(f) || f->valuedouble != floor(f->valuedouble) || f->valuedouble < 1 || f->valuedouble > 100) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "max_attempts: must be an integer in [1, 100]");
    }
    p->out->max_attempts = (int)f->valuedouble;
    return 0;
}

static int check_deadline(const parse_t *p, const cJSON *f) {
    if (!cJSON_IsString(f) || !lr_rfc3339_valid(f->valuestring)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL,
                         "deadline: must be an RFC 3339 timestamp like 2026-11-22T10:00:00Z");
    }
    p->out->deadline = f->valuestring;
    return 0;
}

bool lr_tenant_valid(const char *s) {
    size_t n = strlen(s);
    bool ok = n >= 1 && n <= LR_TASK_MAX_TENANT;
    for (size_t i = 0; ok && i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        ok = isalnum(c) || c == '_' || c == '.' || c == '-' || c == ':';
    }
    return ok;
}

static int check_tenant(const parse_t *p, const cJSON *f) {
    if (!cJSON_IsString(f) || !lr_tenant_valid(f->valuestring)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "tenant: must be 1-64 characters of [A-Za-z0-9_.:-]");
    }
    p->out->tenant = f->valuestring;
    return 0;
}

/* "metadata": an object of at most LR_TASK_MAX_METADATA bytes serialized. */
static int check_metadata(const parse_t *p, const cJSON *f) {
    char *s;
    size_t n;
    if (!cJSON_IsObject(f)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "metadata: must be an object");
    }
    s = cJSON_PrintUnformatted(f);
    if (s == NULL) {
        return LR_ENOMEM;
    }
    n = strlen(s);
    free(s);
    if (n > LR_TASK_MAX_METADATA) {
        return lr_seterr(p->errbuf, p->errlen, LR_ETOOBIG, "metadata: %zu bytes, over the limit of %d", n,
                         LR_TASK_MAX_METADATA);
    }
    p->out->metadata = f;
    return 0;
}

static int check_callback_url(const parse_t *p, const cJSON *f) {
    if (!cJSON_IsString(f) || strlen(f->valuestring) > LR_TASK_MAX_URL ||
        (strncmp(f->valuestring, "http://", 7) != 0 && strncmp(f->valuestring, "https://", 8) != 0)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL,
                         "callback_url: must be an http:// or https:// URL of at most %d bytes", LR_TASK_MAX_URL);
    }
    p->out->callback_url = f->valuestring;
    return 0;
}

static const task_field_t task_fields[] = {
    {"agent", true, check_agent},        {"input", true, check_input},
    {"budgets", false, check_budgets},   {"max_attempts", false, check_max_attempts},
    {"deadline", false, check_deadline}, {"tenant", false, check_tenant},
    {"metadata", false, check_metadata}, {"callback_url", false, check_callback_url},
};
static const size_t task_fields_count = sizeof(task_fields) / sizeof(task_fields[0]);

static bool known_field(const char *name) {
    if (strcmp(name, "id") == 0) {
        return true;
    }
    for (size_t i = 0; i < task_fields_count; i++) {
        if (strcmp(name, task_fields[i].name) == 0) {
            return true;
        }
    }
    return false;
}

/* The checks of the parsed tree as a whole: an object, not nested too deep,
 * no unknown field.  Returns 0 or the error. */
static int check_tree(const parse_t *p, const cJSON *root) {
    if (!cJSON_IsObject(root)) {
        return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "message body must be a JSON object");
    }
    if (json_depth(root) > LR_TASK_MAX_DEPTH) {
        return lr_seterr(p->errbuf, p->errlen, LR_ETOOBIG, "message body nests deeper than %d levels",
                         LR_TASK_MAX_DEPTH);
    }
    for (const cJSON *f = root->child; f != NULL; f = f->next) {
        if (!known_field(f->string)) {
            return lr_seterr(p->errbuf, p->errlen, LR_EINVAL, "unknown field \"%.64s\"", f->string);
        }
    }
    return 0;
}

int lr_task_parse(const char *body, size_t len, lr_task_msg_t *out, char *errbuf, size_t errlen) {
    const parse_t p = {out, errbuf, errlen};
    int rc;
    cJSON *root = NULL;
    const char *end = NULL;
    size_t used;

    memset(out, 0, sizeof(*out));
    lr_budgets_init(&out->budgets);
    out->max_attempts = -1;
    rc = check_bytes(&p, body, len);
    if (rc != 0) {
        return rc;
    }
    root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (root == NULL) {
        size_t off = (end != NULL && end >= body) ? (size_t)(end - body) : 0;
        return lr_seterr(errbuf, errlen, LR_EPARSE, "message body is not valid JSON (error near byte %zu)", off);
    }
    used = end != NULL ? value_end(body, len, end) : len;
    if (used < len) { /* a NUL byte is trailing data too */
        rc = lr_seterr(errbuf, errlen, LR_EPARSE, "message body has trailing data after the JSON value (byte %zu)",
                       used);
        goto out;
    }
    rc = check_tree(&p, root);
    if (rc == 0) {
        rc = check_id(&p, root);
    }
    if (rc != 0) {
        goto out;
    }
    if (cJSON_GetArraySize(root) == 1 && out->has_id) {
        out->continuation = true;
        out->root = root;
        return 0;
    }
    for (size_t i = 0; i < task_fields_count; i++) {
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(root, task_fields[i].name);
        if (f == NULL && !task_fields[i].required) {
            continue;
        }
        rc = task_fields[i].check(&p, f);
        if (rc != 0) {
            goto out;
        }
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
