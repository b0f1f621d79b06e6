/*
 * jsonschema_int.h - what the files split from jsonschema.c share (not for the rest of the program).
 */
#ifndef LR_JSONSCHEMA_INT_H
#define LR_JSONSCHEMA_INT_H

#include "jsonschema.h"
#include <float.h>
#include <locale.h>
#include <math.h>
#include <regex.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "text.h"
#define PATH_CAP 160     /* bytes of a path in a message; longer ones end in "..." */
#define NAME_SHOWN 64    /* bytes of a name, pattern or type shown in a message */
#define SCRATCH 200      /* bytes of a branch's message inside anyOf/oneOf */
#define PATTERN_COST 100 /* steps charged for compiling a pattern (its search costs more) */
typedef struct path {
    char buf[PATH_CAP];
    size_t len;
} path_t;

#define PATTERN_MAX_SIZE 1000 /* elements of a pattern, counted repetitions expanded */
#define PATTERN_MAX_GROUPS 32 /* nesting of (...) */
typedef struct ere {
    char *buf;
    size_t len, cap;
    bool overflow;
    size_t size;     /* elements so far, repetitions expanded */
    size_t atom;     /* elements of the last atom; 0: nothing to repeat */
    bool quantified; /* the last token was a quantifier */
    bool lazy;       /* ... and its lazy "?" was dropped */
    int depth;       /* open groups */
    size_t group_start[PATTERN_MAX_GROUPS];
} ere_t;

typedef struct utf8_scope {
    locale_t loc, old;
} utf8_scope_t;

typedef struct cctx {
    const cJSON *root;
    path_t path;
    char *err;
    size_t errlen;
} cctx_t;

enum vresult {
    V_OK = 0,   /* the value conforms */
    V_FAIL = 1, /* a violation; a combinator may still turn it into success */
    V_HARD = 2, /* a limit, a broken schema, no memory: ends the validation */
};

typedef struct vctx {
    const cJSON *root;
    path_t path;
    char *err; /* where the current branch reports (NULL: nowhere) */
    size_t errlen;
    int hard_rc; /* the LR_E* code of a V_HARD */
    long steps;
    int depth;
} vctx_t;

/* Shared between the files (prefix lrs_). */
const char *lrs_path_str(const path_t *p);
size_t lrs_path_push(path_t *p, const char *seg);
void lrs_path_pop(path_t *p, size_t mark);
void lrs_escape_text(const char *s, char *out, size_t cap);
void lrs_utf8_trim_tail(char *s);
LR_PRINTF(4, 0)
void lrs_put_msg(char *err, size_t errlen, const path_t *p, const char *fmt, va_list ap);
bool lrs_ascii_alnum(unsigned char ch);
size_t lrs_path_push_name(path_t *p, const char *name);
size_t lrs_path_push_index(path_t *p, int i);
const char *lrs_fmt_num(double v, char *buf, size_t cap);
const cJSON *lrs_kw(const cJSON *schema, const char *name);
int lrs_pattern_search(const char *pattern, const char *str, long max_cost, bool *found, long *cost, char *msg,
                       size_t msglen);
const cJSON *lrs_resolve_ref(const cJSON *root, const char *ref, bool *supported);

#endif
