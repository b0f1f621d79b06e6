/*
 * test_http.c - unit test of common/http.c against a tiny HTTP/1.1 server
 * that runs in this process, on the same libuv loop as the client.
 *
 * The server understands just enough HTTP: it reads until "\r\n\r\n", then
 * Content-Length bytes of body, answers by path and keeps the connection open:
 *   /echo          200, body echoed, X-Test: yes, X-Method, X-Echo-Custom
 *   /status/429    429 with Retry-After: 2
 *   /big           100000 bytes
 *   /slow          never answers (timeouts, cancel, close in flight)
 *   /continue      an unsolicited "100 Continue", then 200 with X-Final: 1
 *   /hugeheaders   a header block larger than LR_HTTP_MAX_HEADERS_BYTES
 * It counts accepted connections (to prove keep-alive reuse) and requests that
 * carried an Expect header (which the client must suppress).
 *
 * Every phase drives the loop with UV_RUN_ONCE until its condition holds; a
 * watchdog timer fails the test instead of hanging.  The test ends by closing
 * every handle and asserting uv_loop_close() == 0.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "http.h"
#include "log.h"
#include "testutil.h"

#define SRV_MAX_INPUT (4 * 1024 * 1024)
#define LARGE_BODY_LEN (1536 * 1024)
#define BIG_LEN 100000
#define N_CONCURRENT 200
/* Under ctest's 60 s timeout, so a hang fails here with a message; scaled by
 * the same LONGRUN_TEST_TIMEOUT_MULTIPLIER ctest uses. */
#define WATCHDOG_MS 50000

static uv_loop_t loop;
static uv_tcp_t server;
static uv_timer_t watchdog;
static int server_port;
static int refused_port;
static int srv_accepted;
static int srv_requests;
static int srv_saw_expect;

/* ---- the test server --------------------------------------------------- */

struct srv_conn {
    uv_tcp_t tcp;
    char *buf;
    size_t len;
    size_t cap;
    bool closing;
    struct srv_conn *prev;
    struct srv_conn *next;
};

static struct srv_conn *srv_conns;

struct srv_write {
    uv_write_t req;
    size_t len;
    char data[];
};

static void srv_conn_closed(uv_handle_t *handle) {
    struct srv_conn *c = handle->data;
    free(c->buf);
    free(c);
}

static void srv_conn_close(struct srv_conn *c) {
    if (c->closing) {
        return;
    }
    c->closing = true;
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        srv_conns = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    uv_close((uv_handle_t *)&c->tcp, srv_conn_closed);
}

static void srv_write_done(uv_write_t *req, int status) { free(req); }

static void srv_send(struct srv_conn *c, const char *data, size_t len) {
    struct srv_write *w = malloc(sizeof(*w) + len);
    T_ASSERT(w != NULL);
    memcpy(w->data, data, len);
    w->len = len;
    uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, srv_write_done);
    if (rc != 0) {
        free(w);
        srv_conn_close(c);
    }
}

static void srv_respond(struct srv_conn *c, int status, const char *reason, const char *extra, const char *body,
                        size_t body_len) {
    char head[1024];
    int n = snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\nContent-Length: %zu\r\nConnection: keep-alive\r\n%s\r\n",
                     status, reason, body_len, extra);
    T_ASSERT(n > 0 && (size_t)n < sizeof(head));
    char *msg = malloc((size_t)n + body_len);
    T_ASSERT(msg != NULL);
    memcpy(msg, head, (size_t)n);
    if (body_len > 0) {
        memcpy(msg + n, body, body_len);
    }
    srv_send(c, msg, (size_t)n + body_len);
    free(msg);
}

/* Copies the trimmed value of header name from the head into out, or "". */
static void srv_header(const char *head, const char *name, char *out, size_t outlen) {
    size_t nlen = strlen(name);
    out[0] = '\0';
    for (const char *p = strstr(head, "\r\n"); p != NULL && p[2] != '\0'; p = strstr(p + 2, "\r\n")) {
        const char *line = p + 2;
        if (strncasecmp(line, name, nlen) == 0 && line[nlen] == ':') {
            const char *v = line + nlen + 1;
            while (*v == ' ') {
                v++;
            }
            const char *e = strstr(v, "\r\n");
            size_t vlen = e != NULL ? (size_t)(e - v) : strlen(v);
            if (vlen >= outlen) {
                vlen = outlen - 1;
            }
            memcpy(out, v, vlen);
            out[vlen] = '\0';
            return;
        }
    }
}

static void srv_handle_one(struct srv_conn *c, const char *head, const char *body, size_t body_len) {
    char method[32] = "", path[256] = "", custom[128], expect[64], extra[512];

    T_ASSERT(sscanf(head, "%31s %255s", method, path) == 2);
    srv_header(head, "Expect", expect, sizeof(expect));
    if (expect[0] != '\0') {
        srv_saw_expect++;
    }
    srv_requests++;
    if (strcmp(path, "/echo") == 0) {
        srv_header(head, "X-Custom", custom, sizeof(custom));
        snprintf(extra, sizeof(extra), "X-Test: yes\r\nX-Method: %s\r\n%s%s%s", method,
                 custom[0] != '\0' ? "X-Echo-Custom:   " : "", custom, custom[0] != '\0' ? "  \r\n" : "");
        srv_respond(c, 200, "OK", extra, body, body_len);
    } else if (strcmp(path, "/status/429") == 0) {
        srv_respond(c, 429, "Too Many Requests", "Retry-After: 2\r\n", "slow down", 9);
    } else if (strcmp(path, "/big") == 0) {
        char *big = malloc(BIG_LEN);
        T_ASSERT(big != NULL);
        for (size_t i = 0; i < BIG_LEN; i++) {
            big[i] = (char)('0' + i % 10);
        }
        srv_respond(c, 200, "OK", "", big, BIG_LEN);
        free(big);
    } else if (strcmp(path, "/slow") == 0) {
        /* Never answer. */
    } else if (strcmp(path, "/continue") == 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n";
        srv_send(c, cont, sizeof(cont) - 1);
        srv_respond(c, 200, "OK", "X-Final: 1\r\n", "done", 4);
    } else if (strcmp(path, "/hugeheaders") == 0) {
        /* 100 headers of ~1000 bytes: each under curl's own per-header
         * limit, together above LR_HTTP_MAX_HEADERS_BYTES. */
        size_t cap = 120 * 1024, n = 0;
        char *msg = malloc(cap);
        T_ASSERT(msg != NULL);
        n += (size_t)snprintf(msg + n, cap - n, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n");
        for (int i = 0; i < 100; i++) {
            n += (size_t)snprintf(msg + n, cap - n, "X-Pad-%03d: ", i);
            memset(msg + n, 'p', 1000);
            n += 1000;
            n += (size_t)snprintf(msg + n, cap - n, "\r\n");
        }
        n += (size_t)snprintf(msg + n, cap - n, "\r\nok");
        T_ASSERT(n < cap);
        srv_send(c, msg, n);
        free(msg);
    } else {
        srv_respond(c, 404, "Not Found", "", "", 0);
    }
}

/* Answers every complete request in the input buffer. */
static void srv_process(struct srv_conn *c) {
    for (;;) {
        char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (end == NULL) {
            return;
        }
        size_t head_len = (size_t)(end - c->buf) + 4;
        char cl[32];
        end[2] = '\0'; /* terminate the head after the last header's CRLF */
        srv_header(c->buf, "Content-Length", cl, sizeof(cl));
        size_t body_len = cl[0] != '\0' ? (size_t)strtoul(cl, NULL, 10) : 0;
        if (c->len < head_len + body_len) {
            end[2] = '\r';
            return;
        }
        srv_handle_one(c, c->buf, c->buf + head_len, body_len);
        if (c->closing) {
            return;
        }
        memmove(c->buf, c->buf + head_len + body_len, c->len - head_len - body_len);
        c->len -= head_len + body_len;
    }
}

static void srv_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *b) {
    struct srv_conn *c = handle->data;
    if (c->cap - c->len < 65536) {
        size_t cap = c->cap != 0 ? c->cap * 2 : 131072;
        char *d = realloc(c->buf, cap);
        T_ASSERT(d != NULL);
        c->buf = d;
        c->cap = cap;
    }
    *b = uv_buf_init(c->buf + c->len, (unsigned)(c->cap - c->len));
}

static void srv_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *b) {
    struct srv_conn *c = stream->data;
    if (nread < 0) {
        srv_conn_close(c);
        return;
    }
    c->len += (size_t)nread;
    if (c->len > SRV_MAX_INPUT) {
        srv_conn_close(c);
        return;
    }
    srv_process(c);
}

static void srv_on_connection(uv_stream_t *srv, int status) {
    T_EQ_INT(status, 0);
    struct srv_conn *c = calloc(1, sizeof(*c));
    T_ASSERT(c != NULL);
    T_EQ_INT(uv_tcp_init(&loop, &c->tcp), 0);
    c->tcp.data = c;
    c->next = srv_conns;
    if (srv_conns != NULL) {
        srv_conns->prev = c;
    }
    srv_conns = c;
    T_EQ_INT(uv_accept(srv, (uv_stream_t *)&c->tcp), 0);
    srv_accepted++;
    T_EQ_INT(uv_read_start((uv_stream_t *)&c->tcp, srv_alloc, srv_read), 0);
}

static int bound_port(uv_tcp_t *t) {
    struct sockaddr_in sa;
    int len = sizeof(sa);
    T_EQ_INT(uv_tcp_getsockname(t, (struct sockaddr *)&sa, &len), 0);
    return ntohs(sa.sin_port);
}

static void noop_close(uv_handle_t *handle) {}

static void server_start(void) {
    struct sockaddr_in addr;
    uv_tcp_t probe;

    T_EQ_INT(uv_ip4_addr("127.0.0.1", 0, &addr), 0);
    T_EQ_INT(uv_tcp_init(&loop, &server), 0);
    if (uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0) != 0 ||
        uv_listen((uv_stream_t *)&server, 1024, srv_on_connection) != 0) {
        T_SKIP("cannot listen on 127.0.0.1");
    }
    server_port = bound_port(&server);

    /* A port that was just free and is not listening: connect is refused. */
    T_EQ_INT(uv_tcp_init(&loop, &probe), 0);
    T_EQ_INT(uv_tcp_bind(&probe, (const struct sockaddr *)&addr, 0), 0);
    refused_port = bound_port(&probe);
    uv_close((uv_handle_t *)&probe, noop_close);
    uv_run(&loop, UV_RUN_NOWAIT);
}

/* ---- client helpers ------------------------------------------------------ */

static void on_watchdog(uv_timer_t *t) { T_FAIL("watchdog: test did not finish in time"); }

#define RUN_UNTIL(cond)                 \
    do {                                \
        while (!(cond)) {               \
            uv_run(&loop, UV_RUN_ONCE); \
        }                               \
    } while (0)

static void url(char *buf, size_t len, int port, const char *path) {
    snprintf(buf, len, "http://127.0.0.1:%d%s", port, path);
}

/* What a callback saw, copied (resp is borrowed). */
struct result {
    int called;
    int err;
    long status;
    char *body;
    size_t body_len;
    bool truncated;
    char *headers;
    double total_ms;
    char errmsg[256];
    char xtest[64];
    char custom[64];
    char method[16];
    char retry[16];
    char final[16];
    int small_rc;
};

static void result_free(struct result *r) {
    free(r->body);
    free(r->headers);
    memset(r, 0, sizeof(*r));
}

static void on_result(const lr_http_response_t *resp, void *arg) {
    struct result *r = arg;
    char small[2];

    r->called++;
    r->err = resp->err;
    r->status = resp->status;
    T_ASSERT(resp->body != NULL);
    T_ASSERT(resp->headers != NULL);
    T_ASSERT(resp->errmsg != NULL);
    T_EQ_INT(resp->body[resp->body_len], '\0');
    T_EQ_INT(strlen(resp->headers), resp->headers_len);
    r->body = malloc(resp->body_len + 1);
    T_ASSERT(r->body != NULL);
    memcpy(r->body, resp->body, resp->body_len + 1);
    r->body_len = resp->body_len;
    r->headers = strdup(resp->headers);
    T_ASSERT(r->headers != NULL);
    r->truncated = resp->truncated;
    r->total_ms = resp->total_ms;
    snprintf(r->errmsg, sizeof(r->errmsg), "%s", resp->errmsg);
    (void)lr_http_header(resp, "x-test", r->xtest, sizeof(r->xtest));
    (void)lr_http_header(resp, "X-ECHO-CUSTOM", r->custom, sizeof(r->custom));
    (void)lr_http_header(resp, "X-Method", r->method, sizeof(r->method));
    (void)lr_http_header(resp, "Retry-After", r->retry, sizeof(r->retry));
    (void)lr_http_header(resp, "X-Final", r->final, sizeof(r->final));
    r->small_rc = lr_http_header(resp, "X-Test", small, sizeof(small));
}

static void on_never(const lr_http_response_t *resp, void *arg) {
    T_FAIL("callback of a canceled request ran (err=%d status=%ld)", resp->err, resp->status);
}

/* Sends and waits; r must be zeroed. */
static void do_request(lr_http_t *h, const lr_http_opts_t *o, struct result *r) {
    T_EQ_INT(lr_http_send(h, o, on_result, r, NULL), 0);
    T_EQ_INT(r->called, 0); /* never synchronous */
    RUN_UNTIL(r->called > 0);
    T_EQ_INT(r->called, 1);
}

/* ---- tests ------------------------------------------------------------- */

static void test_header_lookup(void) {
    static const char block[] = "HTTP/1.1 200 OK\r\n"
                                "Content-Type:  application/json \t\r\n"
                                "X-Test: yes\r\n"
                                "X-Testing: no\r\n"
                                "x-empty:\r\n"
                                "Retry-After:\t7\r\n"
                                "\r\n";
    lr_http_response_t r;
    char buf[64];
    char tiny[4];

    memset(&r, 0, sizeof(r));
    r.headers = block;
    r.headers_len = sizeof(block) - 1;
    T_EQ_INT(lr_http_header(&r, "content-type", buf, sizeof(buf)), 0);
    T_EQ_STR(buf, "application/json");
    T_EQ_INT(lr_http_header(&r, "X-TESTING", buf, sizeof(buf)), 0);
    T_EQ_STR(buf, "no");
    T_EQ_INT(lr_http_header(&r, "x-test", buf, sizeof(buf)), 0);
    T_EQ_STR(buf, "yes");
    T_EQ_INT(lr_http_header(&r, "X-Empty", buf, sizeof(buf)), 0);
    T_EQ_STR(buf, "");
    T_EQ_INT(lr_http_header(&r, "retry-after", buf, sizeof(buf)), 0);
    T_EQ_STR(buf, "7");
    T_EQ_INT(lr_http_header(&r, "X-Tes", buf, sizeof(buf)), LR_ENOTFOUND);
    T_EQ_INT(lr_http_header(&r, "HTTP/1.1 200 OK", buf, sizeof(buf)), LR_ENOTFOUND);
    T_EQ_INT(lr_http_header(&r, "Missing", buf, sizeof(buf)), LR_ENOTFOUND);
    T_EQ_INT(lr_http_header(&r, "Content-Type", tiny, sizeof(tiny)), LR_ETOOBIG);
    T_EQ_STR(tiny, "app");
    T_EQ_INT(lr_http_header(&r, "X-Test", buf, 0), LR_EINVAL);

    /* A block without a final newline still finds its last header. */
    r.headers = "HTTP/1.1 204 No Content\r\nX-Last: 1";
    r.headers_len = strlen(r.headers);
    T_EQ_INT(lr_http_header(&r, "x-last", buf, sizeof(buf)), 0);
    T_EQ_STR(buf, "1");
    r.headers = "";
    r.headers_len = 0;
    T_EQ_INT(lr_http_header(&r, "x-last", buf, sizeof(buf)), LR_ENOTFOUND);
}

static void test_invalid(lr_http_t *h) {
    char u[128];
    lr_http_opts_t o;
    lr_http_req_t *req = (lr_http_req_t *)&o; /* must be reset to NULL on failure */
    const char *bad_hdr[] = {"X-Evil: a\r\nX-Injected: b", NULL};

    url(u, sizeof(u), server_port, "/echo");
    memset(&o, 0, sizeof(o));
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, &req), LR_EINVAL); /* no url */
    T_ASSERT(req == NULL);
    o.url = "ftp://127.0.0.1/x";
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, NULL), LR_EINVAL);
    o.url = "not a url";
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, NULL), LR_EINVAL);
    o.url = u;
    T_EQ_INT(lr_http_send(h, &o, NULL, NULL, NULL), LR_EINVAL); /* no cb */
    o.headers = bad_hdr;
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, NULL), LR_EINVAL);
    o.headers = NULL;
    o.method = "GE T";
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, NULL), LR_EINVAL);
    o.method = NULL;
    o.body_len = 5; /* body NULL */
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, NULL), LR_EINVAL);
    o.body_len = 0;
    o.timeout_ms = -1;
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, NULL), LR_EINVAL);
    T_EQ_INT(lr_http_in_flight(h), 0);
}

static void test_echo(lr_http_t *h) {
    char u[128];
    char body[2000];
    const char *hdrs[] = {"X-Custom: hello world", "Content-Type: text/plain", NULL};
    lr_http_opts_t o;
    struct result r;
    int expect_before = srv_saw_expect;

    for (size_t i = 0; i < sizeof(body); i++) {
        body[i] = (char)('a' + i % 26);
    }
    url(u, sizeof(u), server_port, "/echo");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    o.headers = hdrs;
    o.body = body;
    o.body_len = sizeof(body);
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_INT(r.status, 200);
    T_EQ_INT(r.body_len, sizeof(body));
    T_ASSERT(memcmp(r.body, body, sizeof(body)) == 0);
    T_ASSERT(!r.truncated);
    T_EQ_STR(r.errmsg, "");
    T_EQ_STR(r.xtest, "yes");
    T_EQ_STR(r.custom, "hello world");
    T_EQ_STR(r.method, "POST");
    T_EQ_INT(r.small_rc, LR_ETOOBIG);
    T_ASSERT(strncmp(r.headers, "HTTP/1.1 200", 12) == 0);
    T_ASSERT(r.total_ms >= 0.0);
    result_free(&r);

    /* Over 1 MiB: curl 7.88 would add "Expect: 100-continue" (and, as this
     * server never sends 100, stall for a second) unless told not to. */
    char *large = malloc(LARGE_BODY_LEN);
    T_ASSERT(large != NULL);
    for (size_t i = 0; i < LARGE_BODY_LEN; i++) {
        large[i] = (char)('A' + i % 23);
    }
    o.body = large;
    o.body_len = LARGE_BODY_LEN;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_INT(r.body_len, LARGE_BODY_LEN);
    T_ASSERT(memcmp(r.body, large, LARGE_BODY_LEN) == 0);
    T_EQ_INT(srv_saw_expect, expect_before);
    free(large);
    result_free(&r);
    o.body = body;
    o.body_len = sizeof(body);

    /* A custom method with a body, and a GET without one. */
    o.method = "PUT";
    o.headers = NULL;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_STR(r.method, "PUT");
    T_EQ_INT(r.body_len, sizeof(body));
    result_free(&r);

    o.method = NULL;
    o.body = NULL;
    o.body_len = 0;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_STR(r.method, "GET");
    T_EQ_INT(r.body_len, 0);
    T_EQ_STR(r.body, "");
    result_free(&r);
}

static void test_keepalive(lr_http_t *h) {
    char u[128];
    lr_http_opts_t o;
    struct result r;

    url(u, sizeof(u), server_port, "/echo");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    do_request(h, &o, &r);
    result_free(&r);
    int before = srv_accepted;
    for (int i = 0; i < 5; i++) {
        do_request(h, &o, &r);
        T_EQ_INT(r.err, 0);
        result_free(&r);
    }
    T_EQ_INT(srv_accepted, before);
}

static void test_status_429(lr_http_t *h) {
    char u[128];
    lr_http_opts_t o;
    struct result r;

    url(u, sizeof(u), server_port, "/status/429");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0); /* an HTTP response of any status is not an error */
    T_EQ_INT(r.status, 429);
    T_EQ_STR(r.retry, "2");
    T_EQ_STR(r.body, "slow down");
    result_free(&r);
}

static void test_interim_response(lr_http_t *h) {
    char u[128];
    lr_http_opts_t o;
    struct result r;

    url(u, sizeof(u), server_port, "/continue");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    o.body = "x";
    o.body_len = 1;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_INT(r.status, 200);
    T_EQ_STR(r.final, "1");
    T_EQ_STR(r.body, "done");
    /* Only the final response's headers are kept. */
    T_ASSERT(strncmp(r.headers, "HTTP/1.1 200", 12) == 0);
    T_ASSERT(strstr(r.headers, "X-Interim") == NULL);
    result_free(&r);
}

struct burst {
    int done;
    int idx;
    char body[32];
};

static void on_burst(const lr_http_response_t *resp, void *arg) {
    struct burst *b = arg;
    T_EQ_INT(resp->err, 0);
    T_EQ_INT(resp->status, 200);
    T_EQ_INT(resp->body_len, strlen(b->body));
    T_EQ_STR(resp->body, b->body);
    b->done++;
}

static int burst_done_count(const struct burst *b, int n) {
    int done = 0;
    for (int i = 0; i < n; i++) {
        T_ASSERT(b[i].done <= 1);
        done += b[i].done;
    }
    return done;
}

static void run_burst(lr_http_t *h) {
    static struct burst b[N_CONCURRENT];
    char u[128];
    lr_http_opts_t o;

    url(u, sizeof(u), server_port, "/echo");
    memset(b, 0, sizeof(b));
    memset(&o, 0, sizeof(o));
    o.url = u;
    for (int i = 0; i < N_CONCURRENT; i++) {
        b[i].idx = i;
        snprintf(b[i].body, sizeof(b[i].body), "request-%d", i);
        o.body = b[i].body;
        o.body_len = strlen(b[i].body);
        T_EQ_INT(lr_http_send(h, &o, on_burst, &b[i], NULL), 0);
    }
    T_EQ_INT(lr_http_in_flight(h), N_CONCURRENT);
    T_EQ_INT(burst_done_count(b, N_CONCURRENT), 0);
    RUN_UNTIL(burst_done_count(b, N_CONCURRENT) == N_CONCURRENT);
    T_EQ_INT(lr_http_in_flight(h), 0);
}

static void test_concurrent(lr_http_t *h) {
    run_burst(h);
    /* The second burst finds all its connections idle in curl's pool. */
    int before = srv_accepted;
    run_burst(h);
    T_EQ_INT(srv_accepted, before);
}

static void test_timeout(lr_http_t *h) {
    char u[128];
    lr_http_opts_t o;
    struct result r;

    url(u, sizeof(u), server_port, "/slow");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    o.timeout_ms = 300;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, LR_ETIMEOUT);
    T_EQ_INT(r.status, 0);
    T_ASSERT(r.errmsg[0] != '\0');
    T_ASSERT(r.total_ms >= 250.0);
    result_free(&r);
}

static void test_refused(lr_http_t *h) {
    char u[128];
    lr_http_opts_t o;
    struct result r;

    url(u, sizeof(u), refused_port, "/echo");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, LR_ECONN);
    T_EQ_INT(r.status, 0);
    T_ASSERT(r.errmsg[0] != '\0');
    result_free(&r);
}

static void test_max_body(lr_http_t *h) {
    char u[128];
    lr_http_opts_t o;
    struct result r;

    url(u, sizeof(u), server_port, "/big");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_INT(r.body_len, BIG_LEN);
    T_ASSERT(!r.truncated);
    for (size_t i = 0; i < BIG_LEN; i++) {
        T_EQ_INT(r.body[i], '0' + i % 10);
    }
    result_free(&r);

    o.max_body = 1000;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_INT(r.status, 200);
    T_EQ_INT(r.body_len, 1000);
    T_ASSERT(r.truncated);
    T_EQ_STR(r.errmsg, "");
    T_EQ_INT(r.body[999], '9');
    result_free(&r);

    /* Exactly at the limit is not truncated. */
    o.max_body = BIG_LEN;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_INT(r.body_len, BIG_LEN);
    T_ASSERT(!r.truncated);
    result_free(&r);
}

static void test_huge_headers(lr_http_t *h) {
    char u[128];
    lr_http_opts_t o;
    struct result r;

    url(u, sizeof(u), server_port, "/hugeheaders");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, LR_ETOOBIG);
    T_ASSERT(strstr(r.errmsg, "headers") != NULL);
    T_ASSERT(strlen(r.headers) <= LR_HTTP_MAX_HEADERS_BYTES);
    result_free(&r);
}

static void on_done(void *arg) {
    int *flag = arg;
    (*flag)++;
}

static void on_rogue(uv_poll_t *p, int status, int events) {
    T_FAIL("the stale poll handle fired (status=%d events=%d)", status, events);
}

/* A socket curl opens that libuv refuses to watch must fail that one request
 * and leave the client usable (returning -1 from the socket callback would
 * mark curl's whole multi handle dead).  Failure injection: keep a libuv
 * watcher registered for fd N after closing N behind libuv's back; curl's
 * next socket gets the lowest free descriptor, N, and uv_poll_init_socket
 * answers UV_EEXIST. */
static void test_socket_failure(void) {
    lr_http_t *h = NULL;
    char u[128];
    lr_http_opts_t o;
    struct result r;
    uv_poll_t rogue;
    int sv[2];
    int done = 0;

    /* A fresh client: no pooled connection to reuse, and curl_multi_init's
     * own descriptors (if any) are allocated before the trap is set. */
    T_EQ_INT(lr_http_init(&h, &loop), 0);
    T_EQ_INT(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    T_EQ_INT(uv_poll_init_socket(&loop, &rogue, sv[0]), 0);
    T_EQ_INT(uv_poll_start(&rogue, UV_READABLE, on_rogue), 0);
    uv_run(&loop, UV_RUN_NOWAIT); /* libuv adds sv[0] to epoll now */
    close(sv[1]);
    close(sv[0]); /* drops the epoll entry; libuv still thinks it watches sv[0] */

    url(u, sizeof(u), server_port, "/echo");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));
    o.url = u;
    do_request(h, &o, &r);
    T_EQ_INT(r.err, LR_ECONN);
    T_ASSERT(strstr(r.errmsg, "uv_poll_init_socket") != NULL);
    result_free(&r);
    T_EQ_INT(lr_http_in_flight(h), 0);

    uv_close((uv_handle_t *)&rogue, noop_close);
    uv_run(&loop, UV_RUN_NOWAIT);
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    T_EQ_INT(r.status, 200);
    result_free(&r);
    lr_http_close(h, on_done, &done);
    RUN_UNTIL(done > 0);
}

struct cancel_other {
    lr_http_req_t *victim;
    int called;
};

static void on_cancel_other(const lr_http_response_t *resp, void *arg) {
    struct cancel_other *c = arg;
    c->called++;
    T_EQ_INT(resp->err, 0);
    lr_http_cancel(c->victim);
}

static void test_cancel(lr_http_t *h) {
    char echo[128], slow[128];
    lr_http_opts_t o;
    lr_http_req_t *req = NULL;
    struct result r;

    url(echo, sizeof(echo), server_port, "/echo");
    url(slow, sizeof(slow), server_port, "/slow");
    memset(&o, 0, sizeof(o));
    memset(&r, 0, sizeof(r));

    /* Canceled before the loop ever ran. */
    o.url = echo;
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, &req), 0);
    T_ASSERT(req != NULL);
    T_EQ_INT(lr_http_in_flight(h), 1);
    lr_http_cancel(req);
    T_EQ_INT(lr_http_in_flight(h), 0);
    do_request(h, &o, &r); /* the loop keeps working */
    T_EQ_INT(r.err, 0);
    result_free(&r);

    /* Canceled while waiting for a response on an established connection. */
    o.url = slow;
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, &req), 0);
    o.url = echo;
    do_request(h, &o, &r);
    result_free(&r);
    T_EQ_INT(lr_http_in_flight(h), 1);
    lr_http_cancel(req);
    T_EQ_INT(lr_http_in_flight(h), 0);
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    result_free(&r);

    /* Canceled from inside another request's callback. */
    struct cancel_other co = {NULL, 0};
    o.url = slow;
    T_EQ_INT(lr_http_send(h, &o, on_never, NULL, &co.victim), 0);
    o.url = echo;
    T_EQ_INT(lr_http_send(h, &o, on_cancel_other, &co, NULL), 0);
    RUN_UNTIL(co.called == 1);
    T_EQ_INT(lr_http_in_flight(h), 0);
    do_request(h, &o, &r);
    T_EQ_INT(r.err, 0);
    result_free(&r);
}

static void test_close_in_flight(void) {
    lr_http_t *h = NULL;
    char echo[128], slow[128];
    lr_http_opts_t o;
    int done = 0;

    T_EQ_INT(lr_http_init(&h, &loop), 0);
    url(echo, sizeof(echo), server_port, "/echo");
    url(slow, sizeof(slow), server_port, "/slow");
    memset(&o, 0, sizeof(o));
    /* Five requests the server has received and will never answer... */
    int served = srv_requests;
    o.url = slow;
    for (int i = 0; i < 5; i++) {
        T_EQ_INT(lr_http_send(h, &o, on_never, NULL, NULL), 0);
    }
    RUN_UNTIL(srv_requests == served + 5);
    /* ...and five that have not started yet when the client closes. */
    o.url = echo;
    for (int i = 0; i < 5; i++) {
        T_EQ_INT(lr_http_send(h, &o, on_never, NULL, NULL), 0);
    }
    T_EQ_INT(lr_http_in_flight(h), 10);
    lr_http_close(h, on_done, &done);
    T_EQ_INT(done, 0); /* not synchronous */
    RUN_UNTIL(done > 0);
    T_EQ_INT(done, 1);

    /* Closing a fresh client that never sent anything. */
    done = 0;
    T_EQ_INT(lr_http_init(&h, &loop), 0);
    lr_http_close(h, on_done, &done);
    RUN_UNTIL(done > 0);

    done = 0;
    lr_http_close(NULL, on_done, &done);
    T_EQ_INT(done, 1); /* NULL: synchronous by contract */
}

struct close_inside {
    lr_http_t *h;
    int called;
    int done;
};

static void on_close_inside(const lr_http_response_t *resp, void *arg) {
    struct close_inside *ci = arg;
    lr_http_opts_t o;

    ci->called++;
    lr_http_close(ci->h, on_done, &ci->done);
    memset(&o, 0, sizeof(o));
    o.url = "http://127.0.0.1:1/";
    T_EQ_INT(lr_http_send(ci->h, &o, on_never, NULL, NULL), LR_ESHUTDOWN);
}

static void test_close_inside_callback(void) {
    struct close_inside ci = {NULL, 0, 0};
    char u[128];
    lr_http_opts_t o;

    T_EQ_INT(lr_http_init(&ci.h, &loop), 0);
    url(u, sizeof(u), server_port, "/echo");
    memset(&o, 0, sizeof(o));
    o.url = u;
    for (int i = 0; i < 3; i++) {
        T_EQ_INT(lr_http_send(ci.h, &o, on_close_inside, &ci, NULL), 0);
    }
    RUN_UNTIL(ci.done > 0);
    T_EQ_INT(ci.called, 1);
    T_EQ_INT(ci.done, 1);
}

static void test_server_teardown(void) {
    while (srv_conns != NULL) {
        srv_conn_close(srv_conns);
    }
    uv_close((uv_handle_t *)&server, noop_close);
    uv_close((uv_handle_t *)&watchdog, noop_close);
    T_EQ_INT(uv_run(&loop, UV_RUN_DEFAULT), 0);
}

int main(void) {
    lr_http_t *h = NULL;
    int done = 0;
    const char *dbg = getenv("LR_TEST_DEBUG");

    lr_log_init("test_http", NULL, dbg != NULL && dbg[0] == '1' ? LR_LOG_DEBUG : LR_LOG_WARN, 0);
    T_EQ_INT(uv_loop_init(&loop), 0);
    T_EQ_INT(uv_timer_init(&loop, &watchdog), 0);
    const char *mult = getenv("LONGRUN_TEST_TIMEOUT_MULTIPLIER");
    uint64_t watchdog_ms = WATCHDOG_MS;
    if (mult != NULL && strtoul(mult, NULL, 10) > 1) {
        watchdog_ms *= strtoul(mult, NULL, 10);
    }
    T_EQ_INT(uv_timer_start(&watchdog, on_watchdog, watchdog_ms, 0), 0);
    server_start();

    test_header_lookup();
    T_EQ_INT(lr_http_init(&h, &loop), 0);
    test_invalid(h);
    test_echo(h);
    test_keepalive(h);
    test_status_429(h);
    test_interim_response(h);
    test_concurrent(h);
    test_timeout(h);
    test_refused(h);
    test_max_body(h);
    test_huge_headers(h);
    test_cancel(h);
    /* Close with idle pooled connections. */
    lr_http_close(h, on_done, &done);
    RUN_UNTIL(done > 0);

    test_socket_failure();
    test_close_in_flight();
    test_close_inside_callback();
    test_server_teardown();
    T_EQ_INT(uv_loop_close(&loop), 0);
    printf("test_http: ok (%d connections, %d requests served)\n", srv_accepted, srv_requests);
    return 0;
}
