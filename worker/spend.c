/*
 * spend.c - the spend ledger's store (migration 0011): typed reservation
 * and settlement for the agent executor's spend caps, the agents file's
 * caps written at start, and the cache of capped scopes; see spend.h.
 *
 * Design.  Each statement formats its named arguments as text parameters
 * of one statement of sql.h and is queued on the worker's pool in
 * autocommit (lr_pg_query).  The reservation is one call of the SQL
 * function lr_spend_reserve, the settlement one of lr_spend_settle
 * (idempotent, so it is sent again after a connection loss).  Requests
 * carry a small heap context that the pool callback frees.  The cache is
 * a sorted array of "agent:<name>" / "tenant:<name>" replaced as a whole
 * by each load; loads are coalesced (a notification during a load makes
 * one more).  Nothing of libpq reaches the callers.  Loop thread only.
 */
#include "spend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "agents.h"
#include "log.h"
#include "sql.h"

/* How long a statement may wait for a connection (ms): 0 for the
 * settlement (it waits out a reconnect). */
#define SPEND_QUERY_TIMEOUT_MS 10000
#define SPEND_SETTLE_TRIES 3
/* More capped scopes than this and the cache stops distinguishing them:
 * every call of every task reserves (still correct, one round trip more). */
#define SPEND_CACHE_MAX 100000

typedef struct reserve_req {
    lr_spend_cb cb;
    void *arg;
} reserve_req_t;

static double get_num(const PGresult *res, int col) {
    const char *v = lr_pg_get(res, 0, col);
    return v != NULL ? strtod(v, NULL) : 0;
}

static void reserve_cb(int err, const PGresult *res, void *arg) {
    reserve_req_t *rq = arg;
    lr_spend_result_t r = {0};
    const char *granted = err == 0 ? lr_pg_get(res, 0, 0) : NULL;
    if (err == 0 && granted == NULL) {
        err = LR_EDB; /* no row: not what lr_spend_reserve answers */
    }
    if (err != 0) {
        r.err = err;
        r.errmsg = res != NULL && PQresultErrorMessage(res)[0] != '\0' ? PQresultErrorMessage(res) : lr_strerror(err);
    } else if (strcmp(granted, "t") == 0) {
        const char *id = lr_pg_get(res, 0, 1);
        r.granted = true;
        r.id = id != NULL ? strtoll(id, NULL, 10) : 0;
    } else {
        const char *w = lr_pg_get(res, 0, 9), *inf = lr_pg_get(res, 0, 10);
        r.scope = lr_pg_get(res, 0, 2);
        r.name = lr_pg_get(res, 0, 3);
        r.period = lr_pg_get(res, 0, 4);
        r.cap_usd = get_num(res, 5);
        r.spent_usd = get_num(res, 6);
        r.reserved_usd = get_num(res, 7);
        r.resets_at = lr_pg_get(res, 0, 8);
        r.in_flight = inf != NULL && strcmp(inf, "t") == 0;
        r.wait_ms = w != NULL ? strtol(w, NULL, 10) : 1;
        if (r.wait_ms < 1) {
            r.wait_ms = 1;
        }
        if (r.scope == NULL || r.name == NULL || r.period == NULL || r.resets_at == NULL) {
            r.err = LR_EDB;
            r.errmsg = "a refusal without its cap";
        }
    }
    rq->cb(&r, rq->arg);
    free(rq);
}

int lr_spend_reserve(lr_pg_pool_t *pg, const lr_spend_reserve_t *a, lr_spend_cb cb, void *arg) {
    char amount[40], ttl[24];
    reserve_req_t *rq;
    int rc;
    if (a->agent == NULL || a->agent[0] == '\0') {
        return LR_EINVAL;
    }
    rq = malloc(sizeof(*rq));
    if (rq == NULL) {
        return LR_ENOMEM;
    }
    rq->cb = cb;
    rq->arg = arg;
    snprintf(amount, sizeof(amount), "%.12f", a->amount_usd > 0 ? a->amount_usd : 0.0);
    snprintf(ttl, sizeof(ttl), "%ld", a->ttl_seconds > 0 ? a->ttl_seconds : 1L);
    rc = lr_pg_query(pg, SQL_SPEND_RESERVE, 4, (const char *const[]){a->agent, a->tenant, amount, ttl},
                     SPEND_QUERY_TIMEOUT_MS, reserve_cb, rq);
    if (rc != 0) {
        free(rq);
    }
    return rc;
}

/* ------------------------------------------------------------ settlement */

typedef struct settle_req {
    lr_pg_pool_t *pg;
    long long id;
    char amount[40];
    int tries;
} settle_req_t;

static int settle_send(settle_req_t *s);

static void settle_cb(int err, const PGresult *res, void *arg) {
    settle_req_t *s = arg;
    (void)res;
    if (err == LR_ECONN && s->tries < SPEND_SETTLE_TRIES && settle_send(s) == 0) {
        return; /* the answer was lost: the statement is idempotent, send it again */
    }
    if (err != 0) {
        lr_warn("spend.settle_failed",
                "cannot settle spend reservation %lld (%s USD): %s; it counts until it expires, and the ledger "
                "misses this cost",
                s->id, s->amount,
                res != NULL && PQresultErrorMessage(res)[0] != '\0' ? PQresultErrorMessage(res) : lr_strerror(err));
    }
    free(s);
}

static int settle_send(settle_req_t *s) {
    char id[24];
    snprintf(id, sizeof(id), "%lld", s->id);
    s->tries++;
    return lr_pg_query(s->pg, SQL_SPEND_SETTLE, 2, (const char *const[]){id, s->amount}, 0, settle_cb, s);
}

int lr_spend_settle(lr_pg_pool_t *pg, long long id, double actual_usd) {
    settle_req_t *s;
    int rc;
    if (id <= 0) {
        return 0;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        return LR_ENOMEM;
    }
    s->pg = pg;
    s->id = id;
    snprintf(s->amount, sizeof(s->amount), "%.12f", actual_usd > 0 ? actual_usd : 0.0);
    rc = settle_send(s);
    if (rc != 0) {
        free(s);
    }
    return rc;
}

/* ----------------------------------------------------------------- cache */

static struct {
    lr_pg_pool_t *pg;
    char *worker;
    char **scopes; /* sorted "agent:<name>" / "tenant:<name>" */
    int n;
    bool loaded;      /* a load succeeded (and the set fits SPEND_CACHE_MAX) */
    bool loading;     /* a load is in flight */
    bool again;       /* a notification arrived during it */
    bool file_synced; /* the agents file's caps are written */
    bool file_pending;
} cache;

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void cache_clear(void) {
    for (int i = 0; i < cache.n; i++) {
        free(cache.scopes[i]);
    }
    free(cache.scopes);
    cache.scopes = NULL;
    cache.n = 0;
}

static void cache_load(void);

static void caps_cb(int err, const PGresult *res, void *arg) {
    int n;
    (void)arg;
    cache.loading = false;
    if (err == LR_ESHUTDOWN) {
        return;
    }
    if (err != 0) {
        /* the previous set stays (or "everything capped" before the first) */
        lr_warn("spend.caps_load_failed", "cannot read which agents and tenants have spend caps: %s",
                res != NULL && PQresultErrorMessage(res)[0] != '\0' ? PQresultErrorMessage(res) : lr_strerror(err));
    } else if ((n = PQntuples(res)) > SPEND_CACHE_MAX) {
        cache_clear();
        cache.loaded = false;
        lr_warn("spend.caps_loaded", "%d capped scopes, over %d: every model call reserves", n, SPEND_CACHE_MAX);
    } else {
        char **s = calloc((size_t)n + 1, sizeof(char *));
        int k = 0;
        for (int i = 0; s != NULL && i < n; i++) {
            const char *v = lr_pg_get(res, i, 0);
            if (v != NULL && (s[k] = strdup(v)) != NULL) {
                k++;
            }
        }
        if (s == NULL || k != n) {
            for (int i = 0; s != NULL && i < k; i++) {
                free(s[i]);
            }
            free(s);
            lr_warn("spend.caps_load_failed", "out of memory loading the spend caps");
        } else {
            qsort(s, (size_t)k, sizeof(char *), cmp_str);
            cache_clear();
            cache.scopes = s;
            cache.n = k;
            cache.loaded = true;
            lr_info("spend.caps_loaded", "%d agent(s) and tenant(s) with spend caps", k);
        }
    }
    if (cache.again) {
        cache.again = false;
        cache_load();
    }
}

static void cache_load(void) {
    if (cache.loading) {
        cache.again = true;
        return;
    }
    if (lr_pg_query(cache.pg, SQL_SPEND_CAPS, 0, NULL, SPEND_QUERY_TIMEOUT_MS, caps_cb, NULL) != 0) {
        lr_warn("spend.caps_load_failed", "cannot queue the spend caps' reload");
        return;
    }
    cache.loading = true;
}

/* One entry of the file's caps: {"scope", "name", "day", "month"}. */
static void file_entry(cJSON *arr, const char *scope, const char *name, const lr_spend_caps_t *c) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "scope", scope);
    cJSON_AddStringToObject(o, "name", name);
    cJSON_AddItemToObject(o, "day", c->day_usd >= 0 ? cJSON_CreateNumber(c->day_usd) : cJSON_CreateNull());
    cJSON_AddItemToObject(o, "month", c->month_usd >= 0 ? cJSON_CreateNumber(c->month_usd) : cJSON_CreateNull());
    cJSON_AddItemToArray(arr, o);
}

static int cmp_agent(const void *a, const void *b) {
    return strcmp((*(const lr_agent_t *const *)a)->name, (*(const lr_agent_t *const *)b)->name);
}

static int cmp_tenant(const void *a, const void *b) {
    return strcmp((*(const lr_tenant_def_t *const *)a)->name, (*(const lr_tenant_def_t *const *)b)->name);
}

/* The agents file's caps as lr_spend_file_caps takes them, in (scope,
 * name) order (workers starting together lock the rows in one order).
 * NULL: out of memory. */
static char *file_caps_json(void) {
    int na = lr_agents_count(), nt = lr_tenants_count();
    const lr_agent_t **ag = calloc((size_t)na + 1, sizeof(*ag));
    const lr_tenant_def_t **tn = calloc((size_t)nt + 1, sizeof(*tn));
    cJSON *arr = cJSON_CreateArray();
    char *out = NULL;
    if (ag == NULL || tn == NULL || arr == NULL) {
        goto out;
    }
    for (int i = 0; i < na; i++) {
        ag[i] = lr_agents_at(i);
    }
    for (int i = 0; i < nt; i++) {
        tn[i] = lr_tenants_at(i);
    }
    qsort(ag, (size_t)na, sizeof(*ag), cmp_agent);
    qsort(tn, (size_t)nt, sizeof(*tn), cmp_tenant);
    for (int i = 0; i < na; i++) {
        file_entry(arr, "agent", ag[i]->name, &ag[i]->spend_caps);
    }
    for (int i = 0; i < nt; i++) {
        file_entry(arr, "tenant", tn[i]->name, &tn[i]->spend_caps);
    }
    out = cJSON_PrintUnformatted(arr);
out:
    cJSON_Delete(arr);
    free(ag);
    free(tn);
    return out;
}

static void file_caps_cb(int err, const PGresult *res, void *arg) {
    const char *n = err == 0 ? lr_pg_get(res, 0, 0) : NULL;
    (void)arg;
    cache.file_pending = false;
    if (err == LR_ESHUTDOWN) {
        return;
    }
    if (err != 0) {
        lr_warn("spend.file_caps_failed",
                "cannot write the agents file's spend caps (tried again at the next reload): %s",
                res != NULL && PQresultErrorMessage(res)[0] != '\0' ? PQresultErrorMessage(res) : lr_strerror(err));
        return;
    }
    cache.file_synced = true;
    lr_info("spend.file_caps", "the agents file's spend caps are written: %s changed", n != NULL ? n : "0");
    cache_load(); /* (a change also notifies longrun_spend) */
}

static void file_caps_sync(void) {
    char *json;
    if (cache.file_synced || cache.file_pending) {
        return;
    }
    json = file_caps_json();
    if (json == NULL) {
        lr_warn("spend.file_caps_failed", "out of memory building the agents file's spend caps");
        return;
    }
    if (lr_pg_query(cache.pg, SQL_SPEND_FILE_CAPS, 2, (const char *const[]){json, cache.worker}, SPEND_QUERY_TIMEOUT_MS,
                    file_caps_cb, NULL) == 0) {
        cache.file_pending = true;
    } else {
        lr_warn("spend.file_caps_failed", "cannot queue the agents file's spend caps");
    }
    free(json);
}

/* NOTIFY longrun_spend, every reconnect (payload NULL), the first LISTEN. */
static void on_spend_notify(const char *channel, const char *payload, void *arg) {
    (void)channel;
    (void)payload;
    (void)arg;
    file_caps_sync();
    cache_load();
}

int lr_spend_start(lr_pg_pool_t *pg, const char *worker) {
    int rc;
    cache.pg = pg;
    free(cache.worker);
    cache.worker = strdup(worker != NULL ? worker : "worker");
    if (cache.worker == NULL) {
        return LR_ENOMEM;
    }
    rc = lr_pg_listen(pg, "longrun_spend", on_spend_notify, NULL);
    if (rc == 0) {
        on_spend_notify("longrun_spend", NULL, NULL); /* at once: the LISTEN's own reload comes later */
    }
    return rc;
}

void lr_spend_tick(void) {
    if (cache.pg != NULL && (!cache.loaded || !cache.file_synced)) {
        on_spend_notify("longrun_spend", NULL, NULL);
    }
}

bool lr_spend_capped(const char *agent, const char *tenant) {
    char key[100];
    const char *k = key;
    if (!cache.loaded) {
        return true;
    }
    snprintf(key, sizeof(key), "agent:%s", agent);
    if (bsearch(&k, cache.scopes, (size_t)cache.n, sizeof(char *), cmp_str) != NULL) {
        return true;
    }
    if (tenant == NULL) {
        return false;
    }
    snprintf(key, sizeof(key), "tenant:%s", tenant);
    return bsearch(&k, cache.scopes, (size_t)cache.n, sizeof(char *), cmp_str) != NULL;
}

void lr_spend_free(void) {
    cache_clear();
    free(cache.worker);
    memset(&cache, 0, sizeof(cache));
}
