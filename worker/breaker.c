/* breaker.c - circuit breakers and concurrency gates; see breaker.h. */
#include "breaker.h"

#include <stdio.h>
#include <stdlib.h>

#include <cjson/cJSON.h>
#include <string.h>

#include "log.h"
#include "wmetrics.h"

#define KEY_MAX 320
#define LABEL_MAX 160

struct lr_breaker {
    char key[KEY_MAX];
    char label[LABEL_MAX];
    enum lr_cb_state state;
    int failures;
    uint64_t open_until;
    bool not_outage;     /* a failure since the last success was not the endpoint being unavailable */
    uint64_t cool_until; /* a rate limit asked to wait until then (lr_breaker_cool) */
};

static lr_breaker_t breakers[LR_BREAKERS_MAX];
static int nbreakers;
static int cb_failures = 5;
static long cb_open_ms = 30000;
static bool warned_full;

void lr_breakers_configure(int failures, long open_ms) {
    cb_failures = failures > 0 ? failures : 5;
    cb_open_ms = open_ms > 0 ? open_ms : 30000;
}

static void gauge(const lr_breaker_t *b) {
    const char *v[1] = {b->label};
    lr_metric_set(lr_wm.circuit_state, v, (double)b->state);
}

lr_breaker_t *lr_breaker_get(const char *key, const char *label) {
    for (int i = 0; i < nbreakers; i++) {
        if (strcmp(breakers[i].key, key) == 0) {
            return &breakers[i];
        }
    }
    if (nbreakers == LR_BREAKERS_MAX || strlen(key) >= KEY_MAX) {
        if (!warned_full) {
            warned_full = true;
            lr_warn("circuit.table_full", "circuit breaker table full (%d) or key too long: %s is not protected",
                    LR_BREAKERS_MAX, label);
        }
        return NULL;
    }
    lr_breaker_t *b = &breakers[nbreakers++];
    snprintf(b->key, sizeof(b->key), "%s", key);
    snprintf(b->label, sizeof(b->label), "%s", label);
    b->state = LR_CB_CLOSED;
    gauge(b);
    return b;
}

bool lr_breaker_allows(lr_breaker_t *b, uint64_t now_ms) {
    if (b == NULL || b->state == LR_CB_CLOSED) {
        return true;
    }
    if (b->state == LR_CB_OPEN && now_ms >= b->open_until) {
        b->state = LR_CB_HALF_OPEN;
        gauge(b);
        lr_info("circuit.half_open", "circuit for %s half-open: allowing one trial call", b->label);
        return true;
    }
    return false;
}

bool lr_breaker_outage(const lr_breaker_t *b) { return b != NULL && b->state != LR_CB_CLOSED && !b->not_outage; }

void lr_breaker_not_outage(lr_breaker_t *b) {
    if (b != NULL) {
        b->not_outage = true;
    }
}

void lr_breaker_result(lr_breaker_t *b, bool ok, uint64_t now_ms) {
    if (b == NULL) {
        return;
    }
    if (ok) {
        if (b->state != LR_CB_CLOSED) {
            lr_info("circuit.closed", "circuit for %s closed again", b->label);
        }
        b->state = LR_CB_CLOSED;
        b->failures = 0;
        b->not_outage = false;
        gauge(b);
        return;
    }
    b->failures++;
    if (b->state == LR_CB_HALF_OPEN || b->failures >= cb_failures) {
        if (b->state != LR_CB_OPEN) {
            lr_warn("circuit.open", "circuit for %s opened after %d failures; refusing calls for %ld s", b->label,
                    b->failures, cb_open_ms / 1000);
        }
        b->state = LR_CB_OPEN;
        b->open_until = now_ms + (uint64_t)cb_open_ms;
        gauge(b);
    }
}

void lr_breaker_abandon(lr_breaker_t *b, uint64_t now_ms) {
    if (b != NULL && b->state == LR_CB_HALF_OPEN) {
        b->state = LR_CB_OPEN;
        b->open_until = now_ms;
        gauge(b);
    }
}

void lr_breaker_cool(lr_breaker_t *b, uint64_t until_ms) {
    if (b != NULL && until_ms > b->cool_until) {
        b->cool_until = until_ms;
    }
}

long lr_breaker_cooling(const lr_breaker_t *b, uint64_t now_ms) {
    return b != NULL && b->cool_until > now_ms ? (long)(b->cool_until - now_ms) : 0;
}

cJSON *lr_breakers_cjson(void) {
    cJSON *arr = cJSON_CreateArray();
    for (int i = 0; i < nbreakers && arr != NULL; i++) {
        const lr_breaker_t *b = &breakers[i];
        cJSON *o;
        if (b->state == LR_CB_CLOSED) {
            continue;
        }
        o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", b->label);
        cJSON_AddStringToObject(o, "state", b->state == LR_CB_OPEN ? "open" : "half_open");
        cJSON_AddNumberToObject(o, "failures", b->failures);
        cJSON_AddItemToArray(arr, o);
    }
    return arr;
}

int lr_breakers_models_open(uint64_t now_ms, int *nmodels) {
    int n = 0, open = 0;
    for (int i = 0; i < nbreakers; i++) {
        const lr_breaker_t *b = &breakers[i];
        if (strncmp(b->key, "model:", 6) != 0) {
            continue;
        }
        n++;
        if (b->state == LR_CB_OPEN && now_ms < b->open_until) {
            open++;
        }
    }
    *nmodels = n;
    return open;
}

/* ------------------------------------------------------ concurrency gate */

struct lr_gate {
    char key[KEY_MAX];
    char label[LABEL_MAX];
    int limit;
    int in_flight;
    int waiting;
    lr_list_t waiters; /* lr_gate_waiter_t.link, oldest first */
};

static lr_gate_t gates[LR_BREAKERS_MAX];
static int ngates;

lr_gate_t *lr_gate_get(const char *key, const char *label, int limit) {
    if (limit <= 0) {
        return NULL;
    }
    for (int i = 0; i < ngates; i++) {
        if (strcmp(gates[i].key, key) == 0) {
            gates[i].limit = limit;
            return &gates[i];
        }
    }
    if (ngates == LR_BREAKERS_MAX || strlen(key) >= KEY_MAX) {
        return NULL;
    }
    lr_gate_t *g = &gates[ngates++];
    snprintf(g->key, sizeof(g->key), "%s", key);
    snprintf(g->label, sizeof(g->label), "%s", label);
    g->limit = limit;
    lr_list_init(&g->waiters);
    return g;
}

static void gate_gauge(const lr_gate_t *g) {
    const char *v[1] = {g->label};
    lr_metric_set(lr_wm.gate_waiting, v, (double)g->waiting);
}

bool lr_gate_acquire(lr_gate_t *g, lr_gate_waiter_t *wt, uint64_t now_ms) {
    if (g == NULL) {
        return true;
    }
    if (g->in_flight < g->limit && lr_list_empty(&g->waiters)) {
        g->in_flight++;
        return true;
    }
    wt->gate = g;
    wt->since_ms = now_ms;
    lr_list_push_back(&g->waiters, &wt->link);
    g->waiting++;
    gate_gauge(g);
    return false;
}

static void unlink_waiter(lr_gate_waiter_t *wt) {
    lr_gate_t *g = wt->gate;
    lr_list_remove(&wt->link);
    wt->gate = NULL;
    g->waiting--;
    gate_gauge(g);
}

void lr_gate_release(lr_gate_t *g) {
    lr_gate_waiter_t *wt;
    if (g == NULL) {
        return;
    }
    if (g->in_flight > 0) {
        g->in_flight--;
    }
    while (!lr_list_empty(&g->waiters) && g->in_flight < g->limit) {
        wt = lr_list_entry(lr_list_first(&g->waiters), lr_gate_waiter_t, link);
        unlink_waiter(wt);
        g->in_flight++;
        wt->ready(wt);
    }
}

void lr_gate_forget(lr_gate_waiter_t *wt) {
    if (wt != NULL && wt->gate != NULL) {
        unlink_waiter(wt);
    }
}
