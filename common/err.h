/*
 * err.h - the one table of longrun error codes.
 *
 * Every function that can fail returns int: 0 on success, a negative LR_E*
 * code otherwise.  Library codes (CURLcode, PGRES_*, AMQP_STATUS_*, UV_E*) are
 * translated at the adapter boundary; their own text goes to the log line or
 * to an optional caller-provided error buffer, never into the return code.
 */
#ifndef LR_ERR_H
#define LR_ERR_H

#include <stddef.h>

#if defined(__GNUC__)
#define LR_MUSTCHECK __attribute__((warn_unused_result))
#define LR_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define LR_MUSTCHECK
#define LR_PRINTF(fmt, args)
#endif

/* X(name, value, text).  Values are stable: they appear in metrics and logs. */
#define LR_ERRNO_MAP(X)                                \
    X(INVAL, -1, "invalid argument")                   \
    X(NOMEM, -2, "out of memory")                      \
    X(IO, -3, "input/output error")                    \
    X(PARSE, -4, "malformed input")                    \
    X(TOOBIG, -5, "value exceeds its limit")           \
    X(NOTFOUND, -6, "not found")                       \
    X(EXISTS, -7, "already exists")                    \
    X(FENCED, -8, "fenced out by a newer lease epoch") \
    X(TIMEOUT, -9, "timed out")                        \
    X(CONN, -10, "connection failed")                  \
    X(DB, -11, "database error")                       \
    X(AMQP, -12, "message broker error")               \
    X(HTTP, -13, "HTTP error")                         \
    X(CANCELED, -14, "canceled")                       \
    X(SHUTDOWN, -15, "shutting down")                  \
    X(BUSY, -16, "resource busy")                      \
    X(CONFIG, -17, "invalid configuration")            \
    X(SCHEMA, -18, "schema version mismatch")          \
    X(RETRY, -19, "transient failure, retry later")    \
    X(PERM, -20, "permanent failure")                  \
    X(BUDGET, -21, "budget exhausted")                 \
    X(STATE, -22, "invalid state")

enum lr_errno {
    LR_OK = 0,
#define LR_ERR_ENUM(name, value, text) LR_E##name = (value),
    LR_ERRNO_MAP(LR_ERR_ENUM)
#undef LR_ERR_ENUM
};

/* Static human text for a code; never NULL. */
const char *lr_strerror(int err);
/* Static symbolic name ("LR_EFENCED"); never NULL. */
const char *lr_err_name(int err);

/* Writes a formatted message into an optional error buffer (errbuf may be
 * NULL or errlen 0, then nothing is written).  Returns err unchanged so that
 * callers can `return lr_seterr(buf, len, LR_EINVAL, "...")`. */
int lr_seterr(char *errbuf, size_t errlen, int err, const char *fmt, ...) LR_PRINTF(4, 5);

#endif
