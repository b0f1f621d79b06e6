/*
 * redact.h - redaction of personal data and credentials in text bound for
 * the log (the sampled payloads of LONGRUN_LOG_PAYLOADS): every match of a
 * class becomes "[redacted:<class>]".
 *
 * Classes: the built-in "email", "api_key" and "card" (docs/metrics.md,
 * "Payloads and redaction"), and custom POSIX extended regular expressions,
 * each in a class of its own name or "custom".  Everything is compiled once
 * by lr_redact_new(); lr_redact_text() only reads the compiled form, scans
 * its input once per rule, and is bounded by the input it is given (the
 * caller bounds that: a payload's first few KiB), so it never blocks the
 * event loop for long (tests/unit/test_redact.c measures it).
 *
 * Thread safety: an lr_redact_t is immutable after lr_redact_new(); any
 * number of threads may call lr_redact_text() on it at once (glibc's regexec
 * is thread-safe).  lr_redact_free() only when no call is running.
 */
#ifndef LR_REDACT_H
#define LR_REDACT_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"

/* Custom patterns: at most this many, each at most LR_REDACT_MAX_PATTERN
 * bytes; a class name at most LR_REDACT_MAX_NAME bytes ([a-z][a-z0-9_]*). */
#define LR_REDACT_MAX_CUSTOM 16
#define LR_REDACT_MAX_PATTERN 512
#define LR_REDACT_MAX_NAME 32
/* Classes in all: the three built-in ones and one per custom pattern. */
#define LR_REDACT_MAX_CLASSES (3 + LR_REDACT_MAX_CUSTOM)
/* With LR_REDACT_PARTIAL, the input's last this many bytes are scanned but
 * never returned: a secret that starts there may go on past the end of the
 * input, where no rule can see it whole.  No built-in match is longer. */
#define LR_REDACT_LOOKAHEAD 512

typedef struct lr_redact lr_redact_t;

/* Compiles a redactor.
 *
 * classes: "all" (every built-in class), "none", or built-in class names
 *   separated by commas (spaces allowed): "email,card".  NULL or "": "all".
 * patterns: custom POSIX extended regular expressions (regcomp
 *   REG_EXTENDED), one per line; empty lines are skipped.  An entry
 *   "name=regex", name matching [a-z][a-z0-9_]{0,31}, puts its matches in
 *   class name; any other entry is in class "custom" (write "custom=" before
 *   a regex that itself starts like a name and '=').  A pattern that can
 *   match the empty string is refused.  NULL or "": none.
 *
 * Returns 0 with *out set (the caller owns it: lr_redact_free), or
 * LR_ECONFIG with "why" in errbuf (the class or the entry, and regcomp's
 * message; the caller names the variable), or LR_ENOMEM.  *out is NULL on
 * failure. */
int lr_redact_new(lr_redact_t **out, const char *classes, const char *patterns, char *errbuf,
                  size_t errlen) LR_MUSTCHECK;

/* Frees r (NULL is fine). */
void lr_redact_free(lr_redact_t *r);

/* Rules of r in all (0: it redacts nothing); its classes and their names
 * (borrowed, valid while r lives), in the order of lr_redact_out_t.counts. */
int lr_redact_rules(const lr_redact_t *r);
int lr_redact_classes(const lr_redact_t *r);
const char *lr_redact_class_name(const lr_redact_t *r, int i);

/* The input is the start of a longer text (see LR_REDACT_LOOKAHEAD). */
#define LR_REDACT_PARTIAL 1u

typedef struct lr_redact_out {
    char *text;                        /* malloc'd, NUL-terminated (the caller frees it) */
    size_t len;                        /* strlen(text), at most max */
    bool cut;                          /* some of the input is not in text (max, or LR_REDACT_PARTIAL) */
    int matches;                       /* replacements in text */
    int counts[LR_REDACT_MAX_CLASSES]; /* of which per class (lr_redact_class_name) */
} lr_redact_out_t;

/* Redacts s[0..n) (any bytes; NUL bytes are matched as characters) into
 * out->text: at most max bytes, never cut inside a UTF-8 sequence of the
 * input nor inside a "[redacted:...]" marker.  Matches are looked for in all
 * of s[0..n), so a secret that crosses max is replaced whole; overlapping
 * matches of different rules are merged into one marker (the class of the
 * one that starts first, the longer one of two that start together).
 * flags: LR_REDACT_PARTIAL or 0.
 *
 * Returns 0, or LR_ENOMEM (out->text NULL: log nothing, since the text could
 * not be redacted).  Thread-safe.  Cost: the C scanners are linear in n; the
 * regular expressions all start with a literal, so glibc's matcher skips
 * ahead to the places they can start (25 to 100 us per 4.5 KiB with the
 * built-in classes, tests/unit/test_redact.c).  A custom pattern that starts
 * with a repetition is tried from every position: anchor it on a literal. */
int lr_redact_text(const lr_redact_t *r, const char *s, size_t n, size_t max, unsigned flags,
                   lr_redact_out_t *out) LR_MUSTCHECK;

#endif
