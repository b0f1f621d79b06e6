/*
 * pg.c - asynchronous PostgreSQL connection pool on a libuv loop; see pg.h.
 *
 * Design.  Everything runs on the loop thread.  The pool owns `size` query
 * connections, one optional LISTEN connection, two FIFO queues of waiting
 * queries (plain and batched) and three kinds of handle:
 *
 *  - a uv_poll_t per libpq socket (struct pgwatch).  It is allocated on its
 *    own, not embedded in the connection, because PQconnectPoll may close the
 *    socket and open another one (next host address, SSL/GSS fallback), and a
 *    poll handle cannot change its fd: the old handle is closed and a new one
 *    created while the old one's close callback is still pending.  A socket is
 *    identified by (fd, inode) because the new socket often reuses the fd
 *    number.  The watch is freed only in its close callback.
 *  - a uv_timer_t per connection (embedded): connect deadline while
 *    CONNECTING, reconnect delay while BACKOFF.
 *  - the pool's `tick` timer (expires queued queries past their timeout,
 *    runs only while a queued query has a deadline) and `kick` idle handle.
 *
 * lr_pg_query() only queues and starts `kick`; the next loop iteration runs
 * dispatch(), so a callback never runs inside lr_pg_query() and queries
 * issued in the same iteration are seen together, which is what makes group
 * commit happen: when a connection is free and the oldest waiting query is a
 * batched one, up to max_batch batched queries leave together as
 * BEGIN; q1..qN; COMMIT; Sync in pipeline mode.
 *
 * Every event handler (poll, timers, kick) ends with after_event(): dispatch
 * the queue on free connections, send pending LISTENs, report the usable
 * connection count.  User callbacks may call lr_pg_query() and even
 * lr_pg_pool_close(), so code that runs callbacks first detaches what it
 * delivers into a local list and puts the connection into a consistent state;
 * after a callback it re-reads pool state instead of holding iterators.  The
 * pool is freed only from the last handle close callback, never while one of
 * its own frames is on the stack.
 */
#include "pg.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "list.h"
#include "log.h"

#define PG_DEFAULT_SIZE 4
#define PG_MAX_SIZE 64
#define PG_DEFAULT_BATCH 64
#define PG_MAX_BATCH 10000
#define PG_DEFAULT_QUEUE 100000
#define PG_TICK_MS 100              /* queue-timeout resolution */
#define PG_CONNECT_TIMEOUT_MS 10000 /* PQconnectPoll ignores connect_timeout */
#define PG_BACKOFF_MIN_MS 100
#define PG_BACKOFF_MAX_MS 5000
#define PG_WARN_EVERY_MS 5000 /* rate limit of repeated warnings */
#define PG_MAX_POLL_ERRORS 3  /* POLLERR callbacks in a row before giving up */
#define PG_MAX_CHANNEL 63     /* NAMEDATALEN - 1: longer names are truncated by the server */
/* PostgreSQL rejects protocol messages of 1 GB or more; refuse them early. */
#define PG_MAX_QUERY_BYTES ((size_t)1 << 30)

/* Connection states.  Every transition goes through set_state(). */
enum conn_state {
    CONN_INIT = 0,   /* never started (the LISTEN connection until lr_pg_listen) */
    CONN_CONNECTING, /* PQconnectStart done; PQconnectPoll driven by socket events;
                        connect deadline on the timer */
    CONN_IDLE,       /* connected, nothing in flight; watching READABLE to notice
                        a server-side close early */
    CONN_BUSY,       /* one statement in flight in autocommit (or our own ROLLBACK) */
    CONN_BUSY_BATCH, /* a group commit in flight in pipeline mode:
                        BEGIN, q1..qN, COMMIT, Sync */
    CONN_LISTEN,     /* the dedicated LISTEN connection, connected; LISTEN
                        commands and notifications */
    CONN_BACKOFF,    /* broken: PGconn finished; the timer reconnects after an
                        exponential backoff with jitter */
    CONN_CLOSED,     /* pool closing: PGconn finished, handles closed; final */
};

static const char *const conn_state_names[] = {
    "init", "connecting", "idle", "busy", "busy_batch", "listen", "backoff", "closed",
};

typedef struct pgq {
    lr_list_t link; /* in one qlist: a waiting queue or a connection's inflight */
    lr_pg_cb cb;
    void *arg;
    uint64_t seq;      /* FIFO order across both queues; 0 = re-run first */
    uint64_t deadline; /* now_ms() limit while queued; 0 = none */
    PGresult *res;     /* collected result (first error wins) */
    const char *sql;
    char **params; /* nparams entries, NULL = SQL NULL; same allocation */
    int nparams;
    bool batched; /* may be group-committed */
    bool alone;   /* re-run alone after its group commit was rolled back */
} pgq_t;

typedef struct qlist {
    lr_list_t head;
    size_t n;
} qlist_t;

typedef struct pgchan {
    lr_list_t link; /* in p->chans, in lr_pg_listen order; freed with the pool */
    lr_pg_notify_cb cb;
    void *arg;
    bool sending;  /* included in the LISTEN command in flight */
    bool active;   /* LISTEN confirmed on the current connection */
    bool failed;   /* LISTEN rejected; retried after the next reconnect */
    bool announce; /* cb(name, NULL) due */
    char name[];
} pgchan_t;

struct pgconn;

typedef struct pgwatch {
    uv_poll_t poll;      /* data = this */
    struct pgconn *conn; /* NULL once closing */
    lr_pg_pool_t *pool;  /* for the close callback */
    int fd;
    ino_t ino;
    int events;
} pgwatch_t;

typedef struct pgconn {
    lr_pg_pool_t *pool;
    int id; /* 0..size-1; -1 = the LISTEN connection */
    enum conn_state state;
    PGconn *pg;
    pgwatch_t *watch;
    int want;             /* events asked for by the last conn_watch() */
    unsigned poll_errors; /* consecutive poll callbacks with an error */
    uv_timer_t timer;     /* data = this */
    bool timer_closed;
    unsigned failures; /* consecutive, for the backoff */
    bool warned;       /* the current outage was logged */
    bool flushing;     /* PQflush returned 1: watching WRITABLE too */
    bool rollback;     /* BUSY with our own ROLLBACK, no query */
    bool listen_inflight;
    bool listen_err;
    qlist_t inflight; /* sent on this connection, in send order */
    /* BUSY_BATCH read progress: slot 0 = BEGIN, 1..nbatch = queries,
     * nbatch+1 = COMMIT, nbatch+2 = after COMMIT (Sync expected). */
    int nbatch;
    int slot;
    bool slot_has_result;
    bool batch_bad;
    pgq_t *cursor;
    PGresult *commit_res;
    char fatal[256]; /* last FATAL notice, for the failure log line */
} pgconn_t;

struct lr_pg_pool {
    uv_loop_t *loop;
    char *conninfo;
    char *appname;
    int size;
    int max_batch;
    size_t max_queue;
    lr_pg_state_cb on_state;
    void *state_arg;
    qlist_t plain; /* waiting lr_pg_query and re-runs */
    qlist_t batch; /* waiting lr_pg_query_batched */
    size_t inflight;
    uint64_t seq;
    pgconn_t *conns;
    pgconn_t lconn;
    lr_list_t chans; /* pgchan_t */
    uv_timer_t tick;
    uv_idle_t kick;
    int open_handles;
    bool closing;
    void (*done)(void *arg);
    void *done_arg;
    int reported_usable; /* -1 = nothing reported yet */
    size_t timeouts_unlogged;
    uint64_t timeout_logged_at;
    bool any_failure;
    uint64_t rng;
    lr_pg_stats_t stats;
};

static void on_poll(uv_poll_t *h, int status, int events);
static void on_conn_timer(uv_timer_t *t);
static void conn_fail(pgconn_t *c, const char *why);
static void conn_idle(pgconn_t *c);
static void after_event(lr_pg_pool_t *p);
static void on_kick(uv_idle_t *h);

/* ---- small helpers ---------------------------------------------------- */

static uint64_t now_ms(void) { return uv_hrtime() / 1000000u; }

static void qlist_init(qlist_t *l) {
    lr_list_init(&l->head);
    l->n = 0;
}

static bool qlist_empty(const qlist_t *l) { return l->n == 0; }

static pgq_t *qlist_first(const qlist_t *l) {
    lr_list_t *n = lr_list_first(&l->head);
    return n != NULL ? lr_list_entry(n, pgq_t, link) : NULL;
}

static pgq_t *qlist_last(const qlist_t *l) {
    return lr_list_empty(&l->head) ? NULL : lr_list_entry(l->head.prev, pgq_t, link);
}

/* The query after q on l, or NULL when q is the last one. */
static pgq_t *qlist_next(const qlist_t *l, const pgq_t *q) {
    return q->link.next == &l->head ? NULL : lr_list_entry(q->link.next, pgq_t, link);
}

static void qlist_push_back(qlist_t *l, pgq_t *q) {
    lr_list_push_back(&l->head, &q->link);
    l->n++;
}

static void qlist_push_front(qlist_t *l, pgq_t *q) {
    lr_list_push_front(&l->head, &q->link);
    l->n++;
}

static void qlist_remove(qlist_t *l, pgq_t *q) {
    lr_list_remove(&q->link);
    l->n--;
}

static pgq_t *qlist_pop(qlist_t *l) {
    pgq_t *q = qlist_first(l);
    if (q != NULL) {
        qlist_remove(l, q);
    }
    return q;
}

/* Moves the whole of `from` into the empty list `to` (for delivering
 * without holding pool state); `from` is left empty. */
static void qlist_take(qlist_t *to, qlist_t *from) {
    qlist_init(to);
    lr_list_splice_back(&to->head, &from->head);
    to->n = from->n;
    from->n = 0;
}

static bool result_ok(const PGresult *res) {
    ExecStatusType st = PQresultStatus(res);
    return res != NULL && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK);
}

static bool result_is_copy(const PGresult *res) {
    ExecStatusType st = PQresultStatus(res);
    return st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH;
}

/* Keeps the first error of a statement, otherwise its last result (libpq may
 * return more than one result for one statement, e.g. an error after
 * CommandComplete). */
static void store_result(PGresult **dst, PGresult *res) {
    if (*dst != NULL && !result_ok(*dst)) {
        PQclear(res);
        return;
    }
    PQclear(*dst);
    *dst = res;
}

/* One line of text: newlines and tabs become spaces, trailing space cut. */
static void flatten(char *dst, size_t cap, const char *src) {
    size_t n = 0;
    if (cap == 0) {
        return;
    }
    for (; src != NULL && *src != '\0' && n + 1 < cap; src++) {
        char ch = *src;
        if (ch == '\n' || ch == '\r' || ch == '\t') {
            ch = ' ';
        }
        if (ch == ' ' && (n == 0 || dst[n - 1] == ' ')) {
            continue;
        }
        dst[n++] = ch;
    }
    while (n > 0 && dst[n - 1] == ' ') {
        n--;
    }
    dst[n] = '\0';
}

static const char *conn_kind(const pgconn_t *c) { return c->id < 0 ? "listen" : "conn"; }

#define set_state(c, s) set_state_at((c), (s), __LINE__)
static void set_state_at(pgconn_t *c, enum conn_state s, int line) {
    if (c->state == s) {
        return;
    }
    lr_debug("pg.conn_state", "%s %d: %s -> %s (line %d)", conn_kind(c), c->id, conn_state_names[c->state],
             conn_state_names[s], line);
    c->state = s;
}

static bool conn_usable(const pgconn_t *c) {
    return c->state == CONN_IDLE || c->state == CONN_BUSY || c->state == CONN_BUSY_BATCH;
}

static uint64_t pool_rand(lr_pg_pool_t *p) {
    /* xorshift64: jitter only, not security */
    uint64_t x = p->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p->rng = x;
    return x;
}

/* Exponential backoff with "equal jitter", within 100 ms .. 5 s. */
static uint64_t backoff_ms(pgconn_t *c) {
    unsigned shift = c->failures < 6 ? c->failures : 6;
    uint64_t base = (uint64_t)PG_BACKOFF_MIN_MS << shift;
    uint64_t d;
    if (base > PG_BACKOFF_MAX_MS) {
        base = PG_BACKOFF_MAX_MS;
    }
    d = base / 2 + pool_rand(c->pool) % (base / 2 + 1);
    return d < PG_BACKOFF_MIN_MS ? PG_BACKOFF_MIN_MS : d;
}

/* ---- delivering results ------------------------------------------------ */

static void deliver(lr_pg_pool_t *p, pgq_t *q, int err) {
    const PGresult *res = (err == 0 || err == LR_EDB) ? q->res : NULL;
    switch (err) {
    case 0: p->stats.ok++; break;
    case LR_EDB: p->stats.err_db++; break;
    case LR_ECONN: p->stats.err_conn++; break;
    case LR_ETIMEOUT: p->stats.err_timeout++; break;
    default: p->stats.err_shutdown++; break;
    }
    q->cb(err, res, q->arg);
    PQclear(q->res);
    free(q);
}

static void deliver_all(lr_pg_pool_t *p, qlist_t *l, int err) {
    pgq_t *q;
    while ((q = qlist_pop(l)) != NULL) {
        deliver(p, q, err);
    }
}

/* Re-queues unsent queries at the front of their queue, keeping their order. */
static void requeue_front(lr_pg_pool_t *p, qlist_t *l) {
    pgq_t *q;
    while ((q = qlist_last(l)) != NULL) {
        qlist_remove(l, q);
        qlist_push_front(q->batched && !q->alone ? &p->batch : &p->plain, q);
    }
}

static void kick(lr_pg_pool_t *p) {
    if (!p->closing && !uv_is_active((uv_handle_t *)&p->kick)) {
        uv_idle_start(&p->kick, on_kick);
    }
}

/* ---- handle bookkeeping --------------------------------------------------- */

static void pool_free(lr_pg_pool_t *p) {
    lr_list_foreach_safe(it, next, &p->chans) {
        lr_list_remove(it);
        free(lr_list_entry(it, pgchan_t, link));
    }
    free(p->conns);
    free(p->conninfo);
    free(p->appname);
    free(p);
}

static void maybe_finish(lr_pg_pool_t *p) {
    void (*done)(void *);
    void *arg;
    if (!p->closing || p->open_handles > 0) {
        return;
    }
    /* Defensive: nothing can be queued here (lr_pg_query refuses while
     * closing), but a query must never be dropped without its callback. */
    deliver_all(p, &p->plain, LR_ESHUTDOWN);
    deliver_all(p, &p->batch, LR_ESHUTDOWN);
    done = p->done;
    arg = p->done_arg;
    pool_free(p);
    if (done != NULL) {
        done(arg);
    }
}

static void on_pool_handle_close(uv_handle_t *h) {
    lr_pg_pool_t *p = h->data;
    p->open_handles--;
    maybe_finish(p);
}

static void on_timer_close(uv_handle_t *h) {
    pgconn_t *c = h->data;
    lr_pg_pool_t *p = c->pool;
    p->open_handles--;
    maybe_finish(p);
}

static void on_watch_close(uv_handle_t *h) {
    pgwatch_t *w = h->data;
    lr_pg_pool_t *p = w->pool;
    free(w);
    p->open_handles--;
    maybe_finish(p);
}

/* Stops watching the connection's socket.  Must run before PQfinish closes
 * the fd. */
static void conn_unwatch(pgconn_t *c) {
    pgwatch_t *w = c->watch;
    if (w == NULL) {
        return;
    }
    c->watch = NULL;
    w->conn = NULL;
    uv_close((uv_handle_t *)&w->poll, on_watch_close);
}

/* Watches PQsocket() for events, re-creating the poll handle when libpq
 * switched to another socket. */
static int conn_watch(pgconn_t *c, int events) {
    lr_pg_pool_t *p = c->pool;
    pgwatch_t *w = c->watch;
    struct stat st;
    int fd = PQsocket(c->pg);
    int rc;

    c->want = events;
    if (fd < 0 || fstat(fd, &st) != 0) {
        return LR_ECONN;
    }
    if (w != NULL && (w->fd != fd || w->ino != st.st_ino)) {
        conn_unwatch(c);
        w = NULL;
    }
    if (w == NULL) {
        w = calloc(1, sizeof(*w));
        if (w == NULL) {
            return LR_ENOMEM;
        }
        rc = uv_poll_init_socket(p->loop, &w->poll, fd);
        if (rc < 0) {
            /* init failed: the handle was never registered, plain free */
            free(w);
            lr_warn("pg.poll_failed", "%s %d: uv_poll_init: %s", conn_kind(c), c->id, uv_strerror(rc));
            return LR_ECONN;
        }
        w->poll.data = w;
        w->conn = c;
        w->pool = p;
        w->fd = fd;
        w->ino = st.st_ino;
        p->open_handles++;
        c->watch = w;
    }
    if (w->events != events) {
        rc = uv_poll_start(&w->poll, events, on_poll);
        if (rc < 0) {
            lr_warn("pg.poll_failed", "%s %d: uv_poll_start: %s", conn_kind(c), c->id, uv_strerror(rc));
            return LR_ECONN;
        }
        w->events = events;
    }
    return 0;
}

/* Pushes buffered output; watches WRITABLE while libpq still has some. */
static int conn_flush(pgconn_t *c) {
    int r = PQflush(c->pg);
    if (r < 0) {
        return LR_ECONN;
    }
    c->flushing = r == 1;
    return conn_watch(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
}

static void batch_reset(pgconn_t *c) {
    PQclear(c->commit_res);
    c->commit_res = NULL;
    c->nbatch = 0;
    c->slot = 0;
    c->slot_has_result = false;
    c->batch_bad = false;
    c->cursor = NULL;
}

/* Any state -> CLOSED: finishes the PGconn and closes the handles.  In-flight
 * queries must have been detached by the caller. */
static void conn_shutdown(pgconn_t *c) {
    if (c->state == CONN_CLOSED) {
        return;
    }
    conn_unwatch(c);
    if (c->pg != NULL) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    batch_reset(c);
    c->flushing = c->rollback = c->listen_inflight = false;
    set_state(c, CONN_CLOSED);
    if (!c->timer_closed) {
        c->timer_closed = true;
        uv_close((uv_handle_t *)&c->timer, on_timer_close);
    }
}

/* ---- connecting --------------------------------------------------------- */

static void on_notice(void *arg, const PGresult *res) {
    pgconn_t *c = arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    char msg[512];
    flatten(msg, sizeof(msg), PQresultErrorMessage(res));
    if (sev != NULL && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0)) {
        flatten(c->fatal, sizeof(c->fatal), PQresultErrorMessage(res));
    }
    lr_debug("pg.notice", "%s %d: %s", conn_kind(c), c->id, msg);
}

/* INIT/BACKOFF -> CONNECTING */
static void conn_start(pgconn_t *c) {
    lr_pg_pool_t *p = c->pool;
    const char *keys[3], *vals[3];
    int n = 0;

    keys[n] = "dbname"; /* expanded: a conninfo string or URI */
    vals[n++] = p->conninfo;
    if (p->appname != NULL) {
        keys[n] = "application_name"; /* after dbname, so it wins */
        vals[n++] = p->appname;
    }
    keys[n] = NULL;
    vals[n] = NULL;
    c->fatal[0] = '\0';
    c->poll_errors = 0;
    c->pg = PQconnectStartParams(keys, vals, 1);
    set_state(c, CONN_CONNECTING);
    if (c->pg == NULL) {
        conn_fail(c, "out of memory");
        return;
    }
    PQsetNoticeReceiver(c->pg, on_notice, c);
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_fail(c, "connect failed");
        return;
    }
    uv_timer_start(&c->timer, on_conn_timer, PG_CONNECT_TIMEOUT_MS, 0);
    /* "as if PQconnectPoll had returned PGRES_POLLING_WRITING" */
    if (conn_watch(c, UV_WRITABLE) < 0) {
        conn_fail(c, "cannot watch the socket");
    }
}

/* CONNECTING -> IDLE / LISTEN */
static void conn_ready(pgconn_t *c) {
    lr_pg_pool_t *p = c->pool;
    uv_timer_stop(&c->timer);
    if (PQsetnonblocking(c->pg, 1) != 0) {
        conn_fail(c, "cannot set non-blocking mode");
        return;
    }
    c->failures = 0;
    p->stats.connects++;
    if (c->warned) {
        c->warned = false;
        lr_info("pg.conn_restored", "%s %d: connected again", conn_kind(c), c->id);
    }
    if (c->id < 0) {
        set_state(c, CONN_LISTEN); /* after_event() sends the LISTENs */
        if (conn_watch(c, UV_READABLE) < 0) {
            conn_fail(c, "cannot watch the socket");
        }
        return;
    }
    set_state(c, CONN_IDLE);
    if (conn_watch(c, UV_READABLE) < 0) {
        conn_fail(c, "cannot watch the socket");
    }
}

static void conn_connect_step(pgconn_t *c) {
    int events;
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_OK: conn_ready(c); return;
    case PGRES_POLLING_READING: events = UV_READABLE; break;
    case PGRES_POLLING_WRITING: events = UV_WRITABLE; break;
    default: conn_fail(c, "connect failed"); return;
    }
    /* the socket may have changed inside PQconnectPoll */
    if (conn_watch(c, events) < 0) {
        conn_fail(c, "cannot watch the socket");
    }
}

/* Any state -> BACKOFF (or CLOSED when the pool is closing).  Every query
 * still in flight gets LR_ECONN: it may have committed. */
static void conn_fail(pgconn_t *c, const char *why) {
    lr_pg_pool_t *p = c->pool;
    qlist_t lost;
    char msg[512];
    /* A group commit whose COMMIT already answered OK is durable even if the
     * connection died before its Sync result: report it as done. */
    bool committed = c->state == CONN_BUSY_BATCH && !c->batch_bad && result_ok(c->commit_res) &&
                     strcmp(PQcmdStatus(c->commit_res), "COMMIT") == 0;

    qlist_take(&lost, &c->inflight);
    p->inflight -= lost.n;
    if (c->pg != NULL) {
        flatten(msg, sizeof(msg), PQerrorMessage(c->pg));
    } else {
        msg[0] = '\0';
    }
    if (c->fatal[0] != '\0' && strstr(msg, c->fatal) == NULL) {
        /* the server's FATAL arrived while idle, as a notice: say why */
        char both[sizeof(msg)];
        snprintf(both, sizeof(both), "%.250s; %.250s", c->fatal, msg);
        memcpy(msg, both, sizeof(msg));
    }
    p->stats.conn_failures++;
    p->any_failure = true;
    if (!p->closing && !c->warned) {
        c->warned = true;
        lr_warn("pg.conn_failed", "%s %d (%s): %s%s%s; %zu in flight failed; reconnecting", conn_kind(c), c->id,
                conn_state_names[c->state], why, msg[0] != '\0' ? ": " : "", msg, committed ? (size_t)0 : lost.n);
    } else {
        lr_debug("pg.conn_failed", "%s %d (%s): %s%s%s", conn_kind(c), c->id, conn_state_names[c->state], why,
                 msg[0] != '\0' ? ": " : "", msg);
    }
    conn_unwatch(c);
    if (c->pg != NULL) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    batch_reset(c);
    c->flushing = c->rollback = c->listen_inflight = c->listen_err = false;
    if (c->id < 0) {
        lr_list_foreach(it, &p->chans) {
            pgchan_t *ch = lr_list_entry(it, pgchan_t, link);
            ch->sending = ch->active = ch->failed = ch->announce = false;
        }
    }
    if (p->closing) {
        conn_shutdown(c);
    } else {
        uint64_t delay = backoff_ms(c);
        set_state(c, CONN_BACKOFF);
        c->failures++;
        uv_timer_start(&c->timer, on_conn_timer, delay, 0);
    }
    deliver_all(p, &lost, committed ? 0 : LR_ECONN);
}

static void on_conn_timer(uv_timer_t *t) {
    pgconn_t *c = t->data;
    if (c->state == CONN_BACKOFF) {
        conn_start(c);
    } else if (c->state == CONN_CONNECTING) {
        conn_fail(c, "connect timed out");
    }
    after_event(c->pool);
}

/* ---- sending ------------------------------------------------------------ */

/* IDLE -> BUSY with one statement. */
static void send_single(pgconn_t *c, pgq_t *q) {
    lr_pg_pool_t *p = c->pool;
    qlist_push_back(&c->inflight, q);
    p->inflight++;
    set_state(c, CONN_BUSY);
    if (!PQsendQueryParams(c->pg, q->sql, q->nparams, NULL, (const char *const *)q->params, NULL, NULL, 0)) {
        /* Not sent (its Sync never left): safe to run elsewhere. */
        qlist_t back;
        qlist_take(&back, &c->inflight);
        p->inflight -= back.n;
        requeue_front(p, &back);
        conn_fail(c, "send failed");
        return;
    }
    if (conn_flush(c) < 0) {
        conn_fail(c, "flush failed");
    }
}

/* Queues BEGIN and the batch's statements in pipeline mode; false when
 * libpq refused (the connection is broken). */
static bool pipeline_begin(pgconn_t *c) {
    if (!PQenterPipelineMode(c->pg) || !PQsendQueryParams(c->pg, "BEGIN", 0, NULL, NULL, NULL, NULL, 0)) {
        return false;
    }
    lr_list_foreach(it, &c->inflight.head) {
        const pgq_t *q = lr_list_entry(it, pgq_t, link);
        if (!PQsendQueryParams(c->pg, q->sql, q->nparams, NULL, (const char *const *)q->params, NULL, NULL, 0)) {
            return false;
        }
    }
    return true;
}

/* IDLE -> BUSY_BATCH with up to max_batch batched statements. */
static void send_batch(pgconn_t *c) {
    lr_pg_pool_t *p = c->pool;
    int n = 0;

    while (n < p->max_batch && !qlist_empty(&p->batch)) {
        qlist_push_back(&c->inflight, qlist_pop(&p->batch));
        n++;
    }
    if (n == 1) {
        /* One statement alone in autocommit is the same transaction. */
        send_single(c, qlist_pop(&c->inflight));
        return;
    }
    p->inflight += (size_t)n;
    p->stats.batches++;
    p->stats.batched_stmts += (uint64_t)n;
    if ((uint64_t)n > p->stats.batch_max) {
        p->stats.batch_max = (uint64_t)n;
    }
    batch_reset(c);
    c->nbatch = n;
    set_state(c, CONN_BUSY_BATCH);
    if (!pipeline_begin(c)) {
        /* Without COMMIT nothing can have committed: run them again later. */
        qlist_t back;
        qlist_take(&back, &c->inflight);
        p->inflight -= back.n;
        requeue_front(p, &back);
        conn_fail(c, "send failed");
        return;
    }
    /* From here on COMMIT may reach the server: failures are LR_ECONN. */
    if (!PQsendQueryParams(c->pg, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) || !PQpipelineSync(c->pg) ||
        conn_flush(c) < 0) {
        conn_fail(c, "send failed");
    }
}

static pgconn_t *idle_conn(lr_pg_pool_t *p) {
    for (int i = 0; i < p->size; i++) {
        if (p->conns[i].state == CONN_IDLE) {
            return &p->conns[i];
        }
    }
    return NULL;
}

/* Sends waiting queries on idle connections, oldest first. */
static void dispatch(lr_pg_pool_t *p) {
    while (!p->closing && (!qlist_empty(&p->plain) || !qlist_empty(&p->batch))) {
        pgconn_t *c = idle_conn(p);
        pgq_t *ph = qlist_first(&p->plain), *bh = qlist_first(&p->batch);
        if (c == NULL) {
            return;
        }
        /* every pass either sends or breaks a connection: it terminates */
        if (bh != NULL && (ph == NULL || bh->seq < ph->seq)) {
            send_batch(c);
        } else {
            send_single(c, qlist_pop(&p->plain));
        }
    }
}

/* ---- reading ------------------------------------------------------------ */

/* After a completed round trip: back to IDLE, unless a transaction was left
 * open (a failed group commit stays in an aborted block after its Sync, or a
 * caller sent BEGIN), which our own ROLLBACK closes first. */
static void conn_idle(pgconn_t *c) {
    PGTransactionStatusType ts;
    if (c->pool->closing) {
        conn_shutdown(c);
        return;
    }
    ts = PQtransactionStatus(c->pg);
    if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) {
        c->rollback = true;
        set_state(c, CONN_BUSY);
        if (!PQsendQuery(c->pg, "ROLLBACK") || conn_flush(c) < 0) {
            conn_fail(c, "send failed");
        }
        return;
    }
    if (ts != PQTRANS_IDLE) {
        conn_fail(c, "unexpected transaction status");
        return;
    }
    set_state(c, CONN_IDLE);
    if (conn_watch(c, UV_READABLE) < 0) {
        conn_fail(c, "cannot watch the socket");
    }
}

static void conn_read_single(pgconn_t *c) {
    lr_pg_pool_t *p = c->pool;
    pgq_t *q = qlist_first(&c->inflight); /* NULL for our own ROLLBACK */
    bool complete = false;
    qlist_t done;
    int err;

    while (!PQisBusy(c->pg)) {
        PGresult *res = PQgetResult(c->pg);
        if (res == NULL) {
            complete = true;
            break;
        }
        if (result_is_copy(res)) {
            PQclear(res);
            lr_warn("pg.copy_unsupported", "conn %d: COPY is not supported; dropping the connection", c->id);
            conn_fail(c, "COPY is not supported");
            return;
        }
        if (q != NULL) {
            store_result(&q->res, res);
        } else {
            if (!result_ok(res)) {
                char msg[256];
                flatten(msg, sizeof(msg), PQresultErrorMessage(res));
                lr_warn("pg.rollback_failed", "conn %d: %s", c->id, msg);
            }
            PQclear(res);
        }
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_fail(c, "connection lost");
        return;
    }
    if (!complete) {
        return;
    }
    c->rollback = false;
    qlist_take(&done, &c->inflight);
    p->inflight -= done.n;
    conn_idle(c);
    if (q != NULL) {
        qlist_remove(&done, q);
        err = result_ok(q->res) ? 0 : LR_EDB;
        deliver(p, q, err);
    }
}

static void conn_read_batch(pgconn_t *c) {
    lr_pg_pool_t *p = c->pool;
    bool synced = false, committed;
    qlist_t done;

    while (!PQisBusy(c->pg)) {
        PGresult *res = PQgetResult(c->pg);
        if (res == NULL) {
            if (!c->slot_has_result) {
                /* libpq has nothing queued before our Sync: out of step */
                conn_fail(c, "pipeline out of sync");
                return;
            }
            c->slot++;
            c->slot_has_result = false;
            c->cursor = c->slot == 1        ? qlist_first(&c->inflight)
                        : c->cursor != NULL ? qlist_next(&c->inflight, c->cursor)
                                            : NULL;
            continue;
        }
        if (PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
            PQclear(res); /* libpq returns no NULL after a Sync result */
            synced = true;
            break;
        }
        if (result_is_copy(res) || c->slot > c->nbatch + 1) {
            PQclear(res);
            conn_fail(c, "unexpected result in a group commit");
            return;
        }
        if (!result_ok(res)) {
            c->batch_bad = true;
        }
        if (c->slot == 0) {
            PQclear(res); /* BEGIN */
        } else if (c->slot == c->nbatch + 1) {
            store_result(&c->commit_res, res);
        } else {
            store_result(&c->cursor->res, res);
        }
        c->slot_has_result = true;
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_fail(c, "connection lost");
        return;
    }
    if (!synced) {
        return;
    }
    committed = !c->batch_bad && c->slot == c->nbatch + 2 && result_ok(c->commit_res) &&
                strcmp(PQcmdStatus(c->commit_res), "COMMIT") == 0;
    qlist_take(&done, &c->inflight);
    p->inflight -= done.n;
    batch_reset(c);
    if (!PQexitPipelineMode(c->pg)) {
        conn_fail(c, "cannot leave pipeline mode");
    } else {
        conn_idle(c);
    }
    if (committed) {
        deliver_all(p, &done, 0); /* each with its own result */
        return;
    }
    /* Rolled back: nothing of it happened.  Re-run each statement alone so
     * that only a bad one fails. */
    p->stats.batch_retries++;
    lr_debug("pg.batch_retry", "conn %d: group commit of %zu rolled back; re-running alone", c->id, done.n);
    lr_list_foreach(it, &done.head) {
        pgq_t *q = lr_list_entry(it, pgq_t, link);
        PQclear(q->res);
        q->res = NULL;
        q->alone = true;
        q->seq = 0;
        q->deadline = 0; /* accepted and sent once: no queue timeout */
    }
    if (p->closing) {
        deliver_all(p, &done, LR_ESHUTDOWN);
    } else {
        requeue_front(p, &done);
    }
}

static void listen_read(pgconn_t *c) {
    lr_pg_pool_t *p = c->pool;
    bool complete = false;
    PGnotify *n;

    if (c->listen_inflight) {
        while (!PQisBusy(c->pg)) {
            PGresult *res = PQgetResult(c->pg);
            if (res == NULL) {
                complete = true;
                break;
            }
            if (!result_ok(res)) {
                char msg[256];
                flatten(msg, sizeof(msg), PQresultErrorMessage(res));
                lr_warn("pg.listen_failed", "LISTEN failed: %s", msg);
                c->listen_err = true;
            }
            PQclear(res);
        }
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_fail(c, "connection lost");
        return;
    }
    if (complete) {
        c->listen_inflight = false;
        lr_list_foreach(it, &p->chans) {
            pgchan_t *ch = lr_list_entry(it, pgchan_t, link);
            if (ch->sending) {
                ch->sending = false;
                ch->failed = c->listen_err;
                ch->active = !c->listen_err;
                ch->announce = ch->active;
            }
        }
        c->listen_err = false;
        /* "now listening: re-scan for anything missed".  A callback may add
         * a channel (visited too) or close the pool (stop here); channels are
         * freed only with the pool, after every close callback. */
        lr_list_foreach(it, &p->chans) {
            pgchan_t *ch = lr_list_entry(it, pgchan_t, link);
            if (p->closing) {
                break;
            }
            if (ch->announce) {
                ch->announce = false;
                ch->cb(ch->name, NULL, ch->arg);
            }
        }
    }
    /* A callback may have closed the pool (and finished this PGconn). */
    while (c->state == CONN_LISTEN && c->pg != NULL && (n = PQnotifies(c->pg)) != NULL) {
        lr_list_foreach(it, &p->chans) {
            pgchan_t *ch = lr_list_entry(it, pgchan_t, link);
            if (p->closing) {
                break;
            }
            if (ch->active && strcmp(ch->name, n->relname) == 0) {
                ch->cb(ch->name, n->extra, ch->arg);
            }
        }
        PQfreemem(n);
    }
}

/* Sends LISTEN for every channel not yet listened on this connection. */
static void listen_maintain(lr_pg_pool_t *p) {
    pgconn_t *c = &p->lconn;
    size_t len = 0, cap = 0;
    char *sql = NULL;

    if (c->state != CONN_LISTEN || c->listen_inflight) {
        return;
    }
    lr_list_foreach(it, &p->chans) {
        pgchan_t *ch = lr_list_entry(it, pgchan_t, link);
        char *id;
        size_t idlen;
        if (ch->active || ch->failed) {
            continue;
        }
        id = PQescapeIdentifier(c->pg, ch->name, strlen(ch->name));
        if (id == NULL) {
            char msg[256];
            flatten(msg, sizeof(msg), PQerrorMessage(c->pg));
            lr_warn("pg.listen_failed", "cannot quote a channel name: %s", msg);
            ch->failed = true;
            continue;
        }
        idlen = strlen(id);
        if (len + idlen + 16 > cap) {
            size_t ncap = (cap == 0 ? 256 : cap * 2) + idlen + 16;
            char *nsql = realloc(sql, ncap);
            if (nsql == NULL) {
                PQfreemem(id);
                break; /* send what we have; the rest on the next event */
            }
            sql = nsql;
            cap = ncap;
        }
        len += (size_t)snprintf(sql + len, cap - len, "LISTEN %s;", id);
        PQfreemem(id);
        ch->sending = true;
    }
    if (len == 0) {
        free(sql);
        return;
    }
    c->listen_inflight = true;
    if (!PQsendQuery(c->pg, sql) || conn_flush(c) < 0) {
        conn_fail(c, "send failed");
    }
    free(sql);
}

/* Socket event on a connected connection. */
static void conn_io(pgconn_t *c, int events) {
    if ((events & UV_READABLE) != 0 && !PQconsumeInput(c->pg)) {
        conn_fail(c, "read failed");
        return;
    }
    if (c->flushing && conn_flush(c) < 0) {
        conn_fail(c, "write failed");
        return;
    }
    switch (c->state) {
    case CONN_IDLE: {
        PGnotify *n;
        while ((n = PQnotifies(c->pg)) != NULL) {
            PQfreemem(n); /* nobody LISTENs on pool connections */
        }
        if (PQstatus(c->pg) == CONNECTION_BAD) {
            conn_fail(c, "connection lost");
        }
        break;
    }
    case CONN_BUSY: conn_read_single(c); break;
    case CONN_BUSY_BATCH: conn_read_batch(c); break;
    case CONN_LISTEN: listen_read(c); break;
    default: break;
    }
}

/* ---- loop callbacks --------------------------------------------------------- */

static void notify_state(lr_pg_pool_t *p) {
    int n;
    if (p->closing || p->on_state == NULL) {
        return;
    }
    n = lr_pg_pool_usable(p);
    if (n == p->reported_usable) {
        return;
    }
    /* Report 0 only once something failed (not while still starting). */
    if (n == 0 && p->reported_usable < 0 && !p->any_failure) {
        return;
    }
    p->reported_usable = n;
    p->on_state(n, p->state_arg);
}

static void after_event(lr_pg_pool_t *p) {
    if (!p->closing) {
        dispatch(p);
    }
    if (!p->closing) {
        listen_maintain(p);
    }
    notify_state(p);
}

static void on_poll(uv_poll_t *h, int status, int events) {
    pgwatch_t *w = h->data;
    pgconn_t *c = w->conn;
    lr_pg_pool_t *p = w->pool;
    if (c == NULL) {
        return;
    }
    if (status < 0) {
        /* POLLERR: libuv has stopped this handle.  Let libpq read what is
         * left (often the server's FATAL message) and find the error itself;
         * the handle is re-armed below, or we give up after a few in a row. */
        lr_debug("pg.poll_error", "%s %d (%s): %s", conn_kind(c), c->id, conn_state_names[c->state],
                 uv_strerror(status));
        w->events = 0;
        c->poll_errors++;
        events = UV_READABLE | UV_WRITABLE;
    } else {
        c->poll_errors = 0;
    }
    switch (c->state) {
    case CONN_CONNECTING: conn_connect_step(c); break;
    case CONN_IDLE:
    case CONN_BUSY:
    case CONN_BUSY_BATCH:
    case CONN_LISTEN: conn_io(c, events); break;
    default: break;
    }
    if (status < 0 && c->watch == w) { /* still connected on this socket */
        if (c->poll_errors >= PG_MAX_POLL_ERRORS) {
            conn_fail(c, "socket error");
        } else if (w->events == 0) {
            lr_debug("pg.poll_rearm", "%s %d (%s): still connected after a poll error", conn_kind(c), c->id,
                     conn_state_names[c->state]);
            if (conn_watch(c, c->want) < 0) {
                conn_fail(c, "cannot watch the socket");
            }
        }
    }
    after_event(p);
}

static void on_kick(uv_idle_t *h) {
    lr_pg_pool_t *p = h->data;
    uv_idle_stop(h);
    after_event(p);
}

static void on_tick(uv_timer_t *t) {
    lr_pg_pool_t *p = t->data;
    uint64_t now = now_ms();
    qlist_t expired;
    bool any_deadline = false;
    qlist_t *lists[2] = {&p->plain, &p->batch};

    qlist_init(&expired);
    for (int i = 0; i < 2; i++) {
        lr_list_foreach_safe(it, next, &lists[i]->head) {
            pgq_t *q = lr_list_entry(it, pgq_t, link);
            if (q->deadline != 0 && q->deadline <= now) {
                qlist_remove(lists[i], q);
                qlist_push_back(&expired, q);
            } else if (q->deadline != 0) {
                any_deadline = true;
            }
        }
    }
    if (!any_deadline) {
        uv_timer_stop(&p->tick);
    }
    /* One line per PG_WARN_EVERY_MS at most: an outage expires a few
     * queries on every tick. */
    p->timeouts_unlogged += expired.n;
    if (p->timeouts_unlogged > 0 && (p->timeout_logged_at == 0 || now - p->timeout_logged_at >= PG_WARN_EVERY_MS)) {
        lr_warn("pg.queue_timeout", "%zu queries waited longer than their timeout (%d of %d connections usable)",
                p->timeouts_unlogged, lr_pg_pool_usable(p), p->size);
        p->timeouts_unlogged = 0;
        p->timeout_logged_at = now;
    }
    deliver_all(p, &expired, LR_ETIMEOUT);
    after_event(p);
}

/* ---- public API ----------------------------------------------------------- */

/* Copies libpq's conninfo parse error, masking quoted fragments: they can be
 * pieces of the string, password included. */
static void mask_quoted(char *dst, size_t cap, const char *src) {
    size_t n = 0;
    bool in = false;
    for (; src != NULL && *src != '\0' && n + 4 < cap; src++) {
        if (*src == '"') {
            if (!in) {
                memcpy(dst + n, "\"...", 4);
                n += 4;
            } else {
                dst[n++] = '"';
            }
            in = !in;
            continue;
        }
        if (!in) {
            dst[n++] = *src == '\n' ? ' ' : *src;
        }
    }
    dst[n] = '\0';
    while (n > 0 && dst[n - 1] == ' ') {
        dst[--n] = '\0';
    }
}

static void conn_setup(lr_pg_pool_t *p, pgconn_t *c, int id) {
    c->pool = p;
    c->id = id;
    c->state = CONN_INIT;
    qlist_init(&c->inflight);
    uv_timer_init(p->loop, &c->timer); /* cannot fail */
    c->timer.data = c;
    p->open_handles++;
}

int lr_pg_pool_init(lr_pg_pool_t **out, uv_loop_t *loop, const lr_pg_opts_t *opts, char *errbuf, size_t errlen) {
    lr_pg_pool_t *p = NULL;
    PQconninfoOption *parsed = NULL;
    char *perr = NULL;
    const char *conninfo;
    int rc = 0;

    if (out == NULL || loop == NULL || opts == NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "pg: out, loop and opts are required");
    }
    *out = NULL;
    if (opts->size < 0 || opts->size > PG_MAX_SIZE) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "pg: size %d is out of range (0 = default %d, or 1..%d)",
                         opts->size, PG_DEFAULT_SIZE, PG_MAX_SIZE);
    }
    if (opts->max_batch < 0 || opts->max_batch > PG_MAX_BATCH) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "pg: max_batch %d is out of range (0 = default %d, or 1..%d)",
                         opts->max_batch, PG_DEFAULT_BATCH, PG_MAX_BATCH);
    }
    conninfo = opts->conninfo != NULL ? opts->conninfo : "";
    parsed = PQconninfoParse(conninfo, &perr);
    if (parsed == NULL) {
        char msg[256];
        mask_quoted(msg, sizeof(msg), perr != NULL ? perr : "out of memory");
        rc = lr_seterr(errbuf, errlen, perr != NULL ? LR_EINVAL : LR_ENOMEM, "pg: invalid conninfo: %s", msg);
        goto out;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL) {
        rc = lr_seterr(errbuf, errlen, LR_ENOMEM, "pg: out of memory");
        goto out;
    }
    p->loop = loop;
    qlist_init(&p->plain);
    qlist_init(&p->batch);
    lr_list_init(&p->chans);
    p->size = opts->size > 0 ? opts->size : PG_DEFAULT_SIZE;
    p->max_batch = opts->max_batch > 0 ? opts->max_batch : PG_DEFAULT_BATCH;
    p->max_queue = opts->max_queue > 0 ? opts->max_queue : PG_DEFAULT_QUEUE;
    p->on_state = opts->on_state;
    p->state_arg = opts->state_arg;
    p->reported_usable = -1;
    p->rng = (uv_hrtime() ^ (uint64_t)(uintptr_t)p) | 1u;
    p->conninfo = strdup(conninfo);
    p->appname = opts->application_name != NULL ? strdup(opts->application_name) : NULL;
    p->conns = calloc((size_t)p->size, sizeof(*p->conns));
    if (p->conninfo == NULL || p->conns == NULL || (opts->application_name != NULL && p->appname == NULL)) {
        rc = lr_seterr(errbuf, errlen, LR_ENOMEM, "pg: out of memory");
        goto out;
    }
    /* From here on nothing fails: handle inits below cannot. */
    uv_timer_init(loop, &p->tick);
    p->tick.data = p;
    uv_idle_init(loop, &p->kick);
    p->kick.data = p;
    p->open_handles += 2;
    for (int i = 0; i < p->size; i++) {
        conn_setup(p, &p->conns[i], i);
    }
    conn_setup(p, &p->lconn, -1);
    for (int i = 0; i < p->size; i++) {
        conn_start(&p->conns[i]);
    }
    *out = p;
    p = NULL;

out:
    PQconninfoFree(parsed);
    PQfreemem(perr);
    if (p != NULL) {
        free(p->conns);
        free(p->conninfo);
        free(p->appname);
        free(p);
    }
    return rc;
}

static int enqueue(lr_pg_pool_t *p, const char *sql, int nparams, const char *const *params, long timeout_ms,
                   lr_pg_cb cb, void *arg, bool batched) {
    size_t need, sqllen;
    pgq_t *q;
    char *s;

    if (p == NULL || sql == NULL || cb == NULL || nparams < 0 || nparams > LR_PG_MAX_PARAMS ||
        (nparams > 0 && params == NULL) || timeout_ms < 0) {
        return LR_EINVAL;
    }
    if (p->closing) {
        return LR_ESHUTDOWN;
    }
    if (p->plain.n + p->batch.n >= p->max_queue) {
        return LR_EBUSY;
    }
    sqllen = strlen(sql);
    need = sizeof(*q) + (size_t)nparams * sizeof(char *) + sqllen + 1;
    for (int i = 0; i < nparams; i++) {
        if (params[i] != NULL) {
            need += strlen(params[i]) + 1;
        }
        if (need >= PG_MAX_QUERY_BYTES) {
            return LR_EINVAL;
        }
    }
    if (need >= PG_MAX_QUERY_BYTES) {
        return LR_EINVAL;
    }
    q = malloc(need);
    if (q == NULL) {
        return LR_ENOMEM;
    }
    memset(q, 0, sizeof(*q));
    q->params = (char **)(q + 1); /* sizeof(*q) keeps pointer alignment */
    s = (char *)(q->params + nparams);
    memcpy(s, sql, sqllen + 1);
    q->sql = s;
    s += sqllen + 1;
    for (int i = 0; i < nparams; i++) {
        if (params[i] == NULL) {
            q->params[i] = NULL;
        } else {
            size_t l = strlen(params[i]) + 1;
            memcpy(s, params[i], l);
            q->params[i] = s;
            s += l;
        }
    }
    q->nparams = nparams;
    q->cb = cb;
    q->arg = arg;
    q->batched = batched;
    q->seq = ++p->seq;
    q->deadline = timeout_ms > 0 ? now_ms() + (uint64_t)timeout_ms : 0;
    qlist_push_back(batched ? &p->batch : &p->plain, q);
    if (q->deadline != 0 && !uv_is_active((uv_handle_t *)&p->tick)) {
        uv_timer_start(&p->tick, on_tick, PG_TICK_MS, PG_TICK_MS);
    }
    kick(p);
    return 0;
}

int lr_pg_query(lr_pg_pool_t *p, const char *sql, int nparams, const char *const *params, long timeout_ms, lr_pg_cb cb,
                void *arg) {
    return enqueue(p, sql, nparams, params, timeout_ms, cb, arg, false);
}

int lr_pg_query_batched(lr_pg_pool_t *p, const char *sql, int nparams, const char *const *params, long timeout_ms,
                        lr_pg_cb cb, void *arg) {
    return enqueue(p, sql, nparams, params, timeout_ms, cb, arg, true);
}

int lr_pg_listen(lr_pg_pool_t *p, const char *channel, lr_pg_notify_cb cb, void *arg) {
    pgchan_t *ch;
    size_t len;

    if (p == NULL || channel == NULL || cb == NULL) {
        return LR_EINVAL;
    }
    len = strlen(channel);
    if (len == 0 || len > PG_MAX_CHANNEL) {
        return LR_EINVAL;
    }
    if (p->closing) {
        return LR_ESHUTDOWN;
    }
    ch = calloc(1, sizeof(*ch) + len + 1);
    if (ch == NULL) {
        return LR_ENOMEM;
    }
    memcpy(ch->name, channel, len + 1);
    ch->cb = cb;
    ch->arg = arg;
    lr_list_push_back(&p->chans, &ch->link);
    if (p->lconn.state == CONN_INIT) {
        conn_start(&p->lconn); /* calls no user callback */
    }
    kick(p); /* LISTEN goes out from after_event() */
    return 0;
}

int lr_pg_pool_usable(const lr_pg_pool_t *p) {
    int n = 0;
    if (p == NULL) {
        return 0;
    }
    for (int i = 0; i < p->size; i++) {
        n += conn_usable(&p->conns[i]) ? 1 : 0;
    }
    return n;
}

size_t lr_pg_pool_pending(const lr_pg_pool_t *p) { return p == NULL ? 0 : p->plain.n + p->batch.n + p->inflight; }

void lr_pg_pool_stats(const lr_pg_pool_t *p, lr_pg_stats_t *out) {
    if (out == NULL) {
        return;
    }
    if (p == NULL) {
        memset(out, 0, sizeof(*out));
        return;
    }
    *out = p->stats;
}

void lr_pg_pool_close(lr_pg_pool_t *p, void (*done)(void *arg), void *arg) {
    pgq_t *q;
    if (p == NULL) {
        if (done != NULL) {
            done(arg);
        }
        return;
    }
    if (p->closing) {
        lr_warn("pg.close_twice", "lr_pg_pool_close called twice; ignored");
        return;
    }
    p->closing = true;
    p->done = done;
    p->done_arg = arg;
    lr_debug("pg.closing", "closing: %zu queued fail, %zu in flight finish", p->plain.n + p->batch.n, p->inflight);
    uv_close((uv_handle_t *)&p->tick, on_pool_handle_close);
    uv_close((uv_handle_t *)&p->kick, on_pool_handle_close);
    /* Connections without a query in flight go now; busy ones when their
     * results are in (conn_idle) or they fail (conn_fail). */
    for (int i = 0; i < p->size; i++) {
        if (p->conns[i].inflight.n == 0) {
            conn_shutdown(&p->conns[i]);
        }
    }
    conn_shutdown(&p->lconn);
    /* Pop one at a time: a callback cannot add (LR_ESHUTDOWN) but may look. */
    while ((q = qlist_pop(!qlist_empty(&p->plain) ? &p->plain : &p->batch)) != NULL) {
        deliver(p, q, LR_ESHUTDOWN);
    }
    /* done runs from the last close callback (maybe_finish). */
}

const char *lr_pg_get(const PGresult *res, int row, int col) {
    if (res == NULL || row < 0 || col < 0 || row >= PQntuples(res) || col >= PQnfields(res) ||
        PQgetisnull(res, row, col)) {
        return NULL;
    }
    return PQgetvalue(res, row, col);
}

const char *lr_pg_getn(const PGresult *res, int row, const char *colname) {
    if (res == NULL || colname == NULL) {
        return NULL;
    }
    return lr_pg_get(res, row, PQfnumber(res, colname));
}
