/*
 * pg.h - asynchronous PostgreSQL on a libuv loop: a small pool of libpq
 * connections, a FIFO of queries, group commit in pipeline mode, LISTEN.
 *
 * Design: each connection is a state machine (connecting -> idle -> busy ->
 * idle, or broken -> backoff -> connecting) driven by uv_poll_t on PQsocket()
 * and a uv_timer_t for reconnect backoff.  Connecting uses PQconnectStart /
 * PQconnectPoll; queries use PQsendQueryParams (text parameters, text results)
 * with PQsetnonblocking + PQflush, results are read with PQconsumeInput /
 * PQisBusy / PQgetResult, so the loop never blocks.
 *
 * Two kinds of query:
 *  - lr_pg_query: runs alone in autocommit on the next free connection.
 *  - lr_pg_query_batched: may share one transaction with other batched
 *    queries that are waiting at the same moment (group commit): the pool
 *    sends BEGIN; q1; ...; qN; COMMIT in pipeline mode (PQenterPipelineMode,
 *    PQpipelineSync) on one connection.  Each statement must stand on its
 *    own (e.g. a fenced checkpoint returns zero rows, it does not raise).
 *    Callbacks of a batch run only after COMMIT succeeded, so nothing is
 *    reported done before it is durable.  If any statement of the batch
 *    fails, the transaction is rolled back and every query of that batch is
 *    re-run alone (lr_pg_query semantics), so one bad statement cannot fail
 *    the others.  Batch size is bounded (max_batch).
 *
 * Queries wait in the queue while no connection is up (reconnecting with
 * exponential backoff and jitter, 100 ms .. 5 s); the queue is bounded.
 *
 * Thread affinity: all functions and callbacks on the loop thread.
 */
#ifndef LR_PG_H
#define LR_PG_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "err.h"

typedef struct lr_pg_pool lr_pg_pool_t;

#define LR_PG_MAX_PARAMS 32

/* Result callback, called exactly once per accepted query.
 *   err == 0:          the statement succeeded (PGRES_COMMAND_OK/TUPLES_OK) and,
 *                      for batched queries, its transaction committed.
 *                      res is the statement's result.
 *   err == LR_EDB:     the server rejected the statement; res holds the error
 *                      (PQresultErrorField(res, PG_DIAG_SQLSTATE), PQresultErrorMessage).
 *   err == LR_ECONN:   the connection broke while the query was in flight: it
 *                      may or may not have committed.  res is NULL.  The caller
 *                      decides (checkpoints re-check their step row).
 *   err == LR_ETIMEOUT: the query waited in the queue longer than its timeout
 *                      without being sent (never sent); res is NULL.
 *   err == LR_ESHUTDOWN: the pool is closing; never sent; res is NULL.
 * res is borrowed: valid only during the callback (the pool PQclear()s it). */
typedef void (*lr_pg_cb)(int err, const PGresult *res, void *arg);

/* Notification callback for lr_pg_listen: channel and payload are borrowed. */
typedef void (*lr_pg_notify_cb)(const char *channel, const char *payload, void *arg);

/* Connection state changes (count of connections currently usable). */
typedef void (*lr_pg_state_cb)(int usable_connections, void *arg);

typedef struct lr_pg_opts {
    const char *conninfo;         /* libpq conninfo or URI; "" = libpq's PG* defaults */
    int size;                     /* connections, 1..64; default 4 */
    int max_batch;                /* max statements per group commit, default 64 */
    size_t max_queue;             /* max queued queries, default 100000 */
    const char *application_name; /* e.g. "longrun-worker" */
    lr_pg_state_cb on_state;      /* optional */
    void *state_arg;
} lr_pg_opts_t;

/* Creates the pool and starts connecting (asynchronously).  Copies opts.
 * Returns 0, LR_EINVAL (bad opts or unparsable conninfo; detail in errbuf),
 * LR_ENOMEM. */
int lr_pg_pool_init(lr_pg_pool_t **out, uv_loop_t *loop, const lr_pg_opts_t *opts, char *errbuf,
                    size_t errlen) LR_MUSTCHECK;

/* Queues one statement ($1..$n text parameters; NULL entry = SQL NULL).
 * Copies sql and params.  timeout_ms: how long it may wait unsent in the queue
 * (0 = forever).  Returns 0 (cb will run later, never inside this call),
 * LR_EINVAL, LR_ENOMEM, LR_EBUSY (queue full), LR_ESHUTDOWN; on error cb never
 * runs. */
int lr_pg_query(lr_pg_pool_t *p, const char *sql, int nparams, const char *const *params, long timeout_ms, lr_pg_cb cb,
                void *arg) LR_MUSTCHECK;

/* Same, but may be group-committed with other batched statements (above). */
int lr_pg_query_batched(lr_pg_pool_t *p, const char *sql, int nparams, const char *const *params, long timeout_ms,
                        lr_pg_cb cb, void *arg) LR_MUSTCHECK;

/* LISTENs on channel on a dedicated connection (re-LISTENed after every
 * reconnect; after a reconnect cb is called once with payload NULL so that
 * the caller can re-scan for anything it missed).  The NULL-payload call also
 * happens once when the first LISTEN completes, because notifications sent
 * between this call and that moment are lost too.  channel is copied.
 * Returns 0, LR_ENOMEM, LR_EINVAL (NULL/empty channel, longer than 63 bytes,
 * NULL cb), LR_ESHUTDOWN (pool closing); on error cb never runs. */
int lr_pg_listen(lr_pg_pool_t *p, const char *channel, lr_pg_notify_cb cb, void *arg) LR_MUSTCHECK;

/* Number of connections currently connected and usable. */
int lr_pg_pool_usable(const lr_pg_pool_t *p);
/* Number of queries waiting or in flight. */
size_t lr_pg_pool_pending(const lr_pg_pool_t *p);

/* Counters since lr_pg_pool_init (for tests and health output). */
typedef struct lr_pg_stats {
    uint64_t ok;            /* callbacks run with err == 0 */
    uint64_t err_db;        /* ... with LR_EDB */
    uint64_t err_conn;      /* ... with LR_ECONN */
    uint64_t err_timeout;   /* ... with LR_ETIMEOUT */
    uint64_t err_shutdown;  /* ... with LR_ESHUTDOWN */
    uint64_t batches;       /* group commits sent (>= 2 statements in one transaction) */
    uint64_t batched_stmts; /* statements sent inside those group commits */
    uint64_t batch_max;     /* largest group commit sent */
    uint64_t batch_retries; /* group commits rolled back and re-run statement by statement */
    uint64_t connects;      /* connections established (pool and LISTEN) */
    uint64_t conn_failures; /* connection attempts or live connections that failed */
} lr_pg_stats_t;

/* Copies the counters into *out.  Loop thread only. */
void lr_pg_pool_stats(const lr_pg_pool_t *p, lr_pg_stats_t *out);

/* Fails every queued query with LR_ESHUTDOWN, waits for in-flight ones to
 * finish (their callbacks run normally), closes every handle, then calls
 * done(arg) on the loop and frees the pool.  p == NULL: done runs at once. */
void lr_pg_pool_close(lr_pg_pool_t *p, void (*done)(void *arg), void *arg);

/* Helpers for result reading (NULL-safe): the value of (row, col) or NULL
 * when SQL NULL / out of range; and the value by column name. */
const char *lr_pg_get(const PGresult *res, int row, int col);
const char *lr_pg_getn(const PGresult *res, int row, const char *colname);

#endif
