/*
 * bench/fixture_fast.c - longrun-bench-fixture: a fast C stand-in for
 * tests/fixtures/fixture_server.py, for benchmarks only.
 *
 * bench/bench.py runs the fleet against two fixture servers (model calls go to one, tool calls
 * to the other).  The Python fixture spends 0.5-0.9 ms of CPU per agent step; on a 2-core
 * machine that CPU is taken from PostgreSQL and the worker, so the benchmark measured the
 * fixture.  This server answers the requests the bench makes with the same semantics as the
 * Python fixture, for a few microseconds of CPU each.  The Python server remains the reference
 * fixture for the tests; everything it does that is not listed here is not implemented.
 *
 *   POST /v1/chat/completions (also /openai/v1/chat/completions, /chat/completions), model
 *        fixture-steps-N: while turn < N-1 (turn = assistant messages so far) one call of the
 *        first tool of the request, arguments {"step":turn+1}; then "done after N steps".
 *        Other models: 404 model_not_found.
 *   POST /tools/<name>: 200 {"tool":name,"args":<body>,"idempotency_key":<header or null>}.
 *   GET /_health, GET /_stats (uptime_s, total, control_requests, inflight, max_inflight,
 *        by_kind, by_status: what bench.py reads), POST /_reset.
 *
 * Not implemented: streaming (400), Anthropic, /step, /v1/models, the other fixture-* models,
 * longrun summaries (a summary marker does not count turns), the message-sequence checks, the
 * tool fault names (fail-NNN, flaky-N, big-N, slow-N, notjson), --require-auth, /_requests
 * (--record is accepted and ignored).
 *
 * Design.  libmicrohttpd runs one internal epoll thread that parses requests and calls
 * handler(); a request's body is collected in its struct req and the answer is computed once
 * the body is complete.  Without latency the answer is queued at once.  With latency
 * (--model-latency-ms, --tool-latency-ms) the handler suspends the connection and appends the
 * request to the delay queue of its kind; the timer thread resumes it at its deadline and MHD
 * calls handler() again, which queues the answer.  The latency of a kind is constant, so each
 * queue is in deadline order and the timer only looks at the two heads: thousands of delayed
 * keep-alive connections cost neither a thread each nor any sorting.  Lock order: delay.mu,
 * then MHD's own.  The main thread waits for SIGTERM/SIGINT (blocked in every thread), stops
 * the timer (which resumes whatever still waits) and then MHD.  Counters are C11 atomics.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <microhttpd.h>

#define MAX_BODY (16u << 20) /* a larger request body is answered 413 */
#define MAX_STATUS 600
#define MAX_CONNECTIONS 10000u

/* What a request is; by_kind counts the first three, control requests count apart. */
enum kind { KIND_OPENAI, KIND_TOOL, KIND_OTHER, KIND_COUNT, KIND_CONTROL = KIND_COUNT };
static const char *const kind_names[KIND_COUNT] = {"openai", "tool", "other"};

/* One HTTP request, from the first handler() call to complete(), which frees it. */
struct req {
    enum kind kind;
    char *body; /* the request body so far, NUL-terminated; owned */
    size_t len, cap;
    bool too_big;  /* the body passed MAX_BODY: answered 413 */
    bool answered; /* status and out are set */
    unsigned int status;
    char *out; /* the response body; owned until handed to MHD */
    struct MHD_Connection *conn;
    int64_t deadline_ns; /* CLOCK_MONOTONIC time at which a delayed answer is due */
    struct req *next;    /* in a delay queue */
};

static struct {
    const char *host, *port_file;
    int port, model_ms, tool_ms;
} cfg = {"127.0.0.1", NULL, 0, 0, 0};

static struct {
    atomic_uint_fast64_t total, control, ids, by_kind[KIND_COUNT], by_status[MAX_STATUS];
    atomic_int_fast64_t inflight, max_inflight, started_ns;
} stats;

/* Requests waiting for their latency to pass: queue 0 model answers, queue 1 tool answers. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* signalled when a queue gets a head, and on stop */
    struct req *head[2], *tail[2];
    bool stopping; /* set on SIGTERM: answer at once, suspend nothing more */
} delay = {.mu = PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ------------------------------------------------------------------ answers */

/* Sets the answer of r; takes ownership of body.  A NULL body (out of memory) leaves r->out
 * NULL, and handler() then drops the connection. */
static void answer(struct req *r, unsigned int status, cJSON *body) {
    r->status = status;
    r->out = body != NULL ? cJSON_PrintUnformatted(body) : NULL;
    r->answered = true;
    cJSON_Delete(body);
}

static void add_str_or_null(cJSON *o, const char *key, const char *v) {
    if (v != NULL) {
        cJSON_AddStringToObject(o, key, v);
    } else {
        cJSON_AddNullToObject(o, key);
    }
}

static cJSON *error_obj(const char *message, const char *extra_key, const char *extra) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", message);
    if (extra_key != NULL) {
        cJSON_AddStringToObject(o, extra_key, extra);
    }
    return o;
}

static cJSON *openai_error(const char *message, const char *type, const char *param, const char *code) {
    cJSON *o = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(e, "message", message);
    cJSON_AddStringToObject(e, "type", type);
    add_str_or_null(e, "param", param);
    add_str_or_null(e, "code", code);
    return o;
}

static cJSON *parse_body(const struct req *r) {
    /* length + 1 with require_null_terminated: the whole body must be one JSON value. */
    return r->len > 0 ? cJSON_ParseWithLengthOpts(r->body, r->len + 1, NULL, 1) : NULL;
}

/* N of a model named exactly fixture-steps-N, or -1. */
static int steps_of(const char *model) {
    const char *p = model + strlen("fixture-steps-");
    long long n = 0;
    if (strncmp(model, "fixture-steps-", strlen("fixture-steps-")) != 0 || *p == '\0') {
        return -1;
    }
    for (; *p != '\0'; p++) {
        if (*p < '0' || *p > '9') {
            return -1;
        }
        n = n < INT_MAX ? n * 10 + (*p - '0') : n;
    }
    return n < INT_MAX ? (int)n : INT_MAX;
}

/* The name of the first tool of a Chat Completions "tools" array (function or custom), or NULL. */
static const char *first_tool(const cJSON *tools) {
    const cJSON *t;
    cJSON_ArrayForEach(t, tools) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
        const cJSON *cu = cJSON_GetObjectItemCaseSensitive(t, "custom");
        const cJSON *name;
        if (!cJSON_IsObject(t)) {
            continue;
        }
        name = cJSON_GetObjectItemCaseSensitive(cJSON_IsObject(fn) ? fn : cJSON_IsObject(cu) ? cu : t, "name");
        if (cJSON_IsString(name)) {
            return name->valuestring;
        }
    }
    return NULL;
}

static cJSON *openai_usage(int nmessages, int turn) {
    int prompt = 10 + 5 * nmessages;
    cJSON *u = cJSON_CreateObject(), *d;
    cJSON_AddNumberToObject(u, "prompt_tokens", prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", 7);
    cJSON_AddNumberToObject(u, "total_tokens", prompt + 7);
    d = cJSON_AddObjectToObject(u, "prompt_tokens_details");
    cJSON_AddNumberToObject(d, "cached_tokens", turn > 0 ? prompt / 2 : 0);
    cJSON_AddNumberToObject(d, "audio_tokens", 0);
    d = cJSON_AddObjectToObject(u, "completion_tokens_details");
    cJSON_AddNumberToObject(d, "reasoning_tokens", 0);
    cJSON_AddNumberToObject(d, "audio_tokens", 0);
    cJSON_AddNumberToObject(d, "accepted_prediction_tokens", 0);
    cJSON_AddNumberToObject(d, "rejected_prediction_tokens", 0);
    return u;
}

/* POST /v1/chat/completions.  Returns the latency to apply before the answer, in ms. */
static int openai(struct req *r, const char *method, const char *url) {
    char text[1024], id[48];
    cJSON *req = NULL, *o, *msg, *choice, *calls, *call, *fn;
    const cJSON *model, *messages, *m;
    const char *tool;
    int n, turn = 0, delay_ms = 0;

    if (strcmp(method, "POST") != 0) {
        snprintf(text, sizeof(text), "Invalid method for URL (%s %s)", method, url);
        answer(r, 405, openai_error(text, "invalid_request_error", NULL, NULL));
        goto out;
    }
    req = parse_body(r);
    model = cJSON_GetObjectItemCaseSensitive(req, "model");
    messages = cJSON_GetObjectItemCaseSensitive(req, "messages");
    n = cJSON_IsString(model) ? steps_of(model->valuestring) : -1;
    if (!cJSON_IsObject(req)) {
        answer(r, 400,
               openai_error("We could not parse the JSON body of your request.", "invalid_request_error", NULL, NULL));
    } else if (!cJSON_IsString(model) || model->valuestring[0] == '\0') {
        answer(r, 400, openai_error("you must provide a model parameter", "invalid_request_error", NULL, NULL));
    } else if (messages == NULL || cJSON_IsNull(messages)) {
        answer(r, 400,
               openai_error("Missing required parameter: 'messages'.", "invalid_request_error", "messages",
                            "missing_required_parameter"));
    } else if (!cJSON_IsArray(messages)) {
        answer(r, 400,
               openai_error("Invalid type for 'messages': expected an array.", "invalid_request_error", "messages",
                            "invalid_type"));
    } else if (cJSON_GetArraySize(messages) == 0) {
        answer(r, 400,
               openai_error("Invalid 'messages': empty array. Expected an array with minimum length 1, but "
                            "got an empty array instead.",
                            "invalid_request_error", "messages", "empty_array"));
    } else if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(req, "stream"))) {
        answer(r, 400,
               openai_error("longrun-bench-fixture does not stream: use tests/fixtures/fixture_server.py",
                            "invalid_request_error", "stream", NULL));
    } else if (n < 0) {
        snprintf(text, sizeof(text), "The model `%s` does not exist or you do not have access to it.",
                 model->valuestring);
        answer(r, 404, openai_error(text, "invalid_request_error", NULL, "model_not_found"));
        delay_ms = cfg.model_ms;
    }
    if (r->answered) {
        goto out;
    }
    n = n > 1 ? n : 1;
    cJSON_ArrayForEach(m, messages) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        turn += cJSON_IsString(role) && strcmp(role->valuestring, "assistant") == 0;
    }
    tool = first_tool(cJSON_GetObjectItemCaseSensitive(req, "tools"));
    snprintf(id, sizeof(id), "chatcmpl-fx%029" PRIxFAST64, atomic_fetch_add(&stats.ids, 1) + 1);
    o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "object", "chat.completion");
    cJSON_AddNumberToObject(o, "created", (double)time(NULL));
    cJSON_AddStringToObject(o, "model", model->valuestring);
    choice = cJSON_CreateObject();
    cJSON_AddItemToArray(cJSON_AddArrayToObject(o, "choices"), choice);
    cJSON_AddNumberToObject(choice, "index", 0);
    msg = cJSON_AddObjectToObject(choice, "message");
    cJSON_AddStringToObject(msg, "role", "assistant");
    if (turn < n - 1 && tool != NULL) {
        cJSON_AddNullToObject(msg, "content");
        cJSON_AddNullToObject(msg, "refusal");
        calls = cJSON_AddArrayToObject(msg, "tool_calls");
        call = cJSON_CreateObject();
        cJSON_AddItemToArray(calls, call);
        snprintf(id, sizeof(id), "call_%d_0", turn);
        cJSON_AddStringToObject(call, "id", id);
        cJSON_AddStringToObject(call, "type", "function");
        fn = cJSON_AddObjectToObject(call, "function");
        cJSON_AddStringToObject(fn, "name", tool);
        snprintf(text, sizeof(text), "{\"step\":%d}", turn + 1);
        cJSON_AddStringToObject(fn, "arguments", text);
    } else {
        if (turn < n - 1) {
            snprintf(text, sizeof(text), "no tools to call at step %d", turn + 1);
        } else {
            snprintf(text, sizeof(text), "done after %d steps", n);
        }
        cJSON_AddStringToObject(msg, "content", text);
        cJSON_AddNullToObject(msg, "refusal");
    }
    cJSON_AddArrayToObject(msg, "annotations");
    cJSON_AddNullToObject(choice, "logprobs");
    cJSON_AddStringToObject(choice, "finish_reason", turn < n - 1 && tool != NULL ? "tool_calls" : "stop");
    cJSON_AddItemToObject(o, "usage", openai_usage(cJSON_GetArraySize(messages), turn));
    cJSON_AddStringToObject(o, "service_tier", "default");
    cJSON_AddStringToObject(o, "system_fingerprint", "fp_fixture");
    answer(r, 200, o);
    delay_ms = cfg.model_ms;
out:
    cJSON_Delete(req);
    return delay_ms;
}

/* POST /tools/<name>: the echo tool.  Returns the latency to apply, in ms. */
static int tool(struct req *r, const char *name) {
    cJSON *args = parse_body(r), *o;
    if (r->len > 0 && args == NULL) {
        answer(r, 400, error_obj("request body is not valid JSON", "tool", name));
        return cfg.tool_ms;
    }
    o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "tool", name);
    cJSON_AddItemToObject(o, "args", args != NULL ? args : cJSON_CreateNull());
    add_str_or_null(o, "idempotency_key", MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Idempotency-Key"));
    answer(r, 200, o);
    return cfg.tool_ms;
}

static void add_counters(cJSON *o, const char *key, atomic_uint_fast64_t *c, int count, const char *const *names) {
    cJSON *t = cJSON_AddObjectToObject(o, key);
    char num[16];
    for (int i = 0; i < count; i++) {
        uint_fast64_t v = atomic_load(&c[i]);
        if (v > 0) {
            snprintf(num, sizeof(num), "%d", i);
            cJSON_AddNumberToObject(t, names != NULL ? names[i] : num, (double)v);
        }
    }
}

static void control(struct req *r, const char *method, const char *path) {
    char text[512];
    cJSON *o;
    if (strcmp(path, "/_health") == 0) {
        o = cJSON_CreateObject();
        cJSON_AddTrueToObject(o, "ok");
        answer(r, 200, o);
    } else if (strcmp(path, "/_stats") == 0) {
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "fixture", "longrun-bench-fixture");
        cJSON_AddNumberToObject(o, "uptime_s", (double)(now_ns() - atomic_load(&stats.started_ns)) / 1e9);
        cJSON_AddNumberToObject(o, "total", (double)atomic_load(&stats.total));
        cJSON_AddNumberToObject(o, "control_requests", (double)atomic_load(&stats.control));
        cJSON_AddNumberToObject(o, "inflight", (double)atomic_load(&stats.inflight));
        cJSON_AddNumberToObject(o, "max_inflight", (double)atomic_load(&stats.max_inflight));
        add_counters(o, "by_kind", stats.by_kind, KIND_COUNT, kind_names);
        add_counters(o, "by_status", stats.by_status, MAX_STATUS, NULL);
        answer(r, 200, o);
    } else if (strcmp(path, "/_reset") == 0 && strcmp(method, "POST") != 0) {
        answer(r, 405, error_obj("use POST /_reset", NULL, NULL));
    } else if (strcmp(path, "/_reset") == 0) {
        /* Like the Python fixture: everything but the in-flight gauge starts again. */
        atomic_store(&stats.started_ns, now_ns());
        atomic_store(&stats.total, 0);
        atomic_store(&stats.control, 0);
        atomic_store(&stats.max_inflight, atomic_load(&stats.inflight));
        for (int i = 0; i < KIND_COUNT; i++) {
            atomic_store(&stats.by_kind[i], 0);
        }
        for (int i = 0; i < MAX_STATUS; i++) {
            atomic_store(&stats.by_status[i], 0);
        }
        o = cJSON_CreateObject();
        cJSON_AddTrueToObject(o, "ok");
        answer(r, 200, o);
    } else {
        snprintf(text, sizeof(text), "no such control endpoint: %s", path);
        answer(r, 404, error_obj(text, NULL, NULL));
    }
}

/* ------------------------------------------------------------------ delays */

/* Suspends r's connection until its latency has passed.  Returns false (r is not suspended,
 * answer now) when the server is stopping. */
static bool delay_push(struct req *r, int ms) {
    int q = r->kind == KIND_TOOL;
    bool pushed = false;
    pthread_mutex_lock(&delay.mu);
    if (!delay.stopping) {
        r->deadline_ns = now_ns() + (int64_t)ms * 1000000;
        r->next = NULL;
        MHD_suspend_connection(r->conn);
        if (delay.tail[q] != NULL) {
            delay.tail[q]->next = r;
        } else {
            delay.head[q] = r;
            pthread_cond_signal(&delay.cv);
        }
        delay.tail[q] = r;
        pushed = true;
    }
    pthread_mutex_unlock(&delay.mu);
    return pushed;
}

/* The timer thread: resumes each delayed request at its deadline, everything on stop. */
static void *timer_main(void *arg) {
    pthread_mutex_lock(&delay.mu);
    for (;;) {
        int64_t now = now_ns(), next = INT64_MAX;
        for (int q = 0; q < 2; q++) {
            while (delay.head[q] != NULL && (delay.stopping || delay.head[q]->deadline_ns <= now)) {
                struct req *r = delay.head[q];
                delay.head[q] = r->next;
                if (delay.head[q] == NULL) {
                    delay.tail[q] = NULL;
                }
                MHD_resume_connection(r->conn); /* r may be freed from here on */
            }
            if (delay.head[q] != NULL && delay.head[q]->deadline_ns < next) {
                next = delay.head[q]->deadline_ns;
            }
        }
        if (delay.stopping) {
            break;
        }
        if (next == INT64_MAX) {
            pthread_cond_wait(&delay.cv, &delay.mu);
        } else {
            struct timespec ts = {.tv_sec = next / 1000000000, .tv_nsec = next % 1000000000};
            pthread_cond_timedwait(&delay.cv, &delay.mu, &ts);
        }
    }
    pthread_mutex_unlock(&delay.mu);
    return NULL;
}

/* ------------------------------------------------------------------ HTTP */

static enum kind kind_of(const char *url) {
    if (strncmp(url, "/_", 2) == 0) {
        return KIND_CONTROL;
    }
    if (strcmp(url, "/v1/chat/completions") == 0 || strcmp(url, "/openai/v1/chat/completions") == 0 ||
        strcmp(url, "/chat/completions") == 0) {
        return KIND_OPENAI;
    }
    return strncmp(url, "/tools/", 7) == 0 ? KIND_TOOL : KIND_OTHER;
}

static int append_body(struct req *r, const char *data, size_t n) {
    size_t cap = r->cap > 0 ? r->cap : 4096;
    char *p;
    if (n > MAX_BODY - r->len) {
        return -1;
    }
    while (cap < r->len + n + 1) {
        cap *= 2;
    }
    if (cap != r->cap) {
        p = realloc(r->body, cap);
        if (p == NULL) {
            return -1;
        }
        r->body = p;
        r->cap = cap;
    }
    memcpy(r->body + r->len, data, n);
    r->len += n;
    r->body[r->len] = '\0';
    return 0;
}

/* Computes r's answer; returns the latency to apply first, in ms. */
static int compute(struct req *r, const char *url, const char *method) {
    char text[512];
    if (r->too_big) {
        answer(r, 413, error_obj("request body too large", NULL, NULL));
        return 0;
    }
    switch (r->kind) {
    case KIND_CONTROL: control(r, method, url); return 0;
    case KIND_OPENAI: return openai(r, method, url);
    case KIND_TOOL: return tool(r, url + strlen("/tools/"));
    default:
        if (strncmp(url, "/v1/", 4) == 0 || strncmp(url, "/openai/", 8) == 0) {
            snprintf(text, sizeof(text), "Invalid URL (%s %s)", method, url);
            answer(r, 404, openai_error(text, "invalid_request_error", NULL, NULL));
        } else {
            snprintf(text, sizeof(text), "no such endpoint: %s %s", method, url);
            answer(r, 404, error_obj(text, NULL, NULL));
        }
        return 0;
    }
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                               const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    struct req *r = *con_cls;
    struct MHD_Response *resp;
    enum MHD_Result ret;
    int_fast64_t cur, max;

    if (r == NULL) { /* headers complete: the body, if any, comes in the next calls */
        r = calloc(1, sizeof(*r));
        if (r == NULL) {
            return MHD_NO;
        }
        r->conn = c;
        r->kind = kind_of(url);
        *con_cls = r;
        if (r->kind == KIND_CONTROL) {
            atomic_fetch_add(&stats.control, 1);
            return MHD_YES;
        }
        atomic_fetch_add(&stats.total, 1);
        atomic_fetch_add(&stats.by_kind[r->kind], 1);
        cur = atomic_fetch_add(&stats.inflight, 1) + 1;
        max = atomic_load(&stats.max_inflight);
        while (cur > max && !atomic_compare_exchange_weak(&stats.max_inflight, &max, cur)) {
        }
        return MHD_YES;
    }
    if (*upload_size > 0) {
        if (!r->too_big && append_body(r, upload, *upload_size) != 0) {
            r->too_big = true;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (!r->answered) { /* the body is complete */
        int delay_ms = compute(r, url, method);
        if (r->out == NULL) {
            return MHD_NO; /* out of memory: drop the connection */
        }
        if (delay_ms > 0 && delay_push(r, delay_ms)) {
            return MHD_YES; /* handler() runs again once the timer resumes the connection */
        }
    }
    resp = MHD_create_response_from_buffer(strlen(r->out), r->out, MHD_RESPMEM_MUST_FREE);
    if (resp == NULL) {
        return MHD_NO;
    }
    r->out = NULL; /* owned by resp */
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    ret = MHD_queue_response(c, r->status, resp);
    MHD_destroy_response(resp);
    if (r->kind != KIND_CONTROL && r->status < MAX_STATUS) {
        atomic_fetch_add(&stats.by_status[r->status], 1);
    }
    return ret;
}

static void complete(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    struct req *r = *con_cls;
    if (r == NULL) {
        return;
    }
    if (r->kind != KIND_CONTROL) {
        atomic_fetch_sub(&stats.inflight, 1);
    }
    free(r->body);
    free(r->out);
    free(r);
    *con_cls = NULL;
}

/* ------------------------------------------------------------------ main */

static int write_port_file(const char *path, unsigned int port) {
    char tmp[4096];
    FILE *f;
    int rc = -1;
    snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", path, (long)getpid());
    f = fopen(tmp, "w");
    if (f == NULL) {
        return -1;
    }
    if (fprintf(f, "%u\n", port) > 0 && fflush(f) == 0 && fsync(fileno(f)) == 0) {
        rc = 0;
    }
    if (fclose(f) != 0 || rc != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

static int int_arg(const char *flag, const char *v, int lo, int hi) {
    char *end = NULL;
    long n;
    errno = 0;
    n = v != NULL ? strtol(v, &end, 10) : 0;
    if (v == NULL || errno != 0 || end == v || *end != '\0' || n < lo || n > hi) {
        fprintf(stderr, "longrun-bench-fixture: %s wants an integer in [%d, %d], got %s\n", flag, lo, hi,
                v != NULL ? v : "nothing");
        exit(2);
    }
    return (int)n;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i += 2) { /* every option takes a value */
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--port") == 0) {
            cfg.port = int_arg(a, v, 0, 65535);
        } else if (strcmp(a, "--host") == 0 && v != NULL) {
            cfg.host = v;
        } else if (strcmp(a, "--port-file") == 0 && v != NULL) {
            cfg.port_file = v;
        } else if (strcmp(a, "--model-latency-ms") == 0) {
            cfg.model_ms = int_arg(a, v, 0, 3600000);
        } else if (strcmp(a, "--tool-latency-ms") == 0) {
            cfg.tool_ms = int_arg(a, v, 0, 3600000);
        } else if (strcmp(a, "--record") == 0) {
            (void)int_arg(a, v, 0, INT_MAX); /* the Python fixture's request log: none here */
        } else {
            fprintf(stderr, "usage: longrun-bench-fixture [--host IPV4] [--port N] [--port-file PATH] "
                            "[--model-latency-ms N] [--tool-latency-ms N] [--record N (ignored)]\n");
            exit(2);
        }
    }
}

int main(int argc, char **argv) {
    struct sockaddr_in addr = {.sin_family = AF_INET};
    struct rlimit rl;
    pthread_condattr_t ca;
    pthread_t timer;
    sigset_t sigs;
    struct MHD_Daemon *d;
    const union MHD_DaemonInfo *info;
    int sig = 0;

    parse_args(argc, argv);
    if (inet_pton(AF_INET, cfg.host, &addr.sin_addr) != 1) {
        fprintf(stderr, "longrun-bench-fixture: --host %s is not an IPv4 address\n", cfg.host);
        return 2;
    }
    addr.sin_port = htons((uint16_t)cfg.port);
    /* W-lat keeps 1000-2000 connections open: raise the soft fd limit as far as allowed. */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    /* Blocked before any thread starts, so every thread inherits the mask and sigwait() gets them.
     * The default disposition first: an inherited SIG_IGN (background job of a script) would
     * discard them. */
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    atomic_store(&stats.started_ns, now_ns());
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&delay.cv, &ca);
    if (pthread_create(&timer, NULL, timer_main, NULL) != 0) {
        fprintf(stderr, "longrun-bench-fixture: cannot start the timer thread\n");
        return 1;
    }
    d = MHD_start_daemon(MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_TURBO | MHD_USE_ERROR_LOG,
                         0, NULL, NULL, handler, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
                         MHD_OPTION_NOTIFY_COMPLETED, complete, NULL, MHD_OPTION_CONNECTION_LIMIT, MAX_CONNECTIONS,
                         MHD_OPTION_LISTEN_BACKLOG_SIZE, 4096u, MHD_OPTION_CONNECTION_TIMEOUT, 0u, MHD_OPTION_END);
    info = d != NULL ? MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT) : NULL;
    if (info == NULL || info->port == 0) {
        fprintf(stderr, "longrun-bench-fixture: cannot listen on %s:%d\n", cfg.host, cfg.port);
        return 1;
    }
    if (cfg.port_file != NULL && write_port_file(cfg.port_file, info->port) != 0) {
        fprintf(stderr, "longrun-bench-fixture: cannot write %s: %s\n", cfg.port_file, strerror(errno));
        return 1;
    }
    printf("fixture listening on %s:%u\n", cfg.host, (unsigned int)info->port);
    fflush(stdout);
    while (sigwait(&sigs, &sig) != 0) {
    }
    /* Resume everything still waiting (MHD refuses to stop with suspended connections), then stop. */
    pthread_mutex_lock(&delay.mu);
    delay.stopping = true;
    pthread_cond_signal(&delay.cv);
    pthread_mutex_unlock(&delay.mu);
    pthread_join(timer, NULL);
    MHD_stop_daemon(d);
    return 0;
}
