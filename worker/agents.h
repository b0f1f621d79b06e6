/*
 * agents.h - agent definitions: one JSON file (LONGRUN_AGENTS_FILE),
 * validated at start-up with precise errors (longrun-worker --check-config).
 *
 * Format (docs/agents.md, example in examples/agents.json):
 *   {"models": {"<model>": {"input_per_mtok": $, "output_per_mtok": $,
 *                            "cached_input_per_mtok": $, "context_tokens": N}},
 *    "tools":  {"<name>": {"description": "...", "parameters": {JSON Schema},
 *                          "url": "http://...", "timeout_ms": N, "retries": N,
 *                          "requires_approval": bool, "writes": bool,
 *                          "max_result_bytes": N}},
 *    "agents": [{"name": "...", "system": "...",
 *                "models": [{"provider": "openai"|"anthropic", "base_url": "...",
 *                            "model": "...", "api_key_env": "OPENAI_API_KEY",
 *                            "max_tokens": N, "max_tokens_field": "max_tokens"|
 *                            "max_completion_tokens", "temperature": x,
 *                            "tool_choice": "auto"|..., "parallel_tool_calls": bool,
 *                            "timeout_ms": N, "retries": N, "rpm": N, "tpm": N,
 *                            "max_concurrency": N}],
 *                "tools": ["name", "sleep", ...], "mcp": ["server", ...], "budgets": {...},
 *                "context": {"strategy": "full"|"window"|"summarize", "messages": N,
 *                            "threshold_tokens": N},
 *                "slice": {"steps": N, "seconds": N},
 *                "spend_caps": {"daily_usd": $, "monthly_usd": $}}],
 *    "mcp_servers": {"<name>": {"url": "http://.../mcp", "headers": {"Authorization":
 *                   "Bearer ${VAR}"}, "allow": [...], "deny": [...], "timeout_ms": N,
 *                   "prefix": "<name>_", "max_result_bytes": N}},
 *    "tenants": {"<tenant>": {"spend_caps": {"daily_usd": $, "monthly_usd": $}}}}
 * "${VAR}" in URLs (and in MCP servers' header values) is replaced by the environment variable VAR at load.
 * API keys are never in the file: only the *name* of the variable.
 *
 * The registry is process-global, loaded once before the loop starts, and
 * read-only afterwards (safe to read from any thread).
 */
#ifndef LR_AGENTS_H
#define LR_AGENTS_H

#include <cjson/cJSON.h>
#include <stdbool.h>

#include "err.h"
#include "task.h"

enum lr_provider { LR_PROVIDER_OPENAI = 1, LR_PROVIDER_ANTHROPIC };
enum lr_builtin { LR_TOOL_HTTP = 0, LR_TOOL_SLEEP, LR_TOOL_WAIT_EVENT, LR_TOOL_APPROVAL };
enum lr_context { LR_CONTEXT_FULL = 0, LR_CONTEXT_WINDOW, LR_CONTEXT_SUMMARIZE };

typedef struct lr_model_ref {
    enum lr_provider provider;
    char *base_url; /* without the trailing /chat/completions or /messages */
    char *model;
    char *api_key_env;       /* name of the environment variable, or NULL */
    bool auth_api_key;       /* openai: the key goes in an "api-key" header (Azure OpenAI), not Bearer */
    char *api_version;       /* openai: appended as ?api-version= (Azure OpenAI), or NULL */
    char *max_tokens_field;  /* openai: "max_tokens" or "max_completion_tokens" */
    long max_tokens;         /* 0 = omit (openai); anthropic requires it (default 1024) */
    double temperature;      /* < 0 = omit */
    char *tool_choice;       /* NULL = omit */
    int parallel_tool_calls; /* -1 omit, 0 false, 1 true */
    long timeout_ms;
    int retries;          /* in-process retries of one call (default 2) */
    long rpm, tpm;        /* fleet-wide requests / tokens per minute; 0 = unlimited */
    int max_concurrency;  /* in-process calls in flight; 0 = LONGRUN_MODEL_CONCURRENCY */
    char *endpoint_key;   /* "<provider> <base_url> <model>": breaker and gate key */
    char *endpoint_label; /* "<provider>/<model>": metrics and logs */
    /* from the price table */
    double price_in, price_out, price_cached; /* USD per million tokens */
    long context_tokens;                      /* 0 = unknown */
} lr_model_ref_t;

typedef struct lr_tool_def {
    char *name;
    char *description;
    cJSON *parameters; /* JSON Schema object or NULL */
    char *url;         /* HTTP tools */
    long timeout_ms;
    int retries;
    bool requires_approval;
    bool writes;
    long max_result_bytes;
    enum lr_builtin builtin;
    /* MCP tools (builtin LR_TOOL_HTTP, run through worker/mcp.c): the tool's
     * own name on its server, NULL for an HTTP tool; the server (index of
     * lr_mcp_conf_get); the tool's outputSchema (or NULL). */
    const char *mcp_tool;
    int mcp_server;
    cJSON *output_schema;
} lr_tool_def_t;

/* An MCP server of the agents file ("mcp_servers": {"<name>": {...}}). */
#define LR_MCP_MAX_SERVERS 16
#define LR_MCP_MAX_HEADERS 16
typedef struct lr_mcp_conf {
    const char *name; /* the key in mcp_servers (borrowed from the file's tree) */
    char *url;        /* ${VAR} expanded */
    char **headers;   /* "Name: value", ${VAR} expanded (secrets: never logged), NULL-terminated */
    int nheaders;
    const cJSON *allow; /* array of the server's tool names ("x*": a prefix), or NULL: all */
    const cJSON *deny;  /* array of names never exposed, or NULL */
    long timeout_ms;    /* one tools/call (and each request of the handshake) */
    const char *prefix; /* put before each tool name (default "<name>_") */
    long max_result_bytes;
} lr_mcp_conf_t;

/* A pin rule of the context: a message matching every field given is
 * always sent (with the call or the results it is paired with).  Strings
 * borrowed from the agents file's tree. */
typedef struct lr_pin {
    const char *role;     /* "user", "assistant" or "tool", or NULL */
    const char *contains; /* a substring of the message's text, or NULL */
    const char *tool;     /* a tool's result, or an assistant message calling it, or NULL */
} lr_pin_t;

#define LR_AGENT_MAX_PINS 16

/* Spend caps of an agent or a tenant ("spend_caps" in the agents file): USD
 * per UTC day and per UTC month, enforced fleet-wide (worker/spend.h); < 0:
 * none.  The file's caps are written to PostgreSQL when a worker starts;
 * an operator's (longrun spend set-cap) win over them. */
typedef struct lr_spend_caps {
    double day_usd;
    double month_usd;
} lr_spend_caps_t;

/* A tenant of the agents file's "tenants" section. */
typedef struct lr_tenant_def {
    const char *name; /* borrowed from the file's tree */
    lr_spend_caps_t spend_caps;
} lr_tenant_def_t;

typedef struct lr_agent {
    char *name;
    char *system;
    lr_model_ref_t *models;
    int nmodels;
    const lr_tool_def_t **tools;
    int ntools;
    lr_budgets_t budgets;
    enum lr_context context;
    int context_messages;             /* window: messages kept; summarize: recent messages kept verbatim */
    long summarize_tokens;            /* summarize: estimated tokens that trigger a summary */
    lr_pin_t pins[LR_AGENT_MAX_PINS]; /* window, summarize: messages always sent */
    int npins;
    int slice_steps;   /* 0 = LONGRUN_SLICE_STEPS */
    int slice_seconds; /* 0 = LONGRUN_SLICE_SECONDS */
    /* How long a task may stay parked (suspended, provider_unavailable)
     * while every model of the chain is unavailable, counted from its first
     * park of this outage; beyond it the task is dead-lettered. */
    long max_outage_seconds;
    /* "budget_clock": "wall": max_seconds counts the time since the task
     * first started, waits included; default "active": only its steps. */
    bool budget_wall;
    /* "mcp": the MCP servers whose tools the agent gets (lr_mcp_conf_get
     * indexes); tools[0 .. nstatic_tools) are the file's, the rest the
     * servers' tools as last listed (lr_agents_set_mcp_tools). */
    int mcp[LR_MCP_MAX_SERVERS];
    int nmcp;
    int nstatic_tools;
    lr_spend_caps_t spend_caps;
} lr_agent_t;

#define LR_AGENT_MAX_OUTAGE_DEFAULT (6 * 3600)

/* Loads and validates path (replacing any loaded registry on success).
 * Returns 0, LR_EIO (unreadable), LR_EPARSE (not JSON), LR_ECONFIG (invalid;
 * errbuf names the JSON path, e.g. "agents[0].models[1].provider: ..."). */
int lr_agents_load(const char *path, char *errbuf, size_t errlen) LR_MUSTCHECK;
const lr_agent_t *lr_agents_find(const char *name);
int lr_agents_count(void);
/* The i-th agent of the file (0 <= i < lr_agents_count()), or NULL. */
const lr_agent_t *lr_agents_at(int i);
/* The tenants of the "tenants" section, in the file's order. */
int lr_tenants_count(void);
const lr_tenant_def_t *lr_tenants_at(int i);
void lr_agents_free(void);

/* Kill switches (table flags): the set of disabled "tool:NAME",
 * "model:NAME" and "writes:*" entries.  Replaced as a whole when the worker
 * reloads them (start-up, NOTIFY longrun_flags, reconnect); loop thread only. */
void lr_flags_replace(const char *const *entries, int n);
bool lr_flag_disabled(const char *kind, const char *name);

/* JSON Schema of a built-in tool's parameters. */
const cJSON *lr_builtin_parameters(enum lr_builtin b);

/* The MCP servers of the agents file: how many, and server i. */
int lr_mcp_conf_count(void);
const lr_mcp_conf_t *lr_mcp_conf_get(int i);

/* Makes defs[0 .. n) the tools of MCP server `server` for every agent that
 * lists it (loop thread; the tools are read on the loop thread only).  defs
 * is borrowed: it must stay valid until the next call for this server and
 * after every step that may still refer to it (worker/mcp.c keeps every list
 * it made until it closes).  Returns 0 or LR_ENOMEM (the agents keep their
 * previous tools). */
int lr_agents_set_mcp_tools(int server, const lr_tool_def_t *defs, int n) LR_MUSTCHECK;

/* Is tool `name` of an MCP server exposed by its allow/deny lists? */
bool lr_mcp_conf_exposes(const lr_mcp_conf_t *c, const char *name);

/* Looks up a tool of the agent by name (NULL: unknown or not allowed). */
const lr_tool_def_t *lr_agent_tool(const lr_agent_t *a, const char *name);

#endif
