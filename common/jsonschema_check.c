/*
 * jsonschema_check.c - lr_schema_check(): the walk that proves the shape of every
 * keyword of a schema once, when a tool is loaded.
 */
#include "jsonschema_int.h"

/* ---- lr_schema_check ----------------------------------------------------- */

LR_PRINTF(2, 3)
static int cfail(cctx_t *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    lrs_put_msg(c->err, c->errlen, &c->path, fmt, ap);
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
        lrs_escape_text(t->valuestring, esc, sizeof(esc));
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
        size_t mark = lrs_path_push_index(&c->path, i++);
        rc = check_type_name(c, t);
        lrs_path_pop(&c->path, mark);
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
    int rc = lrs_pattern_search(pattern, NULL, 0, &found, &cost, why, sizeof(why));
    if (rc == 0) {
        return 0;
    }
    if (rc == LR_ENOMEM) {
        return lr_seterr(c->err, c->errlen, LR_ENOMEM, "%s: out of memory compiling the pattern",
                         lrs_path_str(&c->path));
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
            size_t mark = lrs_path_push_index(&c->path, i);
            int rc = cfail(c, "must be a string (a property name)");
            lrs_path_pop(&c->path, mark);
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
        size_t mark = lrs_path_push_name(&c->path, m->string != NULL ? m->string : "");
        if (names_are_patterns) {
            rc = check_pattern_text(c, m->string != NULL ? m->string : "");
        }
        if (rc == 0) {
            rc = check_schema(c, m, level + 1);
        }
        lrs_path_pop(&c->path, mark);
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
        size_t mark = lrs_path_push_index(&c->path, i++);
        rc = check_schema(c, m, level + 1);
        lrs_path_pop(&c->path, mark);
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
    lrs_escape_text(v->valuestring, esc, sizeof(esc));
    t = lrs_resolve_ref(c->root, v->valuestring, &supported);
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
        const cJSON *r = lrs_kw(t, "$ref");
        if (!cJSON_IsString(r)) {
            break;
        }
        if (hops >= LR_SCHEMA_MAX_DEPTH) {
            return cfail(c, "reference cycle: \"%s\" only leads to more references", esc);
        }
        t = lrs_resolve_ref(c->root, r->valuestring, &supported);
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
                size_t mark = lrs_path_push_name(&c->path, m->string);
                int rc = check_kws[i].check(c, m, level);
                lrs_path_pop(&c->path, mark);
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
