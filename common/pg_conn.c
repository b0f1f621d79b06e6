/*
 * pg_conn.c - a pool connection: its handles, connecting, sending statements (one,
 * or a batch in pipeline mode), reading their results, LISTEN, and the loop
 * callbacks of the pool; see pg.c for the design.
 */
#include "pg_int.h"

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

void lrp_maybe_finish(lr_pg_pool_t *p) {
    void (*done)(void *);
    void *arg;
    if (!p->closing || p->open_handles > 0) {
        return;
    }
    /* Defensive: nothing can be queued here (lr_pg_query refuses while
     * closing), but a query must never be dropped without its callback. */
    lrp_deliver_all(p, &p->plain, LR_ESHUTDOWN);
    lrp_deliver_all(p, &p->batch, LR_ESHUTDOWN);
    done = p->done;
    arg = p->done_arg;
    pool_free(p);
    if (done != NULL) {
        done(arg);
    }
}

void lrp_on_pool_handle_close(uv_handle_t *h) {
    lr_pg_pool_t *p = h->data;
    p->open_handles--;
    lrp_maybe_finish(p);
}

static void on_timer_close(uv_handle_t *h) {
    pgconn_t *c = h->data;
    lr_pg_pool_t *p = c->pool;
    p->open_handles--;
    lrp_maybe_finish(p);
}

static void on_watch_close(uv_handle_t *h) {
    pgwatch_t *w = h->data;
    lr_pg_pool_t *p = w->pool;
    free(w);
    p->open_handles--;
    lrp_maybe_finish(p);
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
int lrp_conn_watch(pgconn_t *c, int events) {
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
            lr_warn("pg.poll_failed", "%s %d: uv_poll_init: %s", lrp_conn_kind(c), c->id, uv_strerror(rc));
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
        rc = uv_poll_start(&w->poll, events, lrp_on_poll);
        if (rc < 0) {
            lr_warn("pg.poll_failed", "%s %d: uv_poll_start: %s", lrp_conn_kind(c), c->id, uv_strerror(rc));
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
    return lrp_conn_watch(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
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
void lrp_conn_shutdown(pgconn_t *c) {
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
    lrp_flatten(msg, sizeof(msg), PQresultErrorMessage(res));
    if (sev != NULL && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0)) {
        lrp_flatten(c->fatal, sizeof(c->fatal), PQresultErrorMessage(res));
    }
    lr_debug("pg.notice", "%s %d: %s", lrp_conn_kind(c), c->id, msg);
}

/* INIT/BACKOFF -> CONNECTING */
void lrp_conn_start(pgconn_t *c) {
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
        lrp_conn_fail(c, "out of memory");
        return;
    }
    PQsetNoticeReceiver(c->pg, on_notice, c);
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        lrp_conn_fail(c, "connect failed");
        return;
    }
    uv_timer_start(&c->timer, lrp_on_conn_timer, PG_CONNECT_TIMEOUT_MS, 0);
    /* "as if PQconnectPoll had returned PGRES_POLLING_WRITING" */
    if (lrp_conn_watch(c, UV_WRITABLE) < 0) {
        lrp_conn_fail(c, "cannot watch the socket");
    }
}

/* CONNECTING -> IDLE / LISTEN */
static void conn_ready(pgconn_t *c) {
    lr_pg_pool_t *p = c->pool;
    uv_timer_stop(&c->timer);
    if (PQsetnonblocking(c->pg, 1) != 0) {
        lrp_conn_fail(c, "cannot set non-blocking mode");
        return;
    }
    c->failures = 0;
    p->stats.connects++;
    if (c->warned) {
        c->warned = false;
        lr_info("pg.conn_restored", "%s %d: connected again", lrp_conn_kind(c), c->id);
    }
    if (c->id < 0) {
        set_state(c, CONN_LISTEN); /* lrp_after_event() sends the LISTENs */
        if (lrp_conn_watch(c, UV_READABLE) < 0) {
            lrp_conn_fail(c, "cannot watch the socket");
        }
        return;
    }
    set_state(c, CONN_IDLE);
    if (lrp_conn_watch(c, UV_READABLE) < 0) {
        lrp_conn_fail(c, "cannot watch the socket");
    }
}

static void conn_connect_step(pgconn_t *c) {
    int events;
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_OK: conn_ready(c); return;
    case PGRES_POLLING_READING: events = UV_READABLE; break;
    case PGRES_POLLING_WRITING: events = UV_WRITABLE; break;
    default: lrp_conn_fail(c, "connect failed"); return;
    }
    /* the socket may have changed inside PQconnectPoll */
    if (lrp_conn_watch(c, events) < 0) {
        lrp_conn_fail(c, "cannot watch the socket");
    }
}

/* Any state -> BACKOFF (or CLOSED when the pool is closing).  Every query
 * still in flight gets LR_ECONN: it may have committed. */
void lrp_conn_fail(pgconn_t *c, const char *why) {
    lr_pg_pool_t *p = c->pool;
    qlist_t lost;
    char msg[512];
    /* A group commit whose COMMIT already answered OK is durable even if the
     * connection died before its Sync result: report it as done. */
    bool committed = c->state == CONN_BUSY_BATCH && !c->batch_bad && lrp_result_ok(c->commit_res) &&
                     strcmp(PQcmdStatus(c->commit_res), "COMMIT") == 0;

    lrp_qlist_take(&lost, &c->inflight);
    p->inflight -= lost.n;
    if (c->pg != NULL) {
        lrp_flatten(msg, sizeof(msg), PQerrorMessage(c->pg));
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
        lr_warn("pg.conn_failed", "%s %d (%s): %s%s%s; %zu in flight failed; reconnecting", lrp_conn_kind(c), c->id,
                lrp_conn_state_names[c->state], why, msg[0] != '\0' ? ": " : "", msg, committed ? (size_t)0 : lost.n);
    } else {
        lr_debug("pg.conn_failed", "%s %d (%s): %s%s%s", lrp_conn_kind(c), c->id, lrp_conn_state_names[c->state], why,
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
        lrp_conn_shutdown(c);
    } else {
        uint64_t delay = lrp_backoff_ms(c);
        set_state(c, CONN_BACKOFF);
        c->failures++;
        uv_timer_start(&c->timer, lrp_on_conn_timer, delay, 0);
    }
    lrp_deliver_all(p, &lost, committed ? 0 : LR_ECONN);
}

void lrp_on_conn_timer(uv_timer_t *t) {
    pgconn_t *c = t->data;
    if (c->state == CONN_BACKOFF) {
        lrp_conn_start(c);
    } else if (c->state == CONN_CONNECTING) {
        lrp_conn_fail(c, "connect timed out");
    }
    lrp_after_event(c->pool);
}

/* ---- sending ------------------------------------------------------------ */

/* IDLE -> BUSY with one statement. */
static void send_single(pgconn_t *c, pgq_t *q) {
    lr_pg_pool_t *p = c->pool;
    lrp_qlist_push_back(&c->inflight, q);
    p->inflight++;
    set_state(c, CONN_BUSY);
    if (!PQsendQueryParams(c->pg, q->sql, q->nparams, NULL, (const char *const *)q->params, NULL, NULL, 0)) {
        /* Not sent (its Sync never left): safe to run elsewhere. */
        qlist_t back;
        lrp_qlist_take(&back, &c->inflight);
        p->inflight -= back.n;
        lrp_requeue_front(p, &back);
        lrp_conn_fail(c, "send failed");
        return;
    }
    if (conn_flush(c) < 0) {
        lrp_conn_fail(c, "flush failed");
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

    while (n < p->max_batch && !lrp_qlist_empty(&p->batch)) {
        lrp_qlist_push_back(&c->inflight, lrp_qlist_pop(&p->batch));
        n++;
    }
    if (n == 1) {
        /* One statement alone in autocommit is the same transaction. */
        send_single(c, lrp_qlist_pop(&c->inflight));
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
        lrp_qlist_take(&back, &c->inflight);
        p->inflight -= back.n;
        lrp_requeue_front(p, &back);
        lrp_conn_fail(c, "send failed");
        return;
    }
    /* From here on COMMIT may reach the server: failures are LR_ECONN. */
    if (!PQsendQueryParams(c->pg, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) || !PQpipelineSync(c->pg) ||
        conn_flush(c) < 0) {
        lrp_conn_fail(c, "send failed");
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
    while (!p->closing && (!lrp_qlist_empty(&p->plain) || !lrp_qlist_empty(&p->batch))) {
        pgconn_t *c = idle_conn(p);
        pgq_t *ph = lrp_qlist_first(&p->plain), *bh = lrp_qlist_first(&p->batch);
        if (c == NULL) {
            return;
        }
        /* every pass either sends or breaks a connection: it terminates */
        if (bh != NULL && (ph == NULL || bh->seq < ph->seq)) {
            send_batch(c);
        } else {
            send_single(c, lrp_qlist_pop(&p->plain));
        }
    }
}

/* ---- reading ------------------------------------------------------------ */

/* After a completed round trip: back to IDLE, unless a transaction was left
 * open (a failed group commit stays in an aborted block after its Sync, or a
 * caller sent BEGIN), which our own ROLLBACK closes first. */
void lrp_conn_idle(pgconn_t *c) {
    PGTransactionStatusType ts;
    if (c->pool->closing) {
        lrp_conn_shutdown(c);
        return;
    }
    ts = PQtransactionStatus(c->pg);
    if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) {
        c->rollback = true;
        set_state(c, CONN_BUSY);
        if (!PQsendQuery(c->pg, "ROLLBACK") || conn_flush(c) < 0) {
            lrp_conn_fail(c, "send failed");
        }
        return;
    }
    if (ts != PQTRANS_IDLE) {
        lrp_conn_fail(c, "unexpected transaction status");
        return;
    }
    set_state(c, CONN_IDLE);
    if (lrp_conn_watch(c, UV_READABLE) < 0) {
        lrp_conn_fail(c, "cannot watch the socket");
    }
}

static void conn_read_single(pgconn_t *c) {
    lr_pg_pool_t *p = c->pool;
    pgq_t *q = lrp_qlist_first(&c->inflight); /* NULL for our own ROLLBACK */
    bool complete = false;
    qlist_t done;
    int err;

    while (!PQisBusy(c->pg)) {
        PGresult *res = PQgetResult(c->pg);
        if (res == NULL) {
            complete = true;
            break;
        }
        if (lrp_result_is_copy(res)) {
            PQclear(res);
            lr_warn("pg.copy_unsupported", "conn %d: COPY is not supported; dropping the connection", c->id);
            lrp_conn_fail(c, "COPY is not supported");
            return;
        }
        if (q != NULL) {
            lrp_store_result(&q->res, res);
        } else {
            if (!lrp_result_ok(res)) {
                char msg[256];
                lrp_flatten(msg, sizeof(msg), PQresultErrorMessage(res));
                lr_warn("pg.rollback_failed", "conn %d: %s", c->id, msg);
            }
            PQclear(res);
        }
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        lrp_conn_fail(c, "connection lost");
        return;
    }
    if (!complete) {
        return;
    }
    c->rollback = false;
    lrp_qlist_take(&done, &c->inflight);
    p->inflight -= done.n;
    lrp_conn_idle(c);
    if (q != NULL) {
        lrp_qlist_remove(&done, q);
        err = lrp_result_ok(q->res) ? 0 : LR_EDB;
        lrp_deliver(p, q, err);
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
                lrp_conn_fail(c, "pipeline out of sync");
                return;
            }
            c->slot++;
            c->slot_has_result = false;
            c->cursor = c->slot == 1        ? lrp_qlist_first(&c->inflight)
                        : c->cursor != NULL ? lrp_qlist_next(&c->inflight, c->cursor)
                                            : NULL;
            continue;
        }
        if (PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
            PQclear(res); /* libpq returns no NULL after a Sync result */
            synced = true;
            break;
        }
        if (lrp_result_is_copy(res) || c->slot > c->nbatch + 1) {
            PQclear(res);
            lrp_conn_fail(c, "unexpected result in a group commit");
            return;
        }
        if (!lrp_result_ok(res)) {
            c->batch_bad = true;
        }
        if (c->slot == 0) {
            PQclear(res); /* BEGIN */
        } else if (c->slot == c->nbatch + 1) {
            lrp_store_result(&c->commit_res, res);
        } else {
            lrp_store_result(&c->cursor->res, res);
        }
        c->slot_has_result = true;
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        lrp_conn_fail(c, "connection lost");
        return;
    }
    if (!synced) {
        return;
    }
    committed = !c->batch_bad && c->slot == c->nbatch + 2 && lrp_result_ok(c->commit_res) &&
                strcmp(PQcmdStatus(c->commit_res), "COMMIT") == 0;
    lrp_qlist_take(&done, &c->inflight);
    p->inflight -= done.n;
    batch_reset(c);
    if (!PQexitPipelineMode(c->pg)) {
        lrp_conn_fail(c, "cannot leave pipeline mode");
    } else {
        lrp_conn_idle(c);
    }
    if (committed) {
        lrp_deliver_all(p, &done, 0); /* each with its own result */
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
        lrp_deliver_all(p, &done, LR_ESHUTDOWN);
    } else {
        lrp_requeue_front(p, &done);
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
            if (!lrp_result_ok(res)) {
                char msg[256];
                lrp_flatten(msg, sizeof(msg), PQresultErrorMessage(res));
                lr_warn("pg.listen_failed", "LISTEN failed: %s", msg);
                c->listen_err = true;
            }
            PQclear(res);
        }
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        lrp_conn_fail(c, "connection lost");
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
            lrp_flatten(msg, sizeof(msg), PQerrorMessage(c->pg));
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
        lrp_conn_fail(c, "send failed");
    }
    free(sql);
}

/* Socket event on a connected connection. */
static void conn_io(pgconn_t *c, int events) {
    if ((events & UV_READABLE) != 0 && !PQconsumeInput(c->pg)) {
        lrp_conn_fail(c, "read failed");
        return;
    }
    if (c->flushing && conn_flush(c) < 0) {
        lrp_conn_fail(c, "write failed");
        return;
    }
    switch (c->state) {
    case CONN_IDLE: {
        PGnotify *n;
        while ((n = PQnotifies(c->pg)) != NULL) {
            PQfreemem(n); /* nobody LISTENs on pool connections */
        }
        if (PQstatus(c->pg) == CONNECTION_BAD) {
            lrp_conn_fail(c, "connection lost");
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

void lrp_after_event(lr_pg_pool_t *p) {
    if (!p->closing) {
        dispatch(p);
    }
    if (!p->closing) {
        listen_maintain(p);
    }
    notify_state(p);
}

void lrp_on_poll(uv_poll_t *h, int status, int events) {
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
        lr_debug("pg.poll_error", "%s %d (%s): %s", lrp_conn_kind(c), c->id, lrp_conn_state_names[c->state],
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
            lrp_conn_fail(c, "socket error");
        } else if (w->events == 0) {
            lr_debug("pg.poll_rearm", "%s %d (%s): still connected after a poll error", lrp_conn_kind(c), c->id,
                     lrp_conn_state_names[c->state]);
            if (lrp_conn_watch(c, c->want) < 0) {
                lrp_conn_fail(c, "cannot watch the socket");
            }
        }
    }
    lrp_after_event(p);
}

void lrp_on_kick(uv_idle_t *h) {
    lr_pg_pool_t *p = h->data;
    uv_idle_stop(h);
    lrp_after_event(p);
}

void lrp_on_tick(uv_timer_t *t) {
    lr_pg_pool_t *p = t->data;
    uint64_t now = lrp_now_ms();
    qlist_t expired;
    bool any_deadline = false;
    qlist_t *lists[2] = {&p->plain, &p->batch};

    lrp_qlist_init(&expired);
    for (int i = 0; i < 2; i++) {
        lr_list_foreach_safe(it, next, &lists[i]->head) {
            pgq_t *q = lr_list_entry(it, pgq_t, link);
            if (q->deadline != 0 && q->deadline <= now) {
                lrp_qlist_remove(lists[i], q);
                lrp_qlist_push_back(&expired, q);
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
    lrp_deliver_all(p, &expired, LR_ETIMEOUT);
    lrp_after_event(p);
}

int lr_pg_pool_usable(const lr_pg_pool_t *p) {
    int n = 0;
    if (p == NULL) {
        return 0;
    }
    for (int i = 0; i < p->size; i++) {
        n += lrp_conn_usable(&p->conns[i]) ? 1 : 0;
    }
    return n;
}
