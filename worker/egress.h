/*
 * egress.h - the connect-time check of the worker's model and tool calls
 * (LONGRUN_EGRESS_ALLOW; the callbacks have their own, worker/callback.c).
 *
 * Model and tool URLs come from the agents file (with ${VAR} substitution),
 * not from producers, so they are not matched against URL rules; but the
 * address each call actually connects to (after DNS) is checked: public
 * addresses always pass, loopback, private and unique-local ones pass by
 * default (in-cluster model servers and tools), and link-local, cloud
 * metadata, unspecified and reserved ones only when LONGRUN_EGRESS_ALLOW
 * lists them (addresses or CIDR ranges).  A name that resolves to
 * 169.254.169.254 is refused before any packet leaves.
 *
 * Thread affinity: the loop thread (the guard is immutable once parsed).
 */
#ifndef LR_WORKER_EGRESS_H
#define LR_WORKER_EGRESS_H

#include <stddef.h>
#include <sys/socket.h>

#include "urlguard.h"

/* Parses LONGRUN_EGRESS_ALLOW (text; NULL = empty).  Returns 0 and *out
 * (lr_urlguard_free), or LR_ECONFIG with why in errbuf. */
int lr_egress_parse(lr_urlguard_t **out, const char *text, char *errbuf, size_t errlen);

/* lr_http_addr_cb for model and tool requests; arg is the guard. */
int lr_egress_check(const struct sockaddr *sa, size_t len, void *arg, char *why, size_t whylen);

#endif
