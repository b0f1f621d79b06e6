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
 *
 * Files, each using only those below it: jsonschema.c (lr_schema_validate),
 * jsonschema_check.c (lr_schema_check), jsonschema_pattern.c (patterns,
 * $ref), jsonschema_util.c (paths and messages); what they share is in
 * jsonschema_int.h (prefix lrs_).
 */
#include "jsonschema_int.h"

/* ---- lr_schema_validate -------------------------------------------------- */

LR_PRINTF(2, 3)
static int vfail(vctx_t *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    lrs_put_msg(c->err, c->errlen, &c->path, fmt, ap);
    va_end(ap);
    return V_FAIL;
}

LR_PRINTF(3, 4)
static int vhard(vctx_t *c, int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    lrs_put_msg(c->err, c->errlen, &c->path, fmt, ap);
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
        lrs_utf8_trim_tail(err);
    }
    return rc;
}

/* A branch's message without the path prefix it shares with its parent. */
static const char *branch_msg(const vctx_t *c, const char *msg) {
    size_t n = strlen(lrs_path_str(&c->path));
    if (strncmp(msg, lrs_path_str(&c->path), n) == 0 && strncmp(msg + n, ": ", 2) == 0) {
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
        lrs_escape_text(t->valuestring, out, cap);
        return;
    }
    cJSON_ArrayForEach(e, t) {
        char esc[NAME_SHOWN + 8];
        int w;
        if (!cJSON_IsString(e)) {
            continue;
        }
        lrs_escape_text(e->valuestring, esc, sizeof(esc));
        w = snprintf(out + o, cap - o, "%s%s", o > 0 ? " or " : "", esc);
        if (w < 0 || (size_t)w >= cap - o) {
            lrs_utf8_trim_tail(out);
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
    const cJSON *t = lrs_kw(s, "type");
    bool nullable = cJSON_IsTrue(lrs_kw(s, "nullable"));
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
    const cJSON *en = lrs_kw(s, "enum"), *cn = lrs_kw(s, "const"), *e;
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
    const cJSON *r = lrs_kw(s, "$ref"), *t;
    bool supported;
    char esc[NAME_SHOWN + 8];
    if (!cJSON_IsString(r)) {
        return V_OK;
    }
    t = lrs_resolve_ref(c->root, r->valuestring, &supported);
    if (t == NULL) {
        lrs_escape_text(r->valuestring, esc, sizeof(esc));
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
    const cJSON *min = lrs_kw(s, "minimum"), *max = lrs_kw(s, "maximum");
    const cJSON *xmin = lrs_kw(s, "exclusiveMinimum"), *xmax = lrs_kw(s, "exclusiveMaximum"),
                *mul = lrs_kw(s, "multipleOf");
    double x = v->valuedouble;
    char a[40], b[40];
    if (cJSON_IsNumber(min)) {
        bool excl = cJSON_IsTrue(xmin);
        if (excl ? x <= min->valuedouble : x < min->valuedouble) {
            return vfail(c, "%s is %s %s", lrs_fmt_num(x, a, sizeof(a)),
                         excl ? "not greater than the exclusive minimum" : "less than minimum",
                         lrs_fmt_num(min->valuedouble, b, sizeof(b)));
        }
    }
    if (cJSON_IsNumber(max)) {
        bool excl = cJSON_IsTrue(xmax);
        if (excl ? x >= max->valuedouble : x > max->valuedouble) {
            return vfail(c, "%s is %s %s", lrs_fmt_num(x, a, sizeof(a)),
                         excl ? "not less than the exclusive maximum" : "greater than maximum",
                         lrs_fmt_num(max->valuedouble, b, sizeof(b)));
        }
    }
    if (cJSON_IsNumber(xmin) && x <= xmin->valuedouble) {
        return vfail(c, "%s is not greater than exclusiveMinimum %s", lrs_fmt_num(x, a, sizeof(a)),
                     lrs_fmt_num(xmin->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(xmax) && x >= xmax->valuedouble) {
        return vfail(c, "%s is not less than exclusiveMaximum %s", lrs_fmt_num(x, a, sizeof(a)),
                     lrs_fmt_num(xmax->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(mul) && mul->valuedouble > 0 && !is_multiple(x, mul->valuedouble)) {
        return vfail(c, "%s is not a multiple of %s", lrs_fmt_num(x, a, sizeof(a)),
                     lrs_fmt_num(mul->valuedouble, b, sizeof(b)));
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
    int rc = lrs_pattern_search(pattern, str, LR_SCHEMA_MAX_STEPS - c->steps, matched, &cost, why, sizeof(why));
    if (rc == LR_ETOOBIG) {
        return spend(c, cost); /* over the budget: the V_HARD of spend() */
    }
    if (rc == LR_ENOMEM) {
        return vhard(c, rc, "out of memory matching a pattern");
    }
    if (rc != 0) {
        lrs_escape_text(pattern, esc, sizeof(esc));
        return vhard(c, rc, "schema error: pattern \"%s\": %s (lr_schema_check was skipped)", esc, why);
    }
    return spend(c, cost);
}

static int apply_string(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *minl = lrs_kw(s, "minLength"), *maxl = lrs_kw(s, "maxLength"), *pat = lrs_kw(s, "pattern");
    size_t n = utf8_count(v->valuestring);
    char b[40], esc[NAME_SHOWN + 8];
    bool matched = true;
    int rc;
    if (cJSON_IsNumber(minl) && (double)n < minl->valuedouble) {
        return vfail(c, "string length %zu is less than minLength %s", n, lrs_fmt_num(minl->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(maxl) && (double)n > maxl->valuedouble) {
        return vfail(c, "string length %zu is greater than maxLength %s", n,
                     lrs_fmt_num(maxl->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsString(pat)) {
        rc = apply_pattern(c, pat->valuestring, v->valuestring, &matched);
        if (rc != V_OK) {
            return rc;
        }
        if (!matched) {
            lrs_escape_text(pat->valuestring, esc, sizeof(esc));
            return vfail(c, "string does not match pattern \"%s\"", esc);
        }
    }
    return V_OK;
}

static int apply_array(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *mini = lrs_kw(s, "minItems"), *maxi = lrs_kw(s, "maxItems"), *items = lrs_kw(s, "items");
    const cJSON *prefix = lrs_kw(s, "prefixItems"), *p, *e;
    int n = cJSON_GetArraySize(v), i = 0, rc = V_OK;
    char b[40];
    if (cJSON_IsNumber(mini) && n < mini->valuedouble) {
        return vfail(c, "array length %d is less than minItems %s", n, lrs_fmt_num(mini->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(maxi) && n > maxi->valuedouble) {
        return vfail(c, "array length %d is greater than maxItems %s", n, lrs_fmt_num(maxi->valuedouble, b, sizeof(b)));
    }
    p = cJSON_IsArray(prefix) ? prefix->child : NULL;
    if (cJSON_IsArray(items)) {
        items = NULL; /* the old tuple form: lr_schema_check refuses it */
    }
    cJSON_ArrayForEach(e, v) {
        const cJSON *sub = p != NULL ? p : items;
        if (sub != NULL) {
            size_t mark = lrs_path_push_index(&c->path, i);
            rc = apply(c, sub, e);
            lrs_path_pop(&c->path, mark);
            if (rc != V_OK) {
                return rc;
            }
        }
        p = p != NULL ? p->next : NULL;
        i++;
    }
    if (cJSON_IsTrue(lrs_kw(s, "uniqueItems"))) {
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
    const cJSON *props = lrs_kw(s, "properties"), *pprops = lrs_kw(s, "patternProperties");
    const cJSON *add = lrs_kw(s, "additionalProperties"), *ps, *pp;
    char esc[NAME_SHOWN + 8];
    bool known = false;
    size_t mark;
    int rc = V_OK;
    ps = cJSON_IsObject(props) ? cJSON_GetObjectItemCaseSensitive(props, m->string) : NULL;
    mark = lrs_path_push_name(&c->path, m->string);
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
            lrs_path_pop(&c->path, mark);
            lrs_escape_text(m->string, esc, sizeof(esc));
            return vfail(c, "unexpected property \"%s\"", esc);
        }
        rc = apply(c, add, m);
    }
    lrs_path_pop(&c->path, mark);
    return rc;
}

static int apply_object(vctx_t *c, const cJSON *s, const cJSON *v) {
    const cJSON *minp = lrs_kw(s, "minProperties"), *maxp = lrs_kw(s, "maxProperties"), *req = lrs_kw(s, "required");
    const cJSON *r, *m;
    int n = cJSON_GetArraySize(v), rc;
    char b[40], esc[NAME_SHOWN + 8];
    if (cJSON_IsNumber(minp) && n < minp->valuedouble) {
        return vfail(c, "property count %d is less than minProperties %s", n,
                     lrs_fmt_num(minp->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsNumber(maxp) && n > maxp->valuedouble) {
        return vfail(c, "property count %d is greater than maxProperties %s", n,
                     lrs_fmt_num(maxp->valuedouble, b, sizeof(b)));
    }
    if (cJSON_IsArray(req)) {
        cJSON_ArrayForEach(r, req) {
            if (cJSON_IsString(r) && cJSON_GetObjectItemCaseSensitive(v, r->valuestring) == NULL) {
                lrs_escape_text(r->valuestring, esc, sizeof(esc));
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
    const cJSON *all = lrs_kw(s, "allOf"), *any = lrs_kw(s, "anyOf"), *one = lrs_kw(s, "oneOf"),
                *neg = lrs_kw(s, "not"), *b;
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
        size_t mark = cJSON_IsObject(v) ? lrs_path_push_name(&c->path, e->string != NULL ? e->string : "")
                                        : lrs_path_push_index(&c->path, i);
        int rc = check_value_depth(c, e, level + 1);
        lrs_path_pop(&c->path, mark);
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
    lrs_path_push(&c.path, "$");
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
