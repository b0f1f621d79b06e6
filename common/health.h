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
 * Only GET and HEAD are answered (405 otherwise).  The server must stay
 * answerable for the kubelet's probes whatever other clients do, so:
 * epoll (no FD_SETSIZE limit on descriptor numbers), at most
 * LR_HEALTH_MAX_CONNECTIONS open connections, of which the last
 * LR_HEALTH_RESERVED_CONNECTIONS go only to a client address that has none
 * open (a probe opens one connection at a time; a flood holds many), at most
 * LR_HEALTH_PER_IP_CONNECTIONS per address, an idle connection closed after
 * LR_HEALTH_TIMEOUT_SECONDS, and LR_HEALTH_REQUEST_MEMORY bytes per
 * connection for the request.  Connections refused by these limits are
 * counted in longrun_http_connections_refused_total.
 *
 * Thread safety: every function may be called from any thread.
 */
#ifndef LR_HEALTH_H
#define LR_HEALTH_H

#include "err.h"

#define LR_HEALTH_MAX_CONNECTIONS 256
#define LR_HEALTH_RESERVED_CONNECTIONS 32
#define LR_HEALTH_PER_IP_CONNECTIONS 16
#define LR_HEALTH_TIMEOUT_SECONDS 5
#define LR_HEALTH_REQUEST_MEMORY (16 * 1024)
/* Largest snapshot lr_health_set_snapshot takes. */
#define LR_HEALTH_SNAPSHOT_MAX (256 * 1024)

typedef struct lr_health lr_health_t;

/* Starts the server on 0.0.0.0:port (port 0: not started, *out = NULL,
 * returns 0).  Returns 0, LR_EIO (cannot bind, or libmicrohttpd has neither
 * epoll nor poll; detail in errbuf), LR_ENOMEM. */
int lr_health_start(lr_health_t **out, int port, const char *component, long stall_ms, char *errbuf,
                    size_t errlen) LR_MUSTCHECK;
/* The loop is alive (call from a loop timer). */
void lr_health_tick(lr_health_t *h);
/* ready: 1/0; reason: why not ready, or NULL.  Copied, masked
 * (lr_config_mask_secrets: it may quote a connection error) and cut to 255
 * bytes. */
void lr_health_set_ready(lr_health_t *h, int ready, const char *reason);
/* json: the text of one JSON object, of any length up to
 * LR_HEALTH_SNAPSHOT_MAX bytes, copied and served as "status" in /health.
 * Returns 0; LR_ETOOBIG (longer), LR_EPARSE (not one JSON object: a buffer
 * that cut it, say), LR_ENOMEM.  On an error the previous snapshot is
 * dropped and /health shows {"snapshot_error": "..."} instead until the next
 * good one, and a warning is logged (once per kind of error until a good
 * one), so a snapshot is never cut silently.  h NULL: 0. */
int lr_health_set_snapshot(lr_health_t *h, const char *json);

/* The same from a cJSON object, which it takes over (deletes) whatever
 * happens; an error (over LR_HEALTH_SNAPSHOT_MAX, no memory) is logged and
 * shows in /health, as with lr_health_set_snapshot. */
struct cJSON;
void lr_health_set_snapshot_tree(lr_health_t *h, struct cJSON *o);
void lr_health_stop(lr_health_t *h);

#endif
