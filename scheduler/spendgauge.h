/*
 * spendgauge.h - the scheduler's gauges of the spend caps (docs/metrics.md):
 * per cap (scope, name, period), its amount, what its scope spent in the
 * current period (the ledger) and the reservations of calls in flight.
 * The leader reads them every 10 s (LR_SQL_SPEND_GAUGES); loop thread.
 */
#ifndef LR_SPENDGAUGE_H
#define LR_SPENDGAUGE_H

#include <libpq-fe.h>

/* Every cap with an amount, its spend and live reservations (migration
 * 0011: spend_cap_status). */
#define LR_SQL_SPEND_GAUGES                                                                \
    "SELECT scope, name, period, cap_usd::float8, spent_usd::float8, reserved_usd::float8" \
    " FROM spend_cap_status WHERE cap_usd IS NOT NULL"

/* Registers the three families (before threads start). */
void lr_spend_gauges_init(void);

/* Sets the gauges from the rows of LR_SQL_SPEND_GAUGES and drops the
 * series of caps no longer there.  res NULL: drops every series (this
 * instance stopped being the leader). */
void lr_spend_gauges_update(const PGresult *res);

/* Frees what the previous update remembered (at exit). */
void lr_spend_gauges_free(void);

#endif
