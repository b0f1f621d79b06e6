/* wmetrics.c - registration of the worker's metric families. */
#include "wmetrics.h"

lr_wm_t lr_wm;

#define NB(a) ((int)(sizeof(a) / sizeof((a)[0])))

void lr_wm_init(void) {
    static const double ckpt[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5};
    /* a step: a model call and its tools, which may take hours */
    static const double step[] = {0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400};
    /* waits in the queue and whole tasks (sleeps and approvals included): up to a week */
    static const double longs[] = {0.1, 0.5,  1,    2.5,  5,     10,    30,    60,     120,   300,
                                   600, 1800, 3600, 7200, 21600, 43200, 86400, 259200, 604800};
    lr_wm.tasks_started = lr_metric_counter("longrun_tasks_started_total", "Tasks claimed by this worker.", NULL);
    lr_wm.tasks_finished = lr_metric_counter("longrun_tasks_finished_total",
                                             "Tasks that reached a final state here, by agent and outcome.",
                                             "agent,outcome");
    lr_wm.steps = lr_metric_counter("longrun_steps_total", "Steps checkpointed, by agent.", "agent");
    lr_wm.step_seconds = lr_metric_histogram("longrun_step_duration_seconds",
                                             "Wall time of one step (model and tools), by agent.", "agent", step,
                                             NB(step));
    lr_wm.queue_wait_seconds =
        lr_metric_histogram("longrun_queue_wait_seconds",
                            "Time from a task's creation (enqueue) to its first claim, by queue and agent.",
                            "queue,agent", longs, NB(longs));
    lr_wm.task_seconds = lr_metric_histogram(
        "longrun_task_duration_seconds",
        "Time from a task's creation (enqueue) to its final state, waits included, by agent and outcome.",
        "agent,outcome", longs, NB(longs));
    lr_wm.checkpoint_seconds = lr_metric_histogram("longrun_checkpoint_duration_seconds",
                                                   "Time from sending a checkpoint to its commit.", NULL, ckpt,
                                                   NB(ckpt));
    lr_wm.in_flight = lr_metric_gauge("longrun_in_flight", "Tasks in flight in this worker.", NULL);
    lr_wm.dead_letters = lr_metric_counter("longrun_dead_letters_total", "Dead letters recorded, by reason.", "reason");
    lr_wm.retries =
        lr_metric_counter("longrun_retries_total", "Tasks parked in retry_wait after a transient failure.", NULL);
    lr_wm.suspensions = lr_metric_counter("longrun_suspensions_total", "Tasks suspended, by reason.", "reason");
    lr_wm.lease_renewals = lr_metric_counter("longrun_lease_renewals_total", "Leases renewed.", NULL);
    lr_wm.fencing_rejections = lr_metric_counter("longrun_fencing_rejections_total",
                                                 "Writes rejected because a newer owner holds the task.", NULL);
    lr_wm.model_requests = lr_metric_counter("longrun_model_requests_total",
                                             "Model requests by provider, model and HTTP status (0: no response).",
                                             "provider,model,status");
    lr_wm.model_seconds = lr_metric_histogram("longrun_model_request_duration_seconds", "Model request latency.",
                                              "provider", lr_latency_buckets, lr_latency_nbuckets);
    lr_wm.tokens = lr_metric_counter("longrun_tokens_total",
                                     "Tokens by agent, model and direction (input, output, cached).",
                                     "agent,model,direction");
    lr_wm.cost = lr_metric_counter("longrun_cost_usd_total", "Cost in US dollars by agent and model.", "agent,model");
    lr_wm.tool_calls = lr_metric_counter("longrun_tool_calls_total", "Tool calls by tool and outcome.", "tool,outcome");
    lr_wm.tool_seconds = lr_metric_histogram("longrun_tool_duration_seconds", "Tool call latency.", "tool",
                                             lr_latency_buckets, lr_latency_nbuckets);
    lr_wm.circuit_state =
        lr_metric_gauge("longrun_circuit_state",
                        "Circuit breaker per model endpoint and per tool: 0 closed, 1 half-open, 2 open.", "endpoint");
    lr_wm.rate_limit_waits = lr_metric_counter(
        "longrun_rate_limit_waits_total",
        "Rate-limit answers (a 429, or a fleet-wide reservation refused) that made a call wait or suspend.", "model");
    lr_wm.model_fallbacks = lr_metric_counter(
        "longrun_model_fallbacks_total",
        "Model calls of a step that did not answer it, by model, failure reason and what followed (retry, give_up, "
        "next_model, suspend, stop).",
        "model,reason,action");
    lr_wm.provider_parks = lr_metric_counter(
        "longrun_provider_parks_total",
        "Steps that ended with every model's circuit open: the task parked (provider_unavailable) or, past "
        "max_outage_seconds, dead-lettered.",
        "agent");
    lr_wm.gate_waiting = lr_metric_gauge("longrun_model_gate_waiting",
                                         "Model calls waiting for the in-process concurrency gate.", "endpoint");
    lr_wm.payloads_logged = lr_metric_counter("longrun_payloads_logged_total",
                                              "Payloads written to the log (LONGRUN_LOG_PAYLOADS sampling).", NULL);
    lr_wm.payloads_redacted =
        lr_metric_counter("longrun_payloads_redacted_total",
                          "Matches replaced by [redacted:<class>] in logged payloads (LONGRUN_LOG_REDACT), by class.",
                          "class");
    lr_wm.ready = lr_metric_gauge("longrun_ready", "1 when this process is ready (readiness probe).", NULL);
    lr_wm.amqp_connected = lr_metric_gauge("longrun_amqp_connected", "1 while connected to RabbitMQ.", NULL);
    lr_wm.pg_connections = lr_metric_gauge("longrun_pg_connections", "Usable PostgreSQL connections.", NULL);
    lr_wm.callbacks_refused = lr_metric_counter("longrun_callbacks_refused_total",
                                                "callback_url deliveries refused by LONGRUN_CALLBACK_ALLOW or the "
                                                "connect-time address check, by reason.",
                                                "reason");
    lr_wm.egress_refused = lr_metric_counter("longrun_egress_refused_total",
                                             "Model and tool connections refused by the connect-time address "
                                             "check (LONGRUN_EGRESS_ALLOW), by reason.",
                                             "reason");
    lr_wm.memory_budget = lr_metric_gauge("longrun_memory_budget_bytes",
                                          "The worker's memory budget (LONGRUN_MEMORY_BUDGET_MB); 0: none.", NULL);
    lr_wm.memory_charged = lr_metric_gauge("longrun_memory_charged_bytes",
                                           "Bytes charged to the memory budget: conversations and model responses.",
                                           NULL);
    lr_wm.memory_charged_peak = lr_metric_gauge("longrun_memory_charged_peak_bytes",
                                                "The highest charge to the memory budget since the start.", NULL);
    lr_wm.memory_holds = lr_metric_counter("longrun_memory_holds_total",
                                           "Deliveries held unclaimed because the memory budget was reached.", NULL);
    lr_wm.memory_waits = lr_metric_counter(
        "longrun_memory_waits_total",
        "Model calls that waited for room in the memory budget (to start, or to read more of their answer).", NULL);
    lr_wm.memory_held =
        lr_metric_gauge("longrun_memory_held", "Deliveries held unclaimed now (memory budget reached).", NULL);
    lr_wm.events_published = lr_metric_counter("longrun_events_published_total",
                                               "Task events confirmed by the longrun.events stream, by type.", "type");
    lr_wm.events_dropped = lr_metric_counter("longrun_events_dropped_total",
                                             "Task events not published to longrun.events (the checkpoint still "
                                             "holds what they report), by reason.",
                                             "reason");
    lr_wm.spend_suspensions = lr_metric_counter(
        "longrun_spend_cap_suspensions_total",
        "Tasks suspended (spend_cap) because a model call could exceed a spend cap, by the cap that bound.",
        "scope,name,period");
}
