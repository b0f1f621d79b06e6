/*
 * jsonschema_pattern.c - "pattern": the ECMA-262 subset of tool schemas translated
 * to POSIX extended regexes, compiled and searched with a cost bound (see
 * jsonschema.h for the dialect); local $ref resolution.
 */
#include "jsonschema_int.h"

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
    if (out == NULL && lrs_ascii_alnum(x)) {
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
int lrs_pattern_search(const char *pattern, const char *str, long max_cost, bool *found, long *cost, char *msg,
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
const cJSON *lrs_resolve_ref(const cJSON *root, const char *ref, bool *supported) {
    const cJSON *defs, *m;
    const char *name;
    *supported = true;
    if (strcmp(ref, "#") == 0) {
        return root;
    }
    if (strncmp(ref, "#/$defs/", 8) == 0) {
        defs = lrs_kw(root, "$defs");
        name = ref + 8;
    } else if (strncmp(ref, "#/definitions/", 14) == 0) {
        defs = lrs_kw(root, "definitions");
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
