/*
 * pg_util.c - the pool's small helpers (query lists, result keeping, backoff) and
 * the delivery of results to their callbacks; see pg.c for the design.
 */
#include "pg_int.h"

/* PostgreSQL rejects protocol messages of 1 GB or more; refuse them early. */

/* Connection states.  Every transition goes through set_state(). */

const char *const lrp_conn_state_names[] = {
    "init", "connecting", "idle", "busy", "busy_batch", "listen", "backoff", "closed",
};

struct pgconn;

/* ---- small helpers ---------------------------------------------------- */

uint64_t lrp_now_ms(void) { return uv_hrtime() / 1000000u; }

void lrp_qlist_init(qlist_t *l) {
    lr_list_init(&l->head);
    l->n = 0;
}

bool lrp_qlist_empty(const qlist_t *l) { return l->n == 0; }

pgq_t *lrp_qlist_first(const qlist_t *l) {
    lr_list_t *n = lr_list_first(&l->head);
    return n != NULL ? lr_list_entry(n, pgq_t, link) : NULL;
}

static pgq_t *qlist_last(const qlist_t *l) {
    return lr_list_empty(&l->head) ? NULL : lr_list_entry(l->head.prev, pgq_t, link);
}

/* The query after q on l, or NULL when q is the last one. */
pgq_t *lrp_qlist_next(const qlist_t *l, const pgq_t *q) {
    return q->link.next == &l->head ? NULL : lr_list_entry(q->link.next, pgq_t, link);
}

void lrp_qlist_push_back(qlist_t *l, pgq_t *q) {
    lr_list_push_back(&l->head, &q->link);
    l->n++;
}

static void qlist_push_front(qlist_t *l, pgq_t *q) {
    lr_list_push_front(&l->head, &q->link);
    l->n++;
}

void lrp_qlist_remove(qlist_t *l, pgq_t *q) {
    lr_list_remove(&q->link);
    l->n--;
}

pgq_t *lrp_qlist_pop(qlist_t *l) {
    pgq_t *q = lrp_qlist_first(l);
    if (q != NULL) {
        lrp_qlist_remove(l, q);
    }
    return q;
}

/* Moves the whole of `from` into the empty list `to` (for delivering
 * without holding pool state); `from` is left empty. */
void lrp_qlist_take(qlist_t *to, qlist_t *from) {
    lrp_qlist_init(to);
    lr_list_splice_back(&to->head, &from->head);
    to->n = from->n;
    from->n = 0;
}

bool lrp_result_ok(const PGresult *res) {
    ExecStatusType st = PQresultStatus(res);
    return res != NULL && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK);
}

bool lrp_result_is_copy(const PGresult *res) {
    ExecStatusType st = PQresultStatus(res);
    return st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH;
}

/* Keeps the first error of a statement, otherwise its last result (libpq may
 * return more than one result for one statement, e.g. an error after
 * CommandComplete). */
void lrp_store_result(PGresult **dst, PGresult *res) {
    if (*dst != NULL && !lrp_result_ok(*dst)) {
        PQclear(res);
        return;
    }
    PQclear(*dst);
    *dst = res;
}

/* One line of text: newlines and tabs become spaces, trailing space cut. */
void lrp_flatten(char *dst, size_t cap, const char *src) {
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

const char *lrp_conn_kind(const pgconn_t *c) { return c->id < 0 ? "listen" : "conn"; }

void lrp_set_state_at(pgconn_t *c, enum conn_state s, int line) {
    if (c->state == s) {
        return;
    }
    lr_debug("pg.conn_state", "%s %d: %s -> %s (line %d)", lrp_conn_kind(c), c->id, lrp_conn_state_names[c->state],
             lrp_conn_state_names[s], line);
    c->state = s;
}

bool lrp_conn_usable(const pgconn_t *c) {
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
uint64_t lrp_backoff_ms(pgconn_t *c) {
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

void lrp_deliver(lr_pg_pool_t *p, pgq_t *q, int err) {
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

void lrp_deliver_all(lr_pg_pool_t *p, qlist_t *l, int err) {
    pgq_t *q;
    while ((q = lrp_qlist_pop(l)) != NULL) {
        lrp_deliver(p, q, err);
    }
}

/* Re-queues unsent queries at the front of their queue, keeping their order. */
void lrp_requeue_front(lr_pg_pool_t *p, qlist_t *l) {
    pgq_t *q;
    while ((q = qlist_last(l)) != NULL) {
        lrp_qlist_remove(l, q);
        qlist_push_front(q->batched && !q->alone ? &p->batch : &p->plain, q);
    }
}

void lrp_kick(lr_pg_pool_t *p) {
    if (!p->closing && !uv_is_active((uv_handle_t *)&p->kick)) {
        uv_idle_start(&p->kick, lrp_on_kick);
    }
}
