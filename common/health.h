/*
 * health.h - the HTTP health and metrics endpoint of the daemons
 * (LONGRUN_HTTP_PORT), served by libmicrohttpd on its own thread so that it
 * never blocks, and is never blocked by, the event loop.
 *
 *   /healthz  liveness: 200 while the loop turns (the loop calls
 *             lr_health_tick at least every second); 503 when the last tick
 *             is older than the stall threshold.  A long model call does
 *             not stall the loop, so it never fails liveness.
 *   /readyz   readiness: 200 when the daemon says it is ready
 *             (lr_health_set_ready), 503 with the reason otherwise.
 *   /health   JSON: version, uptime, the daemon's snapshot (dependencies,
 *             in-flight, circuits, draining, leader), set with
 *             lr_health_set_snapshot from the loop.
 *   /metrics  Prometheus text exposition (common/metrics.h).
 *
 * Thread safety: every function may be called from any thread.
 */
#ifndef LR_HEALTH_H
#define LR_HEALTH_H

#include "err.h"

typedef struct lr_health lr_health_t;

/* Starts the server on 0.0.0.0:port (port 0: not started, *out = NULL,
 * returns 0).  Returns 0, LR_EIO (cannot bind; detail in errbuf). */
int lr_health_start(lr_health_t **out, int port, const char *component, long stall_ms, char *errbuf,
                    size_t errlen) LR_MUSTCHECK;
/* The loop is alive (call from a loop timer). */
void lr_health_tick(lr_health_t *h);
/* ready: 1/0; reason: why not ready (copied), or NULL. */
void lr_health_set_ready(lr_health_t *h, int ready, const char *reason);
/* JSON object text (copied) merged into /health. */
void lr_health_set_snapshot(lr_health_t *h, const char *json);
void lr_health_stop(lr_health_t *h);

#endif
