/*
 * pg_int.h - what the files split from pg.c share (not for the rest of the program).
 */
#ifndef LR_PG_INT_H
#define LR_PG_INT_H

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
#define PG_MAX_QUERY_BYTES ((size_t)1 << 30)
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

#define set_state(c, s) lrp_set_state_at((c), (s), __LINE__)

/* Shared between the files (prefix lrp_). */
extern const char *const lrp_conn_state_names[];
uint64_t lrp_now_ms(void);
void lrp_qlist_init(qlist_t *l);
bool lrp_qlist_empty(const qlist_t *l);
pgq_t *lrp_qlist_first(const qlist_t *l);
pgq_t *lrp_qlist_next(const qlist_t *l, const pgq_t *q);
void lrp_qlist_push_back(qlist_t *l, pgq_t *q);
void lrp_qlist_remove(qlist_t *l, pgq_t *q);
pgq_t *lrp_qlist_pop(qlist_t *l);
void lrp_qlist_take(qlist_t *to, qlist_t *from);
bool lrp_result_ok(const PGresult *res);
bool lrp_result_is_copy(const PGresult *res);
void lrp_store_result(PGresult **dst, PGresult *res);
void lrp_flatten(char *dst, size_t cap, const char *src);
const char *lrp_conn_kind(const pgconn_t *c);
void lrp_set_state_at(pgconn_t *c, enum conn_state s, int line);
bool lrp_conn_usable(const pgconn_t *c);
uint64_t lrp_backoff_ms(pgconn_t *c);
void lrp_deliver(lr_pg_pool_t *p, pgq_t *q, int err);
void lrp_deliver_all(lr_pg_pool_t *p, qlist_t *l, int err);
void lrp_requeue_front(lr_pg_pool_t *p, qlist_t *l);
void lrp_kick(lr_pg_pool_t *p);
void lrp_maybe_finish(lr_pg_pool_t *p);
void lrp_on_pool_handle_close(uv_handle_t *h);
int lrp_conn_watch(pgconn_t *c, int events);
void lrp_conn_shutdown(pgconn_t *c);
void lrp_conn_start(pgconn_t *c);
void lrp_conn_fail(pgconn_t *c, const char *why);
void lrp_on_conn_timer(uv_timer_t *t);
void lrp_conn_idle(pgconn_t *c);
void lrp_after_event(lr_pg_pool_t *p);
void lrp_on_poll(uv_poll_t *h, int status, int events);
void lrp_on_kick(uv_idle_t *h);
void lrp_on_tick(uv_timer_t *t);

#endif
