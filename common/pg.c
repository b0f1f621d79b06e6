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
 *    runs only while a queued query has a deadline) and `lrp_kick` idle handle.
 *
 * lr_pg_query() only queues and starts `lrp_kick`; the next loop iteration runs
 * dispatch(), so a callback never runs inside lr_pg_query() and queries
 * issued in the same iteration are seen together, which is what makes group
 * commit happen: when a connection is free and the oldest waiting query is a
 * batched one, up to max_batch batched queries leave together as
 * BEGIN; q1..qN; COMMIT; Sync in pipeline mode.
 *
 * Every event handler (poll, timers, lrp_kick) ends with lrp_after_event(): dispatch
 * the queue on free connections, send pending LISTENs, report the usable
 * connection count.  User callbacks may call lr_pg_query() and even
 * lr_pg_pool_close(), so code that runs callbacks first detaches what it
 * delivers into a local list and puts the connection into a consistent state;
 * after a callback it re-reads pool state instead of holding iterators.  The
 * pool is freed only from the last handle close callback, never while one of
 * its own frames is on the stack.
 *
 * Files, each using only those below it: pg.c (the public API), pg_conn.c
 * (connections: handles, connecting, sending, reading, LISTEN, the loop
 * callbacks), pg_util.c (helpers, delivering results); what they share is in
 * pg_int.h (prefix lrp_).
 */
#include "pg_int.h"

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
    lrp_qlist_init(&c->inflight);
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
    lrp_qlist_init(&p->plain);
    lrp_qlist_init(&p->batch);
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
        lrp_conn_start(&p->conns[i]);
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
    q->deadline = timeout_ms > 0 ? lrp_now_ms() + (uint64_t)timeout_ms : 0;
    lrp_qlist_push_back(batched ? &p->batch : &p->plain, q);
    if (q->deadline != 0 && !uv_is_active((uv_handle_t *)&p->tick)) {
        uv_timer_start(&p->tick, lrp_on_tick, PG_TICK_MS, PG_TICK_MS);
    }
    lrp_kick(p);
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
        lrp_conn_start(&p->lconn); /* calls no user callback */
    }
    lrp_kick(p); /* LISTEN goes out from lrp_after_event() */
    return 0;
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
    uv_close((uv_handle_t *)&p->tick, lrp_on_pool_handle_close);
    uv_close((uv_handle_t *)&p->kick, lrp_on_pool_handle_close);
    /* Connections without a query in flight go now; busy ones when their
     * results are in (lrp_conn_idle) or they fail (lrp_conn_fail). */
    for (int i = 0; i < p->size; i++) {
        if (p->conns[i].inflight.n == 0) {
            lrp_conn_shutdown(&p->conns[i]);
        }
    }
    lrp_conn_shutdown(&p->lconn);
    /* Pop one at a time: a callback cannot add (LR_ESHUTDOWN) but may look. */
    while ((q = lrp_qlist_pop(!lrp_qlist_empty(&p->plain) ? &p->plain : &p->batch)) != NULL) {
        lrp_deliver(p, q, LR_ESHUTDOWN);
    }
    /* done runs from the last close callback (lrp_maybe_finish). */
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
