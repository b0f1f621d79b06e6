/*
 * transport.h - which connections a daemon may make in plain text.
 *
 * A daemon's connections to PostgreSQL and RabbitMQ carry passwords, task
 * inputs and model answers.  Across a network they must be encrypted: the
 * worker and the scheduler refuse, at start and before connecting, a
 * PostgreSQL conninfo with sslmode=disable or allow, a plain amqp:// URL,
 * and amqps:// with LONGRUN_AMQP_TLS_VERIFY=0, when the host is not this
 * machine.  LONGRUN_ALLOW_PLAINTEXT=1 lifts the refusal (a network the
 * operator trusts, such as a service mesh that encrypts for us).
 *
 * Each address is read by the parser that will connect with it:
 * PQconninfoParse for the conninfo (with libpq's PG* variables for what it
 * leaves unset, as libpq does), rabbitmq-c's amqp_parse_url for the AMQP
 * URL.  Not read: a pg_service.conf entry (service=...), whose host and
 * sslmode only libpq sees at connect time.
 *
 * Thread affinity: none (pure functions over their arguments and the
 * environment).
 */
#ifndef LR_TRANSPORT_H
#define LR_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "err.h"

/* Whether a connection to host stays on this machine: an IPv4 address in
 * 127.0.0.0/8 (dotted quad, as inet_pton reads it), ::1 or ::ffff:127.x.y.z,
 * "localhost" (any case, with or without a final dot), or a Unix socket
 * (libpq: a host starting with '/' or '@').  host NULL or "" is libpq's
 * default, the Unix socket: true.  Anything else, including names that
 * might resolve to 127.0.0.1, is false. */
bool lr_transport_host_is_local(const char *host);

/* Checks cfg (database_url, amqp_url, allow_plaintext) and the TLS
 * environment (PGSSLMODE, PGHOST, PGHOSTADDR, LONGRUN_AMQP_TLS_VERIFY)
 * against the rule above.  Returns 0, or LR_ECONFIG with
 * "LONGRUN_X: what is wrong; the fix, or set LONGRUN_ALLOW_PLAINTEXT=1" in
 * errbuf (no password: hosts and option values only, masked).
 * LR_ENOMEM when out of memory. */
int lr_transport_check(const lr_config_t *cfg, char *errbuf, size_t errlen) LR_MUSTCHECK;

#endif
