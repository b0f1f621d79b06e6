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

/* Posts body (the outcome JSON) to url for task_id, retrying transient
 * failures; refused (logged) unless url is under LONGRUN_CALLBACK_ALLOW.
 * Strings are copied.  *http is read at each attempt. */
void lr_callback_send(uv_loop_t *loop, lr_http_t *const *http, const char *task_id, const char *url,
                      const char *body);

/* Cancels and frees every delivery still pending (the worker stops). */
void lr_callback_abandon_all(void);

#endif
