/*
 * spendgauge.c - the spend caps' gauges; see spendgauge.h.
 *
 * The series set is the caps of the last read: a cap cleared since is
 * removed (lr_metric_remove) rather than left at its last values, so that
 * an alert on it stops.  The set is at most LR_METRIC_MAX_SERIES caps (the
 * registry's bound; more go to "other").
 */
#include "spendgauge.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"

static lr_metric_t *m_cap, *m_spent, *m_reserved;

/* The label values of the series set last time ("scope", "name", "period"). */
static char *(*shown)[3];
static int nshown;

void lr_spend_gauges_init(void) {
    m_cap = lr_metric_gauge("longrun_spend_cap_usd", "A spend cap in USD, per agent or tenant and UTC day or month.",
                            "scope,name,period");
    m_spent = lr_metric_gauge("longrun_spend_usd",
                              "What the cap's scope spent in its current period, as settled in the spend ledger (USD).",
                              "scope,name,period");
    m_reserved = lr_metric_gauge("longrun_spend_reserved_usd",
                                 "Worst-case cost reserved by the model calls in flight of the cap's scope (USD).",
                                 "scope,name,period");
}

static void forget(int i) {
    const char *v[3] = {shown[i][0], shown[i][1], shown[i][2]};
    lr_metric_remove(m_cap, v);
    lr_metric_remove(m_spent, v);
    lr_metric_remove(m_reserved, v);
}

static void shown_free(char *(*s)[3], int n) {
    for (int i = 0; i < n; i++) {
        free(s[i][0]);
        free(s[i][1]);
        free(s[i][2]);
    }
    free(s);
}

void lr_spend_gauges_update(const PGresult *res) {
    int n = res != NULL ? PQntuples(res) : 0;
    char *(*now)[3] = n > 0 ? calloc((size_t)n, sizeof(*now)) : NULL;
    int k = 0;
    if (n > 0 && now == NULL) {
        return; /* out of memory: the gauges stay as they were */
    }
    for (int i = 0; i < n; i++) {
        const char *v[3] = {PQgetvalue(res, i, 0), PQgetvalue(res, i, 1), PQgetvalue(res, i, 2)};
        lr_metric_set(m_cap, v, strtod(PQgetvalue(res, i, 3), NULL));
        lr_metric_set(m_spent, v, strtod(PQgetvalue(res, i, 4), NULL));
        lr_metric_set(m_reserved, v, strtod(PQgetvalue(res, i, 5), NULL));
        now[k][0] = strdup(v[0]);
        now[k][1] = strdup(v[1]);
        now[k][2] = strdup(v[2]);
        if (now[k][0] != NULL && now[k][1] != NULL && now[k][2] != NULL) {
            k++;
        } else {
            free(now[k][0]);
            free(now[k][1]);
            free(now[k][2]);
            now[k][0] = now[k][1] = now[k][2] = NULL;
        }
    }
    for (int i = 0; i < nshown; i++) {
        bool still = false;
        for (int j = 0; j < k && !still; j++) {
            still = strcmp(shown[i][0], now[j][0]) == 0 && strcmp(shown[i][1], now[j][1]) == 0 &&
                    strcmp(shown[i][2], now[j][2]) == 0;
        }
        if (!still) {
            forget(i);
        }
    }
    shown_free(shown, nshown);
    shown = now;
    nshown = k;
}

void lr_spend_gauges_free(void) {
    shown_free(shown, nshown);
    shown = NULL;
    nshown = 0;
}
