/*
 * fuzz_jsonschema.c - libFuzzer target for the tool-argument validator,
 * lr_schema_check() and lr_schema_validate() (common/jsonschema.c).  The
 * schema comes from an agents file and the value from a model, so both are
 * outside input.
 *
 * Input layout: the schema text, a separator (the first NUL byte, or else
 * the first newline), the value text.  Both are parsed with cJSON; inputs
 * where either does not parse are skipped.
 *
 * Properties:
 *   - lr_schema_check returns 0, LR_ECONFIG or LR_ENOMEM, and a refusal has
 *     a message;
 *   - on a checked schema lr_schema_validate returns 0, LR_EINVAL or
 *     LR_ENOMEM (never LR_ECONFIG: the check covers everything validate
 *     would call broken); on an unchecked one it stays memory-safe and may
 *     also return LR_ECONFIG;
 *   - a message is NUL-terminated, valid UTF-8 without control characters
 *     (it goes to the model, the logs and jsonb), empty on success, and a
 *     violation's message starts with a path "$";
 *   - the result does not depend on the error buffer: the same call with
 *     no buffer, and with a 16-byte one (cut on a character boundary),
 *     returns the same code;
 *   - validation is deterministic and leaves the schema and value as they
 *     were (the printed texts do not change).
 */
#include <cjson/cJSON.h>

#include "err.h"
#include "fuzz_util.h"
#include "jsonschema.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Valid UTF-8 (PostgreSQL's rules) without control characters. */
static bool clean_msg(const char *s) {
    for (const char *p = s; *p != '\0'; p++) {
        if ((unsigned char)*p < 0x20) {
            return false;
        }
    }
    return fuzz_pg_json_ok(s);
}

static void check_msg(const char *buf, size_t size) {
    FUZZ_CHECK(fuzz_terminated(buf, size), "the message is NUL-terminated within its buffer");
    FUZZ_CHECK(clean_msg(buf), "the message is valid UTF-8 without control characters");
}

static void validate(const cJSON *schema, const cJSON *value, bool checked) {
    char err[512], small[16];
    char *before_s = cJSON_PrintUnformatted(schema), *before_v = cJSON_PrintUnformatted(value), *after;
    int rc, rc2;

    memset(err, 'X', sizeof(err));
    rc = lr_schema_validate(schema, value, err, sizeof(err));
    if (checked) {
        FUZZ_CHECK(rc == 0 || rc == LR_EINVAL || rc == LR_ENOMEM, "validate on a checked schema: documented code");
    } else {
        FUZZ_CHECK(rc == 0 || rc == LR_EINVAL || rc == LR_ECONFIG || rc == LR_ENOMEM, "validate: documented code");
    }
    check_msg(err, sizeof(err));
    if (rc == 0) {
        FUZZ_CHECK(err[0] == '\0', "success leaves an empty message");
    } else {
        FUZZ_CHECK(err[0] == '$', "a violation names its path");
    }
    rc2 = lr_schema_validate(schema, value, NULL, 0);
    FUZZ_CHECK(rc2 == rc, "the result does not depend on the error buffer (none)");
    memset(small, 'X', sizeof(small));
    rc2 = lr_schema_validate(schema, value, small, sizeof(small));
    FUZZ_CHECK(rc2 == rc, "the result does not depend on the error buffer (16 bytes)");
    check_msg(small, sizeof(small));
    FUZZ_CHECK(strncmp(small, err, strlen(small)) == 0, "a small buffer holds a prefix of the message");

    after = cJSON_PrintUnformatted(schema);
    FUZZ_CHECK((before_s == NULL) == (after == NULL) && (after == NULL || strcmp(before_s, after) == 0),
               "validate leaves the schema alone");
    free(after);
    after = cJSON_PrintUnformatted(value);
    FUZZ_CHECK((before_v == NULL) == (after == NULL) && (after == NULL || strcmp(before_v, after) == 0),
               "validate leaves the value alone");
    free(after);
    free(before_s);
    free(before_v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *sep = memchr(data, '\0', size);
    cJSON *schema, *value;
    char err[512];
    size_t slen;
    int rc;

    if (sep == NULL) {
        sep = memchr(data, '\n', size);
    }
    if (sep == NULL) {
        return 0;
    }
    slen = (size_t)(sep - data);
    schema = cJSON_ParseWithLength((const char *)data, slen);
    value = cJSON_ParseWithLength((const char *)sep + 1, size - slen - 1);
    if (schema == NULL || value == NULL) {
        cJSON_Delete(schema);
        cJSON_Delete(value);
        return 0;
    }
    memset(err, 'X', sizeof(err));
    rc = lr_schema_check(schema, err, sizeof(err));
    FUZZ_CHECK(rc == 0 || rc == LR_ECONFIG || rc == LR_ENOMEM, "lr_schema_check returns a documented code");
    check_msg(err, sizeof(err));
    FUZZ_CHECK(rc != LR_ECONFIG || err[0] != '\0', "a refused schema gets a message");
    FUZZ_CHECK(lr_schema_check(schema, NULL, 0) == rc, "check does not depend on the error buffer");
    validate(schema, value, rc == 0);
    cJSON_Delete(schema);
    cJSON_Delete(value);
    return 0;
}
