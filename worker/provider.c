/* provider.c - OpenAI Chat Completions and Anthropic Messages wire formats;
 * see provider.h and ../shared/reference/llm-api-contracts.md. */
#include "provider.h"

#include "text.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

char *lr_provider_url(const lr_model_ref_t *m) {
    const char *suffix = m->provider == LR_PROVIDER_OPENAI ? "/chat/completions" : "/messages";
    size_t n = strlen(m->base_url) + strlen(suffix) + (m->api_version != NULL ? strlen(m->api_version) + 16 : 0) + 1;
    char *u = malloc(n);
    if (u != NULL) {
        /* (api_version is checked to be [A-Za-z0-9.-] when the agents file loads) */
        snprintf(u, n, "%s%s%s%s", m->base_url, suffix, m->api_version != NULL ? "?api-version=" : "",
                 m->api_version != NULL ? m->api_version : "");
    }
    return u;
}

static const char *jstr(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static cJSON *tool_schema(const lr_tool_def_t *t) {
    const cJSON *p = t->builtin != LR_TOOL_HTTP ? lr_builtin_parameters(t->builtin) : t->parameters;
    return p != NULL ? cJSON_Duplicate(p, true) : cJSON_Parse("{\"type\":\"object\",\"properties\":{}}");
}

/* OpenAI: system first, then messages mapped one to one. */
static cJSON *openai_messages(const char *system, const cJSON *conv) {
    cJSON *arr = cJSON_CreateArray();
    const cJSON *m;
    if (system != NULL && system[0] != '\0') {
        cJSON *s = cJSON_CreateObject();
        cJSON_AddStringToObject(s, "role", "system");
        cJSON_AddStringToObject(s, "content", system);
        cJSON_AddItemToArray(arr, s);
    }
    cJSON_ArrayForEach(m, conv) {
        const char *role = jstr(m, "role");
        cJSON *o;
        if (role == NULL || strcmp(role, "summary") == 0) {
            continue; /* a summary is folded into the first message by the caller */
        }
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "role", role);
        if (strcmp(role, "assistant") == 0) {
            const cJSON *calls = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
            const char *content = jstr(m, "content");
            if (content != NULL) {
                cJSON_AddStringToObject(o, "content", content);
            } else {
                cJSON_AddNullToObject(o, "content");
            }
            if (cJSON_GetArraySize(calls) > 0) {
                cJSON *tc = cJSON_AddArrayToObject(o, "tool_calls");
                const cJSON *c;
                cJSON_ArrayForEach(c, calls) {
                    cJSON *x = cJSON_CreateObject();
                    cJSON *fn = cJSON_CreateObject();
                    cJSON_AddStringToObject(x, "id", jstr(c, "id") ? jstr(c, "id") : "call");
                    cJSON_AddStringToObject(x, "type", "function");
                    cJSON_AddStringToObject(fn, "name", jstr(c, "name") ? jstr(c, "name") : "");
                    cJSON_AddStringToObject(fn, "arguments", jstr(c, "arguments") ? jstr(c, "arguments") : "{}");
                    cJSON_AddItemToObject(x, "function", fn);
                    cJSON_AddItemToArray(tc, x);
                }
            }
        } else if (strcmp(role, "tool") == 0) {
            cJSON_AddStringToObject(o, "tool_call_id", jstr(m, "tool_call_id") ? jstr(m, "tool_call_id") : "");
            cJSON_AddStringToObject(o, "content", jstr(m, "content") ? jstr(m, "content") : "");
        } else {
            cJSON_AddStringToObject(o, "content", jstr(m, "content") ? jstr(m, "content") : "");
        }
        cJSON_AddItemToArray(arr, o);
    }
    return arr;
}

/* Anthropic: no system role; assistant turns are content blocks; tool
 * results of consecutive tool messages form one user turn, results first. */
static cJSON *anthropic_messages(const cJSON *conv) {
    cJSON *arr = cJSON_CreateArray();
    cJSON *pending_results = NULL; /* user turn being filled with tool_result blocks */
    const cJSON *m;
    cJSON_ArrayForEach(m, conv) {
        const char *role = jstr(m, "role");
        if (role == NULL || strcmp(role, "summary") == 0) {
            continue;
        }
        if (strcmp(role, "tool") == 0) {
            cJSON *blk = cJSON_CreateObject();
            if (pending_results == NULL) {
                cJSON *u = cJSON_CreateObject();
                cJSON_AddStringToObject(u, "role", "user");
                pending_results = cJSON_AddArrayToObject(u, "content");
                cJSON_AddItemToArray(arr, u);
            }
            cJSON_AddStringToObject(blk, "type", "tool_result");
            cJSON_AddStringToObject(blk, "tool_use_id", jstr(m, "tool_call_id") ? jstr(m, "tool_call_id") : "");
            cJSON_AddStringToObject(blk, "content", jstr(m, "content") ? jstr(m, "content") : "");
            if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "is_error"))) {
                cJSON_AddTrueToObject(blk, "is_error");
            }
            cJSON_AddItemToArray(pending_results, blk);
            continue;
        }
        pending_results = NULL;
        if (strcmp(role, "assistant") == 0) {
            cJSON *o = cJSON_CreateObject();
            cJSON *blocks;
            const cJSON *c;
            const char *content = jstr(m, "content");
            cJSON_AddStringToObject(o, "role", "assistant");
            blocks = cJSON_AddArrayToObject(o, "content");
            if (content != NULL && content[0] != '\0') {
                cJSON *t = cJSON_CreateObject();
                cJSON_AddStringToObject(t, "type", "text");
                cJSON_AddStringToObject(t, "text", content);
                cJSON_AddItemToArray(blocks, t);
            }
            cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(m, "tool_calls")) {
                cJSON *t = cJSON_CreateObject();
                const char *args = jstr(c, "arguments");
                cJSON *input = args != NULL ? cJSON_Parse(args) : NULL;
                if (!cJSON_IsObject(input)) {
                    cJSON_Delete(input);
                    input = cJSON_CreateObject();
                }
                cJSON_AddStringToObject(t, "type", "tool_use");
                cJSON_AddStringToObject(t, "id", jstr(c, "id") ? jstr(c, "id") : "toolu");
                cJSON_AddStringToObject(t, "name", jstr(c, "name") ? jstr(c, "name") : "");
                cJSON_AddItemToObject(t, "input", input);
                cJSON_AddItemToArray(blocks, t);
            }
            if (cJSON_GetArraySize(blocks) == 0) {
                cJSON *t = cJSON_CreateObject();
                cJSON_AddStringToObject(t, "type", "text");
                cJSON_AddStringToObject(t, "text", "(no content)");
                cJSON_AddItemToArray(blocks, t);
            }
            cJSON_AddItemToArray(arr, o);
        } else {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "role", "user");
            cJSON_AddStringToObject(o, "content", jstr(m, "content") ? jstr(m, "content") : "");
            cJSON_AddItemToArray(arr, o);
        }
    }
    return arr;
}

char *lr_provider_request(const lr_model_ref_t *m, const char *system, const cJSON *conv,
                          const lr_tool_def_t *const *tools, int ntools) {
    cJSON *req = cJSON_CreateObject();
    char *out;
    cJSON_AddStringToObject(req, "model", m->model);
    if (m->provider == LR_PROVIDER_OPENAI) {
        cJSON_AddItemToObject(req, "messages", openai_messages(system, conv));
        if (ntools > 0) {
            cJSON *arr = cJSON_AddArrayToObject(req, "tools");
            for (int i = 0; i < ntools; i++) {
                cJSON *t = cJSON_CreateObject();
                cJSON *fn = cJSON_CreateObject();
                cJSON_AddStringToObject(t, "type", "function");
                cJSON_AddStringToObject(fn, "name", tools[i]->name);
                if (tools[i]->description != NULL) {
                    cJSON_AddStringToObject(fn, "description", tools[i]->description);
                }
                cJSON_AddItemToObject(fn, "parameters", tool_schema(tools[i]));
                cJSON_AddItemToObject(t, "function", fn);
                cJSON_AddItemToArray(arr, t);
            }
            if (m->tool_choice != NULL) {
                cJSON_AddStringToObject(req, "tool_choice", m->tool_choice);
            }
            if (m->parallel_tool_calls >= 0) {
                cJSON_AddBoolToObject(req, "parallel_tool_calls", m->parallel_tool_calls != 0);
            }
        }
        if (m->max_tokens > 0) {
            cJSON_AddNumberToObject(req, m->max_tokens_field, (double)m->max_tokens);
        }
    } else {
        cJSON_AddNumberToObject(req, "max_tokens", (double)(m->max_tokens > 0 ? m->max_tokens : 1024));
        if (system != NULL && system[0] != '\0') {
            cJSON_AddStringToObject(req, "system", system);
        }
        cJSON_AddItemToObject(req, "messages", anthropic_messages(conv));
        if (ntools > 0) {
            cJSON *arr = cJSON_AddArrayToObject(req, "tools");
            for (int i = 0; i < ntools; i++) {
                cJSON *t = cJSON_CreateObject();
                cJSON_AddStringToObject(t, "name", tools[i]->name);
                if (tools[i]->description != NULL) {
                    cJSON_AddStringToObject(t, "description", tools[i]->description);
                }
                cJSON_AddItemToObject(t, "input_schema", tool_schema(tools[i]));
                cJSON_AddItemToArray(arr, t);
            }
            if (m->tool_choice != NULL) {
                cJSON *tc = cJSON_CreateObject();
                cJSON_AddStringToObject(tc, "type", strcmp(m->tool_choice, "required") == 0 ? "any" : m->tool_choice);
                if (m->parallel_tool_calls == 0) {
                    cJSON_AddTrueToObject(tc, "disable_parallel_tool_use");
                }
                cJSON_AddItemToObject(req, "tool_choice", tc);
            }
        }
    }
    if (m->temperature >= 0) {
        cJSON_AddNumberToObject(req, "temperature", m->temperature);
    }
    out = cJSON_PrintUnformatted(req);
    cJSON_Delete(req);
    return out;
}

static long jlong(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < 0 || v->valuedouble > 1e12) {
        return 0;
    }
    return (long)v->valuedouble;
}

static int parse_openai(const cJSON *root, int step_no, lr_model_reply_t *out, char *errbuf, size_t errlen) {
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    const cJSON *choice = cJSON_GetArrayItem(choices, 0);
    const cJSON *msg = cJSON_GetObjectItemCaseSensitive(choice, "message");
    const cJSON *calls, *usage, *c;
    const char *content, *fin;
    cJSON *a;
    cJSON *tc = NULL;
    int i = 0;

    if (!cJSON_IsObject(msg)) {
        return lr_seterr(errbuf, errlen, LR_EPARSE, "OpenAI response has no choices[0].message");
    }
    a = cJSON_CreateObject();
    cJSON_AddStringToObject(a, "role", "assistant");
    content = jstr(msg, "content");
    if (content != NULL) {
        cJSON_AddStringToObject(a, "content", content);
        out->text = strdup(content);
    } else {
        cJSON_AddNullToObject(a, "content");
    }
    fin = jstr(choice, "finish_reason");
    snprintf(out->finish, sizeof(out->finish), "%s", fin != NULL ? fin : "");
    {
        const char *refusal = jstr(msg, "refusal");
        out->refused = strcmp(out->finish, "content_filter") == 0 || (refusal != NULL && refusal[0] != '\0');
    }
    calls = cJSON_GetObjectItemCaseSensitive(msg, "tool_calls");
    cJSON_ArrayForEach(c, calls) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
        const char *id = jstr(c, "id");
        const char *name = jstr(fn, "name");
        cJSON *x;
        char synth[48];
        if (name == NULL) {
            continue;
        }
        if (tc == NULL) {
            tc = cJSON_AddArrayToObject(a, "tool_calls");
        }
        x = cJSON_CreateObject();
        if (id == NULL || id[0] == '\0') {
            snprintf(synth, sizeof(synth), "call_%d_%d", step_no, i);
            id = synth;
        }
        cJSON_AddStringToObject(x, "id", id);
        cJSON_AddStringToObject(x, "name", name);
        if (cJSON_IsString(args)) {
            cJSON_AddStringToObject(x, "arguments", args->valuestring[0] ? args->valuestring : "{}");
        } else if (cJSON_IsObject(args)) {
            /* llama.cpp quirk: an object instead of a string; re-serialize. */
            char *s = cJSON_PrintUnformatted(args);
            cJSON_AddStringToObject(x, "arguments", s != NULL ? s : "{}");
            free(s);
        } else {
            cJSON_AddStringToObject(x, "arguments", "{}");
        }
        cJSON_AddItemToArray(tc, x);
        i++;
    }
    out->ntool_calls = i;
    out->assistant = a;
    usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
    if (cJSON_IsObject(usage)) {
        out->tokens_in = jlong(usage, "prompt_tokens");
        out->tokens_out = jlong(usage, "completion_tokens");
        out->tokens_cached = jlong(cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens_details"), "cached_tokens");
    } else {
        out->usage_missing = true;
    }
    return 0;
}

static int parse_anthropic(const cJSON *root, int step_no, lr_model_reply_t *out, char *errbuf, size_t errlen) {
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(root, "content");
    const cJSON *usage, *b;
    const char *stop;
    cJSON *a, *tc = NULL;
    char text[65536];
    size_t tl = 0;
    int i = 0;

    if (!cJSON_IsArray(content)) {
        return lr_seterr(errbuf, errlen, LR_EPARSE, "Anthropic response has no content array");
    }
    a = cJSON_CreateObject();
    cJSON_AddStringToObject(a, "role", "assistant");
    text[0] = '\0';
    cJSON_ArrayForEach(b, content) {
        const char *type = jstr(b, "type");
        if (type == NULL) {
            continue;
        }
        if (strcmp(type, "text") == 0 && jstr(b, "text") != NULL) {
            tl += (size_t)snprintf(text + tl, sizeof(text) - tl, "%s", jstr(b, "text"));
            if (tl >= sizeof(text)) {
                tl = sizeof(text) - 1;
            }
        } else if (strcmp(type, "tool_use") == 0 && jstr(b, "name") != NULL) {
            const cJSON *input = cJSON_GetObjectItemCaseSensitive(b, "input");
            const char *id = jstr(b, "id");
            char synth[48];
            cJSON *x = cJSON_CreateObject();
            char *args = NULL;
            if (tc == NULL) {
                tc = cJSON_CreateArray();
            }
            if (id == NULL) {
                snprintf(synth, sizeof(synth), "toolu_%d_%d", step_no, i);
                id = synth;
            }
            cJSON_AddStringToObject(x, "id", id);
            cJSON_AddStringToObject(x, "name", jstr(b, "name"));
            if (cJSON_IsString(input)) {
                cJSON_AddStringToObject(x, "arguments", input->valuestring);
            } else {
                args = input != NULL ? cJSON_PrintUnformatted(input) : NULL;
                cJSON_AddStringToObject(x, "arguments", args != NULL ? args : "{}");
            }
            free(args);
            cJSON_AddItemToArray(tc, x);
            i++;
        }
    }
    if (tl > 0) {
        cJSON_AddStringToObject(a, "content", text);
        out->text = strdup(text);
    } else {
        cJSON_AddNullToObject(a, "content");
    }
    if (tc != NULL) {
        cJSON_AddItemToObject(a, "tool_calls", tc);
    }
    out->ntool_calls = i;
    out->assistant = a;
    stop = jstr(root, "stop_reason");
    snprintf(out->finish, sizeof(out->finish), "%s", stop != NULL ? stop : "");
    out->refused = strcmp(out->finish, "refusal") == 0;
    usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
    if (cJSON_IsObject(usage)) {
        long cached = jlong(usage, "cache_read_input_tokens");
        out->tokens_in = jlong(usage, "input_tokens") + jlong(usage, "cache_creation_input_tokens") + cached;
        out->tokens_cached = cached;
        out->tokens_out = jlong(usage, "output_tokens");
    } else {
        out->usage_missing = true;
    }
    return 0;
}

int lr_provider_parse(const lr_model_ref_t *m, const char *body, size_t len, int step_no, lr_model_reply_t *out,
                      char *errbuf, size_t errlen) {
    cJSON *root;
    int rc;
    bool cut;
    char *clean;
    memset(out, 0, sizeof(*out));
    /* Outside input: everything parsed from it must be storable as jsonb. */
    if (lr_utf8_is_clean(body, len)) {
        /* the usual case: no copy of a body that may be megabytes */
        root = cJSON_ParseWithLength(body, len);
    } else {
        clean = lr_utf8_clean(body, len, len * 3 + 4, &cut);
        if (clean == NULL) {
            return lr_seterr(errbuf, errlen, LR_ENOMEM, "out of memory cleaning the model response (%zu bytes)", len);
        }
        root = cJSON_ParseWithLength(clean, strlen(clean));
        free(clean);
    }
    if (root == NULL) {
        return lr_seterr(errbuf, errlen, LR_EPARSE, "model response is not valid JSON (%zu bytes)", len);
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return lr_seterr(errbuf, errlen, LR_EPARSE, "model response is not a JSON object");
    }
    rc = m->provider == LR_PROVIDER_OPENAI ? parse_openai(root, step_no, out, errbuf, errlen)
                                           : parse_anthropic(root, step_no, out, errbuf, errlen);
    cJSON_Delete(root);
    if (rc != 0) {
        lr_model_reply_free(out);
    }
    return rc;
}

void lr_model_reply_free(lr_model_reply_t *r) {
    cJSON_Delete(r->assistant);
    free(r->text);
    memset(r, 0, sizeof(*r));
}

enum lr_call_class lr_provider_classify(long status, const char *body, const char *should_retry, char *reason,
                                        size_t reasonlen, char *detail, size_t detaillen) {
    cJSON *root = body != NULL ? cJSON_Parse(body) : NULL;
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    const char *msg = cJSON_IsString(err) ? err->valuestring : jstr(err, "message");
    const char *type = jstr(err, "type");
    const cJSON *codej = cJSON_GetObjectItemCaseSensitive(err, "code");
    const char *code = cJSON_IsString(codej) ? codej->valuestring : NULL;
    const cJSON *details = cJSON_GetObjectItemCaseSensitive(err, "details");
    const char *ecode = jstr(details, "error_code");
    enum lr_call_class cls;

    if (msg == NULL) {
        msg = jstr(root, "message"); /* vLLM's old flat shape */
    }
    snprintf(detail, detaillen, "HTTP %ld%s%s", status, msg != NULL ? ": " : "", msg != NULL ? msg : "");
#define R(s) snprintf(reason, reasonlen, "%s", s)
    if (status == 429) {
        if ((code != NULL &&
             (strcmp(code, "insufficient_quota") == 0 || strcmp(code, "credit_balance_exhausted") == 0)) ||
            (type != NULL && strcmp(type, "insufficient_quota") == 0) ||
            (ecode != NULL && strcmp(ecode, "enforced_spend_limit_reached") == 0)) {
            R("quota");
            cls = LR_CALL_NEXT_MODEL;
        } else if (msg != NULL && strstr(msg, "Request too large") != NULL) {
            R("request_too_large");
            cls = LR_CALL_NEXT_MODEL;
        } else {
            R("rate_limited");
            cls = LR_CALL_RETRY;
        }
    } else if (status == 408 || status == 409) {
        R("conflict_or_timeout");
        cls = LR_CALL_RETRY;
    } else if (status == 529 || (type != NULL && strcmp(type, "overloaded_error") == 0)) {
        R("overloaded");
        cls = LR_CALL_RETRY;
    } else if (status >= 500) {
        R("server_error");
        cls = LR_CALL_RETRY;
    } else if (status == 404) {
        R("not_found");
        cls = LR_CALL_NEXT_MODEL;
    } else if (status == 401 || status == 403) {
        R("auth");
        cls = LR_CALL_NEXT_MODEL;
    } else if ((code != NULL && strcmp(code, "context_length_exceeded") == 0) ||
               (type != NULL && strcmp(type, "exceed_context_size_error") == 0)) {
        R("context_length");
        cls = LR_CALL_PERMANENT;
    } else {
        R("bad_request");
        cls = LR_CALL_PERMANENT;
    }
#undef R
    if (should_retry != NULL && cls != LR_CALL_NEXT_MODEL) {
        if (strcasecmp(should_retry, "true") == 0) {
            cls = LR_CALL_RETRY;
        } else if (strcasecmp(should_retry, "false") == 0 && cls == LR_CALL_RETRY) {
            cls = LR_CALL_NEXT_MODEL;
        }
    }
    cJSON_Delete(root);
    return cls;
}

long lr_retry_after_ms(const char *ms, const char *s) {
    char *end = NULL;
    double v;
    if (ms != NULL && ms[0] != '\0') {
        v = strtod(ms, &end);
        if (end != ms && isfinite(v) && v >= 0) {
            return v > 1e9 ? 1000000000L : (long)v;
        }
    }
    if (s != NULL && s[0] != '\0') {
        struct tm tm;
        v = strtod(s, &end);
        if (end != s && *end == '\0' && isfinite(v) && v >= 0) {
            return v > 1e6 ? 1000000000L : (long)(v * 1000.0);
        }
        memset(&tm, 0, sizeof(tm));
        if (strptime(s, "%a, %d %b %Y %H:%M:%S GMT", &tm) != NULL) {
            time_t t = timegm(&tm);
            long d = (long)(t - time(NULL));
            return d > 0 ? d * 1000 : 0;
        }
    }
    return -1;
}
