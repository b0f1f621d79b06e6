/* text.h - text helpers for outside input (model and tool responses). */
#ifndef LR_TEXT_H
#define LR_TEXT_H

#include <stdbool.h>
#include <stddef.h>

/* Returns a malloc'd, NUL-terminated copy of s[0..n) that is valid UTF-8 and
 * holds no NUL byte: every invalid byte becomes U+FFFD, and the copy is cut
 * (never inside a character) so that it is at most max bytes; *cut says
 * whether it was.  PostgreSQL's jsonb refuses anything else.  NULL on out of
 * memory.  Caller frees. */
char *lr_utf8_clean(const char *s, size_t n, size_t max, bool *cut);

#endif
