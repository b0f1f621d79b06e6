/*
 * mcp_wire.h - the wire format of MCP's Streamable HTTP transport, for
 * worker/mcp.c: finding the JSON-RPC answer to a request in a response body
 * (one JSON object, a JSON array of messages, or a text/event-stream of
 * them) and turning a tools/call result's content into text.
 *
 * Pure functions, no I/O: any thread.  Parsers of outside input: every
 * length is bounded by the body given.
 */
#ifndef LR_MCP_WIRE_H
#define LR_MCP_WIRE_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#include "err.h"

/* Finds the answer to request id in body (len bytes, NUL-terminated) of
 * content type ctype ("application/json" or "text/event-stream", parameters
 * ignored).  Messages that are not the answer are skipped, except that
 * notifications/tools/list_changed sets *list_changed.  Returns 0 with the
 * answer in *msg (the caller's to free: an object with "result" or
 * "error"), or LR_EPARSE with why (whylen bytes): not JSON, not JSON-RPC,
 * an unknown content type, or no answer with that id. */
int lr_mcp_wire_find(const char *ctype, const char *body, size_t len, double id, cJSON **msg, bool *list_changed,
                     char *why, size_t whylen) LR_MUSTCHECK;

/* The text of a tools/call result's content: the "text" items joined by
 * newlines; other items as "[<type> content]" (an image, audio, a resource
 * link) or, for an embedded text resource, its text.  malloc'd, or NULL (out
 * of memory). */
char *lr_mcp_wire_text(const cJSON *result);

#endif
