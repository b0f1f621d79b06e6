/*
 * redact.c - the redactor of log payloads; see redact.h.
 *
 * Design.  A redactor is a list of rules, each in one class.  A rule is
 * either a compiled POSIX regular expression (the api_key shapes and the
 * custom patterns) or a scanner written in C where a regular expression
 * would be slow or cannot say it: e-mail addresses (found from each '@',
 * so text without one costs one memchr) and card numbers (digit groups and
 * the Luhn check).  lr_redact_text() runs every rule over the whole input
 * and collects the matches, sorts them, merges those that overlap, and
 * writes the text with each merged match replaced by its marker, up to the
 * caller's maximum.  A regular expression's match can be refused by the
 * rule's own checks (a key must not start inside a longer word, a bearer
 * token needs a digit); the search then goes on from the next byte, so a
 * refused match never hides a good one after it.
 */
#include "redact.h"

#include <ctype.h>
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum rule_kind { RULE_REGEX, RULE_EMAIL, RULE_CARD };

/* Checks of a regular expression's match (rule.checks). */
enum {
    CHECK_LEFT = 1u << 0,  /* the match does not start inside a word: no [A-Za-z0-9_-] before it */
    CHECK_RIGHT = 1u << 1, /* nor end inside one: no [A-Za-z0-9] after it */
    CHECK_DIGIT = 1u << 2, /* the redacted part holds a digit */
};

typedef struct rule {
    enum rule_kind kind;
    int cls;    /* index in r->names */
    regex_t re; /* RULE_REGEX */
    int group;  /* the subexpression redacted (0: the whole match) */
    unsigned checks;
} rule_t;

/* The built-in regular expressions of class api_key. */
static const struct {
    const char *re;
    int flags; /* regcomp flags beyond REG_EXTENDED */
    int group;
    unsigned checks;
} api_key_rules[] = {
    /* OpenAI (sk-..., sk-proj-...), Anthropic (sk-ant-api03-...); not the end of
     * a word (task-..., desk-...).  The other prefixes are rare enough inside words. */
    {"sk-[A-Za-z0-9_-]{16,}", 0, 0, CHECK_LEFT},
    /* Stripe */
    {"(sk|rk|pk)_(live|test)_[A-Za-z0-9]{10,}", 0, 0, 0},
    /* AWS access key ids */
    {"(AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}", 0, 0, CHECK_LEFT | CHECK_RIGHT},
    /* GitHub */
    {"(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}", 0, 0, 0},
    {"github_pat_[A-Za-z0-9_]{22,}", 0, 0, 0},
    /* Slack */
    {"xox[abposr]-[A-Za-z0-9-]{10,}", 0, 0, 0},
    /* Google API keys */
    {"AIza[0-9A-Za-z_-]{35}", 0, 0, 0},
    /* JSON web tokens: header.payload.signature, the header a JSON object */
    {"eyJ[A-Za-z0-9_-]{10,}\\.[A-Za-z0-9_-]{10,}\\.[A-Za-z0-9_-]{10,}", 0, 0, 0},
    /* a bearer token; "Bearer" in a sentence is followed by a word, not a token with a digit */
    {"[Bb]earer[ \t]+([A-Za-z0-9._~+/=-]{12,})", 0, 1, CHECK_LEFT | CHECK_DIGIT},
    /* an Authorization header or field, in any quoting (JSON inside JSON: \") */
    {"authorization\\\\?[\"']?[ \t]*[:=][ \t]*\\\\?[\"']?((basic|bearer|token|digest)[ \t]+)?([A-Za-z0-9._~+/=-]{8,})",
     REG_ICASE, 3, 0},
    /* the value after a name that says it is secret: "api_key": "...", token=..., PASSWORD: ... */
    {"(api[_-]?key|apikey|secret|token|passwd|password|credential|private[_-]?key|access[_-]?key)"
     "[A-Za-z0-9_-]*\\\\?[\"']?[ \t]*[:=][ \t]*\\\\?[\"']?([^][ \t\r\n\"'\\\\,;&{}()<>]{8,})",
     REG_ICASE, 2, 0},
};

static const char *const builtin_names[] = {"email", "api_key", "card"};

struct lr_redact {
    rule_t rules[sizeof(api_key_rules) / sizeof(api_key_rules[0]) + 2 + LR_REDACT_MAX_CUSTOM];
    int nrules;
    char names[LR_REDACT_MAX_CLASSES][LR_REDACT_MAX_NAME + 1];
    int nnames;
};

/* The index of class name, or -1. */
static int find_class(const lr_redact_t *r, const char *name, size_t len) {
    for (int i = 0; i < r->nnames; i++) {
        if (strlen(r->names[i]) == len && memcmp(r->names[i], name, len) == 0) {
            return i;
        }
    }
    return -1;
}

/* The index of class name (added if new). */
static int class_of(lr_redact_t *r, const char *name, size_t len) {
    int i = find_class(r, name, len);
    if (i >= 0) {
        return i;
    }
    memcpy(r->names[r->nnames], name, len);
    r->names[r->nnames][len] = '\0';
    return r->nnames++;
}

static int add_regex(lr_redact_t *r, int cls, const char *re, int flags, int group, unsigned checks, char *errbuf,
                     size_t errlen) {
    rule_t *u = &r->rules[r->nrules];
    int rc = regcomp(&u->re, re, REG_EXTENDED | flags);
    if (rc != 0) {
        char why[160];
        regerror(rc, &u->re, why, sizeof(why));
        return lr_seterr(errbuf, errlen, rc == REG_ESPACE ? LR_ENOMEM : LR_ECONFIG, "%s: %s", re, why);
    }
    if ((size_t)group > u->re.re_nsub) {
        regfree(&u->re);
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s: no group %d", re, group);
    }
    if (regexec(&u->re, "", 0, NULL, 0) == 0) {
        regfree(&u->re);
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "%s: matches the empty string", re);
    }
    u->kind = RULE_REGEX;
    u->cls = cls;
    u->group = group;
    u->checks = checks;
    r->nrules++;
    return 0;
}

static int add_builtin(lr_redact_t *r, const char *name, size_t len, char *errbuf, size_t errlen) {
    int cls, rc;
    if (len == 5 && memcmp(name, "email", 5) == 0) {
        cls = class_of(r, name, len);
        r->rules[r->nrules++] = (rule_t){.kind = RULE_EMAIL, .cls = cls};
        return 0;
    }
    if (len == 4 && memcmp(name, "card", 4) == 0) {
        cls = class_of(r, name, len);
        r->rules[r->nrules++] = (rule_t){.kind = RULE_CARD, .cls = cls};
        return 0;
    }
    if (len == 7 && memcmp(name, "api_key", 7) == 0) {
        cls = class_of(r, name, len);
        for (size_t i = 0; i < sizeof(api_key_rules) / sizeof(api_key_rules[0]); i++) {
            rc = add_regex(r, cls, api_key_rules[i].re, api_key_rules[i].flags, api_key_rules[i].group,
                           api_key_rules[i].checks, errbuf, errlen);
            if (rc != 0) {
                return rc;
            }
        }
        return 0;
    }
    return lr_seterr(errbuf, errlen, LR_ECONFIG, "unknown class '%.*s' (known: all, none, email, api_key, card)",
                     (int)(len < 40 ? len : 40), name);
}

static bool seen_builtin(const lr_redact_t *r, const char *name, size_t len) { return find_class(r, name, len) >= 0; }

static int parse_classes(lr_redact_t *r, const char *classes, char *errbuf, size_t errlen) {
    const char *p = classes != NULL && classes[0] != '\0' ? classes : "all";
    int rc;
    if (strcmp(p, "none") == 0) {
        return 0;
    }
    if (strcmp(p, "all") == 0) {
        for (size_t i = 0; i < sizeof(builtin_names) / sizeof(builtin_names[0]); i++) {
            rc = add_builtin(r, builtin_names[i], strlen(builtin_names[i]), errbuf, errlen);
            if (rc != 0) {
                return rc;
            }
        }
        return 0;
    }
    while (*p != '\0') {
        size_t n;
        while (*p == ' ' || *p == ',') {
            p++;
        }
        n = strcspn(p, ", ");
        if (n == 0) {
            break;
        }
        if (!seen_builtin(r, p, n)) {
            rc = add_builtin(r, p, n, errbuf, errlen);
            if (rc != 0) {
                return rc;
            }
        }
        p += n;
    }
    return 0;
}

/* Length of "name=" at the start of an entry, or 0. */
static size_t entry_name_len(const char *e, size_t n) {
    size_t i = 0;
    if (n == 0 || !(e[0] >= 'a' && e[0] <= 'z')) {
        return 0;
    }
    while (i < n && i < LR_REDACT_MAX_NAME &&
           ((e[i] >= 'a' && e[i] <= 'z') || isdigit((unsigned char)e[i]) || e[i] == '_')) {
        i++;
    }
    return i < n && e[i] == '=' ? i : 0;
}

static int parse_patterns(lr_redact_t *r, const char *patterns, char *errbuf, size_t errlen) {
    int ncustom = 0, rc;
    for (const char *p = patterns != NULL ? patterns : ""; *p != '\0';) {
        size_t n = strcspn(p, "\n"), name;
        char re[LR_REDACT_MAX_PATTERN + 1];
        const char *line = p;
        p += n;
        if (*p == '\n') {
            p++;
        }
        if (n > 0 && line[n - 1] == '\r') {
            n--;
        }
        if (n == 0) {
            continue;
        }
        if (ncustom == LR_REDACT_MAX_CUSTOM) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "more than %d patterns", LR_REDACT_MAX_CUSTOM);
        }
        name = entry_name_len(line, n);
        if (n - (name > 0 ? name + 1 : 0) > LR_REDACT_MAX_PATTERN) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "pattern %d is longer than %d bytes", ncustom + 1,
                             LR_REDACT_MAX_PATTERN);
        }
        memcpy(re, line + (name > 0 ? name + 1 : 0), n - (name > 0 ? name + 1 : 0));
        re[n - (name > 0 ? name + 1 : 0)] = '\0';
        if (re[0] == '\0') {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "pattern %d (%.*s) is empty", ncustom + 1, (int)name, line);
        }
        rc = add_regex(r, name > 0 ? class_of(r, line, name) : class_of(r, "custom", 6), re, 0, 0, 0, errbuf, errlen);
        if (rc != 0) {
            return rc;
        }
        ncustom++;
    }
    return 0;
}

int lr_redact_new(lr_redact_t **out, const char *classes, const char *patterns, char *errbuf, size_t errlen) {
    lr_redact_t *r = calloc(1, sizeof(*r));
    int rc;
    *out = NULL;
    if (r == NULL) {
        return LR_ENOMEM;
    }
    rc = parse_classes(r, classes, errbuf, errlen);
    if (rc == 0) {
        rc = parse_patterns(r, patterns, errbuf, errlen);
    }
    if (rc != 0) {
        lr_redact_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

void lr_redact_free(lr_redact_t *r) {
    if (r == NULL) {
        return;
    }
    for (int i = 0; i < r->nrules; i++) {
        if (r->rules[i].kind == RULE_REGEX) {
            regfree(&r->rules[i].re);
        }
    }
    free(r);
}

int lr_redact_rules(const lr_redact_t *r) { return r != NULL ? r->nrules : 0; }
int lr_redact_classes(const lr_redact_t *r) { return r != NULL ? r->nnames : 0; }
const char *lr_redact_class_name(const lr_redact_t *r, int i) {
    return r != NULL && i >= 0 && i < r->nnames ? r->names[i] : "";
}

/* ------------------------------------------------------------- matching */

typedef struct match {
    size_t start, end;
    int cls;
} match_t;

typedef struct matches {
    match_t *m;
    size_t n, cap;
    bool oom;
} matches_t;

/* Records s[start..end), widened to whole UTF-8 sequences (a custom
 * pattern may match part of one). */
static void add_match(matches_t *ms, const char *s, size_t n, size_t start, size_t end, int cls) {
    if (ms->oom) {
        return;
    }
    while (start > 0 && ((unsigned char)s[start] & 0xC0) == 0x80) {
        start--;
    }
    while (end < n && ((unsigned char)s[end] & 0xC0) == 0x80) {
        end++;
    }
    if (ms->n == ms->cap) {
        size_t ncap = ms->cap > 0 ? ms->cap * 2 : 32;
        match_t *nm = realloc(ms->m, ncap * sizeof(*nm));
        if (nm == NULL) {
            ms->oom = true;
            return;
        }
        ms->m = nm;
        ms->cap = ncap;
    }
    ms->m[ms->n++] = (match_t){start, end, cls};
}

static bool word_char(unsigned char c) { return isalnum(c) || c == '_' || c == '-'; }

static void scan_regex(const rule_t *u, const char *s, size_t n, matches_t *ms) {
    regmatch_t pm[10];
    size_t pos = 0, ng = (size_t)u->group + 1;
    while (pos < n && !ms->oom) {
        size_t ms0, me0, a, b;
        pm[0].rm_so = (regoff_t)pos;
        pm[0].rm_eo = (regoff_t)n;
        if (regexec(&u->re, s, ng, pm, REG_STARTEND | (pos > 0 ? REG_NOTBOL : 0)) != 0) {
            return;
        }
        ms0 = (size_t)pm[0].rm_so;
        me0 = (size_t)pm[0].rm_eo;
        if (me0 <= ms0) {
            pos = ms0 + 1; /* (an empty match: refused at compile time, but never loop) */
            continue;
        }
        a = pm[u->group].rm_so >= 0 ? (size_t)pm[u->group].rm_so : ms0;
        b = pm[u->group].rm_so >= 0 ? (size_t)pm[u->group].rm_eo : me0;
        if (((u->checks & CHECK_LEFT) && ms0 > 0 && word_char((unsigned char)s[ms0 - 1])) ||
            ((u->checks & CHECK_RIGHT) && me0 < n && isalnum((unsigned char)s[me0]))) {
            pos = ms0 + 1;
            continue;
        }
        if (u->checks & CHECK_DIGIT) {
            bool digit = false;
            for (size_t i = a; i < b && !digit; i++) {
                digit = isdigit((unsigned char)s[i]) != 0;
            }
            if (!digit) {
                pos = ms0 + 1;
                continue;
            }
        }
        if (b > a) {
            add_match(ms, s, n, a, b, u->cls);
        }
        pos = me0;
    }
}

/* Bytes of an address: ASCII as usual, and any byte of a UTF-8 sequence (an
 * internationalized address, jürgen@example.de, is hidden whole). */
static bool local_char(unsigned char c) {
    return isalnum(c) || c >= 0x80 || c == '.' || c == '_' || c == '%' || c == '+' || c == '-';
}
static bool domain_char(unsigned char c) { return isalnum(c) || c >= 0x80 || c == '.' || c == '-'; }

/* An e-mail address around the '@' at s[at]: its span, or false. */
static bool email_at(const char *s, size_t n, size_t at, size_t *start, size_t *end) {
    size_t a = at, b = at + 1, last_dot = 0, label = 0;
    while (a > 0 && at - a < 64 && local_char((unsigned char)s[a - 1])) {
        a--;
    }
    while (a < at && s[a] == '.') {
        a++;
    }
    if (a == at) {
        return false;
    }
    while (b < n && b - at <= 253 && domain_char((unsigned char)s[b])) {
        b++;
    }
    while (b > at + 1 && (s[b - 1] == '.' || s[b - 1] == '-')) {
        b--;
    }
    /* labels of 1-63 characters, not starting or ending with '-'; a dot; a TLD of letters */
    for (size_t i = at + 1; i < b; i++) {
        if (s[i] == '.') {
            if (label == 0 || s[i - 1] == '-') {
                return false;
            }
            last_dot = i;
            label = 0;
            continue;
        }
        if (label == 0 && s[i] == '-') {
            return false;
        }
        if (++label > 63) {
            return false;
        }
    }
    if (last_dot == 0 || b - last_dot - 1 < 2) {
        return false;
    }
    for (size_t i = last_dot + 1; i < b; i++) {
        if (!isalpha((unsigned char)s[i]) && (unsigned char)s[i] < 0x80) {
            return false;
        }
    }
    *start = a;
    *end = b;
    return true;
}

static void scan_email(const rule_t *u, const char *s, size_t n, matches_t *ms) {
    size_t pos = 0, a, b;
    const char *at;
    while (pos < n && (at = memchr(s + pos, '@', n - pos)) != NULL) {
        size_t i = (size_t)(at - s);
        if (email_at(s, n, i, &a, &b)) {
            add_match(ms, s, n, a, b, u->cls);
            pos = b;
        } else {
            pos = i + 1;
        }
    }
}

/* The Luhn check over the digits of s[a..b) (separators skipped). */
static bool luhn(const char *s, size_t a, size_t b) {
    int sum = 0, k = 0;
    for (size_t i = b; i > a; i--) {
        unsigned char c = (unsigned char)s[i - 1];
        int d;
        if (!isdigit(c)) {
            continue;
        }
        d = c - '0';
        if (k++ % 2 == 1) {
            d = d * 2 > 9 ? d * 2 - 9 : d * 2;
        }
        sum += d;
    }
    return sum % 10 == 0;
}

#define CARD_MAX_GROUPS 12

/* Card numbers: 13 to 19 digits in groups separated by single spaces or
 * dashes, passing the Luhn check.  From each run of such groups, the longest
 * span of whole groups that passes, from the first group on; what is left
 * of the run is tried again.  A group that is part of a decimal number
 * (3.14159...) does not start one. */
static void scan_card(const rule_t *u, const char *s, size_t n, matches_t *ms) {
    size_t i = 0;
    while (i < n) {
        size_t gs[CARD_MAX_GROUPS], ge[CARD_MAX_GROUPS], ng = 0, j = i, next;
        bool found = false;
        if (!isdigit((unsigned char)s[i]) || (i > 0 && isdigit((unsigned char)s[i - 1]))) {
            i++;
            continue;
        }
        /* the groups of this run */
        while (ng < CARD_MAX_GROUPS) {
            gs[ng] = j;
            while (j < n && isdigit((unsigned char)s[j])) {
                j++;
            }
            ge[ng++] = j;
            if (j + 1 < n && (s[j] == ' ' || s[j] == '-') && isdigit((unsigned char)s[j + 1])) {
                j++;
                continue;
            }
            break;
        }
        next = ge[0];
        for (size_t a = 0; a < ng && !found; a++) {
            size_t digits = 0, best = SIZE_MAX;
            if (gs[a] > 1 && (s[gs[a] - 1] == '.' || s[gs[a] - 1] == ',') && isdigit((unsigned char)s[gs[a] - 2])) {
                continue; /* the fraction of a decimal number */
            }
            for (size_t b = a; b < ng; b++) {
                digits += ge[b] - gs[b];
                if (digits > 19) {
                    break;
                }
                if (digits >= 13 && luhn(s, gs[a], ge[b]) &&
                    !(ge[b] + 1 < n && (s[ge[b]] == '.' || s[ge[b]] == ',') && isdigit((unsigned char)s[ge[b] + 1]))) {
                    best = b;
                }
            }
            if (best != SIZE_MAX) {
                add_match(ms, s, n, gs[a], ge[best], u->cls);
                next = ge[best];
                found = true;
            }
        }
        if (!found) {
            next = ge[ng - 1];
        }
        i = next;
    }
}

static int by_start(const void *x, const void *y) {
    const match_t *a = x, *b = y;
    if (a->start != b->start) {
        return a->start < b->start ? -1 : 1;
    }
    return a->end > b->end ? -1 : a->end < b->end ? 1 : 0;
}

/* The largest k <= want such that s[0..k) does not end inside a UTF-8
 * sequence (k is a boundary of the input's characters). */
static size_t utf8_floor(const char *s, size_t want) {
    size_t k = want;
    while (k > 0 && ((unsigned char)s[k] & 0xC0) == 0x80) {
        k--;
    }
    return k;
}

int lr_redact_text(const lr_redact_t *r, const char *s, size_t n, size_t max, unsigned flags, lr_redact_out_t *out) {
    matches_t ms = {NULL, 0, 0, false};
    size_t limit = n, pos = 0, len = 0;
    char *text;
    memset(out, 0, sizeof(*out));
    if (s == NULL) {
        s = "";
        n = limit = 0;
    }
    text = malloc(max + 1);
    if (text == NULL) {
        return LR_ENOMEM;
    }
    for (int i = 0; r != NULL && i < r->nrules; i++) {
        const rule_t *u = &r->rules[i];
        if (u->kind == RULE_REGEX) {
            scan_regex(u, s, n, &ms);
        } else if (u->kind == RULE_EMAIL) {
            scan_email(u, s, n, &ms);
        } else {
            scan_card(u, s, n, &ms);
        }
    }
    if (ms.oom) {
        free(ms.m);
        free(text);
        return LR_ENOMEM;
    }
    if (ms.n > 1) {
        qsort(ms.m, ms.n, sizeof(ms.m[0]), by_start);
    }
    if (flags & LR_REDACT_PARTIAL) {
        limit = n > LR_REDACT_LOOKAHEAD ? n - LR_REDACT_LOOKAHEAD : 0;
        limit = limit < n ? utf8_floor(s, limit) : limit;
        out->cut = true;
    }
    for (size_t k = 0; k <= ms.n; k++) {
        size_t start = k < ms.n ? ms.m[k].start : n, end = k < ms.n ? ms.m[k].end : n;
        int cls = k < ms.n ? ms.m[k].cls : -1;
        /* merge every later match that overlaps this one */
        while (k + 1 < ms.n && ms.m[k + 1].start < end) {
            k++;
            end = ms.m[k].end > end ? ms.m[k].end : end;
        }
        if (start < pos) {
            start = pos; /* (cannot happen: matches were merged) */
        }
        /* the plain text before it */
        {
            size_t upto = start < limit ? start : limit, take = upto > pos ? upto - pos : 0;
            if (take > max - len) {
                take = utf8_floor(s + pos, max - len); /* (upto is a boundary: a match's start or limit) */
            }
            memcpy(text + len, s + pos, take);
            len += take;
            if (pos + take < start) {
                out->cut = true;
                break;
            }
            pos = start;
        }
        if (cls < 0) {
            break;
        }
        {
            char marker[LR_REDACT_MAX_NAME + 16];
            int m = snprintf(marker, sizeof(marker), "[redacted:%s]", r->names[cls]);
            if (start >= limit || (size_t)m > max - len) {
                out->cut = true;
                break;
            }
            memcpy(text + len, marker, (size_t)m);
            len += (size_t)m;
            out->matches++;
            out->counts[cls]++;
            pos = end;
        }
    }
    text[len] = '\0';
    out->text = text;
    out->len = len;
    free(ms.m);
    return 0;
}
