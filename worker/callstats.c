/*
 * callstats.c - per-endpoint and per-tool call counts over a rolling window;
 * see callstats.h.
 *
 * Each entry keeps a ring of buckets indexed by (time / bucket_ms) modulo
 * the ring size; a bucket remembers which period it counts, so a stale one
 * (from a lap ago) is reset when reused and skipped when read.  Nothing
 * runs on a timer: counts age out by the clock alone.
 */
#include "callstats.h"

#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "log.h"

#define NAME_MAX_LEN 160

typedef struct bucket {
    uint64_t period; /* now_ms / bucket_ms of the counts; 0 = never used */
    long calls;
    long errors;
    long auth;
} bucket_t;

typedef struct entry {
    char name[NAME_MAX_LEN];
    bucket_t ring[LR_CALLSTATS_BUCKETS];
} entry_t;

typedef struct totals {
    long calls;
    long errors;
    long auth;
} totals_t;

static entry_t tables[2][LR_CALLSTATS_MAX];
static int counts[2];
static uint64_t bucket_ms = 60000 / LR_CALLSTATS_WINDOW_BUCKETS;
static bool warned_full;

void lr_callstats_configure(long window_ms) {
    long b = window_ms > 0 ? window_ms / LR_CALLSTATS_WINDOW_BUCKETS : 0;
    bucket_ms = b > 0 ? (uint64_t)b : 1;
    memset(tables, 0, sizeof(tables));
    counts[0] = counts[1] = 0;
}

/* Periods start at 1, so that 0 marks an unused bucket. */
static uint64_t period_of(uint64_t now_ms) { return now_ms / bucket_ms + 1; }

static entry_t *find(enum lr_callstats_kind kind, const char *name, bool create) {
    entry_t *t = tables[kind];
    for (int i = 0; i < counts[kind]; i++) {
        if (strcmp(t[i].name, name) == 0) {
            return &t[i];
        }
    }
    if (!create) {
        return NULL;
    }
    if (counts[kind] == LR_CALLSTATS_MAX || strlen(name) >= NAME_MAX_LEN) {
        if (!warned_full) {
            warned_full = true;
            lr_warn("callstats.table_full", "call statistics table full (%d) or name too long: %s is not counted",
                    LR_CALLSTATS_MAX, name);
        }
        return NULL;
    }
    snprintf(t[counts[kind]].name, NAME_MAX_LEN, "%s", name);
    return &t[counts[kind]++];
}

void lr_callstats_add(enum lr_callstats_kind kind, const char *name, long status, uint64_t now_ms) {
    entry_t *e = find(kind, name != NULL ? name : "", true);
    uint64_t p = period_of(now_ms);
    bucket_t *b;
    if (e == NULL) {
        return;
    }
    b = &e->ring[p % LR_CALLSTATS_BUCKETS];
    if (b->period != p) {
        memset(b, 0, sizeof(*b));
        b->period = p;
    }
    b->calls++;
    if (status < 200 || status > 299) {
        b->errors++;
    }
    if (status == 401 || status == 403) {
        b->auth++;
    }
}

/* The counts of e over the last nbuckets buckets up to now. */
static totals_t sum(const entry_t *e, uint64_t now_ms, int nbuckets) {
    totals_t t = {0, 0, 0};
    uint64_t p = period_of(now_ms);
    for (int i = 0; i < nbuckets && (uint64_t)i < p; i++) {
        const bucket_t *b = &e->ring[(p - (uint64_t)i) % LR_CALLSTATS_BUCKETS];
        if (b->period == p - (uint64_t)i) {
            t.calls += b->calls;
            t.errors += b->errors;
            t.auth += b->auth;
        }
    }
    return t;
}

bool lr_callstats_auth_storm(uint64_t now_ms, long min_calls, char *why, size_t len) {
    long total = 0;
    int called = 0;
    size_t off;
    const char *sep = " ";
    for (int i = 0; i < counts[LR_CALLSTATS_MODEL]; i++) {
        totals_t t = sum(&tables[LR_CALLSTATS_MODEL][i], now_ms, LR_CALLSTATS_WINDOW_BUCKETS);
        if (t.calls == 0) {
            continue;
        }
        if (t.auth < t.calls) {
            return false; /* an endpoint answered something else: the pod can work */
        }
        called++;
        total += t.calls;
    }
    if (called == 0 || total < min_calls) {
        return false;
    }
    off = (size_t)snprintf(why, len, "model API key rejected:");
    for (int i = 0; i < counts[LR_CALLSTATS_MODEL] && off < len; i++) {
        const entry_t *e = &tables[LR_CALLSTATS_MODEL][i];
        totals_t t = sum(e, now_ms, LR_CALLSTATS_WINDOW_BUCKETS);
        if (t.calls > 0) {
            off += (size_t)snprintf(why + off, len - off, "%s%s %ld/%ld calls 401/403", sep, e->name, t.auth, t.calls);
            sep = ", ";
        }
    }
    return true;
}

static void add_totals(cJSON *o, const char *key, totals_t t) {
    cJSON *w = cJSON_AddObjectToObject(o, key);
    cJSON_AddNumberToObject(w, "calls", (double)t.calls);
    cJSON_AddNumberToObject(w, "errors", (double)t.errors);
    cJSON_AddNumberToObject(w, "auth_failures", (double)t.auth);
    cJSON_AddNumberToObject(w, "error_rate", t.calls > 0 ? (double)t.errors / (double)t.calls : 0.0);
}

cJSON *lr_callstats_cjson(enum lr_callstats_kind kind, uint64_t now_ms) {
    cJSON *arr = cJSON_CreateArray();
    for (int i = 0; i < counts[kind] && arr != NULL; i++) {
        const entry_t *e = &tables[kind][i];
        totals_t all = sum(e, now_ms, LR_CALLSTATS_BUCKETS);
        cJSON *o;
        if (all.calls == 0) {
            continue;
        }
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", e->name);
        add_totals(o, "last_window", sum(e, now_ms, LR_CALLSTATS_WINDOW_BUCKETS));
        add_totals(o, "last_5_windows", all);
        cJSON_AddItemToArray(arr, o);
    }
    return arr;
}
