/*
 * http.h - asynchronous HTTP client: curl multi driven by a libuv loop.
 *
 * Design (the pattern of curl's docs/examples/multi-uv.c): one lr_http_t per
 * loop owns a CURLM, a uv_timer_t for curl's timeout and one uv_poll_t per
 * socket curl asks us to watch.  Requests are easy handles added to the multi
 * handle; completion is detected with curl_multi_info_read after every
 * curl_multi_socket_action.  Connections are kept alive and reused (HTTP/1.1
 * and HTTP/2 when the server offers it).  CURLOPT_NOSIGNAL is set.  Nothing
 * here ever blocks the loop (no DNS lookups on the loop thread: curl's
 * threaded resolver is used when available; loopback numeric hosts need none).
 *
 * Thread affinity: every function must be called on the loop thread, and
 * every callback runs on the loop thread.
 */
#ifndef LR_HTTP_H
#define LR_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

#include "err.h"

typedef struct lr_http lr_http_t;
typedef struct lr_http_req lr_http_req_t;

/* Upper bounds; a response body beyond opts.max_body is cut and flagged. */
#define LR_HTTP_MAX_HEADERS_BYTES (64 * 1024)
#define LR_HTTP_DEFAULT_MAX_BODY (8 * 1024 * 1024)

/* A connect-time check (opts.check_addr): called on the loop thread with
 * each address curl is about to connect to, after DNS and before any
 * packet is sent (curl's CURLOPT_OPENSOCKETFUNCTION).  Returns 0 to let
 * the connection be made, or a negative LR_E* code to refuse it, with a
 * reason in why (whylen bytes).  When every address is refused the request
 * fails with that code and reason (resp.err, resp.errmsg). */
typedef int (*lr_http_addr_cb)(const struct sockaddr *addr, size_t addrlen, void *arg, char *why, size_t whylen);

/* An admission check of response bytes (opts.admit): called on the loop
 * thread, from inside the transfer, before the body grows to total bytes.
 * Returns true to keep them, or false to pause the transfer: no more of its
 * body is read (TCP holds the peer back) until lr_http_resume().  It must
 * not call lr_http_* itself. */
typedef bool (*lr_http_admit_cb)(size_t total, void *arg);

typedef struct lr_http_opts {
    const char *method;         /* "POST", "GET"; NULL means POST when body != NULL else GET */
    const char *url;            /* required */
    const char *const *headers; /* NULL-terminated "Name: value" strings, or NULL */
    const char *body;           /* request body or NULL; copied */
    size_t body_len;
    long timeout_ms;         /* whole-request timeout; 0 = 60000 */
    long connect_timeout_ms; /* 0 = 10000 */
    size_t max_body;         /* 0 = LR_HTTP_DEFAULT_MAX_BODY */
    /* Optional connect-time check of each address (see lr_http_addr_cb);
     * with it, no proxy is used (the check must see the destination).  A
     * pooled connection opened earlier is reused without a new check, so
     * requests that need their own check set fresh_connection too. */
    lr_http_addr_cb check_addr;
    void *check_arg;        /* passed to check_addr; must outlive the request */
    bool fresh_connection;  /* neither reuse a pooled connection nor leave this one in the pool */
    lr_http_admit_cb admit; /* optional: may pause the body (see lr_http_admit_cb) */
    void *admit_arg;        /* passed to admit; must outlive the request */
} lr_http_opts_t;

/* Fills o for a POST of body (NUL-terminated, borrowed) to url with headers
 * ("Name: value", NULL-terminated); every other option zero. */
void lr_http_opts_post(lr_http_opts_t *o, const char *url, const char *const *headers, const char *body);

typedef struct lr_http_response {
    int err;          /* 0 when an HTTP response (any status) arrived; LR_ETIMEOUT,
                         LR_ECONN (connect/read/DNS/TLS failure), LR_ECANCELED, LR_ENOMEM */
    long status;      /* HTTP status code, 0 when no response */
    const char *body; /* NUL-terminated (body_len excludes the NUL); never NULL */
    size_t body_len;
    bool truncated;      /* body was cut at max_body */
    const char *headers; /* raw response header block of the final response, NUL-terminated */
    size_t headers_len;
    double total_ms;    /* wall time of the request */
    const char *errmsg; /* curl's error text when err != 0, else "" */
} lr_http_response_t;

/* Called exactly once per successfully started request (unless canceled with
 * lr_http_cancel, then never).  resp and everything it points to are borrowed:
 * valid only during the callback; copy what you keep.  The request handle is
 * freed right after the callback returns. */
typedef void (*lr_http_cb)(const lr_http_response_t *resp, void *arg);

/* Creates the client on loop.  Returns 0, LR_ENOMEM, or LR_EIO (curl init). */
int lr_http_init(lr_http_t **out, uv_loop_t *loop) LR_MUSTCHECK;

/* Starts a request.  Copies opts (url, headers, body).  On success returns 0,
 * stores an opaque handle in *out_req (if out_req != NULL) and cb will run
 * later (never synchronously inside this call).  On failure (LR_EINVAL,
 * LR_ENOMEM, LR_ESHUTDOWN) cb never runs. */
int lr_http_send(lr_http_t *h, const lr_http_opts_t *opts, lr_http_cb cb, void *arg,
                 lr_http_req_t **out_req) LR_MUSTCHECK;

/* Aborts an in-flight request; its callback will not run.  req must be a
 * handle whose callback has not run yet. */
void lr_http_cancel(lr_http_req_t *req);

/* Resumes a transfer its admit check paused; no-op otherwise.  Never call
 * it from inside a curl callback (any lr_http callback or admit check):
 * from a timer or another loop callback. */
void lr_http_resume(lr_http_req_t *req);

/* Number of requests in flight. */
size_t lr_http_in_flight(const lr_http_t *h);

/* Finds a response header (case-insensitive name) in resp->headers and copies
 * its trimmed value into buf.  Returns 0, LR_ENOTFOUND, or LR_ETOOBIG (value
 * cut to fit). */
int lr_http_header(const lr_http_response_t *resp, const char *name, char *buf, size_t buflen);

/* Cancels every request (their callbacks do not run), closes every handle and
 * calls done(arg) on the loop once the last close callback ran; then the
 * object is freed.  Safe to call with h == NULL (done is then called
 * synchronously). */
void lr_http_close(lr_http_t *h, void (*done)(void *arg), void *arg);

#endif
