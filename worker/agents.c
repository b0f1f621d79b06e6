/* agents.c - loading and validating the agents file; see agents.h. */
#include "agents.h"
#include "jsonschema.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_FILE (4 * 1024 * 1024)

typedef struct registry {
    cJSON *root;
    lr_tool_def_t *tools;
    int ntools;
    lr_agent_t *agents;
    int nagents;
    lr_tenant_def_t *tenants;
    int ntenants;
    lr_mcp_conf_t mcp[LR_MCP_MAX_SERVERS];
    int nmcp;
} registry_t;

static registry_t reg;

static const lr_tool_def_t builtin_defs[] = {
    {"sleep", "Pause this task durably for the given number of seconds (no worker is held).", NULL, NULL, 0, 0, false,
     false, 0, LR_TOOL_SLEEP, NULL, 0, NULL},
    {"wait_for_event", "Pause this task until the named external event is signalled.", NULL, NULL, 0, 0, false, false,
     0, LR_TOOL_WAIT_EVENT, NULL, 0, NULL},
    {"request_approval", "Pause this task until a human approves or denies; give the reason.", NULL, NULL, 0, 0, false,
     false, 0, LR_TOOL_APPROVAL, NULL, 0, NULL},
};
static cJSON *builtin_params[3];

static int fail(char *errbuf, size_t errlen, const char *fmt, ...) LR_PRINTF(3, 4);
static int fail(char *errbuf, size_t errlen, const char *fmt, ...) {
    va_list ap;
    if (errbuf != NULL && errlen > 0) {
        va_start(ap, fmt);
        vsnprintf(errbuf, errlen, fmt, ap);
        va_end(ap);
    }
    return LR_ECONFIG;
}

/* "${VAR}" expansion of s into out (outlen bytes); its length, or -1 with
 * errbuf set.  The values are never put in an error message (secrets). */
static long expand_into(const char *s, const char *where, char *out, size_t outlen, char *errbuf, size_t errlen) {
    size_t n = 0;
    for (const char *p = s; *p != '\0';) {
        if (p[0] == '$' && p[1] == '{') {
            const char *end = strchr(p, '}');
            char var[128];
            const char *val;
            size_t vl;
            if (end == NULL || (size_t)(end - p - 2) >= sizeof(var)) {
                fail(errbuf, errlen, "%s: unterminated ${...} in \"%s\"", where, s);
                return -1;
            }
            memcpy(var, p + 2, (size_t)(end - p - 2));
            var[end - p - 2] = '\0';
            val = getenv(var);
            if (val == NULL) {
                fail(errbuf, errlen, "%s: environment variable %s (used in \"%s\") is not set", where, var, s);
                return -1;
            }
            vl = strlen(val);
            if (n + vl >= outlen) {
                fail(errbuf, errlen, "%s: too long once expanded", where);
                return -1;
            }
            memcpy(out + n, val, vl);
            n += vl;
            p = end + 1;
        } else {
            if (n + 1 >= outlen) {
                fail(errbuf, errlen, "%s: too long once expanded", where);
                return -1;
            }
            out[n++] = *p++;
        }
    }
    out[n] = '\0';
    return (long)n;
}

/* "${VAR}" expansion for URLs; malloc'd result or NULL with errbuf set. */
static char *expand(const char *s, const char *where, char *errbuf, size_t errlen) {
    char out[2048];
    long len = expand_into(s, where, out, sizeof(out), errbuf, errlen);
    size_t n;
    if (len < 0) {
        return NULL;
    }
    n = (size_t)len;
    while (n > 0 && out[n - 1] == '/') {
        out[--n] = '\0';
    }
    if (strncmp(out, "http://", 7) != 0 && strncmp(out, "https://", 8) != 0) {
        fail(errbuf, errlen, "%s: \"%s\" must be an http:// or https:// URL", where, out);
        return NULL;
    }
    return strdup(out);
}

static bool tool_name_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 64) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (!isalnum((unsigned char)s[i]) && s[i] != '_' && s[i] != '-') {
            return false;
        }
    }
    return true;
}

static int get_num(const cJSON *o, const char *key, const char *where, double min, double max, bool integer, double def,
                   double *out, char *errbuf, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (v == NULL) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < min || v->valuedouble > max ||
        (integer && v->valuedouble != floor(v->valuedouble))) {
        return fail(errbuf, errlen, "%s.%s: must be %s in [%g, %g]", where, key, integer ? "an integer" : "a number",
                    min, max);
    }
    *out = v->valuedouble;
    return 0;
}

static int get_bool(const cJSON *o, const char *key, const char *where, bool def, bool *out, char *errbuf,
                    size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (v == NULL) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v)) {
        return fail(errbuf, errlen, "%s.%s: must be true or false", where, key);
    }
    *out = cJSON_IsTrue(v);
    return 0;
}

static const char *get_str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int check_keys(const cJSON *o, const char *where, const char *const *known, char *errbuf, size_t errlen) {
    for (const cJSON *c = o->child; c != NULL; c = c->next) {
        bool ok = false;
        for (int i = 0; known[i] != NULL; i++) {
            ok = ok || strcmp(c->string, known[i]) == 0;
        }
        if (!ok) {
            return fail(errbuf, errlen, "%s: unknown field \"%s\"", where, c->string);
        }
    }
    return 0;
}

static void free_registry(registry_t *r) {
    for (int i = 0; i < r->ntools; i++) {
        free(r->tools[i].url);
    }
    for (int i = 0; i < r->nagents; i++) {
        lr_agent_t *a = &r->agents[i];
        for (int m = 0; m < a->nmodels; m++) {
            free(a->models[m].base_url);
            free(a->models[m].endpoint_key);
            free(a->models[m].endpoint_label);
        }
        free(a->models);
        free(a->tools);
    }
    for (int i = 0; i < r->nmcp; i++) {
        free(r->mcp[i].url);
        for (int h = 0; h < r->mcp[i].nheaders; h++) {
            free(r->mcp[i].headers[h]);
        }
        free(r->mcp[i].headers);
    }
    free(r->tools);
    free(r->agents);
    free(r->tenants);
    cJSON_Delete(r->root);
    memset(r, 0, sizeof(*r));
}

static int load_tools(registry_t *r, const cJSON *tools, char *errbuf, size_t errlen) {
    static const char *const known[] = {"description", "parameters",       "url",
                                        "timeout_ms",  "retries",          "requires_approval",
                                        "writes",      "max_result_bytes", NULL};
    int n = cJSON_GetArraySize(tools);
    int i = 0;
    r->tools = calloc((size_t)n + 1, sizeof(lr_tool_def_t));
    if (r->tools == NULL) {
        return LR_ENOMEM;
    }
    for (const cJSON *t = tools->child; t != NULL; t = t->next, i++) {
        lr_tool_def_t *d = &r->tools[i];
        char where[128];
        double v = 0;
        const cJSON *params;
        int rc;
        snprintf(where, sizeof(where), "tools.%s", t->string);
        r->ntools = i + 1;
        if (!tool_name_ok(t->string)) {
            return fail(errbuf, errlen, "%s: tool names are 1-64 characters of [A-Za-z0-9_-]", where);
        }
        for (size_t b = 0; b < 3; b++) {
            if (strcmp(t->string, builtin_defs[b].name) == 0) {
                return fail(errbuf, errlen, "%s: \"%s\" is a built-in tool and cannot be redefined", where, t->string);
            }
        }
        if (!cJSON_IsObject(t)) {
            return fail(errbuf, errlen, "%s: must be an object", where);
        }
        if ((rc = check_keys(t, where, known, errbuf, errlen)) != 0) {
            return rc;
        }
        d->name = t->string;
        d->description = (char *)get_str(t, "description");
        params = cJSON_GetObjectItemCaseSensitive(t, "parameters");
        if (params != NULL && !cJSON_IsObject(params)) {
            return fail(errbuf, errlen, "%s.parameters: must be a JSON Schema object", where);
        }
        if (params != NULL) {
            char serr[300];
            rc = lr_schema_check(params, serr, sizeof(serr));
            if (rc == LR_ECONFIG) {
                return fail(errbuf, errlen, "%s.parameters: %s", where, serr);
            }
            if (rc != 0) {
                return rc;
            }
        }
        d->parameters = (cJSON *)params;
        if (get_str(t, "url") == NULL) {
            return fail(errbuf, errlen, "%s.url: required (the tool's HTTP endpoint)", where);
        }
        d->url = expand(get_str(t, "url"), where, errbuf, errlen);
        if (d->url == NULL) {
            return LR_ECONFIG;
        }
        if ((rc = get_num(t, "timeout_ms", where, 100, 600000, true, 30000, &v, errbuf, errlen)) != 0) {
            return rc;
        }
        d->timeout_ms = (long)v;
        if ((rc = get_num(t, "retries", where, 0, 10, true, 2, &v, errbuf, errlen)) != 0) {
            return rc;
        }
        d->retries = (int)v;
        if ((rc = get_num(t, "max_result_bytes", where, 64, 1048576, true, 16384, &v, errbuf, errlen)) != 0) {
            return rc;
        }
        d->max_result_bytes = (long)v;
        if ((rc = get_bool(t, "requires_approval", where, false, &d->requires_approval, errbuf, errlen)) != 0 ||
            (rc = get_bool(t, "writes", where, false, &d->writes, errbuf, errlen)) != 0) {
            return rc;
        }
        d->builtin = LR_TOOL_HTTP;
    }
    return 0;
}

static const lr_tool_def_t *find_tool(const registry_t *r, const char *name) {
    for (int i = 0; i < r->ntools; i++) {
        if (strcmp(r->tools[i].name, name) == 0) {
            return &r->tools[i];
        }
    }
    for (size_t b = 0; b < 3; b++) {
        if (strcmp(builtin_defs[b].name, name) == 0) {
            return &builtin_defs[b];
        }
    }
    return NULL;
}

static int load_model(registry_t *r, const cJSON *prices, const cJSON *m, const char *where, lr_model_ref_t *out,
                      char *errbuf, size_t errlen) {
    static const char *const known[] =
        {"provider",         "base_url",    "model",       "api_key_env",         "max_tokens",
         "max_tokens_field", "temperature", "tool_choice", "parallel_tool_calls", "timeout_ms",
         "retries",          "rpm",         "tpm",         "max_concurrency",     "auth_header",
         "api_version",      NULL};
    const char *prov = get_str(m, "provider");
    const char *s;
    const cJSON *price;
    double v = 0;
    int rc;
    (void)r;
    if (!cJSON_IsObject(m)) {
        return fail(errbuf, errlen, "%s: must be an object", where);
    }
    if ((rc = check_keys(m, where, known, errbuf, errlen)) != 0) {
        return rc;
    }
    if (prov == NULL || (strcmp(prov, "openai") != 0 && strcmp(prov, "anthropic") != 0)) {
        return fail(errbuf, errlen, "%s.provider: must be \"openai\" (any OpenAI-compatible server) or \"anthropic\"",
                    where);
    }
    out->provider = strcmp(prov, "openai") == 0 ? LR_PROVIDER_OPENAI : LR_PROVIDER_ANTHROPIC;
    s = get_str(m, "model");
    if (s == NULL || s[0] == '\0') {
        return fail(errbuf, errlen, "%s.model: required", where);
    }
    out->model = (char *)s;
    s = get_str(m, "base_url");
    if (s == NULL) {
        s = out->provider == LR_PROVIDER_OPENAI ? "https://api.openai.com/v1" : "https://api.anthropic.com/v1";
    }
    out->base_url = expand(s, where, errbuf, errlen);
    if (out->base_url == NULL) {
        return LR_ECONFIG;
    }
    s = get_str(m, "api_key_env");
    if (cJSON_GetObjectItemCaseSensitive(m, "api_key_env") != NULL && (s == NULL || s[0] == '\0')) {
        return fail(errbuf, errlen, "%s.api_key_env: must name an environment variable", where);
    }
    out->api_key_env = (char *)s;
    s = get_str(m, "auth_header");
    if ((cJSON_GetObjectItemCaseSensitive(m, "auth_header") != NULL &&
         (s == NULL || (strcmp(s, "bearer") != 0 && strcmp(s, "api-key") != 0))) ||
        (s != NULL && strcmp(s, "api-key") == 0 && out->provider != LR_PROVIDER_OPENAI)) {
        return fail(errbuf, errlen,
                    "%s.auth_header: must be \"bearer\" (Authorization: Bearer, the default) or \"api-key\" "
                    "(Azure OpenAI), with provider \"openai\"",
                    where);
    }
    out->auth_api_key = s != NULL && strcmp(s, "api-key") == 0;
    s = get_str(m, "api_version");
    if (cJSON_GetObjectItemCaseSensitive(m, "api_version") != NULL) {
        bool ok = s != NULL && s[0] != '\0' && strlen(s) <= 40 && out->provider == LR_PROVIDER_OPENAI;
        for (const char *p = s; ok && *p != '\0'; p++) {
            ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
                 *p == '.';
        }
        if (!ok) {
            return fail(errbuf, errlen,
                        "%s.api_version: with provider \"openai\", 1-40 characters of [A-Za-z0-9.-] (Azure OpenAI, "
                        "e.g. \"2024-10-21\")",
                        where);
        }
    }
    out->api_version = (char *)s;
    s = get_str(m, "max_tokens_field");
    if (s != NULL && strcmp(s, "max_tokens") != 0 && strcmp(s, "max_completion_tokens") != 0) {
        return fail(errbuf, errlen, "%s.max_tokens_field: must be \"max_tokens\" or \"max_completion_tokens\"", where);
    }
    out->max_tokens_field = (char *)(s != NULL ? s : "max_completion_tokens");
    if ((rc = get_num(m, "max_tokens", where, 1, 1000000, true, out->provider == LR_PROVIDER_ANTHROPIC ? 1024 : 0, &v,
                      errbuf, errlen)) != 0) {
        return rc;
    }
    out->max_tokens = (long)v;
    if ((rc = get_num(m, "temperature", where, 0, out->provider == LR_PROVIDER_ANTHROPIC ? 1 : 2, false, -1, &v, errbuf,
                      errlen)) != 0) {
        return rc;
    }
    out->temperature = v;
    s = get_str(m, "tool_choice");
    if (s != NULL && strcmp(s, "auto") != 0 && strcmp(s, "none") != 0 && strcmp(s, "required") != 0) {
        return fail(errbuf, errlen, "%s.tool_choice: must be \"auto\", \"none\" or \"required\"", where);
    }
    out->tool_choice = (char *)s;
    {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(m, "parallel_tool_calls");
        if (p != NULL && !cJSON_IsBool(p)) {
            return fail(errbuf, errlen, "%s.parallel_tool_calls: must be true or false", where);
        }
        out->parallel_tool_calls = p == NULL ? -1 : cJSON_IsTrue(p);
    }
    if ((rc = get_num(m, "timeout_ms", where, 100, 3600000, true, 120000, &v, errbuf, errlen)) != 0) {
        return rc;
    }
    out->timeout_ms = (long)v;
    if ((rc = get_num(m, "retries", where, 0, 10, true, 2, &v, errbuf, errlen)) != 0) {
        return rc;
    }
    out->retries = (int)v;
    if ((rc = get_num(m, "rpm", where, 0, 1e7, true, 0, &v, errbuf, errlen)) != 0) {
        return rc;
    }
    out->rpm = (long)v;
    if ((rc = get_num(m, "tpm", where, 0, 1e12, true, 0, &v, errbuf, errlen)) != 0) {
        return rc;
    }
    out->tpm = (long)v;
    if ((rc = get_num(m, "max_concurrency", where, 0, 100000, true, 0, &v, errbuf, errlen)) != 0) {
        return rc;
    }
    out->max_concurrency = (int)v;
    {
        const char *pn = out->provider == LR_PROVIDER_OPENAI ? "openai" : "anthropic";
        size_t kl = strlen(pn) + strlen(out->base_url) + strlen(out->model) + 3;
        size_t ll = strlen(pn) + strlen(out->model) + 2;
        out->endpoint_key = malloc(kl);
        out->endpoint_label = malloc(ll);
        if (out->endpoint_key == NULL || out->endpoint_label == NULL) {
            return LR_ENOMEM;
        }
        snprintf(out->endpoint_key, kl, "%s %s %s", pn, out->base_url, out->model);
        snprintf(out->endpoint_label, ll, "%s/%s", pn, out->model);
    }
    price = cJSON_GetObjectItemCaseSensitive(prices, out->model);
    if (price != NULL) {
        char pw[200];
        snprintf(pw, sizeof(pw), "models.%s", out->model);
        if ((rc = get_num(price, "input_per_mtok", pw, 0, 10000, false, 0, &out->price_in, errbuf, errlen)) != 0 ||
            (rc = get_num(price, "output_per_mtok", pw, 0, 10000, false, 0, &out->price_out, errbuf, errlen)) != 0 ||
            (rc = get_num(price, "cached_input_per_mtok", pw, 0, 10000, false, out->price_in, &out->price_cached,
                          errbuf, errlen)) != 0 ||
            (rc = get_num(price, "context_tokens", pw, 0, 1e8, true, 0, &v, errbuf, errlen)) != 0) {
            return rc;
        }
        out->context_tokens = (long)v;
    }
    return 0;
}

/* agents[i].models: the fallback chain (1 to 8). */
static int agent_models(registry_t *r, const cJSON *prices, const cJSON *a, lr_agent_t *ag, const char *where,
                        char *errbuf, size_t errlen) {
    const cJSON *models;
    int rc, mi = 0;
    models = cJSON_GetObjectItemCaseSensitive(a, "models");
    if (!cJSON_IsArray(models) || cJSON_GetArraySize(models) < 1 || cJSON_GetArraySize(models) > 8) {
        return fail(errbuf, errlen, "%s.models: an array of 1 to 8 models (the fallback chain)", where);
    }
    ag->models = calloc((size_t)cJSON_GetArraySize(models), sizeof(lr_model_ref_t));
    if (ag->models == NULL) {
        return LR_ENOMEM;
    }
    for (const cJSON *m = models->child; m != NULL; m = m->next, mi++) {
        char mw[160];
        snprintf(mw, sizeof(mw), "%s.models[%d]", where, mi);
        ag->nmodels = mi + 1;
        if ((rc = load_model(r, prices, m, mw, &ag->models[mi], errbuf, errlen)) != 0) {
            return rc;
        }
    }
    return 0;
}

/* mcp_servers.<name>: an MCP server's URL, headers (with ${VAR} secrets),
 * which of its tools are exposed, and its limits. */
static int load_mcp_server(registry_t *r, const cJSON *m, lr_mcp_conf_t *c, char *errbuf, size_t errlen) {
    static const char *const known[] = {"url",    "headers",          "allow",    "deny", "timeout_ms",
                                        "prefix", "max_result_bytes", "$comment", NULL};
    char where[128], hw[256];
    const cJSON *h, *list;
    double v = 0;
    int rc;
    snprintf(where, sizeof(where), "mcp_servers.%s", m->string);
    c->name = m->string;
    if (!tool_name_ok(m->string)) {
        return fail(errbuf, errlen, "%s: server names are 1-64 characters of [A-Za-z0-9_-]", where);
    }
    if (!cJSON_IsObject(m)) {
        return fail(errbuf, errlen, "%s: must be an object", where);
    }
    if ((rc = check_keys(m, where, known, errbuf, errlen)) != 0) {
        return rc;
    }
    if (get_str(m, "url") == NULL) {
        return fail(errbuf, errlen, "%s.url: required (the server's Streamable HTTP endpoint, e.g. http://host/mcp)",
                    where);
    }
    snprintf(hw, sizeof(hw), "%s.url", where);
    c->url = expand(get_str(m, "url"), hw, errbuf, errlen);
    if (c->url == NULL) {
        return LR_ECONFIG;
    }
    h = cJSON_GetObjectItemCaseSensitive(m, "headers");
    if (h != NULL && (!cJSON_IsObject(h) || cJSON_GetArraySize(h) > LR_MCP_MAX_HEADERS)) {
        return fail(errbuf, errlen, "%s.headers: must be an object of at most %d header name -> value strings", where,
                    LR_MCP_MAX_HEADERS);
    }
    c->headers = calloc((size_t)cJSON_GetArraySize(h) + 1, sizeof(char *));
    if (c->headers == NULL) {
        return LR_ENOMEM;
    }
    for (const cJSON *e = h != NULL ? h->child : NULL; e != NULL; e = e->next) {
        char val[4096];
        size_t nl = strlen(e->string), vl;
        snprintf(hw, sizeof(hw), "%s.headers.%.64s", where, e->string);
        if (!tool_name_ok(e->string) || !cJSON_IsString(e)) {
            return fail(errbuf, errlen, "%s: a header name of [A-Za-z0-9_-] with a string value", hw);
        }
        if (strcasecmp(e->string, "Mcp-Session-Id") == 0 || strcasecmp(e->string, "MCP-Protocol-Version") == 0 ||
            strcasecmp(e->string, "Content-Type") == 0 || strcasecmp(e->string, "Accept") == 0) {
            return fail(errbuf, errlen, "%s: set by the MCP client itself", hw);
        }
        if (expand_into(e->valuestring, hw, val, sizeof(val), errbuf, errlen) < 0) {
            return LR_ECONFIG;
        }
        if (strpbrk(val, "\r\n") != NULL) {
            return fail(errbuf, errlen, "%s: the value has a line break (after ${VAR} expansion)", hw);
        }
        vl = strlen(val);
        c->headers[c->nheaders] = malloc(nl + vl + 3);
        if (c->headers[c->nheaders] == NULL) {
            return LR_ENOMEM;
        }
        snprintf(c->headers[c->nheaders], nl + vl + 3, "%s: %s", e->string, val);
        c->nheaders++;
    }
    for (int k = 0; k < 2; k++) {
        const char *key = k == 0 ? "allow" : "deny";
        list = cJSON_GetObjectItemCaseSensitive(m, key);
        if (list == NULL) {
            continue;
        }
        if (!cJSON_IsArray(list)) {
            return fail(errbuf, errlen, "%s.%s: must be an array of the server's tool names (\"x*\": a prefix)", where,
                        key);
        }
        for (const cJSON *e = list->child; e != NULL; e = e->next) {
            if (!cJSON_IsString(e) || e->valuestring[0] == '\0') {
                return fail(errbuf, errlen, "%s.%s: must be an array of non-empty strings", where, key);
            }
        }
        if (k == 0) {
            c->allow = list;
        } else {
            c->deny = list;
        }
    }
    if ((rc = get_num(m, "timeout_ms", where, 100, 600000, true, 30000, &v, errbuf, errlen)) != 0) {
        return rc;
    }
    c->timeout_ms = (long)v;
    if ((rc = get_num(m, "max_result_bytes", where, 64, 1048576, true, 16384, &v, errbuf, errlen)) != 0) {
        return rc;
    }
    c->max_result_bytes = (long)v;
    list = cJSON_GetObjectItemCaseSensitive(m, "prefix");
    if (list != NULL && (!cJSON_IsString(list) || (list->valuestring[0] != '\0' && !tool_name_ok(list->valuestring)) ||
                         strlen(list->valuestring) > 32)) {
        return fail(errbuf, errlen, "%s.prefix: must be a string of at most 32 characters of [A-Za-z0-9_-]", where);
    }
    c->prefix = list != NULL ? list->valuestring : NULL;
    return 0;
}

static int load_mcp(registry_t *r, const cJSON *servers, char *errbuf, size_t errlen) {
    if (!cJSON_IsObject(servers)) {
        return fail(errbuf, errlen, "mcp_servers: must be an object of server name -> definition");
    }
    if (cJSON_GetArraySize(servers) > LR_MCP_MAX_SERVERS) {
        return fail(errbuf, errlen, "mcp_servers: at most %d servers", LR_MCP_MAX_SERVERS);
    }
    for (const cJSON *m = servers->child; m != NULL; m = m->next) {
        int rc;
        r->nmcp++;
        if ((rc = load_mcp_server(r, m, &r->mcp[r->nmcp - 1], errbuf, errlen)) != 0) {
            return rc;
        }
    }
    return 0;
}

/* agents[i].mcp: names of servers of "mcp_servers". */
static int agent_mcp(registry_t *r, const cJSON *a, lr_agent_t *ag, const char *where, char *errbuf, size_t errlen) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(a, "mcp");
    int i = 0;
    ag->nstatic_tools = ag->ntools;
    if (list == NULL) {
        return 0;
    }
    if (!cJSON_IsArray(list)) {
        return fail(errbuf, errlen, "%s.mcp: must be an array of names of mcp_servers", where);
    }
    for (const cJSON *e = list->child; e != NULL; e = e->next, i++) {
        int found = -1;
        for (int k = 0; k < r->nmcp && cJSON_IsString(e); k++) {
            if (strcmp(r->mcp[k].name, e->valuestring) == 0) {
                found = k;
            }
        }
        if (found < 0) {
            return fail(errbuf, errlen, "%s.mcp[%d]: %s%s%s is not defined in \"mcp_servers\"", where, i,
                        cJSON_IsString(e) ? "\"" : "", cJSON_IsString(e) ? e->valuestring : "a non-string",
                        cJSON_IsString(e) ? "\"" : "");
        }
        for (int k = 0; k < ag->nmcp; k++) {
            if (ag->mcp[k] == found) {
                return fail(errbuf, errlen, "%s.mcp[%d]: \"%s\" is listed twice", where, i, e->valuestring);
            }
        }
        ag->mcp[ag->nmcp++] = found;
    }
    return 0;
}

/* agents[i].tools: names of tools defined in "tools" or built in. */
static int agent_tools(registry_t *r, const cJSON *a, lr_agent_t *ag, const char *where, char *errbuf, size_t errlen) {
    const cJSON *tools;
    int ti = 0;
    tools = cJSON_GetObjectItemCaseSensitive(a, "tools");
    if (tools != NULL && !cJSON_IsArray(tools)) {
        return fail(errbuf, errlen, "%s.tools: must be an array of tool names", where);
    }
    ag->tools = calloc((size_t)cJSON_GetArraySize(tools) + 1, sizeof(lr_tool_def_t *));
    if (ag->tools == NULL) {
        return LR_ENOMEM;
    }
    for (const cJSON *t = tools != NULL ? tools->child : NULL; t != NULL; t = t->next, ti++) {
        const lr_tool_def_t *d = cJSON_IsString(t) ? find_tool(r, t->valuestring) : NULL;
        if (d == NULL) {
            return fail(errbuf, errlen,
                        "%s.tools[%d]: %s%s%s is not defined in \"tools\" nor built in "
                        "(sleep, wait_for_event, request_approval)",
                        where, ti, cJSON_IsString(t) ? "\"" : "", cJSON_IsString(t) ? t->valuestring : "a non-string",
                        cJSON_IsString(t) ? "\"" : "");
        }
        ag->tools[ti] = d;
        ag->ntools = ti + 1;
    }
    return 0;
}

/* agents[i].budgets: numbers, checked by lr_budget_set. */
static int agent_budgets(const cJSON *a, lr_agent_t *ag, const char *where, char *errbuf, size_t errlen) {
    const cJSON *budgets;
    budgets = cJSON_GetObjectItemCaseSensitive(a, "budgets");
    if (budgets != NULL) {
        if (!cJSON_IsObject(budgets)) {
            return fail(errbuf, errlen, "%s.budgets: must be an object", where);
        }
        for (const cJSON *b = budgets->child; b != NULL; b = b->next) {
            char berr[256];
            if (!cJSON_IsNumber(b) || lr_budget_set(&ag->budgets, b->string, b->valuedouble, berr, sizeof(berr)) != 0) {
                return fail(errbuf, errlen, "%s.%s", where,
                            cJSON_IsNumber(b) ? berr : "budgets: values must be numbers");
            }
        }
    }
    return 0;
}

/* agents[i].context: the strategy (full, window, summarize) and its numbers. */
/* context.pin: rules of messages always sent (window, summarize). */
static int agent_pins(const cJSON *ctx, lr_agent_t *ag, const char *where, char *errbuf, size_t errlen) {
    static const char *const known[] = {"role", "contains", "tool", NULL};
    const cJSON *pins = cJSON_GetObjectItemCaseSensitive(ctx, "pin");
    const cJSON *p;
    int i = 0;
    if (pins == NULL) {
        return 0;
    }
    if (!cJSON_IsArray(pins) || cJSON_GetArraySize(pins) > LR_AGENT_MAX_PINS) {
        return fail(errbuf, errlen, "%s.pin: must be an array of at most %d rules", where, LR_AGENT_MAX_PINS);
    }
    if (ag->context == LR_CONTEXT_FULL) {
        return fail(errbuf, errlen, "%s.pin: only with \"window\" or \"summarize\" (\"full\" sends everything)", where);
    }
    cJSON_ArrayForEach(p, pins) {
        char pw[160];
        lr_pin_t *pin = &ag->pins[i];
        int rc;
        snprintf(pw, sizeof(pw), "%s.pin[%d]", where, i);
        if (!cJSON_IsObject(p) || p->child == NULL) {
            return fail(errbuf, errlen, "%s: must be an object with role, contains and/or tool", pw);
        }
        if ((rc = check_keys(p, pw, known, errbuf, errlen)) != 0) {
            return rc;
        }
        for (const cJSON *f = p->child; f != NULL; f = f->next) {
            if (!cJSON_IsString(f) || f->valuestring[0] == '\0') {
                return fail(errbuf, errlen, "%s.%s: must be a non-empty string", pw, f->string);
            }
        }
        pin->role = get_str(p, "role");
        pin->contains = get_str(p, "contains");
        pin->tool = get_str(p, "tool");
        if (pin->role != NULL && strcmp(pin->role, "user") != 0 && strcmp(pin->role, "assistant") != 0 &&
            strcmp(pin->role, "tool") != 0) {
            return fail(errbuf, errlen, "%s.role: must be \"user\", \"assistant\" or \"tool\"", pw);
        }
        i++;
    }
    ag->npins = i;
    return 0;
}

static int agent_context(const cJSON *a, lr_agent_t *ag, const char *where, char *errbuf, size_t errlen) {
    const cJSON *ctx;
    double v = 0;
    int rc;
    ctx = cJSON_GetObjectItemCaseSensitive(a, "context");
    ag->context = LR_CONTEXT_FULL;
    if (ctx != NULL) {
        const char *st = get_str(ctx, "strategy");
        char cw[128];
        snprintf(cw, sizeof(cw), "%s.context", where);
        if (st == NULL || (strcmp(st, "full") != 0 && strcmp(st, "window") != 0 && strcmp(st, "summarize") != 0)) {
            return fail(errbuf, errlen, "%s.strategy: must be \"full\", \"window\" or \"summarize\"", cw);
        }
        if (strcmp(st, "window") == 0) {
            ag->context = LR_CONTEXT_WINDOW;
            if ((rc = get_num(ctx, "messages", cw, 2, 10000, true, 40, &v, errbuf, errlen)) != 0) {
                return rc;
            }
            ag->context_messages = (int)v;
        } else if (strcmp(st, "summarize") == 0) {
            ag->context = LR_CONTEXT_SUMMARIZE;
            if ((rc = get_num(ctx, "messages", cw, 2, 10000, true, 6, &v, errbuf, errlen)) != 0) {
                return rc;
            }
            ag->context_messages = (int)v;
            if ((rc = get_num(ctx, "threshold_tokens", cw, 100, 1e8, true, 0, &v, errbuf, errlen)) != 0) {
                return rc;
            }
            if (v == 0) {
                /* by default, when the conversation nears the smallest
                 * context of the chain (three quarters of it) */
                long smallest = 0;
                for (int i = 0; i < ag->nmodels; i++) {
                    if (ag->models[i].context_tokens > 0 &&
                        (smallest == 0 || ag->models[i].context_tokens < smallest)) {
                        smallest = ag->models[i].context_tokens;
                    }
                }
                if (smallest == 0) {
                    return fail(errbuf, errlen,
                                "%s.threshold_tokens: required with \"summarize\" (estimated "
                                "tokens of the conversation that trigger a summary) unless the price "
                                "table gives a model's context_tokens",
                                cw);
                }
                v = (double)(smallest * 3 / 4 > 100 ? smallest * 3 / 4 : 100);
            }
            ag->summarize_tokens = (long)v;
        }
        if ((rc = agent_pins(ctx, ag, cw, errbuf, errlen)) != 0) {
            return rc;
        }
    }
    return 0;
}

/* agents[i].slice: {"steps": N, "seconds": N}, the agent's own slice. */
static int agent_slice(const cJSON *a, lr_agent_t *ag, const char *where, char *errbuf, size_t errlen) {
    double v = 0;
    int rc;
    {
        const cJSON *sl = cJSON_GetObjectItemCaseSensitive(a, "slice");
        static const char *const slice_known[] = {"steps", "seconds", NULL};
        char sw[128];
        snprintf(sw, sizeof(sw), "%s.slice", where);
        if (sl != NULL) {
            if (!cJSON_IsObject(sl)) {
                return fail(errbuf, errlen, "%s: must be an object {\"steps\": N, \"seconds\": N}", sw);
            }
            if ((rc = check_keys(sl, sw, slice_known, errbuf, errlen)) != 0) {
                return rc;
            }
            if ((rc = get_num(sl, "steps", sw, 1, 10000, true, 0, &v, errbuf, errlen)) != 0) {
                return rc;
            }
            ag->slice_steps = (int)v;
            if ((rc = get_num(sl, "seconds", sw, 1, 3600, true, 0, &v, errbuf, errlen)) != 0) {
                return rc;
            }
            ag->slice_seconds = (int)v;
        }
    }
    return 0;
}

/* "spend_caps": {"daily_usd": X, "monthly_usd": Y} of an agent or a tenant
 * (where: its path); absent: none. */
static int spend_caps(const cJSON *o, lr_spend_caps_t *caps, const char *where, char *errbuf, size_t errlen) {
    static const char *const known[] = {"daily_usd", "monthly_usd", NULL};
    const cJSON *sc = cJSON_GetObjectItemCaseSensitive(o, "spend_caps");
    char sw[160];
    int rc;
    caps->day_usd = caps->month_usd = -1;
    if (sc == NULL) {
        return 0;
    }
    snprintf(sw, sizeof(sw), "%s.spend_caps", where);
    if (!cJSON_IsObject(sc)) {
        return fail(errbuf, errlen, "%s: must be an object {\"daily_usd\": USD, \"monthly_usd\": USD}", sw);
    }
    if ((rc = check_keys(sc, sw, known, errbuf, errlen)) != 0 ||
        (rc = get_num(sc, "daily_usd", sw, 0, 1e9, false, -1, &caps->day_usd, errbuf, errlen)) != 0 ||
        (rc = get_num(sc, "monthly_usd", sw, 0, 1e9, false, -1, &caps->month_usd, errbuf, errlen)) != 0) {
        return rc;
    }
    return 0;
}

/* "tenants": {"<tenant>": {"spend_caps": {...}}}. */
static int load_tenants(registry_t *r, const cJSON *tenants, char *errbuf, size_t errlen) {
    static const char *const known[] = {"spend_caps", NULL};
    int n = cJSON_GetArraySize(tenants), i = 0;
    r->tenants = calloc((size_t)n + 1, sizeof(lr_tenant_def_t));
    if (r->tenants == NULL) {
        return LR_ENOMEM;
    }
    for (const cJSON *t = tenants->child; t != NULL; t = t->next, i++) {
        char where[120];
        int rc;
        snprintf(where, sizeof(where), "tenants.%.80s", t->string);
        if (!lr_tenant_valid(t->string)) {
            return fail(errbuf, errlen, "%s: a tenant name is 1-64 characters of [A-Za-z0-9_.:-]", where);
        }
        if (!cJSON_IsObject(t)) {
            return fail(errbuf, errlen, "%s: must be an object {\"spend_caps\": {...}}", where);
        }
        if ((rc = check_keys(t, where, known, errbuf, errlen)) != 0 ||
            (rc = spend_caps(t, &r->tenants[i].spend_caps, where, errbuf, errlen)) != 0) {
            return rc;
        }
        r->tenants[i].name = t->string;
        r->ntenants = i + 1;
    }
    return 0;
}

static int load_agents(registry_t *r, const cJSON *prices, const cJSON *agents, char *errbuf, size_t errlen) {
    static const char *const known[] = {"name",
                                        "system",
                                        "models",
                                        "tools",
                                        "budgets",
                                        "context",
                                        "description",
                                        "slice",
                                        "max_outage_seconds",
                                        "budget_clock",
                                        "mcp",
                                        "spend_caps",
                                        NULL};
    int n = cJSON_GetArraySize(agents);
    int i = 0;
    r->agents = calloc((size_t)n + 1, sizeof(lr_agent_t));
    if (r->agents == NULL) {
        return LR_ENOMEM;
    }
    for (const cJSON *a = agents->child; a != NULL; a = a->next, i++) {
        lr_agent_t *ag = &r->agents[i];
        char where[96];
        double v = 0;
        int rc;
        snprintf(where, sizeof(where), "agents[%d]", i);
        r->nagents = i + 1;
        lr_budgets_init(&ag->budgets);
        if (!cJSON_IsObject(a)) {
            return fail(errbuf, errlen, "%s: must be an object", where);
        }
        if ((rc = check_keys(a, where, known, errbuf, errlen)) != 0) {
            return rc;
        }
        ag->name = (char *)get_str(a, "name");
        if (ag->name == NULL || !lr_name_valid(ag->name)) {
            return fail(errbuf, errlen, "%s.name: required, matching ^[a-z0-9][a-z0-9_.-]{0,63}$", where);
        }
        if (strcmp(ag->name, "http-steps") == 0) {
            return fail(errbuf, errlen, "%s.name: \"http-steps\" is a built-in task kind", where);
        }
        for (int j = 0; j < i; j++) {
            if (strcmp(r->agents[j].name, ag->name) == 0) {
                return fail(errbuf, errlen, "%s.name: agent \"%s\" is defined twice", where, ag->name);
            }
        }
        snprintf(where, sizeof(where), "agents[%d] (%s)", i, ag->name);
        ag->system = (char *)get_str(a, "system");
        if ((rc = get_num(a, "max_outage_seconds", where, 1, 7 * 86400, true, LR_AGENT_MAX_OUTAGE_DEFAULT, &v, errbuf,
                          errlen)) != 0) {
            return rc;
        }
        ag->max_outage_seconds = (long)v;
        {
            const cJSON *clock = cJSON_GetObjectItemCaseSensitive(a, "budget_clock");
            const char *cs = cJSON_GetStringValue(clock);
            if (clock != NULL && (cs == NULL || (strcmp(cs, "active") != 0 && strcmp(cs, "wall") != 0))) {
                return fail(errbuf, errlen,
                            "%s.budget_clock: must be \"active\" (max_seconds counts the task's steps) or "
                            "\"wall\" (the time since it started, waits included)",
                            where);
            }
            ag->budget_wall = cs != NULL && strcmp(cs, "wall") == 0;
        }
        if ((rc = agent_models(r, prices, a, ag, where, errbuf, errlen)) != 0 ||
            (rc = agent_tools(r, a, ag, where, errbuf, errlen)) != 0 ||
            (rc = agent_mcp(r, a, ag, where, errbuf, errlen)) != 0 ||
            (rc = agent_budgets(a, ag, where, errbuf, errlen)) != 0 ||
            (rc = agent_context(a, ag, where, errbuf, errlen)) != 0 ||
            (rc = agent_slice(a, ag, where, errbuf, errlen)) != 0 ||
            (rc = spend_caps(a, &ag->spend_caps, where, errbuf, errlen)) != 0) {
            return rc;
        }
    }
    return 0;
}

int lr_agents_load(const char *path, char *errbuf, size_t errlen) {
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t len;
    registry_t nr;
    const cJSON *tools, *agents, *prices, *tenants;
    int rc = 0;
    static const char *const known[] = {"models", "tools", "agents", "mcp_servers", "tenants", "$comment", NULL};
    const cJSON *mcp;

    memset(&nr, 0, sizeof(nr));
    if (f == NULL) {
        return lr_seterr(errbuf, errlen, LR_EIO, "LONGRUN_AGENTS_FILE=%s: cannot open", path);
    }
    buf = malloc(MAX_FILE + 1);
    if (buf == NULL) {
        fclose(f);
        return LR_ENOMEM;
    }
    len = fread(buf, 1, MAX_FILE + 1, f);
    fclose(f);
    if (len > MAX_FILE) {
        free(buf);
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s: larger than %d bytes", path, MAX_FILE);
    }
    nr.root = cJSON_ParseWithLength(buf, len);
    free(buf);
    if (nr.root == NULL) {
        return lr_seterr(errbuf, errlen, LR_EPARSE, "%s: not valid JSON", path);
    }
    if (!cJSON_IsObject(nr.root)) {
        rc = fail(errbuf, errlen, "%s: the top level must be an object", path);
        goto out;
    }
    if ((rc = check_keys(nr.root, "(top level)", known, errbuf, errlen)) != 0) {
        goto out;
    }
    prices = cJSON_GetObjectItemCaseSensitive(nr.root, "models");
    if (prices != NULL && !cJSON_IsObject(prices)) {
        rc = fail(errbuf, errlen, "models: must be an object of model name -> prices");
        goto out;
    }
    tools = cJSON_GetObjectItemCaseSensitive(nr.root, "tools");
    if (tools != NULL && !cJSON_IsObject(tools)) {
        rc = fail(errbuf, errlen, "tools: must be an object of tool name -> definition");
        goto out;
    }
    if (tools != NULL && (rc = load_tools(&nr, tools, errbuf, errlen)) != 0) {
        goto out;
    }
    mcp = cJSON_GetObjectItemCaseSensitive(nr.root, "mcp_servers");
    if (mcp != NULL && (rc = load_mcp(&nr, mcp, errbuf, errlen)) != 0) {
        goto out;
    }
    agents = cJSON_GetObjectItemCaseSensitive(nr.root, "agents");
    if (!cJSON_IsArray(agents) || cJSON_GetArraySize(agents) == 0) {
        rc = fail(errbuf, errlen, "agents: required, a non-empty array");
        goto out;
    }
    if ((rc = load_agents(&nr, prices, agents, errbuf, errlen)) != 0) {
        goto out;
    }
    tenants = cJSON_GetObjectItemCaseSensitive(nr.root, "tenants");
    if (tenants != NULL && !cJSON_IsObject(tenants)) {
        rc = fail(errbuf, errlen, "tenants: must be an object of tenant name -> {\"spend_caps\": {...}}");
        goto out;
    }
    if (tenants != NULL && (rc = load_tenants(&nr, tenants, errbuf, errlen)) != 0) {
        goto out;
    }
    if (builtin_params[0] == NULL) {
        builtin_params[0] = cJSON_Parse("{\"type\":\"object\",\"properties\":{\"seconds\":{\"type\":\"number\","
                                        "\"minimum\":0}},\"required\":[\"seconds\"]}");
        builtin_params[1] = cJSON_Parse("{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"}},"
                                        "\"required\":[\"name\"]}");
        builtin_params[2] = cJSON_Parse("{\"type\":\"object\",\"properties\":{\"reason\":{\"type\":\"string\"}},"
                                        "\"required\":[\"reason\"]}");
    }
    free_registry(&reg);
    reg = nr;
    return 0;
out:
    free_registry(&nr);
    return rc;
}

const cJSON *lr_builtin_parameters(enum lr_builtin b) {
    return b >= LR_TOOL_SLEEP && b <= LR_TOOL_APPROVAL ? builtin_params[b - 1] : NULL;
}

const lr_agent_t *lr_agents_find(const char *name) {
    for (int i = 0; i < reg.nagents; i++) {
        if (strcmp(reg.agents[i].name, name) == 0) {
            return &reg.agents[i];
        }
    }
    return NULL;
}

int lr_agents_count(void) { return reg.nagents; }

const lr_agent_t *lr_agents_at(int i) { return i >= 0 && i < reg.nagents ? &reg.agents[i] : NULL; }

int lr_tenants_count(void) { return reg.ntenants; }

const lr_tenant_def_t *lr_tenants_at(int i) { return i >= 0 && i < reg.ntenants ? &reg.tenants[i] : NULL; }

void lr_agents_free(void) {
    free_registry(&reg);
    lr_flags_replace(NULL, 0);
    for (int i = 0; i < 3; i++) {
        cJSON_Delete(builtin_params[i]);
        builtin_params[i] = NULL;
    }
}

const lr_tool_def_t *lr_agent_tool(const lr_agent_t *a, const char *name) {
    for (int i = 0; i < a->ntools; i++) {
        if (strcmp(a->tools[i]->name, name) == 0) {
            return a->tools[i];
        }
    }
    return NULL;
}

int lr_mcp_conf_count(void) { return reg.nmcp; }

const lr_mcp_conf_t *lr_mcp_conf_get(int i) { return i >= 0 && i < reg.nmcp ? &reg.mcp[i] : NULL; }

static bool name_in(const cJSON *list, const char *name) {
    const cJSON *e;
    cJSON_ArrayForEach(e, list) {
        size_t n = strlen(e->valuestring);
        if (strcmp(e->valuestring, name) == 0 ||
            (n > 0 && e->valuestring[n - 1] == '*' && strncmp(e->valuestring, name, n - 1) == 0)) {
            return true;
        }
    }
    return false;
}

bool lr_mcp_conf_exposes(const lr_mcp_conf_t *c, const char *name) {
    return (c->allow == NULL || name_in(c->allow, name)) && !name_in(c->deny, name);
}

int lr_agents_set_mcp_tools(int server, const lr_tool_def_t *defs, int n) {
    for (int i = 0; i < reg.nagents; i++) {
        lr_agent_t *a = &reg.agents[i];
        int total = a->nstatic_tools;
        const lr_tool_def_t **t;
        bool uses = false;
        for (int k = 0; k < a->nmcp; k++) {
            uses = uses || a->mcp[k] == server;
        }
        if (!uses) {
            continue;
        }
        /* the agent's tools: its own, then each of its servers' (this one's
         * from defs, the others' as they are) */
        for (int j = a->nstatic_tools; j < a->ntools; j++) {
            total += a->tools[j]->mcp_server != server ? 1 : 0;
        }
        t = calloc((size_t)(total + n) + 1, sizeof(*t));
        if (t == NULL) {
            return LR_ENOMEM;
        }
        total = 0;
        for (int j = 0; j < a->ntools; j++) {
            if (j < a->nstatic_tools || a->tools[j]->mcp_server != server) {
                t[total++] = a->tools[j];
            }
        }
        for (int j = 0; j < n; j++) {
            bool clash = false; /* a tool of the file keeps its name */
            for (int k = 0; k < a->nstatic_tools; k++) {
                clash = clash || strcmp(a->tools[k]->name, defs[j].name) == 0;
            }
            if (!clash) {
                t[total++] = &defs[j];
            }
        }
        free(a->tools);
        a->tools = t;
        a->ntools = total;
    }
    return 0;
}

/* ------------------------------------------------------------ kill switches */

static char **flags;
static int nflags;

void lr_flags_replace(const char *const *entries, int n) {
    for (int i = 0; i < nflags; i++) {
        free(flags[i]);
    }
    free(flags);
    flags = NULL;
    nflags = 0;
    if (n <= 0) {
        return;
    }
    flags = calloc((size_t)n, sizeof(char *));
    if (flags == NULL) {
        return;
    }
    for (int i = 0; i < n; i++) {
        flags[i] = strdup(entries[i]);
        if (flags[i] != NULL) {
            nflags++;
        }
    }
}

bool lr_flag_disabled(const char *kind, const char *name) {
    size_t kl = strlen(kind);
    for (int i = 0; i < nflags; i++) {
        if (strncmp(flags[i], kind, kl) == 0 && flags[i][kl] == ':' &&
            (strcmp(flags[i] + kl + 1, name) == 0 || strcmp(flags[i] + kl + 1, "*") == 0)) {
            return true;
        }
    }
    return false;
}
