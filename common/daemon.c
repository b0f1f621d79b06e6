/*
 * daemon.c - the daemon skeleton: signals, the health tick, the ordered
 * shutdown and main()'s shared options; see daemon.h.
 *
 * Design.  Everything runs on the loop thread.  lr_daemon_init only starts
 * the health server (its own thread); the loop sees nothing of the daemon
 * until lr_daemon_run, which starts four uv_signal_t and the tick timer.
 * The daemon's progress is one enum, every change through set_state() with
 * its line in the trace:
 *
 *     up --(first SIGTERM/SIGINT)--> draining --(lr_daemon_shutdown)--> closing
 *     up --(lr_daemon_shutdown)--> closing
 *     closing --(last component closed)--> closing_own --(last own close cb)--> closed
 *
 * In `closing` the components are closed one at a time: close_next() takes
 * the next one, clears its slot and calls its close function; that one's
 * done callback (comp_done) calls close_next() again.  A done callback that
 * runs inside its close function (nothing to wait for) is not a recursion:
 * close_next() sees that it is already running and its loop goes on.  The
 * signal handles close last, so that a second SIGTERM still exits at once
 * while connections close; `closed` stops the loop.  lr_daemon_run then
 * closes whatever is left on the loop with a walk callback of the right
 * type (casting uv_close to uv_walk_cb would call it through the wrong
 * function type, which is undefined behaviour) and runs the loop until the
 * close callbacks are done, so that the caller's uv_loop_close() succeeds.
 */
#include "daemon.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buildinfo.h"
#include "log.h"
#include "transport.h"

#define NAME_MAX_LEN 31
#define TICK_MS 1000
#define DEFAULT_STALL_MS 10000
#define MAX_OWN_OPTIONS 16
#define NSIGNALS 4

/* The daemon's progress.  Every transition goes through set_state(). */
enum daemon_state {
    ST_UP = 0,      /* created; running once lr_daemon_run started */
    ST_DRAINING,    /* on_drain called; waiting for the daemon's lr_daemon_shutdown */
    ST_CLOSING,     /* closing the components, one at a time, in registration order */
    ST_CLOSING_OWN, /* closing the signal handles and the tick timer */
    ST_CLOSED,      /* every close callback ran; final */
};

static const char *const state_names[] = {"up", "draining", "closing", "closing_own", "closed"};

typedef struct component {
    lr_daemon_t *d;
    char name[NAME_MAX_LEN + 1];
    lr_daemon_close_fn close;
    void *(*take)(void *slot); /* typed components: reads the owner's slot and clears it */
    void *slot;                /* typed components: the owner's slot */
    void *obj;                 /* lr_daemon_add: the object */
    long timeout_ms;
} component_t;

struct lr_daemon {
    uv_loop_t *loop;
    lr_daemon_opts_t opts;
    char name[NAME_MAX_LEN + 1];
    struct { /* event names: "<name>.<what>" */
        char exit_now[48], sighup[48], stopping[48], shutdown[48], state[48], open_at_exit[48], signals[48];
    } ev;
    enum daemon_state state;
    lr_health_t *health;
    component_t comps[LR_DAEMON_MAX_COMPONENTS];
    int ncomps;
    int next_comp;        /* the next component close_next() takes */
    component_t *waiting; /* the component whose done callback is due, or NULL */
    bool in_close_next;   /* close_next() is on the stack */
    uv_signal_t sig[NSIGNALS];
    int nsig; /* signal handles initialised (closed in closing_own) */
    uv_timer_t tick;
    bool tick_init;
    int own_open;  /* own handles whose close callback has not run */
    bool ran;      /* lr_daemon_run was called */
    bool in_run;   /* inside lr_daemon_run's uv_run: `closed` stops the loop */
    bool run_done; /* lr_daemon_run returned: nothing of ours is on the loop */
};

static const int signums[NSIGNALS] = {SIGTERM, SIGINT, SIGQUIT, SIGHUP};

static void close_next(lr_daemon_t *d);

#define set_state(d, s) set_state_at((d), (s), __LINE__)
static void set_state_at(lr_daemon_t *d, enum daemon_state s, int line) {
    if (d->state == s) {
        return;
    }
    lr_debug(d->ev.state, "%s -> %s (line %d)", state_names[d->state], state_names[s], line);
    d->state = s;
}

/* ---- the end of the shutdown ------------------------------------------- */

static void finish(lr_daemon_t *d) {
    set_state(d, ST_CLOSED);
    if (d->in_run) {
        uv_stop(d->loop);
    }
}

static void own_closed(uv_handle_t *h) {
    lr_daemon_t *d = h->data;
    if (--d->own_open == 0) {
        finish(d);
    }
}

static void close_own(lr_daemon_t *d) {
    set_state(d, ST_CLOSING_OWN);
    d->own_open = d->nsig + (d->tick_init ? 1 : 0);
    if (d->own_open == 0) {
        finish(d); /* lr_daemon_run never started them (a start-up failure) */
        return;
    }
    for (int i = 0; i < d->nsig; i++) {
        uv_close((uv_handle_t *)&d->sig[i], own_closed);
    }
    if (d->tick_init) {
        uv_close((uv_handle_t *)&d->tick, own_closed);
    }
}

/* ---- components ---------------------------------------------------------- */

static void comp_done(void *arg) {
    component_t *c = arg;
    lr_daemon_t *d = c->d;
    if (d->waiting != c) {
        /* NEVER: an adapter called done twice, or for a component not closing. */
        lr_warn(d->ev.shutdown, "%s reported closed twice; ignored", c->name);
        return;
    }
    d->waiting = NULL;
    lr_debug(d->ev.shutdown, "%s closed", c->name);
    close_next(d);
}

/* Closes the next components until one has to be waited for (its done
 * callback calls this again), then the daemon's own handles. */
static void close_next(lr_daemon_t *d) {
    if (d->in_close_next) {
        return; /* a done callback ran inside close(): the loop below goes on */
    }
    d->in_close_next = true;
    while (d->state == ST_CLOSING && d->waiting == NULL) {
        component_t *c;
        void *obj;
        if (d->next_comp == d->ncomps) {
            close_own(d);
            break;
        }
        c = &d->comps[d->next_comp++];
        obj = c->take != NULL ? c->take(c->slot) : c->obj;
        if (obj == NULL) {
            lr_debug(d->ev.shutdown, "%s: not open, nothing to close", c->name);
            continue;
        }
        lr_debug(d->ev.shutdown, "closing %s (%d of %d)", c->name, d->next_comp, d->ncomps);
        d->waiting = c;
        c->close(obj, c->timeout_ms, comp_done, c);
    }
    d->in_close_next = false;
}

static int add(lr_daemon_t *d, const char *name, lr_daemon_close_fn close, void *(*take)(void *), void *slot, void *obj,
               long timeout_ms) {
    component_t *c;
    if (d == NULL || name == NULL || close == NULL || (slot == NULL && obj == NULL)) {
        return LR_EINVAL;
    }
    if (d->state >= ST_CLOSING) {
        return LR_ESHUTDOWN;
    }
    if (d->ncomps == LR_DAEMON_MAX_COMPONENTS) {
        return LR_ETOOBIG;
    }
    c = &d->comps[d->ncomps++];
    memset(c, 0, sizeof(*c));
    c->d = d;
    snprintf(c->name, sizeof(c->name), "%s", name);
    c->close = close;
    c->take = take;
    c->slot = slot;
    c->obj = obj;
    c->timeout_ms = timeout_ms;
    return 0;
}

/* The adapters: one close shape over each module's close function, and one
 * take function per slot type (read the owner's pointer, clear it). */

static void close_pg(void *obj, long timeout_ms, lr_daemon_done_cb done, void *arg) {
    (void)timeout_ms;
    lr_pg_pool_close(obj, done, arg);
}

static void *take_pg(void *slot) {
    lr_pg_pool_t **pp = slot;
    lr_pg_pool_t *p = *pp;
    *pp = NULL;
    return p;
}

static void close_http(void *obj, long timeout_ms, lr_daemon_done_cb done, void *arg) {
    (void)timeout_ms;
    lr_http_close(obj, done, arg);
}

static void *take_http(void *slot) {
    lr_http_t **hp = slot;
    lr_http_t *h = *hp;
    *hp = NULL;
    return h;
}

static void close_amqp(void *obj, long timeout_ms, lr_daemon_done_cb done, void *arg) {
    lr_amqp_stop(obj, timeout_ms, done, arg);
}

static void *take_amqp(void *slot) {
    lr_amqp_t **ap = slot;
    lr_amqp_t *a = *ap;
    *ap = NULL;
    return a;
}

static void handle_closed(uv_handle_t *h) { comp_done(h->data); /* close_handle put the component there */ }

static void close_handle(void *obj, long timeout_ms, lr_daemon_done_cb done, void *arg) {
    uv_handle_t *h = obj;
    (void)timeout_ms;
    if (uv_is_closing(h)) {
        done(arg); /* the owner closed it already */
        return;
    }
    /* No callback of the handle runs once it is closing, so its data is
     * ours now; done is comp_done and arg its component (close_next). */
    h->data = arg;
    uv_close(h, handle_closed);
}

int lr_daemon_add_pg(lr_daemon_t *d, const char *name, lr_pg_pool_t **slot) {
    return add(d, name, close_pg, take_pg, slot, NULL, 0);
}

int lr_daemon_add_http(lr_daemon_t *d, const char *name, lr_http_t **slot) {
    return add(d, name, close_http, take_http, slot, NULL, 0);
}

int lr_daemon_add_amqp(lr_daemon_t *d, const char *name, lr_amqp_t **slot, long timeout_ms) {
    return add(d, name, close_amqp, take_amqp, slot, NULL, timeout_ms);
}

int lr_daemon_add_handle(lr_daemon_t *d, const char *name, uv_handle_t *h) {
    return add(d, name, close_handle, NULL, NULL, h, 0);
}

int lr_daemon_add(lr_daemon_t *d, const char *name, lr_daemon_close_fn close, void *obj, long timeout_ms) {
    return add(d, name, close, NULL, NULL, obj, timeout_ms);
}

/* ---- signals and the tick -------------------------------------------------- */

static void exit_now(lr_daemon_t *d, int signum) {
    char note[256] = "";
    if (d->opts.exit_note != NULL) {
        d->opts.exit_note(note, sizeof(note), d->opts.arg);
    }
    lr_warn(d->ev.exit_now, "%s: exiting now%s%s", strsignal(signum), note[0] != '\0' ? " " : "", note);
    fflush(stdout);
    _exit(signum == SIGQUIT ? 3 : 1);
}

static void on_signal(uv_signal_t *sig, int signum) {
    lr_daemon_t *d = sig->data;
    if (signum == SIGHUP) {
        if (d->state >= ST_CLOSING) {
            lr_info(d->ev.sighup, "SIGHUP: shutting down, nothing reloaded");
        } else if (d->opts.on_reload != NULL) {
            d->opts.on_reload(d, d->opts.arg);
        } else {
            lr_info(d->ev.sighup, "SIGHUP: nothing to reload (configuration is read at start)");
        }
        return;
    }
    if (signum == SIGQUIT || d->state != ST_UP) {
        exit_now(d, signum);
    }
    lr_daemon_drain(d, strsignal(signum));
}

static void on_tick(uv_timer_t *t) {
    lr_daemon_t *d = t->data;
    lr_health_tick(d->health);
    if (d->state < ST_CLOSING && d->opts.on_tick != NULL) {
        d->opts.on_tick(d, d->opts.arg);
    }
}

/* Starts the signal handles and the tick.  On failure the handles that were
 * initialised stay for close_own(). */
static int start_own(lr_daemon_t *d) {
    int rc;
    uv_timer_init(d->loop, &d->tick); /* cannot fail */
    d->tick.data = d;
    d->tick_init = true;
    for (int i = 0; i < NSIGNALS; i++) {
        rc = uv_signal_init(d->loop, &d->sig[i]);
        if (rc == 0) {
            d->sig[i].data = d;
            d->nsig++;
            rc = uv_signal_start(&d->sig[i], on_signal, signums[i]);
        }
        if (rc != 0) {
            lr_error(d->ev.signals, "cannot handle %s: %s; stopping", strsignal(signums[i]), uv_strerror(rc));
            return LR_EIO;
        }
    }
    uv_timer_start(&d->tick, on_tick, 0, TICK_MS);
    return 0;
}

/* ---- lifecycle ------------------------------------------------------------- */

int lr_daemon_init(lr_daemon_t **out, uv_loop_t *loop, const lr_daemon_opts_t *opts, char *errbuf, size_t errlen) {
    lr_daemon_t *d = NULL;
    size_t len;
    int rc;

    if (out == NULL || loop == NULL || opts == NULL || opts->name == NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "daemon: out, loop, opts and opts->name are required");
    }
    *out = NULL;
    len = strlen(opts->name);
    if (len == 0 || len > NAME_MAX_LEN) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "daemon: the name must be 1..%d characters", NAME_MAX_LEN);
    }
    if (opts->stall_ms < 0) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "daemon: stall_ms %ld is negative", opts->stall_ms);
    }
    d = calloc(1, sizeof(*d));
    if (d == NULL) {
        return lr_seterr(errbuf, errlen, LR_ENOMEM, "daemon: out of memory");
    }
    d->loop = loop;
    d->opts = *opts;
    memcpy(d->name, opts->name, len + 1);
    d->opts.name = d->name;
    snprintf(d->ev.exit_now, sizeof(d->ev.exit_now), "%s.exit_now", d->name);
    snprintf(d->ev.sighup, sizeof(d->ev.sighup), "%s.sighup", d->name);
    snprintf(d->ev.stopping, sizeof(d->ev.stopping), "%s.stopping", d->name);
    snprintf(d->ev.shutdown, sizeof(d->ev.shutdown), "%s.shutdown", d->name);
    snprintf(d->ev.state, sizeof(d->ev.state), "%s.daemon_state", d->name);
    snprintf(d->ev.open_at_exit, sizeof(d->ev.open_at_exit), "%s.open_at_exit", d->name);
    snprintf(d->ev.signals, sizeof(d->ev.signals), "%s.signals", d->name);
    rc = lr_health_start(&d->health, opts->http_port, d->name, opts->stall_ms > 0 ? opts->stall_ms : DEFAULT_STALL_MS,
                         errbuf, errlen);
    if (rc != 0) {
        free(d);
        return rc;
    }
    *out = d;
    return 0;
}

void lr_daemon_drain(lr_daemon_t *d, const char *why) {
    if (d == NULL || d->state != ST_UP) {
        return;
    }
    set_state(d, ST_DRAINING);
    why = why != NULL ? why : "drain";
    if (d->opts.on_drain != NULL) {
        d->opts.on_drain(d, why, d->opts.arg);
        return;
    }
    lr_info(d->ev.stopping, "%s: stopping; the same signal again exits at once", why);
    lr_daemon_shutdown(d);
}

void lr_daemon_shutdown(lr_daemon_t *d) {
    if (d == NULL || d->state >= ST_CLOSING) {
        return;
    }
    set_state(d, ST_CLOSING);
    lr_health_set_ready(d->health, 0, "shutting down");
    close_next(d);
}

/* Closes a handle nobody registered: a bug in the daemon, but the loop must
 * close with nothing open. */
static void close_leftover(uv_handle_t *h, void *arg) {
    lr_daemon_t *d = arg;
    if (uv_is_closing(h)) {
        return;
    }
    lr_warn(d->ev.open_at_exit,
            "a %s handle was still open at exit (not registered with the daemon); "
            "closing it",
            uv_handle_type_name(uv_handle_get_type(h)));
    uv_close(h, NULL);
}

int lr_daemon_run(lr_daemon_t *d) {
    int rc = 0;
    if (d == NULL) {
        return LR_EINVAL;
    }
    if (d->ran) {
        return LR_ESTATE;
    }
    d->ran = true;
    if (d->state < ST_CLOSING) {
        rc = start_own(d);
        if (rc != 0) {
            lr_daemon_shutdown(d);
        }
    }
    d->in_run = true;
    while (d->state != ST_CLOSED) {
        if (uv_run(d->loop, UV_RUN_DEFAULT) == 0 && d->state != ST_CLOSED) {
            /* NEVER: nothing left to wait for, yet a close never reported. */
            lr_error(d->ev.shutdown, "the loop has nothing left to run but the shutdown is %s (%s)",
                     state_names[d->state], d->waiting != NULL ? d->waiting->name : "-");
            rc = rc != 0 ? rc : LR_ESTATE;
            break;
        }
    }
    d->in_run = false;
    uv_walk(d->loop, close_leftover, d);
    /* The first call may only clear uv_stop's flag; the loop is alive until
     * the last close callback ran, and nothing is active any more. */
    while (uv_run(d->loop, UV_RUN_DEFAULT) != 0) {
    }
    d->run_done = true;
    return rc;
}

bool lr_daemon_draining(const lr_daemon_t *d) { return d != NULL && d->state >= ST_DRAINING; }

bool lr_daemon_stopping(const lr_daemon_t *d) { return d != NULL && d->state >= ST_CLOSING; }

lr_health_t *lr_daemon_health(const lr_daemon_t *d) { return d != NULL ? d->health : NULL; }

void lr_daemon_free(lr_daemon_t *d) {
    if (d == NULL) {
        return;
    }
    lr_health_stop(d->health);
    if (d->ran && !d->run_done) {
        /* NEVER: our handles are still on the loop; leak rather than let
         * libuv write into freed memory. */
        lr_error(d->ev.shutdown, "lr_daemon_free called inside lr_daemon_run; not freed");
        return;
    }
    free(d);
}

/* ---- main() ------------------------------------------------------------------ */

enum opt_kind { OPT_VALUE = 0, OPT_CHECK, OPT_PRINT, OPT_HELP, OPT_VERSION };

typedef struct shared_option {
    lr_daemon_option_t o;
    enum opt_kind kind;
} shared_option_t;

/* The options every daemon has, listed after its own. */
static const shared_option_t shared_options[] = {
    {{"database-url", 0, "URL", "PostgreSQL (LONGRUN_DATABASE_URL)", "LONGRUN_DATABASE_URL", NULL}, OPT_VALUE},
    {{"amqp-url", 0, "URL", "RabbitMQ (LONGRUN_AMQP_URL)", "LONGRUN_AMQP_URL", NULL}, OPT_VALUE},
    {{"check-config", 0, NULL, "validate the configuration and exit (0 ok, 2 invalid)", NULL, NULL}, OPT_CHECK},
    {{"print-config", 0, NULL, "print the effective configuration (secrets masked) and exit", NULL, NULL}, OPT_PRINT},
    {{"help", 'h', NULL, "this help", NULL, NULL}, OPT_HELP},
    {{"version", 0, NULL, "print the version", NULL, NULL}, OPT_VERSION},
};

#define NSHARED (sizeof(shared_options) / sizeof(shared_options[0]))
#define MAX_OPTIONS (MAX_OWN_OPTIONS + NSHARED)
#define LONG_ONLY_BASE 1000 /* getopt value of option i without a short name: base + i */

/* Every option of one daemon, its own first, and getopt_long's view of them. */
typedef struct option_table {
    const lr_daemon_option_t *opt[MAX_OPTIONS];
    enum opt_kind kind[MAX_OPTIONS];
    int n;
    struct option longopts[MAX_OPTIONS + 1];
    char shortopts[2 * MAX_OPTIONS + 1];
} option_table_t;

static int table_build(option_table_t *t, const lr_daemon_main_t *m) {
    size_t ns = 0;
    memset(t, 0, sizeof(*t));
    for (const lr_daemon_option_t *o = m->options; o != NULL && o->name != NULL; o++) {
        if (t->n == MAX_OWN_OPTIONS) {
            return LR_ETOOBIG;
        }
        t->opt[t->n] = o;
        t->kind[t->n++] = OPT_VALUE;
    }
    for (size_t i = 0; i < NSHARED; i++) {
        t->opt[t->n] = &shared_options[i].o;
        t->kind[t->n++] = shared_options[i].kind;
    }
    for (int i = 0; i < t->n; i++) {
        const lr_daemon_option_t *o = t->opt[i];
        t->longopts[i].name = o->name;
        t->longopts[i].has_arg = o->arg != NULL ? required_argument : no_argument;
        t->longopts[i].val = o->short_name != 0 ? o->short_name : LONG_ONLY_BASE + i;
        if (o->short_name != 0) {
            t->shortopts[ns++] = (char)o->short_name;
            if (o->arg != NULL) {
                t->shortopts[ns++] = ':';
            }
        }
    }
    return 0;
}

static int table_find(const option_table_t *t, int val) {
    for (int i = 0; i < t->n; i++) {
        if (t->longopts[i].val == val) {
            return i;
        }
    }
    return -1;
}

static void usage(const lr_daemon_main_t *m, const option_table_t *t, FILE *f) {
    fprintf(f, "usage: %s %s\n\n%s\n", m->prog, m->synopsis != NULL ? m->synopsis : "[options]",
            m->about != NULL ? m->about : "");
    for (int i = 0; i < t->n; i++) {
        const lr_daemon_option_t *o = t->opt[i];
        char left[80];
        if (o->short_name != 0) {
            snprintf(left, sizeof(left), "  -%c, --%s%s%s", o->short_name, o->name, o->arg != NULL ? " " : "",
                     o->arg != NULL ? o->arg : "");
        } else {
            snprintf(left, sizeof(left), "      --%s%s%s", o->name, o->arg != NULL ? " " : "",
                     o->arg != NULL ? o->arg : "");
        }
        fprintf(f, "%-24s  %s\n", left, o->help != NULL ? o->help : "");
    }
    if (m->epilog != NULL) {
        fprintf(f, "\n%s", m->epilog);
    }
}

static int set_option(const lr_daemon_main_t *m, const lr_daemon_option_t *o, lr_config_t *cfg, const char *value) {
    char err[512];
    if (o->env != NULL) {
        if (lr_config_set(cfg, o->env, value, err, sizeof(err)) != 0) {
            fprintf(stderr, "%s: --%s: %s\n", m->prog, o->name, err);
            return 2;
        }
        return 0;
    }
    return o->set != NULL ? o->set(cfg, value, m->arg) : 0;
}

int lr_daemon_main(const lr_daemon_main_t *m, int argc, char **argv) {
    option_table_t t;
    lr_config_t cfg;
    char err[512], note[128] = "";
    bool check = false, print = false;
    int opt, rc;

    if (m == NULL || m->prog == NULL || m->run == NULL) {
        fprintf(stderr, "longrun: lr_daemon_main: prog and run are required\n");
        return 2;
    }
    if (table_build(&t, m) != 0) {
        fprintf(stderr, "%s: more than %d options of its own\n", m->prog, MAX_OWN_OPTIONS);
        return 2;
    }
    if (lr_config_load(&cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: invalid configuration: %s\n", m->prog, err);
        return 2;
    }
    optind = 1;
    while ((opt = getopt_long(argc, argv, t.shortopts, t.longopts, NULL)) != -1) {
        int i = table_find(&t, opt);
        if (i < 0) { /* '?': getopt said what is wrong */
            usage(m, &t, stderr);
            return 2;
        }
        switch (t.kind[i]) {
        case OPT_CHECK: check = true; break;
        case OPT_PRINT: print = true; break;
        case OPT_HELP: usage(m, &t, stdout); return 0;
        case OPT_VERSION: printf("%s %s (commit %s)\n", m->prog, lr_build_version, lr_build_commit); return 0;
        case OPT_VALUE:
            rc = set_option(m, t.opt[i], &cfg, optarg);
            if (rc != 0) {
                return rc;
            }
            break;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", m->prog, argv[optind]);
        return 2;
    }
    /* Before anything connects, and for --check-config too. */
    if (lr_transport_check(&cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: invalid configuration: %s\n", m->prog, err);
        return 2;
    }
    rc = m->prepare != NULL ? m->prepare(&cfg, note, sizeof(note), m->arg) : 0;
    if (rc != 0) {
        goto out;
    }
    if (print) {
        lr_config_print(&cfg, stdout);
    }
    if (check) {
        printf("configuration ok%s\n", note);
    }
    if (check || print) {
        goto out;
    }
    signal(SIGPIPE, SIG_IGN);
    rc = m->run(&cfg, m->arg);
out:
    if (m->cleanup != NULL) {
        m->cleanup(m->arg);
    }
    return rc;
}
