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

/* Length of the valid UTF-8 sequence at s (n bytes available): 1-4, or 0
 * when it is not valid UTF-8 (overlong, surrogate, beyond U+10FFFF, cut). */
size_t lr_utf8_seq_len(const unsigned char *s, size_t n);
/* Whether the n bytes at s are valid UTF-8 without NUL (lr_utf8_clean would
 * return them unchanged): lets callers skip the copy. */
bool lr_utf8_is_clean(const char *s, size_t n);

/* Valid UTF-8 without NUL bytes: PostgreSQL accepts it as text. */
bool lr_pg_text_ok(const char *s, size_t n);

/* One JSON value, nothing but whitespace after it, that jsonb will take
 * (valid UTF-8, no \u0000). */
bool lr_json_storable(const char *s, size_t n);

/* s[0..n) as PostgreSQL's bytea hex text ("\x4142..."), malloc'd; NULL on out
 * of memory.  Caller frees. */
char *lr_bytea_hex(const char *s, size_t n);

#endif
