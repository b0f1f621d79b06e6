/*
 * test_pg.c - common/pg.c against a real PostgreSQL.
 *
 * Needs LONGRUN_DATABASE_URL (e.g. postgresql://longrun@127.0.0.1:55432/longrun,
 * see scripts/services.sh); skips with 77 without it.  Creates its own table
 * (name includes the pid) and drops it at the end.  LONGRUN_LOG_LEVEL=debug
 * shows every connection transition; LONGRUN_TEST_TIMEOUT_MULTIPLIER scales waits.
 *
 * Covers: parameters and results, SQL errors (LR_EDB + SQLSTATE), 2000
 * group-committed inserts, a group commit with one failing statement, LISTEN/
 * NOTIFY, queue timeout and LR_EBUSY against a closed port, server-side
 * connection kill (LR_ECONN, reconnect, re-LISTEN), close with queries in
 * flight and from inside a callback; ends with uv_loop_close() == 0.  Prints
 * latency and throughput figures.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "log.h"
#include "pg.h"
#include "testutil.h"

static uv_loop_t *loop;
static uv_timer_t wake;
static const char *db_url;
static char table[64];
static long timeout_mult = 1;

static void on_wake(uv_timer_t *t) { (void)t; }

/* Runs the loop until cond holds; fails after ms (times the multiplier).
 * cond must not itself wait (it would stop the shared wake timer). */
#define WAIT_FOR(cond, ms)                                                        \
    do {                                                                          \
        uint64_t _end = uv_now(loop) + (uint64_t)(ms) * (uint64_t)timeout_mult;   \
        uv_timer_start(&wake, on_wake, 5, 5);                                     \
        while (!(cond)) {                                                         \
            if (uv_now(loop) > _end) {                                            \
                T_FAIL("timed out after %d ms waiting for %s", (int)(ms), #cond); \
            }                                                                     \
            uv_run(loop, UV_RUN_ONCE);                                            \
        }                                                                         \
        uv_timer_stop(&wake);                                                     \
    } while (0)

static void run_for(uint64_t ms) {
    uint64_t end;
    uv_update_time(loop);
    end = uv_now(loop) + ms;
    uv_timer_start(&wake, on_wake, 5, 5);
    while (uv_now(loop) < end) {
        uv_run(loop, UV_RUN_ONCE);
    }
    uv_timer_stop(&wake);
}

static double now_s(void) { return (double)uv_hrtime() / 1e9; }

/* ---- one query's outcome ---- */

typedef struct outcome {
    int done;
    int err;
    char sqlstate[8];
    char v0[128]; /* row 0 col 0 */
    bool v0_null;
    int ntuples;
} outcome_t;

static void on_outcome(int err, const PGresult *res, void *arg) {
    outcome_t *o = arg;
    const char *v;
    o->done++;
    o->err = err;
    o->sqlstate[0] = '\0';
    o->v0[0] = '\0';
    if (err == LR_EDB) {
        T_ASSERT(res != NULL);
        snprintf(o->sqlstate, sizeof(o->sqlstate), "%s",
                 PQresultErrorField(res, PG_DIAG_SQLSTATE) ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : "");
    } else if (err == 0) {
        T_ASSERT(res != NULL);
        o->ntuples = PQntuples(res);
        v = lr_pg_get(res, 0, 0);
        o->v0_null = v == NULL;
        snprintf(o->v0, sizeof(o->v0), "%s", v ? v : "");
    } else {
        T_ASSERT(res == NULL);
    }
}

static outcome_t sql(lr_pg_pool_t *p, const char *q, int n, const char *const *params) {
    outcome_t o = {0};
    T_EQ_INT(lr_pg_query(p, q, n, params, 0, on_outcome, &o), 0);
    WAIT_FOR(o.done, 10000);
    return o;
}

static outcome_t sql_ok(lr_pg_pool_t *p, const char *q, int n, const char *const *params) {
    outcome_t o = sql(p, q, n, params);
    if (o.err != 0) {
        T_FAIL("%s: %s", q, lr_err_name(o.err));
    }
    return o;
}

/* ---- pool open/close and state tracking ---- */

typedef struct statelog {
    int calls;
    int last;
    int max;
    bool zero_after_up; /* saw 0 after having seen > 0 */
    bool zero;          /* saw 0 at all */
} statelog_t;

static void on_state(int usable, void *arg) {
    statelog_t *s = arg;
    s->calls++;
    if (usable == 0) {
        s->zero = true;
        if (s->max > 0) {
            s->zero_after_up = true;
        }
    }
    if (usable > s->max) {
        s->max = usable;
    }
    s->last = usable;
}

static lr_pg_pool_t *pool_open(const char *conninfo, int size, const char *app, statelog_t *sl, size_t max_queue) {
    lr_pg_pool_t *p = NULL;
    char err[256] = "";
    lr_pg_opts_t o = {0};
    o.conninfo = conninfo;
    o.size = size;
    o.application_name = app;
    o.on_state = sl ? on_state : NULL;
    o.state_arg = sl;
    o.max_queue = max_queue;
    if (lr_pg_pool_init(&p, loop, &o, err, sizeof(err)) != 0) {
        T_FAIL("lr_pg_pool_init: %s", err);
    }
    return p;
}

static void on_closed(void *arg) { (*(int *)arg)++; }

static void pool_close_wait(lr_pg_pool_t *p) {
    int closed = 0;
    lr_pg_pool_close(p, on_closed, &closed);
    WAIT_FOR(closed, 10000);
    T_EQ_INT(closed, 1);
}

static long count_rows(lr_pg_pool_t *p, const char *where) {
    char q[256];
    snprintf(q, sizeof(q), "SELECT count(*) FROM %s WHERE %s", table, where);
    return atol(sql_ok(p, q, 0, NULL).v0);
}

/* ---- tests ---- */

static void test_bad_opts(void) {
    lr_pg_pool_t *p = NULL;
    char err[256] = "";
    lr_pg_opts_t o = {0};
    o.conninfo = db_url;
    o.size = 65;
    T_EQ_INT(lr_pg_pool_init(&p, loop, &o, err, sizeof(err)), LR_EINVAL);
    T_ASSERT(p == NULL);
    o.size = 1;
    o.conninfo = "host=h password=secret junk";
    T_EQ_INT(lr_pg_pool_init(&p, loop, &o, err, sizeof(err)), LR_EINVAL);
    T_ASSERT(strstr(err, "secret") == NULL && strstr(err, "junk") == NULL);
    T_ASSERT(strstr(err, "conninfo") != NULL);
    printf("  bad conninfo -> \"%s\"\n", err);
    lr_pg_pool_close(NULL, NULL, NULL);
}

static void test_simple(lr_pg_pool_t *p, statelog_t *sl) {
    const char *params[3] = {"41", NULL, "x"};
    const char *big[LR_PG_MAX_PARAMS + 1] = {0};
    outcome_t o = {0};
    PGresult *res;

    WAIT_FOR(lr_pg_pool_usable(p) == 2 && sl->last == 2, 10000);
    T_EQ_INT(sl->zero, 0);

    o = sql_ok(p, "SELECT $1::int + 1 AS n, $2::text IS NULL AS isnull, $2::text AS nul, $3 AS s", 3, params);
    T_EQ_STR(o.v0, "42");
    T_EQ_INT(o.ntuples, 1);
    T_EQ_INT(lr_pg_pool_pending(p), 0);

    /* the helpers, on a result of our own */
    T_EQ_INT(lr_pg_query(p, "SELECT 1", LR_PG_MAX_PARAMS + 1, big, 0, on_outcome, &o), LR_EINVAL);
    T_EQ_INT(lr_pg_query(p, NULL, 0, NULL, 0, on_outcome, &o), LR_EINVAL);
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 1, NULL, 0, on_outcome, &o), LR_EINVAL);
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 0, NULL, -1, on_outcome, &o), LR_EINVAL);
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 0, NULL, 0, NULL, NULL), LR_EINVAL);

    res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    T_ASSERT(lr_pg_get(res, 0, 0) == NULL);
    T_ASSERT(lr_pg_getn(res, 0, "n") == NULL);
    PQclear(res);
    T_ASSERT(lr_pg_get(NULL, 0, 0) == NULL);
    T_ASSERT(lr_pg_getn(NULL, 0, "x") == NULL);
}

typedef struct getn_check {
    int done;
} getn_check_t;

static void on_getn(int err, const PGresult *res, void *arg) {
    getn_check_t *g = arg;
    T_EQ_INT(err, 0);
    T_EQ_STR(lr_pg_getn(res, 0, "n"), "42");
    T_EQ_STR(lr_pg_getn(res, 0, "isnull"), "t");
    T_ASSERT(lr_pg_getn(res, 0, "nul") == NULL); /* SQL NULL */
    T_EQ_STR(lr_pg_getn(res, 0, "s"), "x");
    T_ASSERT(lr_pg_getn(res, 0, "nosuch") == NULL);
    T_ASSERT(lr_pg_getn(res, 1, "n") == NULL);
    T_ASSERT(lr_pg_get(res, 0, 4) == NULL);
    T_ASSERT(lr_pg_get(res, -1, 0) == NULL);
    g->done++;
}

static void test_getn(lr_pg_pool_t *p) {
    const char *params[3] = {"41", NULL, "x"};
    getn_check_t g = {0};
    T_EQ_INT(lr_pg_query(p, "SELECT $1::int + 1 AS n, $2::text IS NULL AS isnull, $2::text AS nul, $3 AS s", 3, params,
                         0, on_getn, &g),
             0);
    WAIT_FOR(g.done, 10000);
}

static void test_sql_error(lr_pg_pool_t *p) {
    outcome_t o = sql(p, "SELECT 1/0", 0, NULL);
    T_EQ_INT(o.err, LR_EDB);
    T_EQ_STR(o.sqlstate, "22012");
    o = sql(p, "SELEC 1", 0, NULL);
    T_EQ_INT(o.err, LR_EDB);
    T_EQ_STR(o.sqlstate, "42601");
    /* a caller's BEGIN must not leak into later queries (the pool rolls back) */
    o = sql_ok(p, "BEGIN", 0, NULL);
    o = sql_ok(p, "SELECT 7", 0, NULL);
    T_EQ_STR(o.v0, "7");
    /* in autocommit every statement gets its own transaction id; inside a
     * leaked BEGIN two statements on one connection would share one */
    for (int i = 0; i < 4; i++) {
        char x1[128];
        o = sql_ok(p, "SELECT pg_current_xact_id()::text", 0, NULL);
        snprintf(x1, sizeof(x1), "%s", o.v0);
        o = sql_ok(p, "SELECT pg_current_xact_id()::text", 0, NULL);
        T_ASSERT(strcmp(x1, o.v0) != 0);
    }
}

typedef struct counter {
    int done;
    int ok;
    int db;
    int other;
    int bad_index; /* which call got LR_EDB */
    char sqlstate[8];
} counter_t;

typedef struct slot {
    counter_t *c;
    int index;
} slot_t;

static void on_count(int err, const PGresult *res, void *arg) {
    slot_t *s = arg;
    s->c->done++;
    if (err == 0) {
        s->c->ok++;
    } else if (err == LR_EDB) {
        s->c->db++;
        s->c->bad_index = s->index;
        snprintf(s->c->sqlstate, sizeof(s->c->sqlstate), "%s", PQresultErrorField(res, PG_DIAG_SQLSTATE));
    } else {
        s->c->other++;
    }
}

/* Issues n inserts (ids from first) at once; returns rows/s. */
static double insert_many(lr_pg_pool_t *p, int n, long first, bool batched, long dup_at, counter_t *c) {
    char q[128];
    slot_t *slots = calloc((size_t)n, sizeof(*slots));
    double t0 = now_s(), dt;
    T_ASSERT(slots != NULL);
    snprintf(q, sizeof(q), "INSERT INTO %s (id, v) VALUES ($1, $2)", table);
    memset(c, 0, sizeof(*c));
    c->bad_index = -1;
    for (int i = 0; i < n; i++) {
        char id[32];
        const char *params[2] = {id, "payload"};
        snprintf(id, sizeof(id), "%ld", i == dup_at ? 1L : first + i);
        slots[i].c = c;
        slots[i].index = i;
        if (batched) {
            T_EQ_INT(lr_pg_query_batched(p, q, 2, params, 0, on_count, &slots[i]), 0);
        } else {
            T_EQ_INT(lr_pg_query(p, q, 2, params, 0, on_count, &slots[i]), 0);
        }
    }
    T_EQ_INT(lr_pg_pool_pending(p), n);
    WAIT_FOR(c->done == n, 60000);
    dt = now_s() - t0;
    free(slots);
    return (double)n / dt;
}

static void test_batched(lr_pg_pool_t *p) {
    counter_t c;
    lr_pg_stats_t st0, st1;
    double rps_batched, rps_plain;

    lr_pg_pool_stats(p, &st0);
    rps_batched = insert_many(p, 2000, 1, true, -1, &c);
    T_EQ_INT(c.ok, 2000);
    T_EQ_INT(count_rows(p, "id BETWEEN 1 AND 2000"), 2000);
    lr_pg_pool_stats(p, &st1);
    T_ASSERT(st1.batches > st0.batches);
    T_ASSERT(st1.batch_max > 1);
    T_EQ_INT(st1.batch_retries, st0.batch_retries);
    printf("  2000 batched inserts, pool 4: %.0f rows/s (%llu group commits, largest %llu)\n", rps_batched,
           (unsigned long long)(st1.batches - st0.batches), (unsigned long long)st1.batch_max);

    rps_plain = insert_many(p, 2000, 100001, false, -1, &c);
    T_EQ_INT(c.ok, 2000);
    T_EQ_INT(count_rows(p, "id BETWEEN 100001 AND 102000"), 2000);
    printf("  2000 plain inserts (lr_pg_query), pool 4: %.0f rows/s (batched/plain = %.1fx)\n", rps_plain,
           rps_batched / rps_plain);
    T_EQ_INT(lr_pg_pool_pending(p), 0);
}

static void test_batch_conflict(lr_pg_pool_t *p) {
    counter_t c;
    lr_pg_stats_t st0, st1;
    lr_pg_pool_stats(p, &st0);
    /* 50 inserts; #25 reuses id 1, which exists: unique violation */
    insert_many(p, 50, 5000, true, 25, &c);
    T_EQ_INT(c.done, 50);
    T_EQ_INT(c.ok, 49);
    T_EQ_INT(c.db, 1);
    T_EQ_INT(c.bad_index, 25);
    T_EQ_STR(c.sqlstate, "23505");
    T_EQ_INT(count_rows(p, "id BETWEEN 5000 AND 5049"), 49);
    lr_pg_pool_stats(p, &st1);
    T_ASSERT(st1.batch_retries > st0.batch_retries);
    /* the connection that rolled back is fine afterwards */
    for (int i = 0; i < 8; i++) {
        T_EQ_STR(sql_ok(p, "SELECT 'fine'", 0, NULL).v0, "fine");
    }
}

typedef struct listener {
    int announces; /* cb with payload NULL */
    int notes;
    char last[128];
} listener_t;

static void on_note(const char *channel, const char *payload, void *arg) {
    listener_t *l = arg;
    T_ASSERT(channel != NULL);
    if (payload == NULL) {
        l->announces++;
        return;
    }
    l->notes++;
    snprintf(l->last, sizeof(l->last), "%s", payload);
}

static void notify(lr_pg_pool_t *p, const char *chan, const char *payload) {
    const char *params[2] = {chan, payload};
    sql_ok(p, "SELECT pg_notify($1, $2)", 2, params);
}

static void test_listen(lr_pg_pool_t *p) {
    listener_t l = {0};
    char chan[64];
    snprintf(chan, sizeof(chan), "lr_Test \"chan\" %d", (int)getpid()); /* needs quoting */
    T_EQ_INT(lr_pg_listen(p, "", on_note, &l), LR_EINVAL);
    T_EQ_INT(lr_pg_listen(p, chan, on_note, &l), 0);
    WAIT_FOR(l.announces == 1, 10000);
    notify(p, chan, "hello");
    WAIT_FOR(l.notes == 1, 10000);
    T_EQ_STR(l.last, "hello");
    notify(p, "some_other_channel", "nope");
    notify(p, chan, "again");
    WAIT_FOR(l.notes == 2, 10000);
    T_EQ_STR(l.last, "again");
}

static int closed_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;
    T_ASSERT(fd >= 0);
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    T_EQ_INT(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    T_EQ_INT(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    port = ntohs(a.sin_port);
    close(fd); /* nobody listens there now */
    return port;
}

static void test_refused_timeout(void) {
    char ci[128];
    statelog_t sl = {0};
    outcome_t o[3] = {{0}};
    outcome_t full = {0}, forever = {0};
    lr_pg_pool_t *p;
    double t0;

    snprintf(ci, sizeof(ci), "host=127.0.0.1 port=%d dbname=x user=x password=hunter2", closed_port());
    p = pool_open(ci, 2, "lr_test_refused", &sl, 5);
    t0 = now_s();
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 0, NULL, 300, on_outcome, &o[0]), 0);
    T_EQ_INT(lr_pg_query_batched(p, "SELECT 1", 0, NULL, 300, on_outcome, &o[1]), 0);
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 0, NULL, 600, on_outcome, &o[2]), 0);
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 0, NULL, 0, on_outcome, &forever), 0);
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 0, NULL, 0, on_outcome, &full), 0);
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 0, NULL, 0, on_outcome, &full), LR_EBUSY); /* max_queue 5 */
    WAIT_FOR(o[0].done && o[1].done, 5000);
    T_ASSERT(now_s() - t0 >= 0.29);
    T_EQ_INT(o[0].err, LR_ETIMEOUT);
    T_EQ_INT(o[1].err, LR_ETIMEOUT);
    T_EQ_INT(o[2].done, 0);
    WAIT_FOR(o[2].done, 5000);
    T_EQ_INT(o[2].err, LR_ETIMEOUT);
    T_ASSERT(now_s() - t0 >= 0.59);
    T_ASSERT(sl.zero);
    T_EQ_INT(sl.max, 0);
    T_EQ_INT(lr_pg_pool_usable(p), 0);
    T_EQ_INT(lr_pg_pool_pending(p), 2);
    /* let it retry with backoff a few times, then close: queued ones fail */
    run_for(400);
    T_EQ_INT(forever.done, 0);
    pool_close_wait(p);
    T_EQ_INT(forever.done, 1);
    T_EQ_INT(forever.err, LR_ESHUTDOWN);
    T_EQ_INT(full.err, LR_ESHUTDOWN);
}

static void test_kill(lr_pg_pool_t *admin) {
    char app[64], chan[64];
    statelog_t sl = {0};
    listener_t l = {0};
    outcome_t sleeper = {0}, killed;
    lr_pg_stats_t st;
    lr_pg_pool_t *p;
    const char *params[1];

    snprintf(app, sizeof(app), "lr_test_kill_%d", (int)getpid());
    snprintf(chan, sizeof(chan), "lr_test_kill_%d", (int)getpid());
    p = pool_open(db_url, 2, app, &sl, 0);
    T_EQ_INT(lr_pg_listen(p, chan, on_note, &l), 0);
    WAIT_FOR(lr_pg_pool_usable(p) == 2 && l.announces == 1, 10000);

    T_EQ_INT(lr_pg_query(p, "SELECT pg_sleep(30)", 0, NULL, 0, on_outcome, &sleeper), 0);
    /* wait until the server runs it, then kill every backend of the pool */
    params[0] = app;
    for (int tries = 0;; tries++) {
        /* not WAIT_FOR(sql_ok(...)): the nested wait would stop the wake timer */
        outcome_t act = sql_ok(admin,
                               "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
                               "AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
                               1, params);
        if (atoi(act.v0) == 1) {
            break;
        }
        T_ASSERT(tries < 1000 * timeout_mult);
        run_for(10);
    }
    killed = sql_ok(admin,
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = $1",
                    1, params);
    T_EQ_STR(killed.v0, "3"); /* two pool connections + the LISTEN one */
    WAIT_FOR(sleeper.done, 10000);
    T_EQ_INT(sleeper.err, LR_ECONN);
    WAIT_FOR(sl.zero_after_up, 10000);

    /* later queries succeed after the reconnect */
    T_EQ_STR(sql_ok(p, "SELECT 'back'", 0, NULL).v0, "back");
    WAIT_FOR(lr_pg_pool_usable(p) == 2 && sl.last == 2, 10000);
    /* LISTEN was re-issued, and the caller told to re-scan */
    WAIT_FOR(l.announces == 2, 10000);
    notify(admin, chan, "after-kill");
    WAIT_FOR(l.notes == 1, 10000);
    T_EQ_STR(l.last, "after-kill");
    lr_pg_pool_stats(p, &st);
    T_ASSERT(st.conn_failures >= 3);
    T_ASSERT(st.connects >= 6);
    T_EQ_INT(st.err_conn, 1);
    pool_close_wait(p);
}

/* The first host refuses, libpq moves on to the second with a new socket,
 * usually with the same fd number: the poll handle must follow. */
static void test_multihost(void) {
    PQconninfoOption *opts = PQconninfoParse(db_url, NULL), *o;
    const char *host = NULL, *port = "5432", *user = NULL, *dbname = NULL, *password = NULL;
    char ci[512];
    lr_pg_pool_t *p;
    int closed;

    T_ASSERT(opts != NULL);
    for (o = opts; o->keyword != NULL; o++) {
        if (o->val == NULL || o->val[0] == '\0') {
            continue;
        }
        if (strcmp(o->keyword, "host") == 0) {
            host = o->val;
        } else if (strcmp(o->keyword, "port") == 0) {
            port = o->val;
        } else if (strcmp(o->keyword, "user") == 0) {
            user = o->val;
        } else if (strcmp(o->keyword, "dbname") == 0) {
            dbname = o->val;
        } else if (strcmp(o->keyword, "password") == 0) {
            password = o->val;
        }
    }
    if (host == NULL || host[0] == '/' || strchr(host, ',') != NULL || strchr(port, ',') != NULL) {
        printf("  (skipped: needs a single TCP host in LONGRUN_DATABASE_URL)\n");
        PQconninfoFree(opts);
        return;
    }
    closed = closed_port();
    snprintf(ci, sizeof(ci), "host=%s,%s port=%d,%s%s%s%s%s%s%s", host, host, closed, port, user ? " user=" : "",
             user ? user : "", dbname ? " dbname=" : "", dbname ? dbname : "", password ? " password=" : "",
             password ? password : "");
    PQconninfoFree(opts);
    p = pool_open(ci, 2, "lr_test_multihost", NULL, 0);
    T_EQ_STR(sql_ok(p, "SELECT 'second host'", 0, NULL).v0, "second host");
    WAIT_FOR(lr_pg_pool_usable(p) == 2, 10000);
    pool_close_wait(p);
}

/* Kill the pool's backends while 3000 batched and plain inserts are in
 * flight: every callback runs exactly once, and every insert reported done
 * is in the table. */
typedef struct tracked {
    int calls;
    int err;
} tracked_t;

static void on_tracked(int err, const PGresult *res, void *arg) {
    tracked_t *t = arg;
    (void)res;
    t->calls++;
    t->err = err;
}

static void test_kill_under_load(lr_pg_pool_t *admin) {
    enum { N = 3000 };
    char app[64], q[160], where[64];
    tracked_t *t = calloc(N, sizeof(*t));
    lr_pg_pool_t *p;
    const char *params[1];
    int done = 0, ok = 0, econn = 0;
    long rows;

    T_ASSERT(t != NULL);
    snprintf(app, sizeof(app), "lr_test_load_%d", (int)getpid());
    p = pool_open(db_url, 4, app, NULL, 0);
    WAIT_FOR(lr_pg_pool_usable(p) == 4, 10000);
    /* 1 ms per statement: the kill lands while group commits are in flight */
    snprintf(q, sizeof(q), "INSERT INTO %s (id, v) SELECT $1, 'load' FROM pg_sleep(0.001)", table);
    for (int i = 0; i < N; i++) {
        char id[32];
        const char *ps[1] = {id};
        snprintf(id, sizeof(id), "%d", 200000 + i);
        if (i % 3 == 0) {
            T_EQ_INT(lr_pg_query(p, q, 1, ps, 0, on_tracked, &t[i]), 0);
        } else {
            T_EQ_INT(lr_pg_query_batched(p, q, 1, ps, 0, on_tracked, &t[i]), 0);
        }
    }
    run_for(100);
    params[0] = app;
    sql_ok(admin, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", 1,
           params);
    for (int tries = 0; done < N; tries++) {
        done = 0;
        for (int i = 0; i < N; i++) {
            done += t[i].calls > 0;
        }
        if (tries >= 3000 * timeout_mult) {
            lr_pg_stats_t st;
            lr_pg_pool_stats(p, &st);
            T_FAIL("kill under load: %d of %d done; pending %zu, usable %d, ok %llu econn %llu "
                   "failures %llu connects %llu batches %llu retries %llu",
                   done, N, lr_pg_pool_pending(p), lr_pg_pool_usable(p), (unsigned long long)st.ok,
                   (unsigned long long)st.err_conn, (unsigned long long)st.conn_failures,
                   (unsigned long long)st.connects, (unsigned long long)st.batches,
                   (unsigned long long)st.batch_retries);
        }
        if (done < N) {
            run_for(10);
        }
    }
    for (int i = 0; i < N; i++) {
        T_EQ_INT(t[i].calls, 1);
        if (t[i].err == 0) {
            ok++;
        } else {
            T_EQ_INT(t[i].err, LR_ECONN);
            econn++;
        }
    }
    snprintf(where, sizeof(where), "id >= 200000 AND id < %d", 200000 + N);
    rows = count_rows(admin, where);
    printf("  kill under load: %d ok, %d LR_ECONN, %ld rows\n", ok, econn, rows);
    T_ASSERT(rows >= ok && rows <= ok + econn);
    T_ASSERT(econn > 0 && ok > 0);
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "id = %d", 200000 + i);
        if (t[i].err == 0 && i % 97 == 0) {
            T_EQ_INT(count_rows(admin, id), 1);
        }
    }
    T_EQ_INT(lr_pg_pool_pending(p), 0);
    pool_close_wait(p);
    free(t);
}

/* Kill a backend that still has megabytes of our pipeline unread: its
 * kernel answers with RST, so the FATAL message and the socket error (libuv:
 * POLLERR, which stops the poll handle) arrive together.  Every query of the
 * group commit must still get LR_ECONN. */
static void test_kill_rst(lr_pg_pool_t *admin) {
    enum { NQ = 20, PARAM = 512 * 1024 };
    char app[64];
    char *big = malloc(PARAM + 1);
    tracked_t t[NQ + 1];
    lr_pg_pool_t *p;
    const char *params[1];
    int done;

    T_ASSERT(big != NULL);
    memset(big, 'x', PARAM);
    big[PARAM] = '\0';
    memset(t, 0, sizeof(t));
    snprintf(app, sizeof(app), "lr_test_rst_%d", (int)getpid());
    p = pool_open(db_url, 1, app, NULL, 0);
    WAIT_FOR(lr_pg_pool_usable(p) == 1, 10000);
    T_EQ_INT(lr_pg_query_batched(p, "SELECT pg_sleep(30)", 0, NULL, 0, on_tracked, &t[0]), 0);
    for (int i = 1; i <= NQ; i++) {
        const char *ps[1] = {big};
        T_EQ_INT(lr_pg_query_batched(p, "SELECT length($1)", 1, ps, 0, on_tracked, &t[i]), 0);
    }
    params[0] = app;
    for (int tries = 0;; tries++) {
        outcome_t act = sql_ok(admin,
                               "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
                               "AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
                               1, params);
        if (atoi(act.v0) == 1) {
            break;
        }
        T_ASSERT(tries < 1000 * timeout_mult);
        run_for(10);
    }
    run_for(50); /* let the socket buffers fill up */
    sql_ok(admin,
           "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
           "WHERE application_name = $1",
           1, params);
    for (int tries = 0;; tries++) {
        done = 0;
        for (int i = 0; i <= NQ; i++) {
            done += t[i].calls;
        }
        if (done == NQ + 1) {
            break;
        }
        if (tries >= 1000 * timeout_mult) {
            T_FAIL("RST kill: only %d of %d callbacks; pending %zu", done, NQ + 1, lr_pg_pool_pending(p));
        }
        run_for(10);
    }
    for (int i = 0; i <= NQ; i++) {
        T_EQ_INT(t[i].calls, 1);
        T_EQ_INT(t[i].err, LR_ECONN);
    }
    T_EQ_STR(sql_ok(p, "SELECT 'alive'", 0, NULL).v0, "alive");
    pool_close_wait(p);
    free(big);
}

/* ---- a fake server: startup handshake, then FATAL + RST on the first query.
 * The client then finds readable data and a socket error at once (libuv
 * reports POLLERR and stops the poll handle); libpq reads the FATAL message
 * fine and only sees the reset on its next read.  Deterministic version of
 * what a real pg_terminate_backend() does only sometimes. */

typedef struct fake_conn {
    uv_tcp_t tcp;
    char buf[8192];
    size_t len;
    int phase; /* 0 = startup, 1 = ready */
} fake_conn_t;

static uv_tcp_t fake_srv;
static int fake_kills;

static void fake_free(uv_handle_t *h) { free(h->data); }

static void fake_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
    fake_conn_t *fc = h->data;
    (void)suggested;
    b->base = fc->buf + fc->len;
    b->len = sizeof(fc->buf) - fc->len;
}

static size_t put_msg(char *out, char type, const char *body, size_t blen) {
    uint32_t n = htonl((uint32_t)(blen + 4));
    out[0] = type;
    memcpy(out + 1, &n, 4);
    memcpy(out + 5, body, blen);
    return blen + 5;
}

static void fake_send(fake_conn_t *fc, const char *data, size_t len) {
    uv_os_fd_t fd;
    T_EQ_INT(uv_fileno((uv_handle_t *)&fc->tcp, &fd), 0);
    T_EQ_INT(send(fd, data, len, 0), (long long)len); /* small: fits the socket buffer */
}

static void fake_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *b) {
    fake_conn_t *fc = st->data;
    char out[512];
    size_t n = 0;
    (void)b;
    if (nread < 0) {
        uv_close((uv_handle_t *)st, fake_free);
        return;
    }
    fc->len += (size_t)nread;
    if (fc->phase == 0) {
        uint32_t mlen;
        static const char auth_ok[4] = {0, 0, 0, 0};
        static const char params[] = "server_version\0"
                                     "15.0\0";
        static const char enc[] = "client_encoding\0"
                                  "UTF8\0";
        static const char key[8] = {0, 0, 0, 42, 0, 0, 0, 7};
        if (fc->len < 4) {
            return;
        }
        memcpy(&mlen, fc->buf, 4);
        if (fc->len < ntohl(mlen)) {
            return;
        }
        n += put_msg(out + n, 'R', auth_ok, sizeof(auth_ok));
        n += put_msg(out + n, 'S', params, sizeof(params) - 1);
        n += put_msg(out + n, 'S', enc, sizeof(enc) - 1);
        n += put_msg(out + n, 'K', key, sizeof(key));
        n += put_msg(out + n, 'Z', "I", 1);
        fake_send(fc, out, n);
        fc->phase = 1;
        fc->len = 0;
        return;
    }
    {
        /* any query: FATAL, then reset the connection */
        static const char fatal[] = "SFATAL\0VFATAL\0"
                                    "C57P01\0"
                                    "Mterminating connection due to administrator command\0";
        struct linger lg = {1, 0};
        uv_os_fd_t fd;
        n = put_msg(out, 'E', fatal, sizeof(fatal)); /* includes the final NUL */
        fake_send(fc, out, n);
        T_EQ_INT(uv_fileno((uv_handle_t *)&fc->tcp, &fd), 0);
        T_EQ_INT(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)), 0);
        uv_close((uv_handle_t *)&fc->tcp, fake_free); /* closes the fd now: RST */
        fake_kills++;
    }
}

static void fake_accept(uv_stream_t *srv, int status) {
    fake_conn_t *fc;
    T_EQ_INT(status, 0);
    fc = calloc(1, sizeof(*fc));
    T_ASSERT(fc != NULL);
    uv_tcp_init(loop, &fc->tcp);
    fc->tcp.data = fc;
    T_EQ_INT(uv_accept(srv, (uv_stream_t *)&fc->tcp), 0);
    T_EQ_INT(uv_read_start((uv_stream_t *)&fc->tcp, fake_alloc, fake_read), 0);
}

static void test_fatal_with_reset(void) {
    struct sockaddr_in a;
    int len = sizeof(a);
    char ci[256];
    outcome_t o = {0};
    lr_pg_pool_t *p;

    uv_tcp_init(loop, &fake_srv);
    T_EQ_INT(uv_ip4_addr("127.0.0.1", 0, &a), 0);
    T_EQ_INT(uv_tcp_bind(&fake_srv, (struct sockaddr *)&a, 0), 0);
    T_EQ_INT(uv_listen((uv_stream_t *)&fake_srv, 8, fake_accept), 0);
    T_EQ_INT(uv_tcp_getsockname(&fake_srv, (struct sockaddr *)&a, &len), 0);
    snprintf(ci, sizeof(ci), "host=127.0.0.1 port=%d user=x dbname=x sslmode=disable gssencmode=disable",
             ntohs(a.sin_port));
    p = pool_open(ci, 1, "lr_test_fake", NULL, 0);
    WAIT_FOR(lr_pg_pool_usable(p) == 1, 5000);
    T_EQ_INT(lr_pg_query(p, "SELECT 1", 0, NULL, 0, on_outcome, &o), 0);
    WAIT_FOR(o.done, 5000);
    T_EQ_INT(o.err, LR_ECONN);
    T_EQ_INT(fake_kills, 1);
    WAIT_FOR(lr_pg_pool_usable(p) == 1, 5000); /* reconnected (to the fake again) */
    pool_close_wait(p);
    uv_close((uv_handle_t *)&fake_srv, NULL);
}

static void test_close_inflight(void) {
    statelog_t sl = {0};
    outcome_t o[10];
    int closed = 0, ok = 0, shut = 0;
    lr_pg_pool_t *p = pool_open(db_url, 2, "lr_test_close", &sl, 0);
    memset(o, 0, sizeof(o));
    WAIT_FOR(lr_pg_pool_usable(p) == 2, 10000);
    for (int i = 0; i < 10; i++) {
        T_EQ_INT(lr_pg_query(p, "SELECT pg_sleep(0.2)", 0, NULL, 0, on_outcome, &o[i]), 0);
    }
    run_for(50); /* two are in flight now */
    lr_pg_pool_close(p, on_closed, &closed);
    /* queued ones failed inside close; the in-flight ones finish */
    for (int i = 2; i < 10; i++) {
        T_EQ_INT(o[i].done, 1);
        T_EQ_INT(o[i].err, LR_ESHUTDOWN);
    }
    T_EQ_INT(o[0].done + o[1].done, 0);
    WAIT_FOR(closed, 10000);
    for (int i = 0; i < 10; i++) {
        T_EQ_INT(o[i].done, 1);
        ok += o[i].err == 0;
        shut += o[i].err == LR_ESHUTDOWN;
    }
    T_EQ_INT(ok, 2);
    T_EQ_INT(shut, 8);
}

typedef struct closer {
    lr_pg_pool_t *p;
    int calls;
    int closed;
    int errs[6];
} closer_t;

static void on_close_from_cb(int err, const PGresult *res, void *arg) {
    closer_t *c = arg;
    (void)res;
    c->errs[c->calls++] = err;
    if (c->calls == 1) {
        outcome_t dummy = {0};
        T_EQ_INT(err, 0);
        lr_pg_pool_close(c->p, on_closed, &c->closed);
        T_EQ_INT(c->closed, 0);
        T_EQ_INT(lr_pg_query(c->p, "SELECT 1", 0, NULL, 0, on_outcome, &dummy), LR_ESHUTDOWN);
        T_EQ_INT(lr_pg_query_batched(c->p, "SELECT 1", 0, NULL, 0, on_outcome, &dummy), LR_ESHUTDOWN);
        lr_pg_pool_close(c->p, on_closed, &c->closed); /* second call: ignored */
    }
}

static void test_close_from_callback(void) {
    closer_t c = {0};
    c.p = pool_open(db_url, 1, "lr_test_close_cb", NULL, 0);
    for (int i = 0; i < 3; i++) {
        T_EQ_INT(lr_pg_query(c.p, "SELECT 1", 0, NULL, 0, on_close_from_cb, &c), 0);
    }
    for (int i = 0; i < 3; i++) {
        T_EQ_INT(lr_pg_query_batched(c.p, "SELECT 2", 0, NULL, 0, on_close_from_cb, &c), 0);
    }
    WAIT_FOR(c.closed, 10000);
    T_EQ_INT(c.closed, 1);
    T_EQ_INT(c.calls, 6);
    T_EQ_INT(c.errs[0], 0);
    for (int i = 1; i < 6; i++) {
        T_EQ_INT(c.errs[i], LR_ESHUTDOWN);
    }
}

typedef struct chain {
    lr_pg_pool_t *p;
    int left;
    int done;
} chain_t;

static void on_chain(int err, const PGresult *res, void *arg) {
    chain_t *c = arg;
    T_EQ_INT(err, 0);
    T_EQ_STR(lr_pg_get(res, 0, 0), "1");
    if (--c->left > 0) {
        /* re-entrant: queue the next one from inside the callback */
        T_EQ_INT(lr_pg_query(c->p, "SELECT 1", 0, NULL, 0, on_chain, c), 0);
    } else {
        c->done = 1;
    }
}

static void test_latency(void) {
    chain_t c = {0};
    const int n = 2000;
    double t0;
    c.p = pool_open(db_url, 1, "lr_test_latency", NULL, 0);
    WAIT_FOR(lr_pg_pool_usable(c.p) == 1, 10000);
    c.left = n;
    t0 = now_s();
    T_EQ_INT(lr_pg_query(c.p, "SELECT 1", 0, NULL, 0, on_chain, &c), 0);
    WAIT_FOR(c.done, 60000);
    printf("  round trip, 1 connection, SELECT 1 x %d sequential: %.1f us mean\n", n, (now_s() - t0) * 1e6 / n);
    pool_close_wait(c.p);
}

static void test_close_at_once(void) {
    /* close right after init, before anything connected */
    lr_pg_pool_t *p = pool_open(db_url, 3, "lr_test_quick_close", NULL, 0);
    pool_close_wait(p);
}

int main(void) {
    statelog_t sl = {0};
    lr_pg_pool_t *p;
    const char *lvl = getenv("LONGRUN_LOG_LEVEL");
    const char *mult = getenv("LONGRUN_TEST_TIMEOUT_MULTIPLIER");
    char q[256];

    db_url = getenv("LONGRUN_DATABASE_URL");
    if (db_url == NULL || db_url[0] == '\0') {
        T_SKIP("LONGRUN_DATABASE_URL is not set (scripts/services.sh up)");
    }
    if (mult != NULL && atol(mult) > 0) {
        timeout_mult = atol(mult);
    }
    lr_log_init("test_pg", NULL, lvl ? lr_log_level_parse(lvl) : LR_LOG_ERROR, 0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    loop = uv_default_loop();
    uv_timer_init(loop, &wake);
    snprintf(table, sizeof(table), "lr_test_pg_%d", (int)getpid());

    printf("test_bad_opts\n");
    test_bad_opts();
    printf("test_close_at_once\n");
    test_close_at_once();

    p = pool_open(db_url, 2, "lr_test_pg", &sl, 0);
    printf("test_simple\n");
    test_simple(p, &sl);
    test_getn(p);
    printf("test_sql_error\n");
    test_sql_error(p);
    pool_close_wait(p);

    p = pool_open(db_url, 4, "lr_test_pg", NULL, 0);
    snprintf(q, sizeof(q), "CREATE TABLE %s (id bigint PRIMARY KEY, v text)", table);
    sql_ok(p, q, 0, NULL);
    printf("test_batched\n");
    test_batched(p);
    printf("test_batch_conflict\n");
    test_batch_conflict(p);
    printf("test_listen\n");
    test_listen(p);
    printf("test_kill\n");
    test_kill(p);
    printf("test_kill_rst\n");
    test_kill_rst(p);
    printf("test_kill_under_load\n");
    test_kill_under_load(p);
    snprintf(q, sizeof(q), "DROP TABLE %s", table);
    sql_ok(p, q, 0, NULL);
    pool_close_wait(p);

    printf("test_refused_timeout\n");
    test_refused_timeout();
    printf("test_fatal_with_reset\n");
    test_fatal_with_reset();
    printf("test_multihost\n");
    test_multihost();
    printf("test_close_inflight\n");
    test_close_inflight();
    printf("test_close_from_callback\n");
    test_close_from_callback();
    printf("test_latency\n");
    test_latency();

    uv_close((uv_handle_t *)&wake, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    T_EQ_INT(uv_loop_close(loop), 0);
    printf("test_pg: OK\n");
    return 0;
}
