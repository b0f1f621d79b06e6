/*
 * callback.h - a task's outcome POSTed to its callback_url (callback.c).
 *
 * Knows nothing of the worker: it gets the loop and the slot of the HTTP
 * client (the worker's lr_http_t *, which the shutdown sets to NULL), so a
 * retry after the client closed gives up instead of using it.
 *
 * Thread affinity: the loop thread.
 */
#ifndef LR_WORKER_CALLBACK_H
#define LR_WORKER_CALLBACK_H

#include <uv.h>

#include "http.h"

/* Sets the allow rules (LONGRUN_CALLBACK_ALLOW, syntax in
 * common/urlguard.h; NULL or empty: no callback is called).  Returns 0, or
 * LR_ECONFIG (why in errbuf) / LR_ENOMEM leaving the old rules.  Call
 * before the first lr_callback_send. */
int lr_callback_configure(const char *rules, char *errbuf, size_t errlen) LR_MUSTCHECK;

/* Posts body (the outcome JSON) to url for task_id, retrying transient
 * failures.  Refused (logged as task.callback_refused with its reason,
 * counted in longrun_callbacks_refused_total) unless url matches a rule,
 * and at connect time unless every address it reaches is public or named
 * by the rule.  Strings are copied.  *http is read at each attempt. */
void lr_callback_send(uv_loop_t *loop, lr_http_t *const *http, const char *task_id, const char *url, const char *body);

/* Cancels and frees every delivery still pending and the rules (the
 * worker stops). */
void lr_callback_abandon_all(void);

#endif
