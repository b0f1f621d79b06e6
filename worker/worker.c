/*
 * worker.c - longrun-worker's wiring: the components (PostgreSQL pool,
 * RabbitMQ, HTTP client), the daemon skeleton (common/daemon.h: signals,
 * health server, ordered shutdown), readiness and the kill switches.  What
 * a run does is in the files core.h lists; this file only connects them.
 *
 * Shutdown order (lr_daemon_add_*): the run flag (no new work, publish
 * retries end), the lease and drain timers, pending callbacks, the HTTP
 * client, the PostgreSQL pool (in-flight statements finish, so their runs
 * still ack or give back their deliveries), then RabbitMQ (5 s for
 * outstanding confirms).
 */
#include "core.h"

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agents.h"
#include "breaker.h"
#include "callback.h"
#include "callstats.h"
#include "egress.h"
#include "mcp.h"
#include "health.h"
#include "migrations.h"
#include "payload_log.h"
#include "spend.h"
#include "state.h"
#include "store.h"
#include "wmetrics.h"

static const lr_executor_t *find_executor(const char *agent) {
    if (strcmp(agent, "http-steps") == 0) {
        return &lr_exec_http_steps;
    }
    if (lr_agents_find(agent) != NULL) {
        return &lr_exec_agent;
    }
    return NULL;
}

static void on_amqp_state(int connected, const char *detail, void *arg) {
    lr_worker_t *w = arg;
    w->amqp_up = connected != 0;
    if (connected) {
        lr_info("amqp.connected", "RabbitMQ connected; consuming %s", w->queues_csv);
    } else {
        lr_warn("amqp.disconnected",
                "RabbitMQ unavailable: %s; in-flight tasks continue, "
                "reconnecting",
                detail != NULL ? detail : "");
    }
}

static void flags_cb(const lr_store_flags_res_t *res, void *arg) {
    (void)arg;
    if (res->err != 0) {
        lr_warn("flags.load_failed", "cannot read the kill switches: %s", res->errmsg);
        return;
    }
    lr_flags_replace(res->entries, res->n);
    lr_info("flags.loaded", "%d kill switch(es) active", res->n);
}

/* NOTIFY longrun_flags (and every reconnect): reload the kill switches. */
static void on_flags_notify(const char *channel, const char *payload, void *arg) {
    lr_worker_t *w = arg;
    (void)channel;
    (void)payload;
    if (!w->stopping && lr_store_flags(w->pg, flags_cb, w) != 0) {
        lr_warn("flags.load_failed", "cannot queue the kill-switch reload");
    }
}

static void schema_cb(const lr_store_count_res_t *res, void *arg) {
    lr_worker_t *w = arg;
    int v;
    if (res->err != 0) {
        w->schema_state = -1;
        snprintf(w->schema_msg, sizeof(w->schema_msg), "schema not readable (run longrun migrate): %.100s",
                 res->errmsg);
        return;
    }
    v = (int)res->count;
    if (v < lr_schema_version_known()) {
        w->schema_state = -1;
        snprintf(w->schema_msg, sizeof(w->schema_msg), "schema version %d is older than %d: run longrun migrate", v,
                 lr_schema_version_known());
    } else {
        /* newer is compatible: migrations are additive (docs/deploy.md) */
        w->schema_state = 1;
        w->schema_msg[0] = '\0';
    }
}

static int start_amqp(lr_worker_t *w);

/* The durability self-check, the first statement the worker sends: a
 * checkpoint is only a checkpoint if its commit survives a crash of the
 * database server, which fsync = off or synchronous_commit = off (for the
 * server, the role or the database) give up.  Nothing is consumed until it
 * passed: RabbitMQ is started here. */
static void durability_cb(const lr_store_durability_res_t *res, void *arg) {
    lr_worker_t *w = arg;
    w->durability_pending = false;
    if (w->stopping) {
        return;
    }
    if (res->err != 0) {
        /* asked again by the next tick */
        lr_warn("worker.durability_check_failed", "cannot read the PostgreSQL durability settings: %s", res->errmsg);
        return;
    }
    if (res->unsafe && w->cfg.allow_unsafe_durability == 0) {
        w->durability_state = -1;
        w->exit_code = 2;
        snprintf(w->schema_msg, sizeof(w->schema_msg),
                 "PostgreSQL durability is off (fsync=%s, "
                 "synchronous_commit=%s)",
                 res->fsync, res->synchronous_commit);
        lr_error("worker.unsafe_durability",
                 "PostgreSQL runs with fsync=%s, synchronous_commit=%s for role %s "
                 "on database %s: a committed checkpoint could be lost in a crash of the database server. "
                 "Refusing to start (exit 2): turn both on (e.g. ALTER DATABASE %s RESET synchronous_commit) "
                 "or set LONGRUN_ALLOW_UNSAFE_DURABILITY=1 to run anyway",
                 res->fsync, res->synchronous_commit, res->user, res->database, res->database);
        lr_daemon_shutdown(w->d);
        return;
    }
    if (res->unsafe) {
        lr_warn("worker.unsafe_durability",
                "PostgreSQL runs with fsync=%s, synchronous_commit=%s for role %s on "
                "database %s: committed checkpoints can be lost in a crash of the database server; running anyway "
                "(LONGRUN_ALLOW_UNSAFE_DURABILITY=1)",
                res->fsync, res->synchronous_commit, res->user, res->database);
    } else {
        lr_info("worker.durability",
                "PostgreSQL durability: fsync=%s, synchronous_commit=%s for role %s on "
                "database %s",
                res->fsync, res->synchronous_commit, res->user, res->database);
    }
    w->durability_state = 1;
    if (w->draining) {
        return; /* a SIGTERM came first: nothing to consume, the drain exits */
    }
    if (!lr_mcp_ready(w->mcp)) {
        /* no task before the MCP servers' tools are known (mcp_ready) */
        w->amqp_after_mcp = true;
        return;
    }
    if (start_amqp(w) != 0) {
        w->exit_code = 2;
        lr_daemon_shutdown(w->d);
    }
}

/* The MCP servers listed their tools (or the start wait is over): a step
 * may now offer them to its model, so tasks may be consumed. */
static void mcp_ready(void *arg) {
    lr_worker_t *w = arg;
    if (!w->amqp_after_mcp || w->stopping || w->draining) {
        return;
    }
    w->amqp_after_mcp = false;
    if (start_amqp(w) != 0) {
        w->exit_code = 2;
        lr_daemon_shutdown(w->d);
    }
}

static void mcp_egress(void *arg, lr_http_opts_t *o) { lr_worker_egress(arg, o); }

static void close_mcp(void *obj, long timeout_ms, lr_daemon_done_cb done, void *done_arg) {
    lr_worker_t *w = obj;
    lr_mcp_t *m = w->mcp;
    (void)timeout_ms;
    w->mcp = NULL;
    lr_mcp_close(m, done, done_arg);
}

static void durability_check(lr_worker_t *w) {
    if (w->durability_state != 0 || w->durability_pending || w->stopping) {
        return;
    }
    if (lr_store_durability(w->pg, durability_cb, w) == 0) {
        w->durability_pending = true;
    } else {
        lr_debug("worker.durability_check", "cannot queue the durability check");
    }
}

/* The /health snapshot, built as a tree (any length, every string escaped)
 * and handed to the health server, which copies it. */
static void health_snapshot(const lr_worker_t *w, lr_health_t *health, uint64_t now_ms) {
    cJSON *o = cJSON_CreateObject(), *deps, *dep, *circuits, *calls;
    if (o == NULL) {
        return;
    }
    cJSON_AddStringToObject(o, "worker", w->id);
    deps = cJSON_AddObjectToObject(o, "dependencies");
    dep = cJSON_AddObjectToObject(deps, "rabbitmq");
    cJSON_AddStringToObject(dep, "status", w->amqp_up ? "up" : "down");
    dep = cJSON_AddObjectToObject(deps, "postgres");
    cJSON_AddStringToObject(dep, "status", w->pg_usable > 0 ? "up" : "down");
    cJSON_AddNumberToObject(dep, "usable_connections", w->pg_usable);
    cJSON_AddNumberToObject(dep, "pending_queries", w->pg != NULL ? (double)lr_pg_pool_pending(w->pg) : 0);
    dep = cJSON_AddObjectToObject(deps, "schema");
    cJSON_AddStringToObject(dep, "status",
                            w->schema_state > 0   ? "ok"
                            : w->schema_state < 0 ? "incompatible"
                                                  : "unknown");
    cJSON_AddNumberToObject(dep, "binary_version", lr_schema_version_known());
    cJSON_AddNumberToObject(o, "in_flight", w->nruns);
    cJSON_AddNumberToObject(o, "max_in_flight", w->cfg.max_in_flight);
    cJSON_AddBoolToObject(o, "draining", w->draining);
    cJSON_AddNumberToObject(o, "steps", (double)w->steps_done);
    cJSON_AddNumberToObject(o, "tasks_finished", (double)w->tasks_finished);
    dep = cJSON_AddObjectToObject(o, "memory");
    cJSON_AddNumberToObject(dep, "budget_bytes", (double)w->mem.budget);
    cJSON_AddNumberToObject(dep, "charged_bytes", (double)w->mem.used);
    cJSON_AddNumberToObject(dep, "peak_bytes", (double)w->mem.peak);
    cJSON_AddNumberToObject(dep, "held", (double)w->nheld);
    {
        /* the heap as malloc sees it: in use (a leak grows it) vs. kept
         * free in its arenas (fragmentation after a peak grows RSS only);
         * a sanitizer's allocator is not malloc's: no figures then */
#if defined(__SANITIZE_ADDRESS__)
        cJSON_AddStringToObject(dep, "heap_source", "none (sanitizer allocator)");
#else
        struct mallinfo2 mi = mallinfo2();
        cJSON_AddStringToObject(dep, "heap_source", "mallinfo2");
        cJSON_AddNumberToObject(dep, "heap_in_use_bytes", (double)(mi.uordblks + mi.hblkhd));
        cJSON_AddNumberToObject(dep, "heap_free_bytes", (double)mi.fordblks);
#endif
    }
    circuits = lr_breakers_cjson();
    cJSON_AddItemToObject(o, "circuits", circuits != NULL ? circuits : cJSON_CreateArray());
    cJSON_AddNumberToObject(o, "calls_window_seconds", w->cfg.ready_window_seconds);
    calls = lr_callstats_cjson(LR_CALLSTATS_MODEL, now_ms);
    cJSON_AddItemToObject(o, "providers", calls != NULL ? calls : cJSON_CreateArray());
    calls = lr_callstats_cjson(LR_CALLSTATS_TOOL, now_ms);
    cJSON_AddItemToObject(o, "tools", calls != NULL ? calls : cJSON_CreateArray());
    lr_health_set_snapshot_tree(health, o);
}

/* The model providers' part of readiness (docs/architecture.md, "Health
 * and metrics"): every call of every model endpoint called over the last
 * window answered 401/403 (at least LONGRUN_READY_AUTH_MIN_CALLS), or every
 * model endpoint known has its circuit open.  NULL when neither, else the
 * reason, written into buf. */
static const char *providers_why(const lr_worker_t *w, uint64_t now_ms, char *buf, size_t len) {
    int nmodels = 0, open = lr_breakers_models_open(now_ms, &nmodels);
    if (lr_callstats_auth_storm(now_ms, w->cfg.ready_auth_min_calls, buf, len)) {
        return buf;
    }
    if (nmodels > 0 && open == nmodels) {
        snprintf(buf, len, "every model endpoint's circuit is open (%d)", nmodels);
        return buf;
    }
    return NULL;
}

/* Every second (the daemon ticks liveness): readiness, gauges, the /health
 * snapshot. */
static void mem_metrics(lr_worker_t *w) {
    static unsigned long long waits_seen;
    int held = 0;
    lr_list_foreach(it, &w->held) {
        held++;
    }
    w->nheld = held;
    lr_metric_set(lr_wm.memory_budget, NULL, (double)w->mem.budget);
    lr_metric_set(lr_wm.memory_charged, NULL, (double)w->mem.used);
    lr_metric_set(lr_wm.memory_charged_peak, NULL, (double)w->mem.peak);
    lr_metric_set(lr_wm.memory_held, NULL, held);
    lr_metric_add(lr_wm.memory_waits, NULL, (double)(w->mem.waits - waits_seen));
    waits_seen = w->mem.waits;
}

static void on_tick(lr_daemon_t *d, void *arg) {
    lr_worker_t *w = arg;
    lr_health_t *health = lr_daemon_health(d);
    const char *why = NULL;
    uint64_t now_ms = uv_hrtime() / 1000000u; /* the clock of lr_agent_now() */
    char provider_msg[512];
    static unsigned ticks;
    static bool was_ready;
    ticks++;
    if (w->pg_usable > 0) {
        durability_check(w);
    }
    if ((w->schema_state <= 0 || ticks % 30 == 0) && w->pg_usable > 0) {
        if (lr_store_schema_version(w->pg, schema_cb, w) != 0) {
            lr_debug("worker.schema_check", "cannot queue the schema check");
        }
        if (ticks % 30 == 0 && !w->stopping) {
            lr_spend_tick(); /* a failed load of the spend caps is tried again */
        }
    }
    if (w->draining) {
        why = "draining";
    } else if (w->durability_state < 0) {
        why = w->schema_msg;
    } else if (w->durability_state == 0) {
        why = w->pg_usable == 0 ? "PostgreSQL not connected" : "checking the PostgreSQL durability settings";
    } else if (!w->amqp_up) {
        why = "RabbitMQ not connected";
    } else if (w->pg_usable == 0) {
        why = "PostgreSQL not connected";
    } else if (w->schema_state < 0) {
        why = w->schema_msg;
    } else if (w->schema_state == 0) {
        why = "checking the schema version";
    } else {
        why = providers_why(w, now_ms, provider_msg, sizeof(provider_msg));
    }
    if ((why == NULL) != was_ready) {
        /* one line per change: the probe's answer, in the log too */
        if (why == NULL) {
            lr_info("worker.ready", "ready");
        } else {
            lr_warn("worker.not_ready", "not ready: %s", why);
        }
        was_ready = why == NULL;
    }
    lr_health_set_ready(health, why == NULL, why);
    lr_metric_set(lr_wm.ready, NULL, why == NULL ? 1 : 0);
    lr_metric_set(lr_wm.in_flight, NULL, w->nruns);
    lr_metric_set(lr_wm.amqp_connected, NULL, w->amqp_up ? 1 : 0);
    lr_metric_set(lr_wm.pg_connections, NULL, w->pg_usable);
    mem_metrics(w);
    health_snapshot(w, health, now_ms);
    if (ticks % 60 == 0) {
        lr_info("worker.stats",
                "in flight %d, steps %llu, tasks finished %llu, postgres %d connection(s) with %zu "
                "pending, rabbitmq %s%s",
                w->nruns, (unsigned long long)w->steps_done, (unsigned long long)w->tasks_finished, w->pg_usable,
                w->pg != NULL ? lr_pg_pool_pending(w->pg) : (size_t)0, w->amqp_up ? "up" : "down",
                w->draining ? ", draining" : "");
    }
}

static void on_pg_state(int usable, void *arg) {
    lr_worker_t *w = arg;
    if (usable == 0 && w->pg_usable > 0) {
        lr_warn("pg.disconnected", "PostgreSQL unavailable: in-flight checkpoints wait, reconnecting");
    } else if (usable > 0 && w->pg_usable == 0) {
        lr_info("pg.connected", "PostgreSQL connected (%d connections)", usable);
    }
    w->pg_usable = usable;
}

/* The first component the shutdown reaches: from here on no run takes new
 * work and a publish retry ends its run. */
static void stop_runs(void *obj, long timeout_ms, lr_daemon_done_cb done, void *done_arg) {
    lr_worker_t *w = obj;
    (void)timeout_ms;
    w->stopping = true;
    lr_info("worker.stopping", "closing connections (%d runs left)", w->nruns);
    done(done_arg);
}

static void abandon_callbacks(void *obj, long timeout_ms, lr_daemon_done_cb done, void *done_arg) {
    (void)obj;
    (void)timeout_ms;
    lr_callback_abandon_all();
    done(done_arg);
}

/* The memory budget: configured, or derived from the process's limits. */
static void setup_memory(lr_worker_t *w) {
    const char *source = "LONGRUN_MEMORY_BUDGET_MB";
    size_t budget = w->cfg.memory_budget_mb >= 0 ? (size_t)w->cfg.memory_budget_mb * 1024u * 1024u
                                                 : lr_mem_default_budget(&source);
    lr_mem_init(&w->mem, w->loop, budget, lr_claim_room, w);
    if (budget == 0) {
        lr_info("worker.memory_budget", "no memory budget (%s); responses up to %d bytes",
                w->cfg.memory_budget_mb == 0 ? "LONGRUN_MEMORY_BUDGET_MB=0" : "no cgroup or RLIMIT_AS limit",
                w->cfg.max_response_bytes);
    } else {
        lr_info("worker.memory_budget", "memory budget %zu MiB (from %s); responses up to %d bytes",
                budget / (1024u * 1024u), source, w->cfg.max_response_bytes);
    }
}

/* Registers the components in their shutdown order (above). */
static int register_components(lr_worker_t *w) {
    setup_memory(w);
    uv_timer_init(w->loop, &w->lease_timer);
    uv_timer_init(w->loop, &w->drain_timer);
    w->lease_timer.data = w->drain_timer.data = w;
    if (lr_daemon_add(w->d, "runs", stop_runs, w, 0) != 0 ||
        lr_daemon_add_handle(w->d, "lease timer", (uv_handle_t *)&w->lease_timer) != 0 ||
        lr_daemon_add_handle(w->d, "memory timer", (uv_handle_t *)&w->mem.wake) != 0 ||
        lr_daemon_add_handle(w->d, "drain timer", (uv_handle_t *)&w->drain_timer) != 0 ||
        lr_daemon_add(w->d, "callbacks", abandon_callbacks, w, 0) != 0 ||
        lr_daemon_add(w->d, "mcp", close_mcp, w, 0) != 0 || lr_daemon_add_http(w->d, "http", &w->http) != 0 ||
        lr_daemon_add_pg(w->d, "postgres", &w->pg) != 0 || lr_daemon_add_amqp(w->d, "rabbitmq", &w->amqp, 5000) != 0) {
        lr_error("worker.start", "cannot register the components");
        return 1;
    }
    return 0;
}

/* The worker's id, host and queue names (full names longrun.q.<name>). */
static int setup_identity(lr_worker_t *w, const char *const *queues) {
    size_t off = 0;
    gethostname(w->hostname, sizeof(w->hostname) - 1);
    if (w->cfg.worker_id[0] != '\0') {
        snprintf(w->id, sizeof(w->id), "%s", w->cfg.worker_id);
    } else {
        snprintf(w->id, sizeof(w->id), "%.100s-%d", w->hostname, (int)getpid());
    }
    for (w->nqueues = 0; queues[w->nqueues] != NULL; w->nqueues++) {
    }
    w->queue_names = calloc((size_t)w->nqueues + 1, sizeof(char *));
    w->queue_short = calloc((size_t)w->nqueues + 1, sizeof(char *));
    if (w->queue_names == NULL || w->queue_short == NULL) {
        return 1;
    }
    for (int i = 0; i < w->nqueues; i++) {
        char *full = malloc(strlen(LR_AMQP_QUEUE_PREFIX) + strlen(queues[i]) + 1);
        if (full == NULL) {
            return 1;
        }
        sprintf(full, "%s%s", LR_AMQP_QUEUE_PREFIX, queues[i]);
        w->queue_names[i] = full;
        w->queue_short[i] = queues[i];
        off += (size_t)snprintf(w->queues_csv + off, sizeof(w->queues_csv) - off, "%s%s", i ? "," : "", queues[i]);
    }
    return 0;
}

/* Creates the components and starts the timers.  Returns 0 or the exit
 * code (what failed is logged); whatever was created is closed by the
 * shutdown either way. */
static int start(lr_worker_t *w) {
    const lr_config_t *cfg = &w->cfg;
    lr_pg_opts_t pgo;
    char err[512];

    if (register_components(w) != 0) {
        return 1;
    }
    memset(&pgo, 0, sizeof(pgo));
    pgo.conninfo = cfg->database_url;
    pgo.size = cfg->pg_pool_size;
    pgo.application_name = "longrun-worker";
    pgo.on_state = on_pg_state;
    pgo.state_arg = w;
    if (lr_pg_pool_init(&w->pg, w->loop, &pgo, err, sizeof(err)) != 0) {
        lr_error("worker.config", "LONGRUN_DATABASE_URL: %s", err);
        return 2;
    }
    if (lr_pg_listen(w->pg, "longrun_flags", on_flags_notify, w) != 0 || lr_cancel_listen(w) != 0 ||
        lr_spend_start(w->pg, w->id) != 0) {
        return 1;
    }
    /* the first statement queued: RabbitMQ starts once it passed */
    durability_check(w);
    on_flags_notify("longrun_flags", NULL, w);
    if (lr_callback_configure(getenv("LONGRUN_CALLBACK_ALLOW"), err, sizeof(err)) != 0) {
        lr_error("worker.config", "LONGRUN_CALLBACK_ALLOW: %s", err);
        return 2;
    }
    if (lr_egress_parse(&w->egress, getenv("LONGRUN_EGRESS_ALLOW"), err, sizeof(err)) != 0) {
        lr_error("worker.config", "LONGRUN_EGRESS_ALLOW: %s", err);
        return 2;
    }
    if (lr_payload_log_configure(cfg->log_redact, cfg->log_redact_patterns, err, sizeof(err)) != 0) {
        lr_error("worker.config", "LONGRUN_LOG_REDACT / LONGRUN_LOG_REDACT_PATTERNS: %s", err);
        return 2;
    }
    if (cfg->log_payloads > 0) {
        char what[200];
        lr_payload_log_describe(what, sizeof(what));
        lr_warn("worker.payloads", "logging the payloads of %g%% of agent tasks (LONGRUN_LOG_PAYLOADS), redacting %s",
                cfg->log_payloads * 100, what);
    }
    if (lr_http_init(&w->http, w->loop) != 0) {
        lr_error("worker.http_init", "cannot initialize the HTTP client");
        return 1;
    }
    if (lr_mcp_init(&w->mcp, w->loop, w->http, mcp_egress, w) != 0) {
        lr_error("worker.mcp_init", "cannot initialize the MCP client");
        return 1;
    }
    lr_mcp_start(w->mcp, 10000, mcp_ready, w);
    uv_timer_start(&w->lease_timer, lr_lease_timer_cb, 200, lr_lease_every_ms(w));
    return 0;
}

/* Starts RabbitMQ (declare, consume): after the durability check passed.
 * Returns 0 or 2 (logged). */
static int start_amqp(lr_worker_t *w) {
    const lr_config_t *cfg = &w->cfg;
    lr_amqp_opts_t ao;
    char err[512];

    memset(&ao, 0, sizeof(ao));
    ao.url = cfg->amqp_url;
    ao.consume = w->queue_names;
    ao.declare = w->queue_short;
    ao.prefetch = cfg->max_in_flight;
    ao.delivery_limit = cfg->delivery_limit;
    ao.max_length = cfg->queue_max_length;
    ao.on_delivery = lr_claim_delivery;
    ao.on_state = on_amqp_state;
    ao.arg = w;
    if (lr_amqp_start(&w->amqp, w->loop, &ao, err, sizeof(err)) != 0) {
        lr_error("worker.config", "LONGRUN_AMQP_URL: %s", err);
        return 2;
    }
    return 0;
}

/* Test hooks (LONGRUN_TEST_HOOKS=1): a state version other than the
 * build's, to test rolling deploys. */
static void setup_test_hooks(lr_worker_t *w) {
    const char *v = getenv("LONGRUN_TEST_STATE_VERSION");
    w->test_hooks = getenv("LONGRUN_TEST_HOOKS") != NULL && strcmp(getenv("LONGRUN_TEST_HOOKS"), "1") == 0;
    if (w->test_hooks && v != NULL && lr_state_set_version(atoi(v)) != 0) {
        lr_error("worker.config", "LONGRUN_TEST_STATE_VERSION=%s: not a state version this build knows (1..%d)", v,
                 LR_STATE_VERSION_MAX);
    }
}

static void worker_free(lr_worker_t *w) {
    lr_urlguard_free(w->egress);
    lr_payload_log_free();
    if (w->queue_names != NULL) {
        for (int i = 0; i < w->nqueues; i++) {
            free((void *)w->queue_names[i]);
        }
    }
    free(w->queue_names);
    free(w->queue_short);
    free(w);
}

int lr_worker_run(const lr_config_t *cfg, const char *const *queues) {
    lr_worker_t *w = calloc(1, sizeof(*w));
    uv_loop_t loop;
    lr_daemon_opts_t dopts;
    char err[512];
    int rc;

    if (w == NULL || uv_loop_init(&loop) != 0) {
        free(w);
        return 1;
    }
    w->loop = &loop;
    w->cfg = *cfg;
    lr_list_init(&w->runs);
    lr_list_init(&w->deferred);
    lr_list_init(&w->held);
    w->on_progress = lr_claim_progress;
    w->on_run_freed = lr_drain_maybe_exit;
    w->hand_back = lr_followup_hand_back;
    w->find_executor = find_executor;
    lr_wm_init();
    lr_breakers_configure(cfg->breaker_failures, (long)cfg->breaker_open_seconds * 1000);
    lr_callstats_configure((long)cfg->ready_window_seconds * 1000);
    setup_test_hooks(w);
    if (setup_identity(w, queues) != 0) {
        (void)uv_loop_close(&loop);
        worker_free(w);
        lr_metrics_free();
        return 1;
    }
    lr_log_init("worker", w->id, lr_log_level_parse(cfg->log_level), strcmp(cfg->log_format, "json") == 0);
    memset(&dopts, 0, sizeof(dopts));
    dopts.name = "worker";
    dopts.http_port = cfg->http_port;
    dopts.stall_ms = 10000;
    dopts.on_drain = lr_drain_start;
    dopts.on_tick = on_tick;
    dopts.exit_note = lr_drain_exit_note;
    dopts.arg = w;
    if (lr_daemon_init(&w->d, &loop, &dopts, err, sizeof(err)) != 0) {
        lr_error("worker.config", "%s", err);
        (void)uv_loop_close(&loop);
        worker_free(w);
        lr_metrics_free();
        return 2;
    }
    rc = start(w);
    if (rc == 0) {
        lr_info("worker.started",
                "longrun-worker %s: queues %s, max in flight %d, lease %d s, slice %d steps / %d s, "
                "schema v%d",
                LONGRUN_VERSION, w->queues_csv, cfg->max_in_flight, cfg->lease_seconds, cfg->slice_steps,
                cfg->slice_seconds, lr_schema_version_known());
    } else {
        w->stopping = true;
        lr_daemon_shutdown(w->d); /* close what start() created */
    }
    if (lr_daemon_run(w->d) != 0 && rc == 0) {
        rc = 1;
    }
    if (rc == 0 && w->exit_code != 0) {
        rc = w->exit_code;
    }
    if (rc == 0) {
        lr_info("worker.exit", "exiting: %llu steps, %llu tasks finished by this worker",
                (unsigned long long)w->steps_done, (unsigned long long)w->tasks_finished);
    }
    lr_run_free_all(w);
    lr_spend_free();
    lr_daemon_free(w->d);
    if (uv_loop_close(&loop) != 0) {
        lr_error("worker.exit", "the event loop still has open handles at exit");
    }
    worker_free(w);
    lr_metrics_free();
    return rc;
}
