/*
 * jsonschema.c - a small JSON Schema validator for tool arguments; see
 * jsonschema.h for the keywords, the pattern dialect and the limits.
 *
 * Two walks over the same schema.  lr_schema_check() runs once, when a tool
 * is loaded, and proves the shape of every keyword it knows (so that typos in
 * an agents file fail at start-up, not when a model first calls the tool).
 * lr_schema_validate() runs for every tool call; it trusts that shape but
 * stays memory-safe on an unchecked schema: malformed keywords are skipped,
 * and what it cannot skip (a bad pattern, an unresolved $ref) is LR_ECONFIG.
 *
 * Error messages carry a path: inside the schema for the check
 * ("properties.query.type"), inside the value for the validation
 * ("$.items[2]").  Names and patterns come from outside, so they are escaped
 * as in a JSON string and cut; every message is valid UTF-8 without control
 * characters, even when the caller's buffer cuts it.  Messages go back to
 * the model as tool results, so they say what is wrong in plain words.
 *
 * A validation reports the first violation it meets.  Inside anyOf, oneOf and
 * not, a failing branch is not a failure of the whole, so branches write into
 * scratch buffers; hard errors (limits, broken schema, out of memory) end the
 * whole validation whatever combinator they happen inside: "not" must not
 * turn "nesting too deep" into a success.
 */
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

/* ---- paths and messages ------------------------------------------------- */

typedef struct path {
    char buf[PATH_CAP];
    size_t len;
} path_t;

static const char *path_str(const path_t *p) { return p->len > 0 ? p->buf : "(root)"; }

static bool ends_with_dots(const path_t *p) { return p->len >= 3 && memcmp(p->buf + p->len - 3, "...", 3) == 0; }

/* Appends seg; returns the length to give back to path_pop().  Invariant:
 * either 4 bytes are free (room for "..." and the NUL) or the path already
 * ends in "...", so a path that would overflow ends in "..." instead. */
static size_t path_push(path_t *p, const char *seg) {
    size_t mark = p->len, n = strlen(seg);
    if (p->len + n + 4 <= sizeof(p->buf)) {
        memcpy(p->buf + p->len, seg, n + 1);
        p->len += n;
    } else if (!ends_with_dots(p)) {
        memcpy(p->buf + p->len, "...", 4);
        p->len += 3;
    }
    return mark;
}

static void path_pop(path_t *p, size_t mark) {
    p->len = mark;
    p->buf[mark] = '\0';
}

/* Writes s into out (cap bytes, NUL-terminated) escaped as inside a JSON
 * string: quote, backslash and control characters escaped, invalid UTF-8
 * bytes as \xNN; cut with "..." when it does not fit. */
static void escape_text(const char *s, char *out, size_t cap) {
    size_t o = 0, n = strlen(s);
    for (size_t i = 0; i < n;) {
        unsigned char ch = (unsigned char)s[i];
        char tok[8];
        size_t k = ch < 0x80 ? 1 : lr_utf8_seq_len((const unsigned char *)s + i, n - i);
        size_t tlen;
        if (ch == '"' || ch == '\\') {
            tok[0] = '\\';
            tok[1] = (char)ch;
            tlen = 2;
        } else if (ch < 0x20 || ch == 0x7f) {
            tlen = (size_t)snprintf(tok, sizeof(tok), "\\u%04x", ch);
        } else if (k == 0) {
            tlen = (size_t)snprintf(tok, sizeof(tok), "\\x%02x", ch);
            k = 1;
        } else {
            memcpy(tok, s + i, k);
            tlen = k;
        }
        if (o + tlen + 4 > cap) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        memcpy(out + o, tok, tlen);
        o += tlen;
        i += k;
    }
    out[o] = '\0';
}

/* Drops a UTF-8 sequence that a cut left incomplete at the end of s. */
static void utf8_trim_tail(char *s) {
    size_t n = strlen(s), i = n;
    while (i > 0 && n - i < 4 && ((unsigned char)s[i - 1] & 0xc0) == 0x80) {
        i--;
    }
    if (i == 0) {
        s[0] = '\0'; /* empty, or nothing but continuation bytes */
        return;
    }
    i--;
    if ((unsigned char)s[i] >= 0x80 && lr_utf8_seq_len((const unsigned char *)s + i, n - i) != n - i) {
        s[i] = '\0';
    }
}

/* "<path>: <message>" into err (may be NULL). */
LR_PRINTF(4, 0)
static void put_msg(char *err, size_t errlen, const path_t *p, const char *fmt, va_list ap) {
    char body[256];
    if (err == NULL || errlen == 0) {
        return;
    }
    vsnprintf(body, sizeof(body), fmt, ap);
    utf8_trim_tail(body);
    snprintf(err, errlen, "%s: %s", path_str(p), body);
    utf8_trim_tail(err);
}

/* ASCII only, whatever the locale: a Latin-1 locale must not let a lone
 * byte 0xE9 into a message as a "letter". */
static bool ascii_alnum(unsigned char ch) {
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

/* Appends a member name to a path: .name for identifiers, ["name"] else. */
static size_t path_push_name(path_t *p, const char *name) {
    char esc[NAME_SHOWN + 8], seg[NAME_SHOWN + 16];
    bool ident = name[0] != '\0' && !(name[0] >= '0' && name[0] <= '9');
    for (const char *q = name; *q != '\0' && ident; q++) {
        ident = ascii_alnum((unsigned char)*q) || *q == '_' || *q == '$';
    }
    if (ident && strlen(name) <= NAME_SHOWN) {
        snprintf(seg, sizeof(seg), "%s%s", p->len > 0 ? "." : "", name);
    } else {
        escape_text(name, esc, sizeof(esc));
        snprintf(seg, sizeof(seg), "[\"%s\"]", esc);
    }
    return path_push(p, seg);
}

static size_t path_push_index(path_t *p, int i) {
    char seg[24];
    snprintf(seg, sizeof(seg), "[%d]", i);
    return path_push(p, seg);
}

/* A number as short as it can be printed without changing its value. */
static const char *fmt_num(double v, char *buf, size_t cap) {
    snprintf(buf, cap, "%.15g", v);
    if (strtod(buf, NULL) != v) {
        snprintf(buf, cap, "%.17g", v);
    }
    return buf;
}

static const cJSON *kw(const cJSON *schema, const char *name) {
    return cJSON_IsObject(schema) ? cJSON_GetObjectItemCaseSensitive(schema, name) : NULL;
}

/* ---- patterns ------------------------------------------------------------ */

/*
 * A schema's pattern is translated into a POSIX ERE before regcomp(), for
 * three reasons:
 *   - meaning: ECMA escapes (\d, \w, \s ...) that POSIX reads differently or
 *     not at all are rewritten, and what cannot be rewritten is refused;
 *   - time: glibc's regexec() retries a failing unanchored search from every
 *     position, quadratic in the string ("[a-z]+@" takes seconds on 20 kB).
 *     The ERE is "^.*(P)": one anchored pass, linear in the string;
 *   - size: counted repetitions are copied by regcomp, nested ones multiply
 *     ("((a{1,30}){1,30}){1,30}" never finishes), and stacked quantifiers
 *     ("a****") make regcomp cubic.  The translator estimates the expanded
 *     size (PATTERN_MAX_SIZE) and refuses stacked quantifiers, as ECMA does
 *     ("nothing to repeat"), except the lazy "?" of "*?", which matches the
 *     same strings and is dropped.  Back-references (exponential) are
 *     refused.
 */
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

static void emit(ere_t *e, const char *s, size_t n) {
    if (e->len + n >= e->cap) {
        e->overflow = true;
        return;
    }
    memcpy(e->buf + e->len, s, n);
    e->len += n;
}

static void emit_str(ere_t *e, const char *s) { emit(e, s, strlen(s)); }

/* A token that a quantifier may follow, n elements big. */
static void atom(ere_t *e, size_t n) {
    e->size += n;
    e->atom = n;
    e->quantified = false;
    e->lazy = false;
}

/* A token that nothing may repeat: an anchor, "(", "|". */
static void no_atom(ere_t *e) {
    e->atom = 0;
    e->quantified = false;
    e->lazy = false;
}

LR_PRINTF(3, 4)
static int pattern_err(char *msg, size_t msglen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, msglen, fmt, ap);
    va_end(ap);
    return LR_ECONFIG;
}

/* One ECMA escape "\x" into ERE, inside or outside a bracket expression. */
static int translate_escape(ere_t *e, unsigned char x, bool in_class, char *msg, size_t msglen) {
    static const char ere_special[] = ".[]()*+?{}|^$\\";
    static const char class_special[] = "]-^[\\";
    const char *out = NULL;
    char one[8];
    switch (x) {
    case 'd': out = in_class ? "0-9" : "[0-9]"; break;
    case 'w': out = in_class ? "A-Za-z0-9_" : "[A-Za-z0-9_]"; break;
    case 's': out = in_class ? "[:space:]" : "[[:space:]]"; break;
    case 'D':
    case 'W':
    case 'S':
        if (in_class) {
            return pattern_err(msg, msglen, "\\%c inside [...] is not supported", x);
        }
        out = x == 'D' ? "[^0-9]" : x == 'W' ? "[^A-Za-z0-9_]" : "[^[:space:]]";
        break;
    case 'n': out = "\n"; break;
    case 't': out = "\t"; break;
    case 'r': out = "\r"; break;
    case 'f': out = "\f"; break;
    case 'v': out = "\v"; break;
    case 'b':
    case 'B':
        if (in_class && x == 'B') {
            return pattern_err(msg, msglen, "\\B inside [...] is not supported");
        }
        if (in_class) {
            emit_str(e, "\b"); /* [\b] is a backspace */
            return 0;
        }
        emit_str(e, x == 'b' ? "\\b" : "\\B"); /* word boundaries, a GNU extension of regcomp */
        no_atom(e);
        return 0;
    default: break;
    }
    if (out == NULL && x >= '1' && x <= '9') {
        return pattern_err(msg, msglen, "back-references (\\%c) are not supported", x);
    }
    if (out == NULL && ascii_alnum(x)) {
        return pattern_err(msg, msglen, "the escape \\%c is not supported (write the character itself)", x);
    }
    if (out == NULL) {
        if (in_class && strchr(class_special, x) != NULL) {
            /* A collating symbol is the one way to put ] - ^ [ \ anywhere
             * in a POSIX bracket expression. */
            snprintf(one, sizeof(one), "[.%c.]", x);
        } else if (!in_class && strchr(ere_special, x) != NULL) {
            snprintf(one, sizeof(one), "\\%c", x);
        } else {
            snprintf(one, sizeof(one), "%c", x); /* \/ \- \< ...: the character (GNU reads \< \> as anchors) */
        }
        out = one;
    }
    emit_str(e, out);
    if (!in_class) {
        atom(e, 1);
    }
    return 0;
}

/* Whether p starts an interval "{n}", "{n,}" or "{n,m}": *len its bytes,
 * *mult how many copies of its atom regcomp makes (capped). */
static bool interval(const char *p, size_t *len, size_t *mult) {
    size_t i = 1, lo = 0, hi = 0;
    bool comma = false, has_hi = false;
    if (!(p[i] >= '0' && p[i] <= '9')) {
        return false;
    }
    for (; p[i] >= '0' && p[i] <= '9'; i++) {
        lo = lo < 100000 ? lo * 10 + (size_t)(p[i] - '0') : lo;
    }
    if (p[i] == ',') {
        comma = true;
        for (i++; p[i] >= '0' && p[i] <= '9'; i++) {
            hi = hi < 100000 ? hi * 10 + (size_t)(p[i] - '0') : hi;
            has_hi = true;
        }
    }
    if (p[i] != '}') {
        return false;
    }
    *len = i + 1;
    *mult = !comma ? lo : has_hi ? (hi > lo ? hi : lo) : lo + 1;
    if (*mult == 0) {
        *mult = 1;
    }
    return true;
}

/* A quantifier at p (one of * + ? or an interval of qlen bytes). */
static int quantifier(ere_t *e, const char *p, size_t qlen, size_t mult, char *msg, size_t msglen) {
    if (e->quantified || e->atom == 0) {
        return pattern_err(msg, msglen, "nothing to repeat before \"%.*s\"", (int)qlen, p);
    }
    if (e->atom > PATTERN_MAX_SIZE || mult > PATTERN_MAX_SIZE || e->size + e->atom * (mult - 1) > PATTERN_MAX_SIZE) {
        return pattern_err(msg, msglen,
                           "too complex: its repetitions expand to more than %d elements "
                           "(for a length limit, use minLength/maxLength)",
                           PATTERN_MAX_SIZE);
    }
    e->size += e->atom * (mult - 1);
    e->quantified = true;
    emit(e, p, qlen);
    return 0;
}

/* Translates an ECMA-flavoured pattern into POSIX ERE (see above). */
static int translate_pattern(const char *p, ere_t *e, char *msg, size_t msglen) {
    bool in_class = false;
    size_t i = 0, qlen, mult;
    int rc = 0;
    emit_str(e, "^.*(");
    while (p[i] != '\0' && rc == 0) {
        unsigned char ch = (unsigned char)p[i];
        if (ch == '\\') {
            if (p[i + 1] == '\0') {
                return pattern_err(msg, msglen, "ends with a lone backslash");
            }
            rc = translate_escape(e, (unsigned char)p[i + 1], in_class, msg, msglen);
            i += 2;
        } else if (in_class && ch == '[' && (p[i + 1] == ':' || p[i + 1] == '.' || p[i + 1] == '=')) {
            /* [:class:], [.sym.], [=equiv=]: copied whole, so that their ']' does not close the class */
            char close[3] = {p[i + 1], ']', '\0'};
            const char *end = strstr(p + i + 2, close);
            if (end == NULL) {
                return pattern_err(msg, msglen, "unterminated \"[%c\" inside [...]", p[i + 1]);
            }
            emit(e, p + i, (size_t)(end + 2 - (p + i)));
            i = (size_t)(end + 2 - p);
        } else if (in_class) {
            in_class = ch != ']';
            emit(e, p + i, 1);
            i++;
        } else if (ch == '[') {
            in_class = true;
            emit_str(e, "[");
            atom(e, 1);
            i++;
            if (p[i] == '^') {
                emit_str(e, "^");
                i++;
            }
            if (p[i] == ']') {
                return pattern_err(msg, msglen,
                                   "\"[]\" and \"[^]\" are not supported (ECMA and POSIX read them differently)");
            }
        } else if (ch == '?' && e->quantified && !e->lazy) {
            e->lazy = true; /* the lazy "*?": the same strings match */
            i++;
        } else if (ch == '*' || ch == '+' || ch == '?') {
            rc = quantifier(e, p + i, 1, ch == '+' ? 2 : 1, msg, msglen);
            i++;
        } else if (ch == '{' && interval(p + i, &qlen, &mult)) {
            rc = quantifier(e, p + i, qlen, mult, msg, msglen);
            i += qlen;
        } else if (ch == '{' || ch == '}') {
            emit_str(e, ch == '{' ? "\\{" : "}"); /* not an interval: the character, as in ECMA */
            atom(e, 1);
            i++;
        } else if (ch == '(') {
            if (p[i + 1] == '?' && p[i + 2] != ':') {
                return pattern_err(msg, msglen, "lookaround and named groups \"(?\" are not supported");
            }
            if (e->depth >= PATTERN_MAX_GROUPS) {
                return pattern_err(msg, msglen, "groups nest more than %d deep", PATTERN_MAX_GROUPS);
            }
            e->group_start[e->depth++] = e->size;
            emit_str(e, "("); /* (?:...) groups like (...) when nothing is captured */
            no_atom(e);
            i += p[i + 1] == '?' ? 3 : 1;
        } else if (ch == ')') {
            if (e->depth == 0) {
                return pattern_err(msg, msglen, "unmatched \")\"");
            }
            e->depth--;
            emit_str(e, ")");
            e->atom = e->size > e->group_start[e->depth] ? e->size - e->group_start[e->depth] : 1;
            e->quantified = false;
            e->lazy = false;
            i++;
        } else {
            emit(e, p + i, 1);
            if (ch == '|' || ch == '^' || ch == '$') {
                no_atom(e);
            } else if ((ch & 0xc0) != 0x80) {
                atom(e, 1); /* a character; UTF-8 continuation bytes belong to it */
            }
            i++;
        }
    }
    if (rc != 0) {
        return rc;
    }
    if (in_class) {
        return pattern_err(msg, msglen, "unterminated \"[\"");
    }
    if (e->depth > 0) {
        return pattern_err(msg, msglen, "unmatched \"(\"");
    }
    emit_str(e, ")");
    if (e->overflow) {
        return pattern_err(msg, msglen, "too long");
    }
    e->buf[e->len] = '\0';
    return 0;
}

/* Patterns match characters, not bytes: regcomp() and regexec() run with a
 * C.UTF-8 LC_CTYPE and LC_COLLATE for this thread only (uselocale), whatever
 * the locale of the process.  Where C.UTF-8 does not exist (glibc before
 * 2.35 without it installed) they run in the process's locale. */
typedef struct utf8_scope {
    locale_t loc, old;
} utf8_scope_t;

static void utf8_enter(utf8_scope_t *u) {
    u->loc = newlocale(LC_CTYPE_MASK | LC_COLLATE_MASK, "C.UTF-8", (locale_t)0);
    u->old = u->loc != (locale_t)0 ? uselocale(u->loc) : (locale_t)0;
}

static void utf8_leave(utf8_scope_t *u) {
    if (u->loc != (locale_t)0) {
        uselocale(u->old);
        freelocale(u->loc);
    }
}

/* Compiles a schema's pattern; call inside utf8_enter/utf8_leave.  Returns
 * 0 (the caller regfree()s re; *size is its expanded size), LR_ECONFIG with
 * the reason in msg, or LR_ENOMEM. */
static int pattern_compile(const char *src, regex_t *re, size_t *size, char *msg, size_t msglen) {
    size_t n = strlen(src);
    ere_t e;
    int rc, rerr;
    if (n > LR_SCHEMA_MAX_PATTERN) {
        return pattern_err(msg, msglen, "longer than %d bytes", LR_SCHEMA_MAX_PATTERN);
    }
    memset(&e, 0, sizeof(e));
    e.cap = n * 8 + 8; /* the longest rewrite, \W, is 13 bytes for 2; "^.*(" ")" */
    e.buf = malloc(e.cap);
    if (e.buf == NULL) {
        snprintf(msg, msglen, "out of memory");
        return LR_ENOMEM;
    }
    rc = translate_pattern(src, &e, msg, msglen);
    if (rc == 0) {
        rerr = regcomp(re, e.buf, REG_EXTENDED | REG_NOSUB);
        if (rerr == REG_ESPACE) {
            rc = LR_ENOMEM;
            snprintf(msg, msglen, "out of memory");
        } else if (rerr != 0) {
            char why[96];
            regerror(rerr, re, why, sizeof(why));
            rc = pattern_err(msg, msglen, "does not compile: %s", why);
        }
    }
    *size = e.size;
    free(e.buf);
    return rc;
}

/* Compiles pattern and, when str is not NULL, searches it in str.  The
 * search costs about size * length / 100 units (one anchored pass over the
 * string with a state set as big as the pattern).  Returns 0 with *found
 * and *cost set; LR_ETOOBIG (nothing searched) when the cost would exceed
 * max_cost; LR_ECONFIG with msg; LR_ENOMEM.  A string that is not valid
 * UTF-8 is not matched ("." does not match a stray byte). */
static int pattern_search(const char *pattern, const char *str, long max_cost, bool *found, long *cost, char *msg,
                          size_t msglen) {
    utf8_scope_t u;
    regex_t re;
    size_t size = 0, n = str != NULL ? strlen(str) : 0;
    int rc, m;
    *found = false;
    *cost = PATTERN_COST;
    utf8_enter(&u);
    rc = pattern_compile(pattern, &re, &size, msg, msglen);
    if (rc == 0) {
        *cost += (long)(size * n / 100); /* size <= PATTERN_MAX_SIZE: no overflow */
        if (str == NULL || !lr_pg_text_ok(str, n)) {
            m = REG_NOMATCH;
        } else if (*cost > max_cost) {
            m = REG_NOMATCH;
            rc = LR_ETOOBIG;
        } else {
            m = regexec(&re, str, 0, NULL, 0);
        }
        regfree(&re);
        if (m != 0 && m != REG_NOMATCH) {
            rc = LR_ENOMEM; /* REG_ESPACE, the one other result */
            snprintf(msg, msglen, "out of memory");
        }
        *found = m == 0 && rc == 0;
    }
    utf8_leave(&u);
    return rc;
}

/* ---- $ref ---------------------------------------------------------------- */

/* Whether the JSON-pointer token tok (~0 is ~, ~1 is /) spells name. */
static bool pointer_token_eq(const char *tok, const char *name) {
    while (*tok != '\0' && *name != '\0') {
        char ch = *tok;
        if (ch == '~') {
            if (tok[1] != '0' && tok[1] != '1') {
                return false;
            }
            ch = tok[1] == '0' ? '~' : '/';
            tok++;
        }
        if (ch != *name) {
            return false;
        }
        tok++;
        name++;
    }
    return *tok == '\0' && *name == '\0';
}

/* The schema a local $ref names, or NULL; *supported is false for any other
 * form than "#", "#/$defs/NAME" and "#/definitions/NAME". */
static const cJSON *resolve_ref(const cJSON *root, const char *ref, bool *supported) {
    const cJSON *defs, *m;
    const char *name;
    *supported = true;
    if (strcmp(ref, "#") == 0) {
        return root;
    }
    if (strncmp(ref, "#/$defs/", 8) == 0) {
        defs = kw(root, "$defs");
        name = ref + 8;
    } else if (strncmp(ref, "#/definitions/", 14) == 0) {
        defs = kw(root, "definitions");
        name = ref + 14;
    } else {
        *supported = false;
        return NULL;
    }
    if (strchr(name, '/') != NULL) {
        *supported = false;
        return NULL;
    }
    if (!cJSON_IsObject(defs)) {
        return NULL;
    }
    cJSON_ArrayForEach(m, defs) {
        if (m->string != NULL && pointer_token_eq(name, m->string)) {
            return m;
        }
    }
    return NULL;
}

/* ---- lr_schema_check ----------------------------------------------------- */

typedef struct cctx {
    const cJSON *root;
    path_t path;
    char *err;
    size_t errlen;
} cctx_t;

LR_PRINTF(2, 3)
static int cfail(cctx_t *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    put_msg(c->err, c->errlen, &c->path, fmt, ap);
    va_end(ap);
    return LR_ECONFIG;
}

static int check_schema(cctx_t *c, const cJSON *s, int level);

static const char *const type_names[] = {"object", "array", "string", "number", "integer", "boolean", "null"};

static bool known_type(const char *name) {
    for (size_t i = 0; i < sizeof(type_names) / sizeof(type_names[0]); i++) {
        if (strcmp(name, type_names[i]) == 0) {
            return true;
        }
    }
    return false;
}

static int check_type_name(cctx_t *c, const cJSON *t) {
    char esc[NAME_SHOWN + 8];
    if (!cJSON_IsString(t)) {
        return cfail(c, "must be a type name (object, array, string, number, integer, boolean, null)");
    }
    if (!known_type(t->valuestring)) {
        escape_text(t->valuestring, esc, sizeof(esc));
        return cfail(c, "unknown type \"%s\"", esc);
    }
    return 0;
}

static int check_type(cctx_t *c, const cJSON *v, int level) {
    const cJSON *t;
    int i = 0, rc = 0;
    (void)level;
    if (cJSON_IsString(v)) {
        return check_type_name(c, v);
    }
    if (!cJSON_IsArray(v) || v->child == NULL) {
        return cfail(c, "must be a type name or a non-empty array of type names");
    }
    cJSON_ArrayForEach(t, v) {
        size_t mark = path_push_index(&c->path, i++);
        rc = check_type_name(c, t);
        path_pop(&c->path, mark);
        if (rc != 0) {
            break;
        }
    }
    return rc;
}

static int check_bool(cctx_t *c, const cJSON *v, int level) {
    (void)level;
    return cJSON_IsBool(v) ? 0 : cfail(c, "must be true or false");
}

static int check_number(cctx_t *c, const cJSON *v, int level) {
    (void)level;
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) ? 0 : cfail(c, "must be a finite number");
}

/* exclusiveMinimum/Maximum: a number (2020-12) or, in OpenAPI 3.0, a boolean
 * that makes minimum/maximum exclusive. */
static int check_exclusive(cctx_t *c, const cJSON *v, int level) {
    (void)level;
    if (cJSON_IsBool(v) || (cJSON_IsNumber(v) && isfinite(v->valuedouble))) {
        return 0;
    }
    return cfail(c, "must be a finite number (or, OpenAPI 3.0, a boolean)");
}

static int check_multiple(cctx_t *c, const cJSON *v, int level) {
    (void)level;
    if (cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble > 0) {
        return 0;
    }
    return cfail(c, "must be a number greater than 0");
}

static int check_count(cctx_t *c, const cJSON *v, int level) {
    (void)level;
    if (cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble >= 0 &&
        v->valuedouble == floor(v->valuedouble)) {
        return 0;
    }
    return cfail(c, "must be a non-negative integer");
}

static int check_pattern_text(cctx_t *c, const char *pattern) {
    char why[200];
    bool found;
    long cost;
    int rc = pattern_search(pattern, NULL, 0, &found, &cost, why, sizeof(why));
    if (rc == 0) {
        return 0;
    }
    if (rc == LR_ENOMEM) {
        return lr_seterr(c->err, c->errlen, LR_ENOMEM, "%s: out of memory compiling the pattern", path_str(&c->path));
    }
    return cfail(c, "%s", why);
}

static int check_pattern(cctx_t *c, const cJSON *v, int level) {
    (void)level;
    return cJSON_IsString(v) ? check_pattern_text(c, v->valuestring) : cfail(c, "must be a string");
}

static int check_required(cctx_t *c, const cJSON *v, int level) {
    const cJSON *r;
    int i = 0;
    (void)level;
    if (!cJSON_IsArray(v)) {
        return cfail(c, "must be an array of property names");
    }
    cJSON_ArrayForEach(r, v) {
        if (!cJSON_IsString(r)) {
            size_t mark = path_push_index(&c->path, i);
            int rc = cfail(c, "must be a string (a property name)");
            path_pop(&c->path, mark);
            return rc;
        }
        i++;
    }
    return 0;
}

static int check_enum(cctx_t *c, const cJSON *v, int level) {
    (void)level;
    return cJSON_IsArray(v) && v->child != NULL ? 0 : cfail(c, "must be a non-empty array of values");
}

/* One subschema (items, not, additionalProperties). */
static int check_sub(cctx_t *c, const cJSON *v, int level) { return check_schema(c, v, level + 1); }

static int check_items(cctx_t *c, const cJSON *v, int level) {
    if (cJSON_IsArray(v)) {
        return cfail(c, "must be a schema (an array of schemas is the old tuple form: use prefixItems)");
    }
    return check_schema(c, v, level + 1);
}

/* properties, patternProperties, $defs, definitions: name -> schema. */
static int check_schema_map(cctx_t *c, const cJSON *v, int level, bool names_are_patterns) {
    const cJSON *m;
    int rc = 0;
    if (!cJSON_IsObject(v)) {
        return cfail(c, "must be an object of schemas");
    }
    cJSON_ArrayForEach(m, v) {
        size_t mark = path_push_name(&c->path, m->string != NULL ? m->string : "");
        if (names_are_patterns) {
            rc = check_pattern_text(c, m->string != NULL ? m->string : "");
        }
        if (rc == 0) {
            rc = check_schema(c, m, level + 1);
        }
        path_pop(&c->path, mark);
        if (rc != 0) {
            break;
        }
    }
    return rc;
}

static int check_map(cctx_t *c, const cJSON *v, int level) { return check_schema_map(c, v, level, false); }

static int check_pattern_map(cctx_t *c, const cJSON *v, int level) { return check_schema_map(c, v, level, true); }

/* allOf, anyOf, oneOf, prefixItems: a non-empty array of schemas. */
static int check_list(cctx_t *c, const cJSON *v, int level) {
    const cJSON *m;
    int i = 0, rc = 0;
    if (!cJSON_IsArray(v) || v->child == NULL) {
        return cfail(c, "must be a non-empty array of schemas");
    }
    cJSON_ArrayForEach(m, v) {
        size_t mark = path_push_index(&c->path, i++);
        rc = check_schema(c, m, level + 1);
        path_pop(&c->path, mark);
        if (rc != 0) {
            break;
        }
    }
    return rc;
}

static int check_ref(cctx_t *c, const cJSON *v, int level) {
    char esc[NAME_SHOWN + 8];
    bool supported;
    const cJSON *t;
    (void)level;
    if (!cJSON_IsString(v)) {
        return cfail(c, "must be a string");
    }
    escape_text(v->valuestring, esc, sizeof(esc));
    t = resolve_ref(c->root, v->valuestring, &supported);
    if (!supported) {
        return cfail(c, "unsupported reference \"%s\" (only \"#\", \"#/$defs/NAME\" and \"#/definitions/NAME\")", esc);
    }
    if (t == NULL) {
        return cfail(c, "unresolved reference \"%s\"", esc);
    }
    /* A chain of references that only leads to more references never
     * reaches a keyword that looks at the value: refuse it here rather than
     * fail every call with "nesting too deep".  (The referenced schemas
     * themselves are checked where they are defined.) */
    for (int hops = 0;; hops++) {
        const cJSON *r = kw(t, "$ref");
        if (!cJSON_IsString(r)) {
            break;
        }
        if (hops >= LR_SCHEMA_MAX_DEPTH) {
            return cfail(c, "reference cycle: \"%s\" only leads to more references", esc);
        }
        t = resolve_ref(c->root, r->valuestring, &supported);
    }
    return 0;
}

static const struct check_kw {
    const char *name;
    int (*check)(cctx_t *c, const cJSON *v, int level);
} check_kws[] = {
    {"type", check_type},
    {"nullable", check_bool},
    {"enum", check_enum},
    {"properties", check_map},
    {"patternProperties", check_pattern_map},
    {"required", check_required},
    {"additionalProperties", check_sub},
    {"minProperties", check_count},
    {"maxProperties", check_count},
    {"items", check_items},
    {"prefixItems", check_list},
    {"minItems", check_count},
    {"maxItems", check_count},
    {"uniqueItems", check_bool},
    {"minimum", check_number},
    {"maximum", check_number},
    {"exclusiveMinimum", check_exclusive},
    {"exclusiveMaximum", check_exclusive},
    {"multipleOf", check_multiple},
    {"minLength", check_count},
    {"maxLength", check_count},
    {"pattern", check_pattern},
    {"allOf", check_list},
    {"anyOf", check_list},
    {"oneOf", check_list},
    {"not", check_sub},
    {"$ref", check_ref},
    {"$defs", check_map},
    {"definitions", check_map},
};

static int check_schema(cctx_t *c, const cJSON *s, int level) {
    const cJSON *m;
    if (cJSON_IsBool(s)) {
        return 0;
    }
    if (!cJSON_IsObject(s)) {
        return cfail(c, "a schema must be an object or a boolean");
    }
    if (level > LR_SCHEMA_MAX_DEPTH) {
        return cfail(c, "nesting too deep (more than %d levels of subschemas)", LR_SCHEMA_MAX_DEPTH);
    }
    cJSON_ArrayForEach(m, s) {
        for (size_t i = 0; m->string != NULL && i < sizeof(check_kws) / sizeof(check_kws[0]); i++) {
            if (strcmp(m->string, check_kws[i].name) == 0) {
                size_t mark = path_push_name(&c->path, m->string);
                int rc = check_kws[i].check(c, m, level);
                path_pop(&c->path, mark);
                if (rc != 0) {
                    return rc;
                }
                break;
            }
        }
    }
    return 0;
}

int lr_schema_check(const cJSON *schema, char *errbuf, size_t errlen) {
    cctx_t c;
    memset(&c, 0, sizeof(c));
    c.root = schema;
    c.err = errbuf;
    c.errlen = errlen;
    if (errbuf != NULL && errlen > 0) {
        errbuf[0] = '\0';
    }
    if (schema == NULL) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "(root): no schema");
    }
    return check_schema(&c, schema, 0);
}

/* ---- lr_schema_validate -------------------------------------------------- */

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

LR_PRINTF(2, 3)
static int vfail(vctx_t *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    put_msg(c->err, c->errlen, &c->path, fmt, ap);
    va_end(ap);
    return V_FAIL;
}

LR_PRINTF(3, 4)
static int vhard(vctx_t *c, int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    put_msg(c->err, c->errlen, &c->path, fmt, ap);
    va_end(ap);
    c->hard_rc = rc;
    return V_HARD;
}

/* Charges n units of work; V_HARD once the budget is spent. */
static int spend(vctx_t *c, long n) {
    c->steps += n;
    if (c->steps > LR_SCHEMA_MAX_STEPS) {
        return vhard(c, LR_EINVAL, "validation too costly (more than %ld steps; simplify the schema or the value)",
                     LR_SCHEMA_MAX_STEPS);
    }
    return V_OK;
}

static int apply(vctx_t *c, const cJSON *s, const cJSON *v);

/* Applies s to v with the messages going to scratch: a failing branch of
 * anyOf/oneOf/not is not yet a failure.  A hard error is copied up. */
static int apply_quiet(vctx_t *c, const cJSON *s, const cJSON *v, char *scratch, size_t n) {
    char *err = c->err;
    size_t errlen = c->errlen;
    int rc;
    scratch[0] = '\0';
    c->err = scratch;
    c->errlen = n;
    rc = apply(c, s, v);
    c->err = err;
    c->errlen = errlen;
    if (rc == V_HARD && err != NULL && errlen > 0) {
        snprintf(err, errlen, "%s", scratch);
        utf8_trim_tail(err);
    }
    return rc;
}

/* A branch's message without the path prefix it shares with its parent. */
static const char *branch_msg(const vctx_t *c, const char *msg) {
    size_t n = strlen(path_str(&c->path));
    if (strncmp(msg, path_str(&c->path), n) == 0 && strncmp(msg + n, ": ", 2) == 0) {
        return msg + n + 2;
    }
    return msg;
}

static const char *json_type_name(const cJSON *v) {
    if (cJSON_IsNull(v)) {
        return "null";
    }
    if (cJSON_IsBool(v)) {
        return "boolean";
    }
    if (cJSON_IsNumber(v)) {
        return "number";
    }
    if (cJSON_IsString(v)) {
        return "string";
    }
    if (cJSON_IsArray(v)) {
        return "array";
    }
    return cJSON_IsObject(v) ? "object" : "invalid";
}

static bool is_integer(const cJSON *v) {
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble);
}

static bool type_matches(const char *name, const cJSON *v) {
    if (strcmp(name, "integer") == 0) {
        return is_integer(v);
    }
    return strcmp(name, json_type_name(v)) == 0;
}

/* " or "-joined type names for "expected X, got Y". */
static void type_list(const cJSON *t, char *out, size_t cap) {
    const cJSON *e;
    size_t o = 0;
    out[0] = '\0';
    if (cJSON_IsString(t)) {
        escape_text(t->valuestring, out, cap);
        return;
    }
    cJSON_ArrayForEach(e, t) {
        char esc[NAME_SHOWN + 8];
        int w;
        if (!cJSON_IsString(e)) {
            continue;
        }
        escape_text(e->valuestring, esc, sizeof(esc));
        w = snprintf(out + o, cap - o, "%s%s", o > 0 ? " or " : "", esc);
        if (w < 0 || (size_t)w >= cap - o) {
            utf8_trim_tail(out);
            return;
        }
        o += (size_t)w;
    }
}

/* Whether "type" t (a name or an array of names) admits v; a malformed t
 * (refused by lr_schema_check) admits everything. */
static bool type_admits(const cJSON *t, const cJSON *v) {
    const cJSON *e;
    if (cJSON_IsString(t)) {
        return type_matches(t->valuestring, v);
    }
    if (!cJSON_IsArray(t)) {
        return true;
    }
    cJSON_ArrayForEach(e, t) {
        if (cJSON_IsString(e) && type_matches(e->valuestring, v)) {
            return true;
        }
    }
    return false;
}

static int apply_type(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *t = kw(s, "type");
    bool nullable = cJSON_IsTrue(kw(s, "nullable"));
    cJSON null_value;
    char expected[160];
    if (t == NULL || (nullable && cJSON_IsNull(v)) || type_admits(t, v)) {
        return V_OK;
    }
    memset(&null_value, 0, sizeof(null_value));
    null_value.type = cJSON_NULL;
    type_list(t, expected, sizeof(expected));
    if (nullable && !type_admits(t, &null_value)) {
        size_t n = strlen(expected);
        snprintf(expected + n, sizeof(expected) - n, " or null");
    }
    return vfail(c, "expected %s, got %s", expected, json_type_name(v));
}

/* " <json>" of a short enum/const for a message, or "" (too long or not
 * valid UTF-8). */
static void json_hint(const cJSON *j, char *out, size_t cap) {
    char *s = cJSON_PrintUnformatted(j);
    out[0] = '\0';
    if (s != NULL && strlen(s) + 2 <= cap && strlen(s) <= 120 && lr_pg_text_ok(s, strlen(s))) {
        snprintf(out, cap, " %s", s);
    }
    free(s);
}

static int apply_enum_const(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *en = kw(s, "enum"), *cn = kw(s, "const"), *e;
    char hint[128];
    int rc;
    if (cJSON_IsArray(en)) {
        bool found = false;
        cJSON_ArrayForEach(e, en) {
            rc = spend(c, 1);
            if (rc != V_OK) {
                return rc;
            }
            if (cJSON_Compare(e, v, true)) {
                found = true;
                break;
            }
        }
        if (!found) {
            json_hint(en, hint, sizeof(hint));
            return vfail(c, "value not in enum%s", hint);
        }
    }
    if (cn != NULL && !cJSON_Compare(cn, v, true)) {
        json_hint(cn, hint, sizeof(hint));
        return vfail(c, "value not equal to const%s", hint);
    }
    return V_OK;
}

static int apply_ref(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *r = kw(s, "$ref"), *t;
    bool supported;
    char esc[NAME_SHOWN + 8];
    if (!cJSON_IsString(r)) {
        return V_OK;
    }
    t = resolve_ref(c->root, r->valuestring, &supported);
    if (t == NULL) {
        escape_text(r->valuestring, esc, sizeof(esc));
        return vhard(c, LR_ECONFIG, "schema error: unresolved $ref \"%s\" (lr_schema_check was skipped)", esc);
    }
    return apply(c, t, v);
}

static bool is_multiple(double x, double m) {
    double q;
    if (!isfinite(x)) {
        return false;
    }
    if (x == floor(x) && m == floor(m) && fabs(x) < 9007199254740992.0) {
        return fmod(x, m) == 0; /* exact for integers below 2^53 */
    }
    q = x / m;
    if (!isfinite(q) || fabs(q) >= 9007199254740992.0) {
        return true; /* every double this large is an integer */
    }
    /* x and m are rounded decimals (0.3 / 0.1 = 2.9999999999999996): allow
     * the error of the division, a few units in the last place of q. */
    return fabs(q - nearbyint(q)) <= fmax(1e-9, 4 * DBL_EPSILON * fabs(q));
}

static int apply_number(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *min = kw(s, "minimum"), *max = kw(s, "maximum");
    const cJSON *xmin = kw(s, "exclusiveMinimum"), *xmax = kw(s, "exclusiveMaximum"), *mul = kw(s, "multipleOf");
    double x = v->valuedouble;
    char a[40], b[40];
    if (cJSON_IsNumber(min)) {
        bool excl = cJSON_IsTrue(xmin);
        if (excl ? x <= min->valuedouble : x < min->valuedouble) {
            return vfail(c, "%s is %s %s", fmt_num(x, a, sizeof(a)),
                         excl ? "not greater than the exclusive minimum" : "less than minimum",
                         fmt_num(min->valuedouble, b, sizeof(b)));
        }
    }
    if (cJSON_IsNumber(max)) {
        bool excl = cJSON_IsTrue(xmax);
        if (excl ? x >= max->valuedouble : x > max->valuedouble) {
            return vfail(c, "%s is %s %s", fmt_num(x, a, sizeof(a)),
                         excl ? "not less than the exclusive maximum" : "greater than maximum",
                         fmt_num(max->valuedouble, b, sizeof(b)));
        }
    }
    if (cJSON_IsNumber(xmin) && x <= xmin->valuedouble) {
        return vfail(c, "%s is not greater than exclusiveMinimum %s", fmt_num(x, a, sizeof(a)),
                     fmt_num(xmin->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(xmax) && x >= xmax->valuedouble) {
        return vfail(c, "%s is not less than exclusiveMaximum %s", fmt_num(x, a, sizeof(a)),
                     fmt_num(xmax->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(mul) && mul->valuedouble > 0 && !is_multiple(x, mul->valuedouble)) {
        return vfail(c, "%s is not a multiple of %s", fmt_num(x, a, sizeof(a)),
                     fmt_num(mul->valuedouble, b, sizeof(b)));
    }
    return V_OK;
}

/* Unicode code points of a UTF-8 string: every byte that does not continue
 * a sequence starts one (an invalid byte counts as one). */
static size_t utf8_count(const char *s) {
    size_t n = 0;
    for (; *s != '\0'; s++) {
        n += ((unsigned char)*s & 0xc0) != 0x80;
    }
    return n;
}

static int apply_pattern(vctx_t *c, const char *pattern, const char *str, bool *matched) {
    char why[200], esc[NAME_SHOWN + 8];
    long cost;
    int rc = pattern_search(pattern, str, LR_SCHEMA_MAX_STEPS - c->steps, matched, &cost, why, sizeof(why));
    if (rc == LR_ETOOBIG) {
        return spend(c, cost); /* over the budget: the V_HARD of spend() */
    }
    if (rc == LR_ENOMEM) {
        return vhard(c, rc, "out of memory matching a pattern");
    }
    if (rc != 0) {
        escape_text(pattern, esc, sizeof(esc));
        return vhard(c, rc, "schema error: pattern \"%s\": %s (lr_schema_check was skipped)", esc, why);
    }
    return spend(c, cost);
}

static int apply_string(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *minl = kw(s, "minLength"), *maxl = kw(s, "maxLength"), *pat = kw(s, "pattern");
    size_t n = utf8_count(v->valuestring);
    char b[40], esc[NAME_SHOWN + 8];
    bool matched = true;
    int rc;
    if (cJSON_IsNumber(minl) && (double)n < minl->valuedouble) {
        return vfail(c, "string length %zu is less than minLength %s", n, fmt_num(minl->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(maxl) && (double)n > maxl->valuedouble) {
        return vfail(c, "string length %zu is greater than maxLength %s", n, fmt_num(maxl->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsString(pat)) {
        rc = apply_pattern(c, pat->valuestring, v->valuestring, &matched);
        if (rc != V_OK) {
            return rc;
        }
        if (!matched) {
            escape_text(pat->valuestring, esc, sizeof(esc));
            return vfail(c, "string does not match pattern \"%s\"", esc);
        }
    }
    return V_OK;
}

static int apply_array(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *mini = kw(s, "minItems"), *maxi = kw(s, "maxItems"), *items = kw(s, "items");
    const cJSON *prefix = kw(s, "prefixItems"), *p, *e;
    int n = cJSON_GetArraySize(v), i = 0, rc = V_OK;
    char b[40];
    if (cJSON_IsNumber(mini) && n < mini->valuedouble) {
        return vfail(c, "array length %d is less than minItems %s", n, fmt_num(mini->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(maxi) && n > maxi->valuedouble) {
        return vfail(c, "array length %d is greater than maxItems %s", n, fmt_num(maxi->valuedouble, b, sizeof(b)));
    }
    p = cJSON_IsArray(prefix) ? prefix->child : NULL;
    if (cJSON_IsArray(items)) {
        items = NULL; /* the old tuple form: lr_schema_check refuses it */
    }
    cJSON_ArrayForEach(e, v) {
        const cJSON *sub = p != NULL ? p : items;
        if (sub != NULL) {
            size_t mark = path_push_index(&c->path, i);
            rc = apply(c, sub, e);
            path_pop(&c->path, mark);
            if (rc != V_OK) {
                return rc;
            }
        }
        p = p != NULL ? p->next : NULL;
        i++;
    }
    if (cJSON_IsTrue(kw(s, "uniqueItems"))) {
        int ia = 0;
        for (const cJSON *a = v->child; a != NULL; a = a->next, ia++) {
            int ib = ia + 1;
            for (const cJSON *bb = a->next; bb != NULL; bb = bb->next, ib++) {
                rc = spend(c, 1);
                if (rc != V_OK) {
                    return rc;
                }
                if (cJSON_Compare(a, bb, true)) {
                    return vfail(c, "items [%d] and [%d] are equal (uniqueItems)", ia, ib);
                }
            }
        }
    }
    return V_OK;
}

/* One member of an object against properties, patternProperties and
 * additionalProperties. */
static int apply_member(vctx_t *c, const cJSON *s, const cJSON *m) {
    const cJSON *props = kw(s, "properties"), *pprops = kw(s, "patternProperties");
    const cJSON *add = kw(s, "additionalProperties"), *ps, *pp;
    char esc[NAME_SHOWN + 8];
    bool known = false;
    size_t mark;
    int rc = V_OK;
    ps = cJSON_IsObject(props) ? cJSON_GetObjectItemCaseSensitive(props, m->string) : NULL;
    mark = path_push_name(&c->path, m->string);
    if (ps != NULL) {
        known = true;
        rc = apply(c, ps, m);
    }
    if (cJSON_IsObject(pprops)) {
        for (pp = pprops->child; pp != NULL && rc == V_OK; pp = pp->next) {
            bool matched = false;
            rc = apply_pattern(c, pp->string != NULL ? pp->string : "", m->string, &matched);
            if (rc == V_OK && matched) {
                known = true;
                rc = apply(c, pp, m);
            }
        }
    }
    if (rc == V_OK && !known && add != NULL && !cJSON_IsTrue(add)) {
        if (cJSON_IsFalse(add)) {
            path_pop(&c->path, mark);
            escape_text(m->string, esc, sizeof(esc));
            return vfail(c, "unexpected property \"%s\"", esc);
        }
        rc = apply(c, add, m);
    }
    path_pop(&c->path, mark);
    return rc;
}

static int apply_object(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *minp = kw(s, "minProperties"), *maxp = kw(s, "maxProperties"), *req = kw(s, "required");
    const cJSON *r, *m;
    int n = cJSON_GetArraySize(v), rc;
    char b[40], esc[NAME_SHOWN + 8];
    if (cJSON_IsNumber(minp) && n < minp->valuedouble) {
        return vfail(c, "property count %d is less than minProperties %s", n, fmt_num(minp->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(maxp) && n > maxp->valuedouble) {
        return vfail(c, "property count %d is greater than maxProperties %s", n,
                     fmt_num(maxp->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsArray(req)) {
        cJSON_ArrayForEach(r, req) {
            if (cJSON_IsString(r) && cJSON_GetObjectItemCaseSensitive(v, r->valuestring) == NULL) {
                escape_text(r->valuestring, esc, sizeof(esc));
                return vfail(c, "missing required property \"%s\"", esc);
            }
        }
    }
    cJSON_ArrayForEach(m, v) {
        if (m->string == NULL) {
            continue;
        }
        rc = apply_member(c, s, m);
        if (rc != V_OK) {
            return rc;
        }
    }
    return V_OK;
}

/* anyOf (one false) or oneOf (one true): how many branches match decides.
 * When none does, the message of branch 0 says why, so that the model sees
 * at least one concrete reason. */
static int apply_any_one(vctx_t *c, const cJSON *list, const cJSON *v, const char *name, bool one) {
    char first[SCRATCH], other[SCRATCH];
    const cJSON *b;
    int i = 0, hit = -1;
    cJSON_ArrayForEach(b, list) {
        int rc = apply_quiet(c, b, v, i == 0 ? first : other, SCRATCH);
        if (rc == V_HARD) {
            return rc;
        }
        if (rc == V_OK) {
            if (!one) {
                return V_OK;
            }
            if (hit >= 0) {
                return vfail(c, "value matches both oneOf[%d] and oneOf[%d], expected exactly one", hit, i);
            }
            hit = i;
        }
        i++;
    }
    if (hit >= 0 || i == 0) {
        return V_OK;
    }
    return vfail(c, "value matches no schema of %s (%s[0]: %s)", name, name, branch_msg(c, first));
}

static int apply_combinators(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *all = kw(s, "allOf"), *any = kw(s, "anyOf"), *one = kw(s, "oneOf"), *neg = kw(s, "not"), *b;
    char scratch[SCRATCH];
    int rc = V_OK;
    if (cJSON_IsArray(all)) {
        cJSON_ArrayForEach(b, all) {
            rc = apply(c, b, v);
            if (rc != V_OK) {
                return rc;
            }
        }
    }
    if (cJSON_IsArray(any)) {
        rc = apply_any_one(c, any, v, "anyOf", false);
    }
    if (rc == V_OK && cJSON_IsArray(one)) {
        rc = apply_any_one(c, one, v, "oneOf", true);
    }
    if (rc == V_OK && neg != NULL) {
        rc = apply_quiet(c, neg, v, scratch, sizeof(scratch));
        if (rc == V_HARD) {
            return rc;
        }
        rc = rc == V_OK ? vfail(c, "value must not match the schema of \"not\"") : V_OK;
    }
    return rc;
}

static int apply(vctx_t *c, const cJSON *s, const cJSON *v) {
    int rc = spend(c, 1);
    if (rc != V_OK) {
        return rc;
    }
    if (cJSON_IsTrue(s)) {
        return V_OK;
    }
    if (cJSON_IsFalse(s)) {
        return vfail(c, "no value is allowed here (schema false)");
    }
    if (!cJSON_IsObject(s)) {
        return vhard(c, LR_ECONFIG,
                     "schema error: a schema must be an object or a boolean (lr_schema_check was skipped)");
    }
    if (c->depth >= LR_SCHEMA_MAX_APPLY) {
        return vhard(c, LR_EINVAL, "nesting too deep (more than %d nested subschemas; a $ref loop?)",
                     LR_SCHEMA_MAX_APPLY);
    }
    c->depth++;
    rc = apply_type(c, s, v);
    if (rc == V_OK) {
        rc = apply_enum_const(c, s, v);
    }
    if (rc == V_OK) {
        rc = apply_ref(c, s, v);
    }
    if (rc == V_OK && cJSON_IsNumber(v)) {
        rc = apply_number(c, s, v);
    } else if (rc == V_OK && cJSON_IsString(v)) {
        rc = apply_string(c, s, v);
    } else if (rc == V_OK && cJSON_IsArray(v)) {
        rc = apply_array(c, s, v);
    } else if (rc == V_OK && cJSON_IsObject(v)) {
        rc = apply_object(c, s, v);
    }
    if (rc == V_OK) {
        rc = apply_combinators(c, s, v);
    }
    c->depth--;
    return rc;
}

/* Values nest at most LR_SCHEMA_MAX_DEPTH levels of arrays and objects,
 * whatever the schema looks at; the walk stops at the first one too deep. */
static int check_value_depth(vctx_t *c, const cJSON *v, int level) {
    const cJSON *e;
    int i = 0;
    if (!cJSON_IsArray(v) && !cJSON_IsObject(v)) {
        return V_OK;
    }
    if (level >= LR_SCHEMA_MAX_DEPTH) {
        return vfail(c, "nesting too deep (more than %d levels of arrays and objects)", LR_SCHEMA_MAX_DEPTH);
    }
    cJSON_ArrayForEach(e, v) {
        size_t mark = cJSON_IsObject(v) ? path_push_name(&c->path, e->string != NULL ? e->string : "")
                                        : path_push_index(&c->path, i);
        int rc = check_value_depth(c, e, level + 1);
        path_pop(&c->path, mark);
        if (rc != V_OK) {
            return rc;
        }
        i++;
    }
    return V_OK;
}

int lr_schema_validate(const cJSON *schema, const cJSON *value, char *errbuf, size_t errlen) {
    vctx_t c;
    int rc;
    memset(&c, 0, sizeof(c));
    c.root = schema;
    c.err = errbuf;
    c.errlen = errlen;
    c.hard_rc = LR_EINVAL;
    path_push(&c.path, "$");
    if (errbuf != NULL && errlen > 0) {
        errbuf[0] = '\0';
    }
    if (schema == NULL || value == NULL) {
        return lr_seterr(errbuf, errlen, LR_EINVAL, "$: no %s", schema == NULL ? "schema" : "value");
    }
    rc = check_value_depth(&c, value, 0);
    if (rc == V_OK) {
        rc = apply(&c, schema, value);
    }
    return rc == V_OK ? 0 : rc == V_FAIL ? LR_EINVAL : c.hard_rc;
}
