/*
 * daemon.h - the skeleton every longrun daemon (longrun-scheduler,
 * longrun-worker) runs in: signals, the health server and its one-second
 * tick, an ordered shutdown of the daemon's components, and main()'s
 * configuration and shared command-line options.
 *
 * A daemon's life:
 *
 *     lr_daemon_init(&d, &loop, &opts, ...)      health server up; nothing on the loop yet
 *     lr_daemon_add_handle(d, "tick", &timer)    components, in the order they are to close;
 *     lr_daemon_add_pg(d, "pg", &s->pg)          slots may still be NULL here
 *     ... create the components, start the timers ...
 *     lr_daemon_run(d)                           signals + tick, until the shutdown is complete
 *     lr_daemon_free(d); uv_loop_close(&loop)    returns 0: nothing is left open
 *
 * Signals (uv_signal_t, handled on the loop; each logs one line):
 *   SIGTERM, SIGINT  the first one calls opts.on_drain(d, strsignal(signum)),
 *                    which logs what the drain does and calls
 *                    lr_daemon_shutdown() when it is done (without on_drain
 *                    the shutdown starts at once).  Any later SIGTERM or
 *                    SIGINT, also during the shutdown, exits at once.
 *   SIGQUIT          exits at once.
 *   SIGHUP           calls opts.on_reload, which logs what it reloads; without
 *                    one, "<name>.sighup" says that nothing is reloadable.
 * "Exits at once" logs "<name>.exit_now" and calls _exit(): 3 for SIGQUIT, 1
 * otherwise.  Signal handling starts in lr_daemon_run and stays until the
 * last component is closed, so a second signal still works while
 * connections close.
 *
 * Shutdown: lr_daemon_shutdown() closes the registered components one after
 * the other, in registration order, each once the previous one reported that
 * it is closed; then the daemon's own handles; when the last close callback
 * has run it stops the loop.  A component's slot (the owner's pointer to it)
 * is set to NULL when its turn comes, so the owner's code sees NULL from
 * then on, exactly as if it had written `lr_pg_pool_close(s->pg, ...);
 * s->pg = NULL;` itself.  The tick hook is not called once the shutdown has
 * started; /readyz says "shutting down" from then on.
 *
 * Ownership: the daemon owns its signal handles, its tick timer and the
 * health server.  It does not own the loop (the caller inits and closes it)
 * nor the components: it only calls their close functions.  Handles given to
 * lr_daemon_add_handle stay owned by the caller (usually embedded in its
 * state), but the daemon closes them and uses their `data` from then on.
 * Strings in opts are borrowed until lr_daemon_free.
 *
 * Thread affinity: every function and every hook runs on the loop thread
 * (lr_daemon_main: the main thread, before any loop exists).
 */
#ifndef LR_DAEMON_H
#define LR_DAEMON_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "amqp.h"
#include "config.h"
#include "err.h"
#include "health.h"
#include "http.h"
#include "pg.h"

typedef struct lr_daemon lr_daemon_t;

/* Most components a daemon can register (bounded: LR_ETOOBIG past it). */
#define LR_DAEMON_MAX_COMPONENTS 16

typedef void (*lr_daemon_done_cb)(void *arg);

/* First SIGTERM/SIGINT (or lr_daemon_drain).  why: "Terminated",
 * "Interrupt" or the caller's text; borrowed for the call.  Logs one line
 * saying what the drain does; calls lr_daemon_shutdown when it is done
 * (now or later, e.g. when the last in-flight task is checkpointed). */
typedef void (*lr_daemon_drain_cb)(lr_daemon_t *d, const char *why, void *arg);

/* SIGHUP (on_reload: logs one line saying what it reloaded) and the
 * one-second tick (on_tick: readiness, gauges, the /health snapshot; the
 * daemon has already called lr_health_tick). */
typedef void (*lr_daemon_hook_cb)(lr_daemon_t *d, void *arg);

/* Fills buf (capacity len, never NULL, len > 0) with what exiting at once
 * leaves behind, appended to the "<name>.exit_now" line, e.g. "without
 * draining (3 tasks in flight run again elsewhere ...)".  Called just
 * before _exit: must not allocate or block. */
typedef void (*lr_daemon_note_cb)(char *buf, size_t len, void *arg);

/* The one shape of a component's asynchronous close, an adapter over
 * lr_pg_pool_close, lr_http_close, lr_amqp_stop or the daemon's own close
 * function: starts closing obj (never NULL) and calls done(done_arg) exactly
 * once, on the loop thread, when it is closed (later, or before returning).
 * timeout_ms: the one given at registration (how long the component may
 * wait for outstanding work; adapters without such a notion ignore it). */
typedef void (*lr_daemon_close_fn)(void *obj, long timeout_ms, lr_daemon_done_cb done, void *done_arg);

typedef struct lr_daemon_opts {
    const char *name;            /* "scheduler", "worker": event prefix and health component;
                                    1..31 characters, required */
    int http_port;               /* health server (LONGRUN_HTTP_PORT); 0 = none */
    long stall_ms;               /* /healthz fails after this long without a tick; 0 = 10000 */
    lr_daemon_drain_cb on_drain; /* NULL: the first SIGTERM/SIGINT starts the shutdown */
    lr_daemon_hook_cb on_reload; /* NULL: nothing is reloadable */
    lr_daemon_hook_cb on_tick;   /* optional */
    lr_daemon_note_cb exit_note; /* optional */
    void *arg;                   /* passed to every hook */
} lr_daemon_opts_t;

/* Creates the daemon and starts the health server (opts->http_port; 0: no
 * server).  Puts nothing on the loop yet.  Returns 0, LR_EINVAL (bad opts),
 * LR_ENOMEM, LR_EIO (the health port cannot be bound; detail in errbuf);
 * on error *out is NULL and nothing needs closing. */
int lr_daemon_init(lr_daemon_t **out, uv_loop_t *loop, const lr_daemon_opts_t *opts, char *errbuf,
                   size_t errlen) LR_MUSTCHECK;

/* Registers a component, to be closed after those registered before it.
 * The typed forms take the owner's slot (e.g. &s->pg): the daemon reads it
 * when the component's turn comes (NULL then: nothing to close, e.g. a
 * start-up failure before it was created) and sets it to NULL before
 * closing.  The slot must stay valid until lr_daemon_run returns.  name
 * (for the trace) is copied, truncated to 31 bytes.
 *   _pg:     lr_pg_pool_close (queued queries fail, in-flight ones finish).
 *   _http:   lr_http_close (requests are cancelled without their callbacks).
 *   _amqp:   lr_amqp_stop(timeout_ms) (outstanding confirms wait that long).
 *   _handle: uv_close on an initialised handle (timers, idles, ...); the
 *            daemon takes over h->data at that point; a handle the owner
 *            already closed is skipped.
 *   lr_daemon_add: anything else, through an adapter; obj is fixed (not a
 *            slot) and must stay valid until its done callback.
 * Returns 0, LR_EINVAL (NULL argument), LR_ETOOBIG (more than
 * LR_DAEMON_MAX_COMPONENTS), LR_ESHUTDOWN (the shutdown has started). */
int lr_daemon_add_pg(lr_daemon_t *d, const char *name, lr_pg_pool_t **slot) LR_MUSTCHECK;
int lr_daemon_add_http(lr_daemon_t *d, const char *name, lr_http_t **slot) LR_MUSTCHECK;
int lr_daemon_add_amqp(lr_daemon_t *d, const char *name, lr_amqp_t **slot, long timeout_ms) LR_MUSTCHECK;
int lr_daemon_add_handle(lr_daemon_t *d, const char *name, uv_handle_t *h) LR_MUSTCHECK;
int lr_daemon_add(lr_daemon_t *d, const char *name, lr_daemon_close_fn close, void *obj, long timeout_ms) LR_MUSTCHECK;

/* Starts signal handling and the tick (first tick at once, then every
 * second) and runs the loop until the shutdown is complete.  After a
 * start-up failure, call lr_daemon_shutdown first: run then only completes
 * the shutdown (no signals, no tick).  Before returning it closes, and logs
 * as "<name>.open_at_exit", any handle still open on the loop (a component
 * that was not registered), so that uv_loop_close() succeeds.  Returns 0,
 * LR_EIO (signal handling could not be set up: logged; the components were
 * closed), LR_EINVAL (d NULL), LR_ESTATE (called twice). */
int lr_daemon_run(lr_daemon_t *d);

/* What the first SIGTERM does, without a signal (an admin command's twin):
 * calls on_drain once (or starts the shutdown).  Later calls, and calls
 * once the shutdown has started, do nothing. */
void lr_daemon_drain(lr_daemon_t *d, const char *why);

/* Starts the ordered shutdown (above).  Idempotent; may be called from any
 * callback on the loop thread, also before lr_daemon_run. */
void lr_daemon_shutdown(lr_daemon_t *d);

/* Whether the drain (first SIGTERM or lr_daemon_drain) / the shutdown has
 * started.  Both stay true. */
bool lr_daemon_draining(const lr_daemon_t *d);
bool lr_daemon_stopping(const lr_daemon_t *d);

/* The health server (NULL without one; every lr_health_* accepts NULL).
 * Borrowed: valid until lr_daemon_free. */
lr_health_t *lr_daemon_health(const lr_daemon_t *d);

/* Stops the health server and frees d.  Only before lr_daemon_run or after
 * it returned.  NULL-safe. */
void lr_daemon_free(lr_daemon_t *d);

/* ---- main(): configuration and the options every daemon shares ---------- */

/* One command-line option of a daemon's own.  Either env names the
 * configuration entry its value sets (lr_config_set; an invalid value prints
 * "<prog>: --<name>: <why>" and exits 2), or set handles it. */
typedef struct lr_daemon_option {
    const char *name; /* long name without "--"; NULL ends the table */
    int short_name;   /* e.g. 'q'; 0 = none */
    const char *arg;  /* the value's name in --help ("NAME"); NULL = takes no value */
    const char *help; /* one line of --help */
    const char *env;  /* LONGRUN_X, or NULL */
    /* value: borrowed from argv (valid for the whole process), NULL when
     * the option takes none.  Returns 0, or the exit code after printing why
     * to stderr. */
    int (*set)(lr_config_t *cfg, const char *value, void *arg);
} lr_daemon_option_t;

typedef struct lr_daemon_main {
    const char *prog;                  /* "longrun-worker": messages, usage, --version */
    const char *synopsis;              /* after "usage: <prog> ", e.g. "[options]" */
    const char *about;                 /* the paragraph(s) between the usage line and the options */
    const char *epilog;                /* optional: printed after the options, after an empty line */
    const lr_daemon_option_t *options; /* own options, listed before the shared ones; may be NULL */
    /* After the options, for --check-config and --print-config too: the
     * daemon's own validation (e.g. loading its agents file).  Returns 0
     * (note: optional text after "configuration ok") or the exit code after
     * printing why to stderr.  Optional. */
    int (*prepare)(lr_config_t *cfg, char *note, size_t notelen, void *arg);
    int (*run)(const lr_config_t *cfg, void *arg); /* returns the exit code; required */
    void (*cleanup)(void *arg);                    /* after prepare was called, on every path; optional */
    void *arg;
} lr_daemon_main_t;

/* The whole of a daemon's main(): loads the configuration (an invalid one:
 * "<prog>: invalid configuration: ...", exit 2), parses the shared options
 * (--database-url, --amqp-url, --check-config, --print-config, -h/--help,
 * --version) and the daemon's own, refuses positional arguments (exit 2),
 * refuses plain text to another host (lr_transport_check, common/transport.h:
 * "<prog>: invalid configuration: ...", exit 2, before anything connects,
 * --check-config included), calls prepare, then either prints/checks the configuration and exits 0,
 * or ignores SIGPIPE and returns run's exit code.  Bad usage prints the
 * usage to stderr and exits 2; --help prints it to stdout and exits 0. */
int lr_daemon_main(const lr_daemon_main_t *m, int argc, char **argv);

#endif
