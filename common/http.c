/*
 * http.c - asynchronous HTTP client: curl multi on a libuv loop; see http.h.
 *
 * Design (curl's docs/examples/multi-uv.c):
 *
 *   - curl tells us, through socket_cb (CURLMOPT_SOCKETFUNCTION), which
 *     sockets to watch for what.  Each watched socket gets a heap-allocated
 *     sock_ctx holding a uv_poll_t; it is attached to the socket with
 *     curl_multi_assign, stopped and uv_close()d when curl says
 *     CURL_POLL_REMOVE, and freed only in its close callback.
 *   - curl tells us, through timer_cb (CURLMOPT_TIMERFUNCTION), when it wants
 *     to be called back without socket activity; that drives one uv_timer_t
 *     embedded in lr_http_t.
 *   - Socket readiness and timer expiry both end in curl_multi_socket_action,
 *     followed by process_done(), which drains curl_multi_info_read and runs
 *     the user callbacks.  User callbacks therefore only ever run from a
 *     libuv callback, never from inside a curl callback and never inside
 *     lr_http_send.
 *
 * Re-entrancy: a user callback may call lr_http_send, lr_http_cancel (on other
 * requests) or even lr_http_close.  The finished request is taken off the multi
 * handle and off our list before its callback runs, so neither cancel nor close
 * can touch it; after each callback process_done re-checks whether the client
 * started closing and, if so, stops using the (now cleaned up) multi handle.
 * lr_http_t itself is only freed from the last close callback, so it outlives
 * every libuv callback that could still reference it.
 *
 * Failures inside curl's callbacks never return -1 to curl: that marks the
 * whole multi handle dead (and libcurl 7.88 then crashes in
 * curl_multi_socket_action).  The affected request is flagged instead and
 * failed from process_done.
 *
 * Everything runs on the loop thread.
 */
#include "http.h"

#include <curl/curl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "list.h"
#include "log.h"

/* Internal bounds on what a caller may pass in; beyond them lr_http_send
 * answers LR_EINVAL instead of handing curl something absurd. */
#define MAX_URL_LEN (64 * 1024)
#define MAX_METHOD_LEN 32
#define MAX_REQ_HEADER_LEN (16 * 1024)
#define MAX_REQ_HEADERS 256
#define DEFAULT_TIMEOUT_MS 60000L
#define DEFAULT_CONNECT_TIMEOUT_MS 10000L
/* Connections kept in curl's pool.  curl's default (4 x handles, shrinking
 * as handles go away) would close most connections after a burst of
 * concurrent requests; a large fixed pool keeps them for reuse. */
#define MAX_CACHED_CONNECTIONS 1024L
/* Largest body we ever try to hold; keeps max_body + 1 from overflowing. */
#define MAX_BODY_CAP (SIZE_MAX / 4)

/* A growable buffer with a hard maximum (curl's dynbuf idea). */
struct buf {
    char *data; /* NULL until the first byte arrives; NUL-terminated after */
    size_t len;
    size_t cap;
};

enum req_state {
    REQ_ACTIVE,   /* added to the multi handle, transfer in progress */
    REQ_CALLBACK, /* finished: removed from the multi handle, user callback running */
};

static const char *const req_state_names[] = {"active", "callback"};

struct lr_http_req {
    lr_http_t *h;
    lr_list_t link; /* in h->reqs while REQ_ACTIVE */
    enum req_state state;
    CURL *easy;
    struct curl_slist *headers;
    char *body; /* our copy of opts->body; curl borrows it */
    lr_http_cb cb;
    void *arg;
    size_t max_body;
    struct buf resp_body;
    struct buf resp_headers;
    bool truncated;         /* set by body_cb when the body passed max_body */
    int local_err;          /* our own reason for aborting from a curl callback */
    bool sock_failed;       /* socket_cb could not watch its socket: fail it */
    lr_http_admit_cb admit; /* admission of body bytes, or NULL */
    void *admit_arg;
    bool paused;                /* admit said no: the transfer is paused */
    lr_http_addr_cb check_addr; /* connect-time check, or NULL */
    void *check_arg;
    int refused;         /* check_addr's code for the last address it refused, or 0 */
    char local_msg[128]; /* text for local_err; curl overwrites errbuf */
    char errbuf[CURL_ERROR_SIZE];
    uint64_t start_ns;
};

/* One socket curl asked us to watch. */
struct sock_ctx {
    uv_poll_t poll;
    lr_http_t *h;
    curl_socket_t fd;
    int events;     /* UV_READABLE | UV_WRITABLE currently wanted */
    bool closing;   /* uv_close called; freed in close_sock_cb */
    lr_list_t link; /* in h->socks until closing */
};

struct lr_http {
    uv_loop_t *loop;
    CURLM *multi;     /* NULL once lr_http_close cleaned it up */
    uv_timer_t timer; /* curl's timeout; embedded, freed with h */
    lr_list_t reqs;   /* requests in REQ_ACTIVE, newest first */
    size_t n_reqs;
    lr_list_t socks;       /* polls not yet closing (struct sock_ctx), newest first */
    size_t pending_closes; /* uv_close calls whose callback has not run */
    bool sweep_failed;     /* some request has sock_failed set */
    bool closing;          /* lr_http_close was called */
    void (*done)(void *arg);
    void *done_arg;
};

static void process_done(lr_http_t *h);
static void maybe_finish_close(lr_http_t *h);

/* ---- small helpers ---------------------------------------------------- */

#define set_state(req, st) set_state_at((req), (st), __LINE__)

/* The only place a request changes state; traces old -> new (line N). */
static void set_state_at(struct lr_http_req *req, enum req_state st, int line) {
    lr_debug("http.req.state", "req=%p %s -> %s (line %d)", (void *)req, req_state_names[req->state],
             req_state_names[st], line);
    req->state = st;
}

/* Appends n bytes, keeping the buffer NUL-terminated and never above max
 * bytes of content.  Returns 0, LR_ETOOBIG (nothing appended) or LR_ENOMEM. */
static int buf_append(struct buf *b, const char *p, size_t n, size_t max) {
    if (n > max - b->len) {
        return LR_ETOOBIG;
    }
    size_t need = b->len + n + 1;
    if (need > b->cap) {
        size_t cap = b->cap != 0 ? b->cap : 1024;
        while (cap < need) {
            cap *= 2;
        }
        if (cap > max + 1) {
            cap = max + 1;
        }
        char *d = realloc(b->data, cap);
        if (d == NULL) {
            return LR_ENOMEM;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

static void list_add_req(lr_http_t *h, struct lr_http_req *req) {
    lr_list_push_front(&h->reqs, &req->link);
    h->n_reqs++;
}

static void list_del_req(lr_http_t *h, struct lr_http_req *req) {
    lr_list_remove(&req->link);
    h->n_reqs--;
}

/* Frees a request that is no longer attached to the multi handle. */
static void req_free(struct lr_http_req *req) {
    if (req == NULL) {
        return;
    }
    if (req->easy != NULL) {
        curl_easy_cleanup(req->easy);
    }
    curl_slist_free_all(req->headers);
    free(req->body);
    free(req->resp_body.data);
    free(req->resp_headers.data);
    free(req);
}

/* Translates a finished transfer's CURLcode at the adapter boundary. */
static int map_curl_code(const struct lr_http_req *req, CURLcode code) {
    switch (code) {
    case CURLE_OK: return 0;
    case CURLE_OPERATION_TIMEDOUT: return LR_ETIMEOUT;
    case CURLE_COULDNT_CONNECT:
        /* Every address was refused by check_addr (or did not answer). */
        return req->refused != 0 ? req->refused : LR_ECONN;
    case CURLE_OUT_OF_MEMORY: return LR_ENOMEM;
    case CURLE_WRITE_ERROR:
        /* We abort from body_cb/header_cb by returning a short count; the
         * reason is ours, not curl's.  A cut body is a success by contract. */
        if (req->truncated) {
            return 0;
        }
        if (req->local_err != 0) {
            return req->local_err;
        }
        return LR_ECONN;
    default:
        /* Resolve, connect, send, receive, TLS, HTTP/2 framing, malformed
         * replies...: all mean "no usable response from that server". */
        return LR_ECONN;
    }
}

/* ---- curl callbacks (never call back into curl_multi_* from here) ------ */

static size_t body_cb(char *ptr, size_t size, size_t nmemb, void *userdata) {
    struct lr_http_req *req = userdata;
    size_t n = size * nmemb;
    size_t room = req->max_body - req->resp_body.len;
    size_t take = n < room ? n : room;

    if (take > 0 && req->admit != NULL && !req->admit(req->resp_body.len + take, req->admit_arg)) {
        /* curl hands the same bytes again once resumed. */
        req->paused = true;
        return CURL_WRITEFUNC_PAUSE;
    }
    if (take > 0) {
        int rc = buf_append(&req->resp_body, ptr, take, req->max_body);
        if (rc != 0) {
            req->local_err = rc;
            snprintf(req->local_msg, sizeof(req->local_msg), "response body: %s", lr_strerror(rc));
            return CURL_WRITEFUNC_ERROR;
        }
    }
    if (take < n) {
        /* Over the limit: keep what we have and stop the transfer instead of
         * downloading (and discarding) an unbounded remainder.  The aborted
         * connection is closed by curl, not reused. */
        req->truncated = true;
        return CURL_WRITEFUNC_ERROR;
    }
    return n;
}

static size_t header_cb(char *ptr, size_t size, size_t nitems, void *userdata) {
    struct lr_http_req *req = userdata;
    size_t n = size * nitems;

    /* A new status line starts a new response (after 1xx, or a proxy's
     * CONNECT reply): only the final response's headers are kept. */
    if (n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) {
        req->resp_headers.len = 0;
        if (req->resp_headers.data != NULL) {
            req->resp_headers.data[0] = '\0';
        }
    }
    int rc = buf_append(&req->resp_headers, ptr, n, LR_HTTP_MAX_HEADERS_BYTES);
    if (rc != 0) {
        req->local_err = rc;
        snprintf(req->local_msg, sizeof(req->local_msg), "response headers: %s (limit %d bytes)", lr_strerror(rc),
                 LR_HTTP_MAX_HEADERS_BYTES);
        return CURL_WRITEFUNC_ERROR;
    }
    return n;
}

/* CURLOPT_OPENSOCKETFUNCTION of a request with check_addr: asks it about
 * the resolved address, then opens the socket as curl would (curl makes it
 * non-blocking).  A refused address gets CURL_SOCKET_BAD, so no packet is
 * sent to it; curl tries the next address, if any. */
static curl_socket_t open_socket_cb(void *clientp, curlsocktype purpose, struct curl_sockaddr *a) {
    struct lr_http_req *req = clientp;
    char why[96];
    int rc;

    if (purpose != CURLSOCKTYPE_IPCXN) {
        return CURL_SOCKET_BAD;
    }
    why[0] = '\0';
    rc = req->check_addr(&a->addr, a->addrlen, req->check_arg, why, sizeof(why));
    if (rc != 0) {
        req->refused = rc;
        snprintf(req->local_msg, sizeof(req->local_msg), "connection refused by policy: %s",
                 why[0] != '\0' ? why : lr_strerror(rc));
        return CURL_SOCKET_BAD;
    }
    return socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
}

static void poll_cb(uv_poll_t *handle, int status, int events);
static void on_timeout(uv_timer_t *timer);

static void close_sock_cb(uv_handle_t *handle) {
    struct sock_ctx *ctx = handle->data;
    lr_http_t *h = ctx->h;

    free(ctx);
    h->pending_closes--;
    maybe_finish_close(h);
}

/* Stops watching a socket now (so its fd number may be reused by curl right
 * away) and frees its context once libuv is done with it. */
static void sock_close(lr_http_t *h, struct sock_ctx *ctx) {
    if (ctx->closing) {
        return;
    }
    ctx->closing = true;
    lr_list_remove(&ctx->link);
    h->pending_closes++;
    uv_close((uv_handle_t *)&ctx->poll, close_sock_cb);
}

/* socket_cb could not set up a watch for the transfer easy.  Returning -1 to
 * curl would mark the whole multi handle dead (every later transfer fails),
 * so instead return 0 and fail just this transfer from process_done, outside
 * curl's callbacks.  Other transfers multiplexed on the same socket (HTTP/2)
 * stall until their own timeout. */
static int socket_failed(lr_http_t *h, CURL *easy, int err, const char *what, int uv_err) {
    void *priv = NULL;

    curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
    struct lr_http_req *req = priv;
    lr_error("http.socket", "%s: %s", what, uv_strerror(uv_err));
    if (req != NULL && !req->sock_failed) {
        req->sock_failed = true;
        req->local_err = err;
        snprintf(req->local_msg, sizeof(req->local_msg), "%s: %s", what, uv_strerror(uv_err));
        h->sweep_failed = true;
    }
    return 0;
}

static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp) {
    lr_http_t *h = userp;
    struct sock_ctx *ctx = socketp;
    int events = 0;
    int rc;

    if (what == CURL_POLL_REMOVE) {
        if (ctx != NULL) {
            sock_close(h, ctx);
            if (h->multi != NULL && !h->closing) {
                curl_multi_assign(h->multi, s, NULL);
            }
        }
        return 0;
    }
    if (h->closing) {
        /* curl_multi_cleanup may still talk about sockets; we watch nothing
         * new once closing. */
        return 0;
    }
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) {
        events |= UV_READABLE;
    }
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) {
        events |= UV_WRITABLE;
    }
    if (ctx == NULL) {
        ctx = calloc(1, sizeof(*ctx));
        if (ctx == NULL) {
            return socket_failed(h, easy, LR_ENOMEM, "watching a socket", UV_ENOMEM);
        }
        ctx->h = h;
        ctx->fd = s;
        rc = uv_poll_init_socket(h->loop, &ctx->poll, s);
        if (rc != 0) {
            free(ctx); /* never initialized: no uv_close needed */
            return socket_failed(h, easy, rc == UV_ENOMEM ? LR_ENOMEM : LR_ECONN, "uv_poll_init_socket", rc);
        }
        ctx->poll.data = ctx;
        lr_list_push_front(&h->socks, &ctx->link);
        curl_multi_assign(h->multi, s, ctx);
    }
    ctx->events = events;
    rc = uv_poll_start(&ctx->poll, events, poll_cb);
    if (rc != 0) {
        return socket_failed(h, easy, LR_ECONN, "uv_poll_start", rc);
    }
    return 0;
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
    lr_http_t *h = userp;

    if (h->closing) {
        return 0;
    }
    if (timeout_ms < 0) {
        uv_timer_stop(&h->timer);
        return 0;
    }
    /* 0 means "as soon as possible".  A 0 ms uv timer restarted from inside
     * the timer phase runs again in the same phase (libuv 1.44), which could
     * starve the loop if curl keeps asking for 0; 1 ms always yields. */
    if (timeout_ms == 0) {
        timeout_ms = 1;
    }
    uv_timer_start(&h->timer, on_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

/* ---- libuv callbacks -------------------------------------------------- */

static void on_timeout(uv_timer_t *timer) {
    lr_http_t *h = timer->data;
    int running = 0;

    if (h->closing) {
        return;
    }
    CURLMcode mc = curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    if (mc != CURLM_OK) {
        lr_warn("http.multi", "curl_multi_socket_action(timeout): %s", curl_multi_strerror(mc));
    }
    process_done(h);
}

static void poll_cb(uv_poll_t *handle, int status, int events) {
    struct sock_ctx *ctx = handle->data;
    lr_http_t *h = ctx->h;
    int flags = 0;
    int running = 0;

    if (h->closing || ctx->closing) {
        return;
    }
    if (status < 0) {
        /* libuv stopped the poll (POLLERR); let curl look at the socket. */
        flags = CURL_CSELECT_ERR;
    } else {
        if (events & UV_READABLE) {
            flags |= CURL_CSELECT_IN;
        }
        if (events & UV_WRITABLE) {
            flags |= CURL_CSELECT_OUT;
        }
    }
    CURLMcode mc = curl_multi_socket_action(h->multi, ctx->fd, flags, &running);
    if (mc != CURLM_OK) {
        lr_warn("http.multi", "curl_multi_socket_action(%d): %s", (int)ctx->fd, curl_multi_strerror(mc));
    }
    /* ctx stays allocated until its close callback, so these reads are safe
     * even when curl removed the socket during socket_action.  If curl still
     * wants it after an error, re-arm the poll libuv stopped: curl only
     * calls socket_cb on a change, so nobody else would. */
    if (status < 0 && !ctx->closing && !h->closing) {
        uv_poll_start(&ctx->poll, ctx->events, poll_cb);
    }
    process_done(h);
}

/* Takes a finished (or failed) request off the multi handle, runs its
 * callback and frees it.  Runs only from process_done, outside curl's
 * callbacks, where removing an easy handle is allowed. */
static void finish_req(lr_http_t *h, struct lr_http_req *req, CURLcode code) {
    lr_http_response_t resp;
    long status = 0;

    curl_multi_remove_handle(h->multi, req->easy);
    list_del_req(h, req);
    set_state(req, REQ_CALLBACK);

    curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
    memset(&resp, 0, sizeof(resp));
    resp.err = req->sock_failed ? req->local_err : map_curl_code(req, code);
    resp.status = status;
    resp.body = req->resp_body.data != NULL ? req->resp_body.data : "";
    resp.body_len = req->resp_body.len;
    resp.truncated = req->truncated;
    resp.headers = req->resp_headers.data != NULL ? req->resp_headers.data : "";
    resp.headers_len = req->resp_headers.len;
    resp.total_ms = (double)(uv_hrtime() - req->start_ns) / 1e6;
    if (resp.err == 0) {
        resp.errmsg = "";
    } else if ((req->local_err != 0 || (req->refused != 0 && resp.err == req->refused)) && req->local_msg[0] != '\0') {
        resp.errmsg = req->local_msg; /* curl's errbuf would only say "write error" */
    } else if (req->errbuf[0] != '\0') {
        resp.errmsg = req->errbuf;
    } else {
        resp.errmsg = curl_easy_strerror(code);
    }
    if (resp.err != 0) {
        lr_debug("http.failed", "err=%s curl=%d (%s) total_ms=%.1f", lr_err_name(resp.err), (int)code, resp.errmsg,
                 resp.total_ms);
    }
    req->cb(&resp, req->arg);
    req_free(req);
}

/* Drains curl's completion messages, then fails the requests socket_cb could
 * not watch, running the user callbacks.  Any callback may close the client
 * (h->closing; h->multi is gone then) or cancel other requests, so every
 * step starts again from curl's queue or our list. */
static void process_done(lr_http_t *h) {
    int left = 0;

    while (!h->closing) {
        CURLMsg *msg = curl_multi_info_read(h->multi, &left);
        if (msg == NULL) {
            break;
        }
        if (msg->msg != CURLMSG_DONE) {
            continue;
        }
        void *priv = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
        /* msg is invalid after curl_multi_remove_handle: read result first. */
        finish_req(h, priv, msg->data.result);
    }
    while (!h->closing && h->sweep_failed) {
        struct lr_http_req *req = NULL;
        lr_list_foreach(it, &h->reqs) {
            struct lr_http_req *r = lr_list_entry(it, struct lr_http_req, link);
            if (r->sock_failed) {
                req = r;
                break;
            }
        }
        if (req == NULL) {
            h->sweep_failed = false;
            break;
        }
        finish_req(h, req, CURLE_OK);
    }
}

/* ---- public API ------------------------------------------------------- */

static uv_once_t global_once = UV_ONCE_INIT;
static CURLcode global_rc = CURLE_FAILED_INIT;

static void global_init(void) {
    /* Process-wide and never undone: curl_global_cleanup is not safe while
     * other threads or modules may still use curl. */
    global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int lr_http_init(lr_http_t **out, uv_loop_t *loop) {
    lr_http_t *h = NULL;
    int rc = 0;

    if (out == NULL || loop == NULL) {
        return LR_EINVAL;
    }
    *out = NULL;
    uv_once(&global_once, global_init);
    if (global_rc != CURLE_OK) {
        lr_error("http.init", "curl_global_init: %s", curl_easy_strerror(global_rc));
        return LR_EIO;
    }
    h = calloc(1, sizeof(*h));
    if (h == NULL) {
        return LR_ENOMEM;
    }
    h->loop = loop;
    lr_list_init(&h->reqs);
    lr_list_init(&h->socks);
    h->multi = curl_multi_init();
    if (h->multi == NULL) {
        rc = LR_EIO;
        goto out;
    }
    if (curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, socket_cb) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, timer_cb) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_MAXCONNECTS, MAX_CACHED_CONNECTIONS) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_MAX_HOST_CONNECTIONS, 0L) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX) != CURLM_OK) {
        lr_error("http.init", "curl_multi_setopt failed");
        rc = LR_EIO;
        goto out;
    }
    /* Last: after this succeeds the timer must be closed, not just freed. */
    rc = uv_timer_init(loop, &h->timer);
    if (rc != 0) {
        lr_error("http.init", "uv_timer_init: %s", uv_strerror(rc));
        rc = LR_EIO;
        goto out;
    }
    h->timer.data = h;
    *out = h;
    h = NULL;
out:
    if (h != NULL) {
        if (h->multi != NULL) {
            curl_multi_cleanup(h->multi);
        }
        free(h);
    }
    return rc;
}

/* RFC 9110 token characters: anything else in a method could smuggle bytes
 * into the request line. */
static bool valid_method(const char *m) {
    size_t n = strlen(m);
    if (n == 0 || n > MAX_METHOD_LEN) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)m[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              strchr("!#$%&'*+-.^_`|~", c) != NULL)) {
            return false;
        }
    }
    return true;
}

/* http:// or https:// only, parseable by curl, bounded in length. */
static bool valid_url(const char *url) {
    CURLU *u = NULL;
    char *scheme = NULL;
    bool ok = false;

    if (strnlen(url, MAX_URL_LEN + 1) > MAX_URL_LEN) {
        goto out;
    }
    u = curl_url();
    if (u == NULL) {
        goto out;
    }
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK) {
        goto out;
    }
    if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK) {
        goto out;
    }
    ok = strcasecmp(scheme, "http") == 0 || strcasecmp(scheme, "https") == 0;
out:
    curl_free(scheme);
    curl_url_cleanup(u);
    return ok;
}

int lr_http_send(lr_http_t *h, const lr_http_opts_t *opts, lr_http_cb cb, void *arg, lr_http_req_t **out_req) {
    struct lr_http_req *req = NULL;
    struct curl_slist *tmp;
    const char *method;
    CURL *e;
    int rc = 0;

    if (out_req != NULL) {
        *out_req = NULL;
    }
    if (h == NULL || opts == NULL || cb == NULL || opts->url == NULL || (opts->body == NULL && opts->body_len != 0) ||
        opts->timeout_ms < 0 || opts->connect_timeout_ms < 0) {
        return LR_EINVAL;
    }
    if (h->closing) {
        return LR_ESHUTDOWN;
    }
    method = opts->method != NULL ? opts->method : (opts->body != NULL ? "POST" : "GET");
    if (!valid_method(method) || (strcmp(method, "HEAD") == 0 && opts->body != NULL)) {
        return LR_EINVAL;
    }
    if (!valid_url(opts->url)) {
        return LR_EINVAL;
    }

    req = calloc(1, sizeof(*req));
    if (req == NULL) {
        rc = LR_ENOMEM;
        goto out;
    }
    req->h = h;
    req->state = REQ_ACTIVE;
    req->cb = cb;
    req->arg = arg;
    req->max_body = opts->max_body != 0 ? opts->max_body : LR_HTTP_DEFAULT_MAX_BODY;
    req->check_addr = opts->check_addr;
    req->check_arg = opts->check_arg;
    req->admit = opts->admit;
    req->admit_arg = opts->admit_arg;
    if (req->max_body > MAX_BODY_CAP) {
        req->max_body = MAX_BODY_CAP;
    }

    if (opts->headers != NULL) {
        size_t i;
        for (i = 0; opts->headers[i] != NULL; i++) {
            const char *hd = opts->headers[i];
            /* CR/LF would let a caller-supplied value inject headers. */
            if (i >= MAX_REQ_HEADERS || strnlen(hd, MAX_REQ_HEADER_LEN + 1) > MAX_REQ_HEADER_LEN ||
                strpbrk(hd, "\r\n") != NULL) {
                rc = LR_EINVAL;
                goto out;
            }
            tmp = curl_slist_append(req->headers, hd);
            if (tmp == NULL) {
                rc = LR_ENOMEM;
                goto out;
            }
            req->headers = tmp;
        }
    }
    /* Suppress curl's automatic "Expect: 100-continue" on larger bodies: it
     * costs a round trip (or a 1 s wait with servers that ignore it). */
    tmp = curl_slist_append(req->headers, "Expect:");
    if (tmp == NULL) {
        rc = LR_ENOMEM;
        goto out;
    }
    req->headers = tmp;

    if (opts->body != NULL) {
        /* +1 so a zero-length body still gets a valid, owned pointer. */
        req->body = malloc(opts->body_len + 1);
        if (req->body == NULL) {
            rc = LR_ENOMEM;
            goto out;
        }
        memcpy(req->body, opts->body, opts->body_len);
        req->body[opts->body_len] = '\0';
    }

    req->easy = curl_easy_init();
    if (req->easy == NULL) {
        rc = LR_ENOMEM;
        goto out;
    }
    e = req->easy;
    /* Setopt results are not checked one by one: with valid arguments they
     * only fail on OOM, and then the transfer itself reports the error. */
    curl_easy_setopt(e, CURLOPT_URL, opts->url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, req);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
    curl_easy_setopt(e, CURLOPT_USERAGENT, "longrun");
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, req->headers);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, opts->timeout_ms != 0 ? opts->timeout_ms : DEFAULT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     opts->connect_timeout_ms != 0 ? opts->connect_timeout_ms : DEFAULT_CONNECT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, req->errbuf);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, body_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, req);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, req);
    if (opts->check_addr != NULL) {
        curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket_cb);
        curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, req);
        curl_easy_setopt(e, CURLOPT_PROXY, ""); /* no proxy, not even from the environment */
    }
    if (opts->fresh_connection) {
        curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, 1L);
        curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L);
    }

    if (req->body != NULL) {
        /* Size first: POSTFIELDS without it would strlen() the body. */
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)opts->body_len);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, req->body);
        if (strcmp(method, "POST") != 0) {
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
        }
    } else if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (strcmp(method, "POST") == 0) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, "");
    } else {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
        if (strcmp(method, "GET") != 0) {
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
        }
    }

    req->start_ns = uv_hrtime();
    /* Only arms curl's timer (timer_cb); the transfer starts on the loop, so
     * cb cannot run before we return. */
    CURLMcode mc = curl_multi_add_handle(h->multi, e);
    if (mc != CURLM_OK) {
        lr_error("http.send", "curl_multi_add_handle: %s", curl_multi_strerror(mc));
        rc = mc == CURLM_OUT_OF_MEMORY ? LR_ENOMEM : LR_EIO;
        goto out;
    }
    list_add_req(h, req);
    if (out_req != NULL) {
        *out_req = req;
    }
    req = NULL;
out:
    req_free(req);
    return rc;
}

void lr_http_cancel(lr_http_req_t *req) {
    if (req == NULL) {
        return;
    }
    if (req->state != REQ_ACTIVE) {
        /* Its callback is running right now (cancel from inside it); it is
         * freed when the callback returns. */
        return;
    }
    lr_http_t *h = req->h;
    /* May call socket_cb/timer_cb synchronously; both are fine outside
     * curl_multi_socket_action.  Removing a handle also drops a pending
     * completion message it may have queued. */
    curl_multi_remove_handle(h->multi, req->easy);
    list_del_req(h, req);
    req_free(req);
}

void lr_http_resume(lr_http_req_t *req) {
    if (req == NULL || req->state != REQ_ACTIVE || !req->paused) {
        return;
    }
    req->paused = false;
    /* May call body_cb at once with the held bytes (which may pause again);
     * curl then expires the handle's timer, and the loop drives it on. */
    CURLcode cc = curl_easy_pause(req->easy, CURLPAUSE_CONT);
    if (cc != CURLE_OK) {
        lr_warn("http.resume", "curl_easy_pause: %s", curl_easy_strerror(cc));
    }
}

size_t lr_http_in_flight(const lr_http_t *h) { return h != NULL ? h->n_reqs : 0; }

int lr_http_header(const lr_http_response_t *resp, const char *name, char *buf, size_t buflen) {
    if (resp == NULL || name == NULL || buf == NULL || buflen == 0 || resp->headers == NULL) {
        return LR_EINVAL;
    }
    size_t nlen = strlen(name);
    const char *p = resp->headers;
    const char *end = resp->headers + resp->headers_len;

    buf[0] = '\0';
    if (nlen == 0) {
        return LR_ENOTFOUND;
    }
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *line_end = eol != NULL ? eol : end;

        if ((size_t)(line_end - p) > nlen && p[nlen] == ':' && strncasecmp(p, name, nlen) == 0) {
            const char *v = p + nlen + 1;
            const char *ve = line_end;
            while (v < ve && (*v == ' ' || *v == '\t')) {
                v++;
            }
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t' || ve[-1] == '\r' || ve[-1] == '\n')) {
                ve--;
            }
            size_t vlen = (size_t)(ve - v);
            if (vlen >= buflen) {
                memcpy(buf, v, buflen - 1);
                buf[buflen - 1] = '\0';
                return LR_ETOOBIG;
            }
            memcpy(buf, v, vlen);
            buf[vlen] = '\0';
            return 0;
        }
        p = line_end + 1;
    }
    return LR_ENOTFOUND;
}

/* Calls done and frees h once every handle we closed has reported back. */
static void maybe_finish_close(lr_http_t *h) {
    if (!h->closing || h->pending_closes != 0) {
        return;
    }
    void (*done)(void *) = h->done;
    void *done_arg = h->done_arg;
    free(h);
    if (done != NULL) {
        done(done_arg);
    }
}

static void close_timer_cb(uv_handle_t *handle) {
    lr_http_t *h = handle->data;
    h->pending_closes--;
    maybe_finish_close(h);
}

void lr_http_close(lr_http_t *h, void (*done)(void *arg), void *arg) {
    if (h == NULL) {
        if (done != NULL) {
            done(arg);
        }
        return;
    }
    if (h->closing) {
        lr_warn("http.close", "lr_http_close called twice; ignored");
        return;
    }
    h->done = done;
    h->done_arg = arg;
    /* Cancel first, while curl may still report socket removals normally. */
    while (!lr_list_empty(&h->reqs)) {
        lr_http_cancel(lr_list_entry(lr_list_first(&h->reqs), struct lr_http_req, link));
    }
    h->closing = true;
    /* Stop watching every socket before curl closes it (fds stay valid for
     * uv_poll_stop), then let curl close its cached connections. */
    while (!lr_list_empty(&h->socks)) {
        sock_close(h, lr_list_entry(lr_list_first(&h->socks), struct sock_ctx, link));
    }
    curl_multi_cleanup(h->multi);
    h->multi = NULL;
    /* pending_closes >= 1 from here on, so done never runs synchronously. */
    uv_timer_stop(&h->timer);
    h->pending_closes++;
    uv_close((uv_handle_t *)&h->timer, close_timer_cb);
}

void lr_http_opts_post(lr_http_opts_t *o, const char *url, const char *const *headers, const char *body) {
    memset(o, 0, sizeof(*o));
    o->method = "POST";
    o->url = url;
    o->headers = headers;
    o->body = body;
    o->body_len = strlen(body);
}
