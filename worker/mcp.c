/*
 * mcp.c - the worker's MCP client: a session per server, its tool list, and
 * the tools/call requests of agent steps (mcp.h says what the protocol is).
 *
 * Design.  Loop thread.  Two state machines, each with one enum, a table of
 * legal moves and one transition function that traces "old -> new (line)":
 *
 *   a server (srv_state):  IDLE -> INITIALIZING -> NOTIFYING -> LISTING ->
 *       READY; any failure of the handshake -> BACKOFF (a timer) -> IDLE; a
 *       session the server forgot (404) -> IDLE, and a new handshake at once.
 *       The tool list is made once (LISTING is skipped when a session is
 *       renewed) and again when the server says notifications/tools/list_changed.
 *   a call (call_state):   WAITING (for the session) -> SENT -> DONE; SENT ->
 *       WAITING when the session was lost (once: the call is sent again in the
 *       new session, with the same idempotency key).
 *
 * Every request goes through common/http.h (curl multi on the loop): nothing
 * blocks.  Each list of tool definitions a server publishes stays allocated
 * until the client closes, since a step may still hold a definition of an
 * older list (agents.h, lr_agents_set_mcp_tools).  Calls hold no reference to
 * anything the server frees early: a call is freed once its callback returned
 * or it was abandoned.  Headers of the agents file may hold secrets: they are
 * sent, never logged.
 */
#include "mcp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsonschema.h"
#include "log.h"
#include "mcp_wire.h"

#define MCP_PROTOCOL_LATEST "2025-11-25"
#define MCP_MAX_TOOLS 256 /* tools kept per server (more are dropped, logged) */
#define MCP_MAX_PAGES 32  /* tools/list pages followed */
#define MCP_LIST_BYTES (4 * 1024 * 1024)
#define MCP_BACKOFF_MIN_MS 500
#define MCP_BACKOFF_MAX_MS 30000
#define MCP_MAX_NOTES 32 /* fire-and-forget notifications in flight per server */

static const char *const protocol_versions[] = {"2025-11-25", "2025-06-18", "2025-03-26", NULL};

enum srv_state {
    SRV_IDLE,         /* no session: the next call or the start makes one */
    SRV_INITIALIZING, /* initialize in flight */
    SRV_NOTIFYING,    /* notifications/initialized in flight */
    SRV_LISTING,      /* tools/list (a page) in flight */
    SRV_READY,        /* the session is up: calls are sent */
    SRV_BACKOFF,      /* the handshake failed: retried when the timer fires */
    SRV_CLOSED,       /* the client is closing */
    SRV_NSTATES
};

enum call_state {
    CALL_WAITING, /* queued until the server is READY */
    CALL_SENT,    /* tools/call in flight */
    CALL_DONE,    /* answered or abandoned: freed */
    CALL_NSTATES
};

#define TO(s) (1u << (s))
static const unsigned srv_moves[SRV_NSTATES] = {
    [SRV_IDLE] = TO(SRV_INITIALIZING) | TO(SRV_CLOSED),
    [SRV_INITIALIZING] = TO(SRV_NOTIFYING) | TO(SRV_BACKOFF) | TO(SRV_CLOSED),
    [SRV_NOTIFYING] = TO(SRV_LISTING) | TO(SRV_READY) | TO(SRV_IDLE) | TO(SRV_BACKOFF) | TO(SRV_CLOSED),
    [SRV_LISTING] = TO(SRV_READY) | TO(SRV_IDLE) | TO(SRV_BACKOFF) | TO(SRV_CLOSED),
    [SRV_READY] = TO(SRV_LISTING) | TO(SRV_IDLE) | TO(SRV_CLOSED),
    [SRV_BACKOFF] = TO(SRV_IDLE) | TO(SRV_CLOSED),
    [SRV_CLOSED] = 0,
};
static const char *const srv_names[SRV_NSTATES] = {"idle",  "initializing", "notifying", "listing",
                                                   "ready", "backoff",      "closed"};
static const unsigned call_moves[CALL_NSTATES] = {
    [CALL_WAITING] = TO(CALL_SENT) | TO(CALL_DONE),
    [CALL_SENT] = TO(CALL_WAITING) | TO(CALL_DONE),
    [CALL_DONE] = 0,
};
static const char *const call_names[CALL_NSTATES] = {"waiting", "sent", "done"};

typedef struct server server_t;

/* One list of tool definitions (strings and schemas owned here). */
typedef struct toolset {
    lr_tool_def_t defs[MCP_MAX_TOOLS];
    int n;
    struct toolset *next;
} toolset_t;

/* A notification sent without waiting for its answer. */
typedef struct note {
    server_t *s;
    lr_http_req_t *req;
} note_t;

struct lr_mcp_call {
    server_t *s;
    enum call_state state;
    const lr_tool_def_t *def;
    char *params; /* the tools/call params, text */
    double rpc_id;
    lr_http_req_t *req;
    int renewals; /* sessions renewed for this call */
    uint64_t deadline;
    char idem[160], task[96];
    long long epoch;
    lr_mcp_call_cb cb;
    void *arg;
    lr_mcp_call_t *next; /* the server's list of calls (waiting or sent) */
};

struct server {
    lr_mcp_t *m;
    int index;
    const lr_mcp_conf_t *conf;
    enum srv_state state;
    char session[256]; /* Mcp-Session-Id, "" when none */
    char version[32];  /* the negotiated protocol version */
    lr_http_req_t *req;
    double next_id;
    double req_id;
    char cursor[512];
    int pages;
    toolset_t *building; /* the list being made (LISTING) */
    toolset_t *lists;    /* every list published, newest first */
    int ntools;          /* in the newest list */
    bool listed, relist;
    int failures;
    char last_error[256];
    uv_timer_t timer;
    lr_mcp_call_t *calls;
    note_t notes[MCP_MAX_NOTES];
};

struct lr_mcp {
    uv_loop_t *loop;
    lr_http_t *http;
    lr_mcp_egress_cb egress;
    void *egress_arg;
    server_t servers[LR_MCP_MAX_SERVERS];
    int nservers;
    uv_timer_t wait_timer;
    lr_mcp_ready_cb ready_cb;
    void *ready_arg;
    bool ready, started;
    int open_handles;
    void (*closed)(void *arg);
    void *closed_arg;
};

#define srv_set_state(s, to) srv_set_state_at((s), (to), __LINE__)
static void srv_set_state_at(server_t *s, enum srv_state to, int line) {
    if ((srv_moves[s->state] & TO(to)) == 0) {
        lr_error("mcp.bad_transition", "server %s: illegal move %s -> %s (line %d)", s->conf->name, srv_names[s->state],
                 srv_names[to], line);
    }
    lr_debug("mcp.state", "server %s: %s -> %s (line %d)", s->conf->name, srv_names[s->state], srv_names[to], line);
    s->state = to;
}

#define call_set_state(c, to) call_set_state_at((c), (to), __LINE__)
static void call_set_state_at(lr_mcp_call_t *c, enum call_state to, int line) {
    if ((call_moves[c->state] & TO(to)) == 0) {
        lr_error("mcp.bad_transition", "call %s: illegal move %s -> %s (line %d)", c->idem, call_names[c->state],
                 call_names[to], line);
    }
    lr_debug("mcp.call_state", "call %s: %s -> %s (line %d)", c->idem, call_names[c->state], call_names[to], line);
    c->state = to;
}

static uint64_t now_ms(void) { return uv_hrtime() / 1000000u; }

/* ------------------------------------------------------------- requests */

/* Posts message (JSON text) to s with the transport's headers; cb(arg) gets
 * the response.  with_session: send Mcp-Session-Id and MCP-Protocol-Version
 * (everything but initialize).  Returns lr_http_send's code. */
static int post(server_t *s, const char *message, bool with_session, const char *const *extra, long timeout_ms,
                size_t max_body, lr_http_cb cb, void *arg, lr_http_req_t **out) {
    const char *headers[LR_MCP_MAX_HEADERS + 12];
    char h_sess[300], h_ver[64];
    int n = 0;
    lr_http_opts_t o;
    headers[n++] = "Content-Type: application/json";
    headers[n++] = "Accept: application/json, text/event-stream";
    if (with_session && s->session[0] != '\0') {
        snprintf(h_sess, sizeof(h_sess), "Mcp-Session-Id: %s", s->session);
        headers[n++] = h_sess;
    }
    if (with_session && s->version[0] != '\0') {
        snprintf(h_ver, sizeof(h_ver), "MCP-Protocol-Version: %s", s->version);
        headers[n++] = h_ver;
    }
    for (int i = 0; extra != NULL && extra[i] != NULL && i < 4; i++) {
        headers[n++] = extra[i];
    }
    for (int i = 0; i < s->conf->nheaders; i++) {
        headers[n++] = s->conf->headers[i];
    }
    headers[n] = NULL;
    lr_http_opts_post(&o, s->conf->url, headers, message);
    o.timeout_ms = timeout_ms;
    o.max_body = max_body;
    if (s->m->egress != NULL) {
        s->m->egress(s->m->egress_arg, &o);
    }
    return lr_http_send(s->m->http, &o, cb, arg, out);
}

/* {"jsonrpc":"2.0","id":id,"method":method,"params":params} as text
 * (params taken; id < 0: a notification). */
static char *rpc_text(double id, const char *method, cJSON *params) {
    cJSON *j = cJSON_CreateObject();
    char *t;
    cJSON_AddStringToObject(j, "jsonrpc", "2.0");
    if (id >= 0) {
        cJSON_AddNumberToObject(j, "id", id);
    }
    cJSON_AddStringToObject(j, "method", method);
    if (params != NULL) {
        cJSON_AddItemToObject(j, "params", params);
    }
    t = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    return t;
}

static void note_done(const lr_http_response_t *resp, void *arg) {
    note_t *n = arg;
    (void)resp;
    n->req = NULL;
    n->s = NULL;
}

/* Sends a notification and forgets it (at most MCP_MAX_NOTES in flight). */
static void notify(server_t *s, const char *method, cJSON *params) {
    note_t *n = NULL;
    char *t;
    for (int i = 0; i < MCP_MAX_NOTES && n == NULL; i++) {
        n = s->notes[i].s == NULL ? &s->notes[i] : NULL;
    }
    if (n == NULL || s->state == SRV_CLOSED) {
        cJSON_Delete(params);
        lr_warn("mcp.notify_dropped", "server %s: %s not sent (%d notifications in flight)", s->conf->name, method,
                MCP_MAX_NOTES);
        return;
    }
    t = rpc_text(-1, method, params);
    if (t == NULL) {
        return;
    }
    n->s = s;
    if (post(s, t, true, NULL, s->conf->timeout_ms, 4096, note_done, n, &n->req) != 0) {
        n->s = NULL;
        n->req = NULL;
    }
    free(t);
}

/* Is resp the server saying it does not know the session we sent?  404 is
 * what the specification says; the reference server (server-everything)
 * answers 400 with a JSON-RPC error "No valid session ID provided". */
static bool session_lost(const server_t *s, const lr_http_response_t *resp) {
    if (resp->err != 0 || s->session[0] == '\0') {
        return false;
    }
    return resp->status == 404 ||
           (resp->status == 400 && resp->body != NULL && strstr(resp->body, "session ID") != NULL);
}

/* -------------------------------------------------------------- sessions */

static void srv_connect(server_t *s);
static void srv_list_page(server_t *s);
static void call_send(lr_mcp_call_t *c);
static void call_finish(lr_mcp_call_t *c, int err, long status, bool is_error, const char *text,
                        const cJSON *structured, const char *errmsg);

static void call_unlink(lr_mcp_call_t *c);

static lr_mcp_call_t *first_waiting(server_t *s) {
    for (lr_mcp_call_t *c = s->calls; c != NULL; c = c->next) {
        if (c->state == CALL_WAITING) {
            return c;
        }
    }
    return NULL;
}

static void check_ready(lr_mcp_t *m) {
    bool all = true;
    for (int i = 0; i < m->nservers; i++) {
        all = all && m->servers[i].listed;
    }
    if (all && !m->ready && m->started) {
        m->ready = true;
        uv_timer_stop(&m->wait_timer);
        if (m->ready_cb != NULL) {
            m->ready_cb(m->ready_arg);
        }
    }
}

static void backoff_cb(uv_timer_t *t) {
    server_t *s = t->data;
    if (s->state == SRV_BACKOFF) {
        srv_set_state(s, SRV_IDLE);
        srv_connect(s);
    }
}

/* The handshake failed (why): every waiting call fails, and the next try is
 * after a backoff that doubles with each failure in a row. */
static void srv_backoff(server_t *s, const char *why) {
    long delay = MCP_BACKOFF_MIN_MS;
    lr_mcp_call_t *c;
    for (int i = 0; i < s->failures && delay < MCP_BACKOFF_MAX_MS; i++) {
        delay *= 2;
    }
    if (delay > MCP_BACKOFF_MAX_MS) {
        delay = MCP_BACKOFF_MAX_MS;
    }
    s->failures++;
    snprintf(s->last_error, sizeof(s->last_error), "%s", why);
    lr_warn("mcp.unavailable", "server %s (%s): %s; trying again in %ld ms", s->conf->name, s->conf->url, why, delay);
    s->session[0] = '\0';
    srv_set_state(s, SRV_BACKOFF);
    uv_timer_start(&s->timer, backoff_cb, (uint64_t)delay, 0);
    /* (one at a time: a callback may abandon other calls of the list) */
    while ((c = first_waiting(s)) != NULL) {
        call_unlink(c);
        call_finish(c, LR_ECONN, 0, false, "", NULL, why);
    }
}

/* The session is up: send the calls that waited for it. */
static void srv_ready(server_t *s) {
    lr_mcp_call_t *c;
    srv_set_state(s, SRV_READY);
    s->failures = 0;
    while (s->state == SRV_READY && (c = first_waiting(s)) != NULL) {
        call_send(c); /* SENT, or answered (and unlinked) at once */
    }
}

/* The server forgot our session: a new handshake now (the calls in flight
 * that get the same answer wait for it). */
static void srv_renew(server_t *s) {
    if (s->state != SRV_READY && s->state != SRV_LISTING && s->state != SRV_NOTIFYING) {
        return; /* a handshake is already under way, or failed */
    }
    lr_info("mcp.session_lost", "server %s forgot session; initializing a new one", s->conf->name);
    if (s->req != NULL) {
        lr_http_cancel(s->req);
        s->req = NULL;
    }
    s->session[0] = '\0';
    srv_set_state(s, SRV_IDLE);
    srv_connect(s);
}

/* Builds the definition of one listed tool into ts (false: skipped, logged). */
static bool add_tool(server_t *s, toolset_t *ts, const cJSON *t) {
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "name"));
    const char *desc = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "description"));
    const cJSON *in = cJSON_GetObjectItemCaseSensitive(t, "inputSchema");
    const cJSON *outs = cJSON_GetObjectItemCaseSensitive(t, "outputSchema");
    char full[128], err[300];
    lr_tool_def_t *d;
    size_t nl;
    if (name == NULL || !lr_mcp_conf_exposes(s->conf, name)) {
        return false;
    }
    if (ts->n >= MCP_MAX_TOOLS) {
        lr_warn("mcp.tool_skipped", "server %s: tool %.64s: over %d tools", s->conf->name, name, MCP_MAX_TOOLS);
        return false;
    }
    snprintf(full, sizeof(full), "%s%s%s", s->conf->prefix != NULL ? s->conf->prefix : s->conf->name,
             s->conf->prefix != NULL ? "" : "_", name);
    nl = strlen(full);
    for (size_t i = 0; i < nl; i++) {
        char ch = full[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
              ch == '-')) {
            nl = 0;
        }
    }
    if (nl == 0 || nl > 64) {
        lr_warn("mcp.tool_skipped", "server %s: tool %.64s: the name with its prefix is not 1-64 of [A-Za-z0-9_-]",
                s->conf->name, name);
        return false;
    }
    if ((in != NULL && (!cJSON_IsObject(in) || lr_schema_check(in, err, sizeof(err)) != 0)) ||
        (outs != NULL && (!cJSON_IsObject(outs) || lr_schema_check(outs, err, sizeof(err)) != 0))) {
        lr_warn("mcp.tool_skipped", "server %s: tool %.64s: a schema this worker cannot check: %s", s->conf->name, name,
                err);
        return false;
    }
    d = &ts->defs[ts->n];
    memset(d, 0, sizeof(*d));
    d->name = strdup(full);
    d->description = desc != NULL ? strdup(desc) : NULL;
    d->mcp_tool = strdup(name);
    d->parameters = in != NULL ? cJSON_Duplicate(in, true) : NULL;
    d->output_schema = outs != NULL ? cJSON_Duplicate(outs, true) : NULL;
    d->url = s->conf->url;
    d->timeout_ms = s->conf->timeout_ms;
    d->max_result_bytes = s->conf->max_result_bytes;
    d->mcp_server = s->index;
    d->builtin = LR_TOOL_HTTP;
    ts->n++;
    if (d->name == NULL || d->mcp_tool == NULL) {
        return false;
    }
    return true;
}

static void toolset_free(toolset_t *ts) {
    while (ts != NULL) {
        toolset_t *next = ts->next;
        for (int i = 0; i < ts->n; i++) {
            free(ts->defs[i].name);
            free(ts->defs[i].description);
            free((char *)ts->defs[i].mcp_tool);
            cJSON_Delete(ts->defs[i].parameters);
            cJSON_Delete(ts->defs[i].output_schema);
        }
        free(ts);
        ts = next;
    }
}

/* A handshake response: the answer to s->req_id, or why not (why set). */
static cJSON *handshake_answer(server_t *s, const lr_http_response_t *resp, const char *what, char *why,
                               size_t whylen) {
    char ctype[128];
    cJSON *msg = NULL;
    bool changed = false;
    const cJSON *err;
    if (resp->err != 0) {
        snprintf(why, whylen, "%s: %s%s%.150s", what, lr_strerror(resp->err), resp->errmsg[0] != '\0' ? ": " : "",
                 resp->errmsg);
        return NULL;
    }
    if (resp->status < 200 || resp->status >= 300) {
        snprintf(why, whylen, "%s: HTTP %ld: %.120s", what, resp->status, resp->body);
        return NULL;
    }
    if (resp->truncated) {
        snprintf(why, whylen, "%s: the response is over %d bytes", what, MCP_LIST_BYTES);
        return NULL;
    }
    if (lr_http_header(resp, "content-type", ctype, sizeof(ctype)) != 0) {
        ctype[0] = '\0';
    }
    if (lr_mcp_wire_find(ctype, resp->body, resp->body_len, s->req_id, &msg, &changed, why, whylen) != 0) {
        char tmp[256];
        snprintf(tmp, sizeof(tmp), "%s: %s", what, why);
        snprintf(why, whylen, "%s", tmp);
        return NULL;
    }
    err = cJSON_GetObjectItemCaseSensitive(msg, "error");
    if (err != NULL) {
        snprintf(why, whylen, "%s: JSON-RPC error %.0f: %.150s", what,
                 cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(err, "code")),
                 cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(err, "message")) != NULL
                     ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(err, "message"))
                     : "");
        cJSON_Delete(msg);
        return NULL;
    }
    return msg;
}

static void list_response(const lr_http_response_t *resp, void *arg) {
    server_t *s = arg;
    char why[300];
    cJSON *msg;
    const cJSON *result, *t, *next;
    s->req = NULL;
    if (session_lost(s, resp)) {
        toolset_free(s->building);
        s->building = NULL;
        s->relist = true;
        srv_renew(s);
        return;
    }
    msg = handshake_answer(s, resp, "tools/list", why, sizeof(why));
    if (msg == NULL) {
        toolset_free(s->building);
        s->building = NULL;
        srv_backoff(s, why);
        return;
    }
    result = cJSON_GetObjectItemCaseSensitive(msg, "result");
    if (!cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(result, "tools"))) {
        cJSON_Delete(msg);
        toolset_free(s->building);
        s->building = NULL;
        srv_backoff(s, "tools/list: the result has no \"tools\" array");
        return;
    }
    cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(result, "tools")) {
        (void)add_tool(s, s->building, t);
    }
    next = cJSON_GetObjectItemCaseSensitive(result, "nextCursor");
    if (cJSON_IsString(next) && next->valuestring[0] != '\0' && s->pages < MCP_MAX_PAGES &&
        strlen(next->valuestring) < sizeof(s->cursor)) {
        snprintf(s->cursor, sizeof(s->cursor), "%s", next->valuestring);
        cJSON_Delete(msg);
        srv_list_page(s);
        return;
    }
    cJSON_Delete(msg);
    if (lr_agents_set_mcp_tools(s->index, s->building->defs, s->building->n) != 0) {
        toolset_free(s->building);
        s->building = NULL;
        srv_backoff(s, "out of memory publishing the tool list");
        return;
    }
    s->building->next = s->lists;
    s->lists = s->building;
    s->ntools = s->building->n;
    s->building = NULL;
    s->listed = true;
    s->relist = false;
    lr_info("mcp.ready", "server %s: %d tool(s) over protocol %s, %s", s->conf->name, s->ntools, s->version,
            s->session[0] != '\0' ? "with a session" : "without a session");
    srv_ready(s);
    check_ready(s->m);
}

static void srv_list_page(server_t *s) {
    cJSON *params = NULL;
    char *t;
    if (s->cursor[0] != '\0') {
        params = cJSON_CreateObject();
        cJSON_AddStringToObject(params, "cursor", s->cursor);
    }
    s->pages++;
    s->req_id = s->next_id++;
    t = rpc_text(s->req_id, "tools/list", params);
    if (t == NULL || post(s, t, true, NULL, s->conf->timeout_ms, MCP_LIST_BYTES, list_response, s, &s->req) != 0) {
        free(t);
        toolset_free(s->building);
        s->building = NULL;
        srv_backoff(s, "cannot send tools/list");
        return;
    }
    free(t);
}

static void srv_list(server_t *s) {
    srv_set_state(s, SRV_LISTING);
    s->cursor[0] = '\0';
    s->pages = 0;
    s->building = calloc(1, sizeof(toolset_t));
    if (s->building == NULL) {
        srv_backoff(s, "out of memory");
        return;
    }
    srv_list_page(s);
}

static void initialized_response(const lr_http_response_t *resp, void *arg) {
    server_t *s = arg;
    char why[300];
    s->req = NULL;
    if (session_lost(s, resp)) {
        srv_renew(s);
        return;
    }
    if (resp->err != 0 || resp->status < 200 || resp->status >= 300) {
        snprintf(why, sizeof(why), "notifications/initialized: %s %ld",
                 resp->err != 0 ? lr_strerror(resp->err) : "HTTP", resp->status);
        srv_backoff(s, why);
        return;
    }
    if (!s->listed || s->relist) {
        srv_list(s);
    } else {
        lr_info("mcp.session", "server %s: new session over protocol %s", s->conf->name, s->version);
        srv_ready(s);
    }
}

static void initialize_response(const lr_http_response_t *resp, void *arg) {
    server_t *s = arg;
    char why[300], sid[sizeof(s->session)], *t;
    const char *ver;
    bool known = false;
    cJSON *msg;
    s->req = NULL;
    msg = handshake_answer(s, resp, "initialize", why, sizeof(why));
    if (msg == NULL) {
        srv_backoff(s, why);
        return;
    }
    ver = cJSON_GetStringValue(
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(msg, "result"), "protocolVersion"));
    for (int i = 0; ver != NULL && protocol_versions[i] != NULL; i++) {
        known = known || strcmp(ver, protocol_versions[i]) == 0;
    }
    if (!known) {
        snprintf(why, sizeof(why), "initialize: the server speaks protocol %.40s, this worker %s, %s or %s",
                 ver != NULL ? ver : "(none given)", protocol_versions[0], protocol_versions[1], protocol_versions[2]);
        cJSON_Delete(msg);
        srv_backoff(s, why);
        return;
    }
    snprintf(s->version, sizeof(s->version), "%s", ver);
    cJSON_Delete(msg);
    if (lr_http_header(resp, "mcp-session-id", sid, sizeof(sid)) == 0) {
        snprintf(s->session, sizeof(s->session), "%s", sid);
    } else {
        s->session[0] = '\0';
    }
    srv_set_state(s, SRV_NOTIFYING);
    t = rpc_text(-1, "notifications/initialized", NULL);
    if (t == NULL || post(s, t, true, NULL, s->conf->timeout_ms, 4096, initialized_response, s, &s->req) != 0) {
        free(t);
        srv_backoff(s, "cannot send notifications/initialized");
        return;
    }
    free(t);
}

static void srv_connect(server_t *s) {
    cJSON *params = cJSON_CreateObject();
    cJSON *info = cJSON_CreateObject();
    char *t;
    cJSON_AddStringToObject(params, "protocolVersion", MCP_PROTOCOL_LATEST);
    cJSON_AddItemToObject(params, "capabilities", cJSON_CreateObject());
    cJSON_AddStringToObject(info, "name", "longrun-worker");
    cJSON_AddStringToObject(info, "version", LONGRUN_VERSION);
    cJSON_AddItemToObject(params, "clientInfo", info);
    srv_set_state(s, SRV_INITIALIZING);
    s->session[0] = '\0';
    s->version[0] = '\0';
    s->req_id = s->next_id++;
    t = rpc_text(s->req_id, "initialize", params);
    if (t == NULL || post(s, t, false, NULL, s->conf->timeout_ms, 65536, initialize_response, s, &s->req) != 0) {
        free(t);
        srv_backoff(s, "cannot send initialize");
        return;
    }
    free(t);
}

/* ----------------------------------------------------------------- calls */

static void call_unlink(lr_mcp_call_t *c) {
    for (lr_mcp_call_t **pp = &c->s->calls; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    c->next = NULL;
}

static void call_free(lr_mcp_call_t *c) {
    free(c->params);
    free(c);
}

/* Answers c and frees it (c must be unlinked already). */
static void call_finish(lr_mcp_call_t *c, int err, long status, bool is_error, const char *text,
                        const cJSON *structured, const char *errmsg) {
    lr_mcp_result_t r;
    memset(&r, 0, sizeof(r));
    r.err = err;
    r.http_status = status;
    r.is_error = is_error;
    r.text = text != NULL ? text : "";
    r.structured = structured;
    r.errmsg = errmsg != NULL ? errmsg : "";
    call_set_state(c, CALL_DONE);
    c->cb(&r, c->arg);
    call_free(c);
}

static void call_cancelled_note(lr_mcp_call_t *c, const char *reason) {
    cJSON *p = cJSON_CreateObject();
    cJSON_AddNumberToObject(p, "requestId", c->rpc_id);
    cJSON_AddStringToObject(p, "reason", reason);
    notify(c->s, "notifications/cancelled", p);
}

/* The answer to a tools/call: the result as the model sees it. */
static void call_answer(lr_mcp_call_t *c, const lr_http_response_t *resp, const cJSON *msg) {
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(msg, "error");
    const cJSON *result = cJSON_GetObjectItemCaseSensitive(msg, "result");
    const cJSON *sc = cJSON_GetObjectItemCaseSensitive(result, "structuredContent");
    bool is_error = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(result, "isError"));
    char buf[700], verr[300];
    char *text;
    if (err != NULL) {
        const char *m = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(err, "message"));
        snprintf(buf, sizeof(buf), "MCP error %.0f: %.500s",
                 cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(err, "code")), m != NULL ? m : "");
        call_finish(c, 0, resp->status, true, buf, NULL, "");
        return;
    }
    if (!cJSON_IsObject(result)) {
        call_finish(c, LR_EPARSE, resp->status, false, "", NULL, "the answer has no result object");
        return;
    }
    if (sc != NULL && !cJSON_IsObject(sc)) {
        call_finish(c, 0, resp->status, true, "error: the tool's structuredContent is not a JSON object", NULL, "");
        return;
    }
    if (!is_error && c->def->output_schema != NULL) {
        int vrc = sc != NULL ? lr_schema_validate(c->def->output_schema, sc, verr, sizeof(verr)) : LR_EINVAL;
        if (sc == NULL) {
            snprintf(verr, sizeof(verr), "the tool declares an outputSchema but its result has no structuredContent");
        }
        if (vrc != 0) {
            snprintf(buf, sizeof(buf), "error: the result of tool \"%s\" does not match its outputSchema: %s",
                     c->def->name, vrc == LR_EINVAL ? verr : lr_strerror(vrc));
            call_finish(c, 0, resp->status, true, buf, sc, "");
            return;
        }
    }
    text = lr_mcp_wire_text(result);
    if (text == NULL) {
        call_finish(c, LR_ENOMEM, resp->status, false, "", NULL, "out of memory");
        return;
    }
    if (text[0] == '\0' && sc != NULL) {
        /* no text content: the model reads the structured content */
        free(text);
        text = cJSON_PrintUnformatted(sc);
    }
    call_finish(c, 0, resp->status, is_error, text, sc, "");
    free(text);
}

static void call_response(const lr_http_response_t *resp, void *arg) {
    lr_mcp_call_t *c = arg;
    server_t *s = c->s;
    char ctype[128], why[300];
    cJSON *msg = NULL;
    bool changed = false;
    c->req = NULL;
    if (session_lost(s, resp) && c->renewals < 1) {
        c->renewals++;
        call_set_state(c, CALL_WAITING);
        srv_renew(s);
        return;
    }
    call_unlink(c);
    if (resp->err != 0) {
        if (resp->err == LR_ETIMEOUT) {
            call_cancelled_note(c, "timed out");
        }
        snprintf(why, sizeof(why), "%s%s%.200s", lr_strerror(resp->err), resp->errmsg[0] != '\0' ? ": " : "",
                 resp->errmsg);
        call_finish(c, resp->err, 0, false, "", NULL, why);
        return;
    }
    if (session_lost(s, resp)) {
        call_finish(c, LR_ENOTFOUND, resp->status, false, "", NULL, "the server lost the session again");
        return;
    }
    if (resp->status < 200 || resp->status >= 300) {
        snprintf(why, sizeof(why), "HTTP %ld: %.200s", resp->status, resp->body);
        call_finish(c, LR_EHTTP, resp->status, false, "", NULL, why);
        return;
    }
    if (resp->truncated) {
        snprintf(why, sizeof(why), "the response is over %zu bytes", (size_t)c->def->max_result_bytes * 8 + 65536);
        call_finish(c, LR_ETOOBIG, resp->status, false, "", NULL, why);
        return;
    }
    if (lr_http_header(resp, "content-type", ctype, sizeof(ctype)) != 0) {
        ctype[0] = '\0';
    }
    if (lr_mcp_wire_find(ctype, resp->body, resp->body_len, c->rpc_id, &msg, &changed, why, sizeof(why)) != 0) {
        call_finish(c, LR_EPARSE, resp->status, false, "", NULL, why);
    } else {
        call_answer(c, resp, msg);
        cJSON_Delete(msg);
    }
    if (changed && s->state == SRV_READY) {
        lr_info("mcp.list_changed", "server %s: its tool list changed; listing it again", s->conf->name);
        s->relist = true;
        srv_list(s);
    }
}

/* Posts c's tools/call (a new JSON-RPC id each time).  Returns
 * lr_http_send's code. */
static int call_post(lr_mcp_call_t *c) {
    server_t *s = c->s;
    char h_idem[200], h_task[140], h_epoch[64], *t;
    const char *extra[4];
    uint64_t now = now_ms();
    long left = c->deadline > now ? (long)(c->deadline - now) : 0;
    int rc;
    c->rpc_id = s->next_id++;
    t = rpc_text(c->rpc_id, "tools/call", cJSON_Parse(c->params));
    snprintf(h_idem, sizeof(h_idem), "Idempotency-Key: %s", c->idem);
    snprintf(h_task, sizeof(h_task), "X-Longrun-Task-Id: %s", c->task);
    snprintf(h_epoch, sizeof(h_epoch), "X-Longrun-Epoch: %lld", c->epoch);
    extra[0] = h_idem;
    extra[1] = h_task;
    extra[2] = h_epoch;
    extra[3] = NULL;
    rc = t == NULL ? LR_ENOMEM
                   : post(s, t, true, extra, left > 100 ? left : 100, (size_t)c->def->max_result_bytes * 8 + 65536,
                          call_response, c, &c->req);
    free(t);
    if (rc == 0) {
        call_set_state(c, CALL_SENT);
    }
    return rc;
}

/* Sends waiting call c from a loop callback: a send that fails answers it
 * now. */
static void call_send(lr_mcp_call_t *c) {
    int rc = call_post(c);
    if (rc != 0) {
        call_unlink(c);
        call_finish(c, rc, 0, false, "", NULL, "cannot send the request");
    }
}

int lr_mcp_call(lr_mcp_t *m, const lr_tool_def_t *def, const char *args, const char *idem, long long epoch,
                const char *task_id, long timeout_ms, lr_mcp_call_cb cb, void *arg, lr_mcp_call_t **out, char *errbuf,
                size_t errlen) {
    server_t *s;
    lr_mcp_call_t *c;
    cJSON *params, *a, *meta;
    if (m == NULL || def == NULL || def->mcp_tool == NULL || def->mcp_server < 0 || def->mcp_server >= m->nservers ||
        cb == NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "not an MCP tool of this worker");
    }
    s = &m->servers[def->mcp_server];
    if (s->state == SRV_BACKOFF || s->state == SRV_CLOSED) {
        return lr_seterr(errbuf, errlen, LR_ECONN, "MCP server %s is unavailable: %s", s->conf->name, s->last_error);
    }
    a = args != NULL && args[0] != '\0' ? cJSON_Parse(args) : cJSON_CreateObject();
    if (!cJSON_IsObject(a)) {
        cJSON_Delete(a);
        return lr_seterr(errbuf, errlen, LR_EINVAL, "the arguments are not a JSON object");
    }
    c = calloc(1, sizeof(*c));
    params = cJSON_CreateObject();
    meta = cJSON_CreateObject();
    cJSON_AddStringToObject(params, "name", def->mcp_tool);
    cJSON_AddItemToObject(params, "arguments", a);
    cJSON_AddStringToObject(meta, "longrun/idempotency_key", idem);
    cJSON_AddNumberToObject(meta, "longrun/epoch", (double)epoch);
    cJSON_AddStringToObject(meta, "longrun/task_id", task_id);
    cJSON_AddItemToObject(params, "_meta", meta);
    if (c != NULL) {
        c->params = cJSON_PrintUnformatted(params);
    }
    cJSON_Delete(params);
    if (c == NULL || c->params == NULL) {
        if (c != NULL) {
            call_free(c);
        }
        return lr_seterr(errbuf, errlen, LR_ENOMEM, "out of memory");
    }
    c->s = s;
    c->def = def;
    c->state = CALL_WAITING;
    c->deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : def->timeout_ms);
    snprintf(c->idem, sizeof(c->idem), "%s", idem);
    snprintf(c->task, sizeof(c->task), "%s", task_id);
    c->epoch = epoch;
    c->cb = cb;
    c->arg = arg;
    if (s->state == SRV_IDLE) {
        srv_connect(s); /* (before c is queued: a failure to send fails no call inside lr_mcp_call) */
    }
    if (s->state == SRV_BACKOFF) {
        call_free(c);
        return lr_seterr(errbuf, errlen, LR_ECONN, "MCP server %s is unavailable: %s", s->conf->name, s->last_error);
    }
    c->next = s->calls;
    s->calls = c;
    if (s->state == SRV_READY) {
        int rc = call_post(c);
        if (rc != 0) {
            call_unlink(c);
            call_free(c);
            return lr_seterr(errbuf, errlen, rc, "cannot send the request: %s", lr_strerror(rc));
        }
    }
    if (out != NULL) {
        *out = c;
    }
    return 0;
}

void lr_mcp_abandon(lr_mcp_call_t *c, const char *reason) {
    if (c == NULL) {
        return;
    }
    call_unlink(c);
    if (c->state == CALL_SENT && c->req != NULL) {
        lr_http_cancel(c->req);
        c->req = NULL;
        call_cancelled_note(c, reason != NULL ? reason : "abandoned");
    }
    call_set_state(c, CALL_DONE);
    call_free(c);
}

/* ----------------------------------------------------------------- client */

static void wait_cb(uv_timer_t *t) {
    lr_mcp_t *m = t->data;
    if (!m->ready) {
        for (int i = 0; i < m->nservers; i++) {
            if (!m->servers[i].listed) {
                lr_warn("mcp.not_ready", "server %s has no tool list yet (%s): starting without its tools",
                        m->servers[i].conf->name,
                        m->servers[i].last_error[0] != '\0' ? m->servers[i].last_error : "no answer yet");
            }
        }
        m->ready = true;
        if (m->ready_cb != NULL) {
            m->ready_cb(m->ready_arg);
        }
    }
}

int lr_mcp_init(lr_mcp_t **out, uv_loop_t *loop, lr_http_t *http, lr_mcp_egress_cb egress, void *egress_arg) {
    lr_mcp_t *m = calloc(1, sizeof(*m));
    *out = NULL;
    if (m == NULL) {
        return LR_ENOMEM;
    }
    m->loop = loop;
    m->http = http;
    m->egress = egress;
    m->egress_arg = egress_arg;
    m->nservers = lr_mcp_conf_count();
    uv_timer_init(loop, &m->wait_timer);
    m->wait_timer.data = m;
    m->open_handles = 1;
    for (int i = 0; i < m->nservers; i++) {
        server_t *s = &m->servers[i];
        s->m = m;
        s->index = i;
        s->conf = lr_mcp_conf_get(i);
        s->state = SRV_IDLE;
        s->next_id = 1;
        uv_timer_init(loop, &s->timer);
        s->timer.data = s;
        m->open_handles++;
    }
    *out = m;
    return 0;
}

void lr_mcp_start(lr_mcp_t *m, long wait_ms, lr_mcp_ready_cb ready, void *arg) {
    m->ready_cb = ready;
    m->ready_arg = arg;
    m->started = true;
    uv_timer_start(&m->wait_timer, wait_cb, (uint64_t)(m->nservers == 0 ? 0 : wait_ms), 0);
    for (int i = 0; i < m->nservers; i++) {
        if (m->servers[i].state == SRV_IDLE) {
            srv_connect(&m->servers[i]);
        }
    }
}

bool lr_mcp_ready(const lr_mcp_t *m) { return m == NULL || m->ready; }

cJSON *lr_mcp_health(const lr_mcp_t *m) {
    cJSON *arr = cJSON_CreateArray();
    for (int i = 0; m != NULL && i < m->nservers; i++) {
        const server_t *s = &m->servers[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", s->conf->name);
        cJSON_AddStringToObject(o, "state", srv_names[s->state]);
        cJSON_AddNumberToObject(o, "tools", s->ntools);
        cJSON_AddBoolToObject(o, "session", s->session[0] != '\0');
        if (s->version[0] != '\0') {
            cJSON_AddStringToObject(o, "protocol", s->version);
        }
        if (s->state == SRV_BACKOFF) {
            cJSON_AddStringToObject(o, "last_error", s->last_error);
        }
        cJSON_AddItemToArray(arr, o);
    }
    return arr;
}

static void closed(lr_mcp_t *m) {
    if (--m->open_handles == 0) {
        void (*done)(void *) = m->closed;
        void *arg = m->closed_arg;
        for (int i = 0; i < m->nservers; i++) {
            toolset_free(m->servers[i].lists);
            toolset_free(m->servers[i].building);
        }
        free(m);
        if (done != NULL) {
            done(arg);
        }
    }
}

static void wait_closed_cb(uv_handle_t *h) { closed(h->data); }

static void srv_closed_cb(uv_handle_t *h) { closed(((server_t *)h->data)->m); }

void lr_mcp_close(lr_mcp_t *m, void (*done)(void *arg), void *arg) {
    if (m == NULL) {
        if (done != NULL) {
            done(arg);
        }
        return;
    }
    m->closed = done;
    m->closed_arg = arg;
    for (int i = 0; i < m->nservers; i++) {
        server_t *s = &m->servers[i];
        while (s->calls != NULL) {
            lr_mcp_call_t *c = s->calls;
            s->calls = c->next;
            if (c->req != NULL) {
                lr_http_cancel(c->req);
            }
            c->state = CALL_DONE;
            call_free(c);
        }
        if (s->req != NULL) {
            lr_http_cancel(s->req);
            s->req = NULL;
        }
        for (int n = 0; n < MCP_MAX_NOTES; n++) {
            if (s->notes[n].req != NULL) {
                lr_http_cancel(s->notes[n].req);
                s->notes[n].req = NULL;
                s->notes[n].s = NULL;
            }
        }
        if (s->state != SRV_CLOSED) {
            srv_set_state(s, SRV_CLOSED);
        }
        uv_close((uv_handle_t *)&s->timer, srv_closed_cb);
    }
    uv_close((uv_handle_t *)&m->wait_timer, wait_closed_cb);
}
