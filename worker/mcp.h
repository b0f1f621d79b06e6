/*
 * mcp.h - the worker's MCP client (Model Context Protocol, the Streamable
 * HTTP transport): one session per server of the agents file's
 * "mcp_servers", its tools listed at start and exposed to the agents that
 * list the server, and tools/call requests for the agent steps.
 *
 * The protocol (docs/agents.md, "MCP servers"): every JSON-RPC message is a
 * POST to the server's URL with Accept: application/json, text/event-stream;
 * the answer is one JSON object or an SSE stream that carries it (matched by
 * id).  A session starts with initialize (protocol-version negotiation) and
 * notifications/initialized; the Mcp-Session-Id the server gives and the
 * negotiated MCP-Protocol-Version go on every later request.  A server that
 * answers 404 to a request with the session has forgotten it: the client
 * initializes again and sends the request once more.  Each tools/call
 * carries params._meta {"longrun/idempotency_key": "<task>:<step>:<i>",
 * "longrun/epoch": N, "longrun/task_id": "<task>"} (and the same values in
 * the Idempotency-Key, X-Longrun-Epoch and X-Longrun-Task-Id headers).  A
 * call that is abandoned (cancel, drain, lease loss, its timeout) is
 * followed by notifications/cancelled.
 *
 * Thread affinity: the loop thread only (the loop of the http client).
 */
#ifndef LR_MCP_H
#define LR_MCP_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <uv.h>

#include "agents.h"
#include "err.h"
#include "http.h"

typedef struct lr_mcp lr_mcp_t;
typedef struct lr_mcp_call lr_mcp_call_t;

/* What a tools/call came to.  Borrowed: valid during the callback only. */
typedef struct lr_mcp_result {
    /* 0: the server answered the call (is_error says whether the tool
     * failed); else the call did not complete: LR_ETIMEOUT, LR_ECONN,
     * LR_EPERM (refused by the egress check), LR_EHTTP (an HTTP status other
     * than 2xx), LR_EPARSE (no valid JSON-RPC answer), LR_ETOOBIG (the
     * response is over the server's limit), LR_ENOTFOUND (the session was
     * lost again right after a new one was made), LR_ENOMEM. */
    int err;
    long http_status;        /* the call's HTTP status (0: none) */
    bool is_error;           /* the result's isError, a JSON-RPC error, or a
                                structuredContent that does not match the outputSchema */
    const char *text;        /* the text content joined by newlines (or why it
                                failed when is_error); never NULL */
    const cJSON *structured; /* structuredContent, or NULL */
    const char *errmsg;      /* err != 0: what went wrong; never NULL */
} lr_mcp_result_t;

/* Runs exactly once per call started (unless abandoned: then never). */
typedef void (*lr_mcp_call_cb)(const lr_mcp_result_t *res, void *arg);
/* Sets the connect-time check on a request's options (egress.h). */
typedef void (*lr_mcp_egress_cb)(void *arg, lr_http_opts_t *o);
/* Called once, when every server has its tools or the start wait is over. */
typedef void (*lr_mcp_ready_cb)(void *arg);

/* Creates the client for the servers of the loaded agents file (none is
 * fine).  http is borrowed and must outlive the client.  Returns 0 or
 * LR_ENOMEM. */
int lr_mcp_init(lr_mcp_t **out, uv_loop_t *loop, lr_http_t *http, lr_mcp_egress_cb egress,
                void *egress_arg) LR_MUSTCHECK;

/* Connects to every server and lists its tools.  ready(arg) runs once on
 * the loop (never inside this call) when every server has listed its tools
 * or after wait_ms, whichever comes first; servers still unreachable then
 * keep being retried with backoff, and their tools appear once listed. */
void lr_mcp_start(lr_mcp_t *m, long wait_ms, lr_mcp_ready_cb ready, void *arg);

/* Whether ready has run (true for a NULL client). */
bool lr_mcp_ready(const lr_mcp_t *m);

/* Calls MCP tool def (def->mcp_tool on server def->mcp_server) with args (a
 * JSON object, text; NULL or "" for {}), idem as its idempotency key, epoch
 * and task id, within timeout_ms.  On success returns 0, *out (if not NULL)
 * is the call until its callback ran, and cb runs later (never inside this
 * call).  Else LR_EINVAL, LR_ENOMEM, LR_ECONN (the server is in backoff
 * after failures; errbuf says why) and cb never runs. */
int lr_mcp_call(lr_mcp_t *m, const lr_tool_def_t *def, const char *args, const char *idem, long long epoch,
                const char *task_id, long timeout_ms, lr_mcp_call_cb cb, void *arg, lr_mcp_call_t **out, char *errbuf,
                size_t errlen) LR_MUSTCHECK;

/* Abandons call c (its callback will not run): the request is cancelled and
 * the server is sent notifications/cancelled with reason when the request
 * was sent. */
void lr_mcp_abandon(lr_mcp_call_t *c, const char *reason);

/* One line per server for /health: name, state, tools, session (yes/no). */
cJSON *lr_mcp_health(const lr_mcp_t *m);

/* Abandons every call (callbacks do not run), cancels every request, closes
 * the timers and frees the client once they are closed, then done(arg).
 * NULL m: done runs at once. */
void lr_mcp_close(lr_mcp_t *m, void (*done)(void *arg), void *arg);

#endif
