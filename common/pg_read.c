/*
 * pg_read.c - reading a connection's results, LISTEN, and the loop callbacks of
 * the pool (poll, timers, kick); see pg.c for the design.
 */
#include "pg_int.h"

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
        if (!PQsendQuery(c->pg, "ROLLBACK") || lrp_conn_flush(c) < 0) {
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
    lrp_batch_reset(c);
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
    if (!PQsendQuery(c->pg, sql) || lrp_conn_flush(c) < 0) {
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
    if (c->flushing && lrp_conn_flush(c) < 0) {
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
        lrp_dispatch(p);
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
    case CONN_CONNECTING: lrp_conn_connect_step(c); break;
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
