/*
 * test_daemon.c - the daemon skeleton (common/daemon.c): signals raised in
 * this process reach the hooks (SIGHUP -> reload, the first SIGTERM ->
 * drain, once), the shutdown closes the components one after the other in
 * registration order and clears their slots, a start-up failure closes what
 * was opened without ever handling a signal, a handle nobody registered is
 * closed at the end, and lr_daemon_main parses the shared and own options.
 * Every case ends with uv_loop_close() == 0.
 *
 * Needs no server: the PostgreSQL pool and the RabbitMQ client point at a
 * closed port (they keep reconnecting until closed).  The exit-now paths
 * (_exit) are left to the integration tests (test_sigterm.py).
 */
#include "daemon.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "testutil.h"

#define CLOSED_PG "host=127.0.0.1 port=1 connect_timeout=1"
#define CLOSED_AMQP "amqp://guest:guest@127.0.0.1:1/"

/* ---- a fake component: records when its close starts and ends -------- */

typedef struct fake {
    struct world *w;
    char tag;   /* lower case at close start, upper case at done */
    bool async; /* done from a timer's close callback, else inside close */
    uv_timer_t timer;
    lr_daemon_done_cb done;
    void *done_arg;
    long timeout_ms;
} fake_t;

typedef struct world {
    uv_loop_t loop;
    lr_daemon_t *d;
    char order[32];
    int ticks, ticks_at_shutdown;
    int reloads, drains;
    char why[64];
    int step;
    uv_timer_t driver;
    lr_pg_pool_t *pg, *pg_never;
    lr_http_t *http;
    lr_amqp_t *amqp;
    bool slots_clear_at_last; /* pg, http and amqp were NULL when the last component closed */
    fake_t a, b, c;
} world_t;

static void record(world_t *w, char c) {
    size_t n = strlen(w->order);
    T_ASSERT(n + 1 < sizeof(w->order));
    w->order[n] = c;
    w->order[n + 1] = '\0';
}

static void fake_timer_closed(uv_handle_t *h) {
    fake_t *f = h->data;
    record(f->w, (char)(f->tag - 'a' + 'A'));
    f->done(f->done_arg);
}

static void fake_fire(uv_timer_t *t) { uv_close((uv_handle_t *)t, fake_timer_closed); }

static void fake_close(void *obj, long timeout_ms, lr_daemon_done_cb done, void *done_arg) {
    fake_t *f = obj;
    record(f->w, f->tag);
    f->timeout_ms = timeout_ms;
    if (f->tag == 'c') {
        f->w->slots_clear_at_last = f->w->pg == NULL && f->w->http == NULL && f->w->amqp == NULL;
    }
    if (!f->async) {
        record(f->w, (char)(f->tag - 'a' + 'A'));
        done(done_arg); /* inside close: the daemon must not recurse */
        return;
    }
    f->done = done;
    f->done_arg = done_arg;
    T_EQ_INT(uv_timer_init(&f->w->loop, &f->timer), 0);
    f->timer.data = f;
    T_EQ_INT(uv_timer_start(&f->timer, fake_fire, 20, 0), 0);
}

/* A loop and a daemon named "testd" (no health server) with these hooks. */
static world_t *world_new(lr_daemon_drain_cb on_drain_cb, lr_daemon_hook_cb on_reload_cb,
                          lr_daemon_hook_cb on_tick_cb) {
    world_t *w = calloc(1, sizeof(*w));
    lr_daemon_opts_t o;
    char err[256];

    T_ASSERT(w != NULL);
    T_EQ_INT(uv_loop_init(&w->loop), 0);
    memset(&o, 0, sizeof(o));
    o.name = "testd";
    o.on_drain = on_drain_cb;
    o.on_reload = on_reload_cb;
    o.on_tick = on_tick_cb;
    o.arg = w;
    T_EQ_INT(lr_daemon_init(&w->d, &w->loop, &o, err, sizeof(err)), 0);
    T_ASSERT(lr_daemon_health(w->d) == NULL); /* port 0: no server */
    return w;
}

/* Every case ends here: nothing may be left on the loop. */
static void world_free(world_t *w) {
    lr_daemon_free(w->d);
    T_EQ_INT(uv_loop_close(&w->loop), 0);
    free(w);
}

/* ---- case 1: signals, drain once, ordered shutdown --------------------- */

static void on_tick(lr_daemon_t *d, void *arg) {
    world_t *w = arg;
    T_ASSERT(!lr_daemon_stopping(d));
    w->ticks++;
}

static void on_reload(lr_daemon_t *d, void *arg) {
    world_t *w = arg;
    (void)d;
    w->reloads++;
}

static void on_drain(lr_daemon_t *d, const char *why, void *arg) {
    world_t *w = arg;
    T_ASSERT(lr_daemon_draining(d));
    T_ASSERT(!lr_daemon_stopping(d));
    w->drains++;
    snprintf(w->why, sizeof(w->why), "%s", why);
    /* The shutdown comes later, from the driver, as a worker's would once
     * its in-flight tasks are checkpointed. */
}

/* Every 10 ms: one step of the scenario once the previous one showed. */
static void drive(uv_timer_t *t) {
    world_t *w = t->data;
    switch (w->step) {
    case 0:
        if (w->ticks > 0) { /* lr_daemon_run has started: signals are handled */
            T_EQ_INT(raise(SIGHUP), 0);
            w->step++;
        }
        break;
    case 1:
        if (w->reloads == 1) {
            T_EQ_INT(w->drains, 0);
            T_EQ_INT(uv_kill(getpid(), SIGTERM), 0);
            w->step++;
        }
        break;
    case 2:
        if (w->drains == 1) {
            lr_daemon_drain(w->d, "again"); /* a second drain does nothing */
            T_EQ_INT(w->drains, 1);
            T_ASSERT(w->pg != NULL && w->http != NULL && w->amqp != NULL);
            w->ticks_at_shutdown = w->ticks;
            lr_daemon_shutdown(w->d); /* closes this timer first, inside its own callback */
            T_ASSERT(lr_daemon_stopping(w->d));
            lr_daemon_shutdown(w->d); /* idempotent */
            w->step++;
        }
        break;
    default: T_FAIL("the driver runs after its close: step %d", w->step);
    }
}

static void test_signals_and_order(void) {
    world_t *w = world_new(on_drain, on_reload, on_tick);
    lr_pg_opts_t po;
    lr_amqp_opts_t ao;
    char err[256];
    static const char *const consume[] = {"longrun.q.test-daemon", NULL};

    /* Components, in closing order.  The slots are still NULL. */
    T_EQ_INT(uv_timer_init(&w->loop, &w->driver), 0);
    w->driver.data = w;
    w->a = (fake_t){.w = w, .tag = 'a'};
    w->b = (fake_t){.w = w, .tag = 'b', .async = true};
    w->c = (fake_t){.w = w, .tag = 'c'};
    T_EQ_INT(lr_daemon_add_handle(w->d, "driver", (uv_handle_t *)&w->driver), 0);
    T_EQ_INT(lr_daemon_add(w->d, "a", fake_close, &w->a, 0), 0);
    T_EQ_INT(lr_daemon_add(w->d, "b", fake_close, &w->b, 1234), 0);
    T_EQ_INT(lr_daemon_add_http(w->d, "http", &w->http), 0);
    T_EQ_INT(lr_daemon_add_pg(w->d, "pg never opened", &w->pg_never), 0);
    T_EQ_INT(lr_daemon_add_pg(w->d, "pg", &w->pg), 0);
    T_EQ_INT(lr_daemon_add_amqp(w->d, "amqp", &w->amqp, 500), 0);
    T_EQ_INT(lr_daemon_add(w->d, "c", fake_close, &w->c, 0), 0);

    T_EQ_INT(lr_http_init(&w->http, &w->loop), 0);
    memset(&po, 0, sizeof(po));
    po.conninfo = CLOSED_PG;
    po.size = 1;
    T_EQ_INT(lr_pg_pool_init(&w->pg, &w->loop, &po, err, sizeof(err)), 0);
    memset(&ao, 0, sizeof(ao));
    ao.url = CLOSED_AMQP;
    ao.consume = consume;
    ao.prefetch = 1;
    T_EQ_INT(lr_amqp_start(&w->amqp, &w->loop, &ao, err, sizeof(err)), 0);
    T_EQ_INT(uv_timer_start(&w->driver, drive, 10, 10), 0);

    T_EQ_INT(lr_daemon_run(w->d), 0);
    T_EQ_INT(lr_daemon_run(w->d), LR_ESTATE);

    T_EQ_INT(w->reloads, 1);
    T_EQ_INT(w->drains, 1);
    T_EQ_STR(w->why, strsignal(SIGTERM));
    T_EQ_INT(w->step, 3);
    T_EQ_INT(w->ticks, w->ticks_at_shutdown); /* no tick hook once stopping */
    /* a and c finish inside their close, b later: c starts only after B. */
    T_EQ_STR(w->order, "aAbBcC");
    T_EQ_INT(w->b.timeout_ms, 1234);
    T_ASSERT(w->slots_clear_at_last);
    T_ASSERT(w->pg == NULL && w->http == NULL && w->amqp == NULL && w->pg_never == NULL);
    T_EQ_INT(lr_daemon_add(w->d, "late", fake_close, &w->a, 0), LR_ESHUTDOWN);
    world_free(w);
    printf("signals and order: ok\n");
}

/* ---- case 2: a start-up failure ---------------------------------------- */

static void test_startup_failure(void) {
    world_t *w = world_new(on_drain, NULL, on_tick);
    uv_timer_t never_started;

    T_EQ_INT(uv_timer_init(&w->loop, &never_started), 0);
    w->b = (fake_t){.w = w, .tag = 'b', .async = true};
    T_EQ_INT(lr_daemon_add_handle(w->d, "timer", (uv_handle_t *)&never_started), 0);
    T_EQ_INT(lr_daemon_add_pg(w->d, "pg", &w->pg), 0); /* its init "failed": NULL */
    T_EQ_INT(lr_daemon_add(w->d, "b", fake_close, &w->b, 0), 0);

    lr_daemon_shutdown(w->d); /* before run: run only completes it */
    T_ASSERT(lr_daemon_stopping(w->d));
    T_EQ_INT(lr_daemon_run(w->d), 0);
    T_EQ_INT(w->ticks, 0); /* the tick never started */
    T_EQ_STR(w->order, "bB");
    T_ASSERT(uv_is_closing((uv_handle_t *)&never_started));
    world_free(w);
    printf("start-up failure: ok\n");
}

/* ---- case 3: no drain hook; a handle nobody registered -------------------- */

static void raise_sigint(lr_daemon_t *d, void *arg) {
    world_t *w = arg;
    (void)d;
    if (w->ticks++ == 0) {
        T_EQ_INT(raise(SIGINT), 0); /* without on_drain: the shutdown starts at once */
    }
}

static void idle_cb(uv_idle_t *h) { (void)h; }

static void test_leftover_handle(void) {
    world_t *w = world_new(NULL, NULL, raise_sigint);
    uv_idle_t forgotten;

    T_EQ_INT(uv_idle_init(&w->loop, &forgotten), 0);
    T_EQ_INT(uv_idle_start(&forgotten, idle_cb), 0);
    T_EQ_INT(lr_daemon_run(w->d), 0);
    T_ASSERT(lr_daemon_draining(w->d) && lr_daemon_stopping(w->d));
    T_ASSERT(uv_is_closing((uv_handle_t *)&forgotten)); /* closed, logged as testd.open_at_exit */
    world_free(w);
    printf("leftover handle: ok\n");
}

/* ---- case 4: bad arguments and bounds ------------------------------------- */

static void test_bounds(void) {
    uv_loop_t loop;
    lr_daemon_t *d = NULL;
    lr_daemon_opts_t o;
    char err[256];
    fake_t f = {.tag = 'a'};
    lr_pg_pool_t *pg = NULL;

    T_EQ_INT(uv_loop_init(&loop), 0);
    memset(&o, 0, sizeof(o));
    T_EQ_INT(lr_daemon_init(&d, &loop, &o, err, sizeof(err)), LR_EINVAL); /* no name */
    T_ASSERT(d == NULL);
    o.name = "a-name-that-is-longer-than-31-characters";
    T_EQ_INT(lr_daemon_init(&d, &loop, &o, err, sizeof(err)), LR_EINVAL);
    T_ASSERT(strstr(err, "name") != NULL);
    o.name = "testd";
    T_EQ_INT(lr_daemon_init(&d, &loop, &o, err, sizeof(err)), 0);
    T_EQ_INT(lr_daemon_add(d, "x", NULL, &f, 0), LR_EINVAL);
    T_EQ_INT(lr_daemon_add(d, "x", fake_close, NULL, 0), LR_EINVAL);
    T_EQ_INT(lr_daemon_add_pg(d, "x", NULL), LR_EINVAL);
    T_EQ_INT(lr_daemon_add_pg(NULL, "x", &pg), LR_EINVAL);
    for (int i = 0; i < LR_DAEMON_MAX_COMPONENTS; i++) {
        T_EQ_INT(lr_daemon_add_pg(d, "pg", &pg), 0);
    }
    T_EQ_INT(lr_daemon_add_pg(d, "one too many", &pg), LR_ETOOBIG);
    lr_daemon_free(d); /* never run: nothing on the loop */
    lr_daemon_free(NULL);
    T_EQ_INT(lr_daemon_run(NULL), LR_EINVAL);
    T_EQ_INT(uv_loop_close(&loop), 0);
    printf("bounds: ok\n");
}

/* ---- case 5: lr_daemon_main -------------------------------------------------- */

typedef struct main_state {
    const char *name;
    int prepared, ran, cleaned;
    int max_in_flight;
    char amqp_url[1024];
} main_state_t;

static int set_name(lr_config_t *cfg, const char *value, void *arg) {
    main_state_t *ms = arg;
    (void)cfg;
    if (strcmp(value, "bad") == 0) {
        fprintf(stderr, "test: --name: bad\n");
        return 2;
    }
    ms->name = value;
    return 0;
}

static int prepare(lr_config_t *cfg, char *note, size_t notelen, void *arg) {
    main_state_t *ms = arg;
    (void)cfg;
    ms->prepared++;
    snprintf(note, notelen, " (test)");
    return 0;
}

static int run(const lr_config_t *cfg, void *arg) {
    main_state_t *ms = arg;
    ms->ran++;
    ms->max_in_flight = cfg->max_in_flight;
    snprintf(ms->amqp_url, sizeof(ms->amqp_url), "%s", cfg->amqp_url);
    return 7;
}

static void cleanup(void *arg) { ((main_state_t *)arg)->cleaned++; }

static int call_main(main_state_t *ms, const char *a1, const char *a2, const char *a3) {
    static const lr_daemon_option_t own[] = {
        {"name", 'n', "NAME", "a name", NULL, set_name},
        {"max-in-flight", 0, "N", "tasks in flight", "LONGRUN_MAX_IN_FLIGHT", NULL},
        {NULL, 0, NULL, NULL, NULL, NULL},
    };
    lr_daemon_main_t m = {
        .prog = "test-daemon",
        .about = "A test.\n",
        .options = own,
        .prepare = prepare,
        .run = run,
        .cleanup = cleanup,
        .arg = ms,
    };
    char *argv[5] = {(char *)"test-daemon", (char *)a1, (char *)a2, (char *)a3, NULL};
    int argc = 1 + (a1 != NULL) + (a2 != NULL) + (a3 != NULL);
    memset(ms, 0, sizeof(*ms));
    return lr_daemon_main(&m, argc, argv);
}

static void test_main(void) {
    main_state_t ms;

    T_EQ_INT(call_main(&ms, "-n", "x", "--max-in-flight=9"), 7);
    T_EQ_STR(ms.name, "x");
    T_EQ_INT(ms.max_in_flight, 9);
    T_EQ_INT(ms.prepared, 1);
    T_EQ_INT(ms.ran, 1);
    T_EQ_INT(ms.cleaned, 1);
    T_EQ_INT(call_main(&ms, "--amqp-url", "amqps://u:p@h:1/", NULL), 7);
    T_EQ_STR(ms.amqp_url, "amqps://u:p@h:1/");
    /* plain text to another machine (common/transport.h): refused before prepare */
    T_EQ_INT(call_main(&ms, "--amqp-url", "amqp://u:p@h:1/", NULL), 2);
    T_EQ_INT(ms.prepared + ms.ran + ms.cleaned, 0);
    T_EQ_INT(call_main(&ms, "--database-url", "postgresql://u@10.0.0.1/d?sslmode=disable", "--check-config"), 2);
    T_EQ_INT(ms.prepared + ms.ran + ms.cleaned, 0);

    T_EQ_INT(call_main(&ms, "--check-config", NULL, NULL), 0); /* "configuration ok (test)" */
    T_EQ_INT(ms.prepared, 1);
    T_EQ_INT(ms.ran, 0);
    T_EQ_INT(ms.cleaned, 1);
    T_EQ_INT(call_main(&ms, "--max-in-flight", "0", NULL), 2); /* out of range */
    T_EQ_INT(ms.prepared + ms.ran + ms.cleaned, 0);
    T_EQ_INT(call_main(&ms, "--amqp-url=http://x", NULL, NULL), 2);
    T_EQ_INT(call_main(&ms, "--name", "bad", NULL), 2);
    T_EQ_INT(call_main(&ms, "--no-such-option", NULL, NULL), 2);
    T_EQ_INT(call_main(&ms, "positional", NULL, NULL), 2);
    T_EQ_INT(ms.ran, 0);
    T_EQ_INT(call_main(&ms, "--version", NULL, NULL), 0);
    T_EQ_INT(call_main(&ms, "--help", NULL, NULL), 0);
    T_EQ_INT(ms.prepared + ms.ran, 0);
    printf("main: ok\n");
}

int main(void) {
    lr_log_init("test_daemon", NULL, LR_LOG_ERROR, 0);
    test_bounds();
    test_startup_failure();
    test_leftover_handle();
    test_signals_and_order();
    test_main();
    printf("test_daemon: ok\n");
    return 0;
}
