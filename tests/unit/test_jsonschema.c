/*
 * test_jsonschema.c - unit test of common/jsonschema.c: every keyword with a
 * passing and a failing value, the exact messages (with their paths) that go
 * back to the model, what lr_schema_check refuses, the depth and work limits,
 * UTF-8 length counting and messages cut by a small buffer.
 *
 * Each case is one line: OK(schema, value) must pass the check and the
 * validation; BAD(schema, value, message) must pass the check and fail the
 * validation with exactly that message; SBAD(schema, message) must fail the
 * check with exactly that message.  Schemas and values are JSON text.
 */
#include <cjson/cJSON.h>
#include <locale.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "jsonschema.h"
#include "testutil.h"
#include "text.h"

static int ncases;

static cJSON *parse_at(int line, const char *text) {
    cJSON *j = cJSON_Parse(text);
    if (j == NULL) {
        T_FAIL("line %d: test input is not JSON: %s", line, text);
    }
    return j;
}

/* A message must be valid UTF-8 without control characters (it goes to the
 * model, the logs and jsonb). */
static void assert_clean_msg(int line, const char *msg) {
    if (!lr_pg_text_ok(msg, strlen(msg))) {
        T_FAIL("line %d: message is not valid UTF-8: %s", line, msg);
    }
    for (const char *p = msg; *p != '\0'; p++) {
        if ((unsigned char)*p < 0x20) {
            T_FAIL("line %d: message holds a control character: %s", line, msg);
        }
    }
}

/* Runs check + validate; returns the validation code, message in err. */
static int run_at(int line, const char *schema_text, const char *value_text, char *err, size_t errlen) {
    cJSON *schema = parse_at(line, schema_text), *value = parse_at(line, value_text);
    char cerr[512] = "";
    int rc = lr_schema_check(schema, cerr, sizeof(cerr));
    if (rc != 0) {
        T_FAIL("line %d: schema %s refused: %s (%s)", line, schema_text, cerr, lr_err_name(rc));
    }
    err[0] = '\0';
    rc = lr_schema_validate(schema, value, err, errlen);
    cJSON_Delete(schema);
    cJSON_Delete(value);
    ncases++;
    return rc;
}

static void ok_at(int line, const char *schema_text, const char *value_text) {
    char err[512];
    int rc = run_at(line, schema_text, value_text, err, sizeof(err));
    if (rc != 0) {
        T_FAIL("line %d: %s against %s: %s, \"%s\"", line, value_text, schema_text, lr_err_name(rc), err);
    }
    T_EQ_STR(err, "");
}

static void bad_at(int line, const char *schema_text, const char *value_text, const char *want) {
    char err[512];
    int rc = run_at(line, schema_text, value_text, err, sizeof(err));
    if (rc != LR_EINVAL) {
        T_FAIL("line %d: %s against %s: want LR_EINVAL, got %s \"%s\"", line, value_text, schema_text, lr_err_name(rc),
               err);
    }
    if (strcmp(err, want) != 0) {
        T_FAIL("line %d: message\n  got:  %s\n  want: %s", line, err, want);
    }
    assert_clean_msg(line, err);
}

static void sbad_at(int line, const char *schema_text, const char *want) {
    cJSON *schema = parse_at(line, schema_text);
    char err[512] = "";
    int rc = lr_schema_check(schema, err, sizeof(err));
    cJSON_Delete(schema);
    ncases++;
    if (rc != LR_ECONFIG) {
        T_FAIL("line %d: schema %s: want LR_ECONFIG, got %s \"%s\"", line, schema_text, lr_err_name(rc), err);
    }
    if (strcmp(err, want) != 0) {
        T_FAIL("line %d: message\n  got:  %s\n  want: %s", line, err, want);
    }
    assert_clean_msg(line, err);
}

/* The check refuses the schema with a message that starts with want. */
static void sbad_prefix_at(int line, const char *schema_text, const char *want) {
    cJSON *schema = parse_at(line, schema_text);
    char err[512] = "";
    int rc = lr_schema_check(schema, err, sizeof(err));
    cJSON_Delete(schema);
    ncases++;
    if (rc != LR_ECONFIG || strncmp(err, want, strlen(want)) != 0) {
        T_FAIL("line %d: schema %s: %s \"%s\", want LR_ECONFIG \"%s...\"", line, schema_text, lr_err_name(rc), err,
               want);
    }
    assert_clean_msg(line, err);
}

#define OK(s, v) ok_at(__LINE__, s, v)
#define BAD(s, v, m) bad_at(__LINE__, s, v, m)
#define SBAD(s, m) sbad_at(__LINE__, s, m)
#define SBAD_PREFIX(s, m) sbad_prefix_at(__LINE__, s, m)

static void test_type(void) {
    OK("{\"type\":\"string\"}", "\"abc\"");
    BAD("{\"type\":\"string\"}", "1", "$: expected string, got number");
    OK("{\"type\":\"number\"}", "1.5");
    BAD("{\"type\":\"number\"}", "\"1\"", "$: expected number, got string");
    OK("{\"type\":\"integer\"}", "3");
    OK("{\"type\":\"integer\"}", "3.0");
    OK("{\"type\":\"integer\"}", "-4e2");
    BAD("{\"type\":\"integer\"}", "3.5", "$: expected integer, got number");
    BAD("{\"type\":\"integer\"}", "\"3\"", "$: expected integer, got string");
    OK("{\"type\":\"boolean\"}", "true");
    OK("{\"type\":\"boolean\"}", "false");
    BAD("{\"type\":\"boolean\"}", "0", "$: expected boolean, got number");
    OK("{\"type\":\"null\"}", "null");
    BAD("{\"type\":\"null\"}", "false", "$: expected null, got boolean");
    OK("{\"type\":\"object\"}", "{}");
    BAD("{\"type\":\"object\"}", "[]", "$: expected object, got array");
    OK("{\"type\":\"array\"}", "[]");
    BAD("{\"type\":\"array\"}", "{}", "$: expected array, got object");
    OK("{\"type\":[\"string\",\"null\"]}", "null");
    OK("{\"type\":[\"string\",\"null\"]}", "\"x\"");
    BAD("{\"type\":[\"string\",\"null\"]}", "1", "$: expected string or null, got number");
    BAD("{\"type\":[\"integer\",\"boolean\"]}", "0.5", "$: expected integer or boolean, got number");
    /* no type: anything */
    OK("{}", "[1,{\"a\":null}]");
}

static void test_nullable(void) {
    OK("{\"type\":\"string\",\"nullable\":true}", "null");
    OK("{\"type\":\"string\",\"nullable\":true}", "\"x\"");
    BAD("{\"type\":\"string\",\"nullable\":true}", "1", "$: expected string or null, got number");
    BAD("{\"type\":\"string\",\"nullable\":false}", "null", "$: expected string, got null");
    BAD("{\"type\":[\"string\",\"null\"],\"nullable\":true}", "1", "$: expected string or null, got number");
    /* OpenAPI 3.0: nullable widens only the type; an enum must list null itself */
    BAD("{\"type\":\"string\",\"nullable\":true,\"enum\":[\"a\"]}", "null", "$: value not in enum [\"a\"]");
}

static const char *const weather = "{\"type\":\"object\",\"properties\":{"
                                   "\"location\":{\"type\":\"string\",\"description\":\"City and country\"},"
                                   "\"unit\":{\"type\":\"string\",\"enum\":[\"celsius\",\"fahrenheit\"]},"
                                   "\"days\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":14}},"
                                   "\"required\":[\"location\",\"unit\"],\"additionalProperties\":false}";

static void test_objects(void) {
    OK(weather, "{\"location\":\"Oslo\",\"unit\":\"celsius\"}");
    OK(weather, "{\"unit\":\"celsius\",\"location\":\"Oslo\",\"days\":14}");
    BAD(weather, "{}", "$: missing required property \"location\"");
    BAD(weather, "{\"location\":\"Oslo\"}", "$: missing required property \"unit\"");
    BAD(weather, "{\"location\":1,\"unit\":\"celsius\"}", "$.location: expected string, got number");
    BAD(weather, "{\"location\":\"Oslo\",\"unit\":\"kelvin\"}",
        "$.unit: value not in enum [\"celsius\",\"fahrenheit\"]");
    BAD(weather, "{\"location\":\"Oslo\",\"unit\":\"celsius\",\"days\":0}", "$.days: 0 is less than minimum 1");
    BAD(weather, "{\"location\":\"Oslo\",\"unit\":\"celsius\",\"days\":2.5}", "$.days: expected integer, got number");
    BAD(weather, "{\"location\":\"Oslo\",\"unit\":\"celsius\",\"foo\":1}", "$: unexpected property \"foo\"");
    BAD(weather, "[]", "$: expected object, got array");
    /* properties and required look only at objects */
    OK("{\"properties\":{\"a\":{\"type\":\"string\"}},\"required\":[\"a\"]}", "5");
    /* names that are not identifiers are quoted in paths */
    BAD("{\"properties\":{\"a b\":{\"type\":\"string\"}}}", "{\"a b\":1}", "$[\"a b\"]: expected string, got number");
    BAD("{\"properties\":{\"a\":{\"properties\":{\"b\":{\"type\":\"string\"}}}}}", "{\"a\":{\"b\":1}}",
        "$.a.b: expected string, got number");
    /* required is case-sensitive */
    BAD("{\"required\":[\"Query\"]}", "{\"query\":1}", "$: missing required property \"Query\"");
    /* additionalProperties: a schema, true, or absent */
    OK("{\"additionalProperties\":{\"type\":\"number\"}}", "{\"a\":1,\"b\":2.5}");
    BAD("{\"additionalProperties\":{\"type\":\"number\"}}", "{\"a\":\"x\"}", "$.a: expected number, got string");
    BAD("{\"properties\":{\"a\":true},\"additionalProperties\":{\"type\":\"number\"}}", "{\"a\":\"x\",\"b\":\"y\"}",
        "$.b: expected number, got string");
    OK("{\"additionalProperties\":true}", "{\"a\":\"x\"}");
    OK("{\"properties\":{\"a\":{}}}", "{\"b\":\"x\"}");
    /* odd names are escaped in messages */
    BAD("{\"additionalProperties\":false}", "{\"x\\\"y\":1}", "$: unexpected property \"x\\\"y\"");
    BAD("{\"additionalProperties\":false}", "{\"a\\nb\":1}", "$: unexpected property \"a\\u000ab\"");
    BAD("{\"additionalProperties\":false}", "{\"\xff\":1}", "$: unexpected property \"\\xff\"");
    BAD("{\"additionalProperties\":false}", "{\"\xc3\xa9t\xc3\xa9\":1}",
        "$: unexpected property \"\xc3\xa9t\xc3\xa9\"");
    /* patternProperties */
    OK("{\"patternProperties\":{\"^x-\":{\"type\":\"string\"}},\"additionalProperties\":false}", "{\"x-a\":\"s\"}");
    BAD("{\"patternProperties\":{\"^x-\":{\"type\":\"string\"}},\"additionalProperties\":false}", "{\"x-a\":1}",
        "$[\"x-a\"]: expected string, got number");
    BAD("{\"patternProperties\":{\"^x-\":{\"type\":\"string\"}},\"additionalProperties\":false}", "{\"y\":1}",
        "$: unexpected property \"y\"");
    BAD("{\"properties\":{\"n1\":{\"minimum\":0}},\"patternProperties\":{\"^n\\\\d$\":{\"maximum\":5}}}", "{\"n1\":6}",
        "$.n1: 6 is greater than maximum 5");
    /* minProperties, maxProperties */
    OK("{\"minProperties\":1,\"maxProperties\":2}", "{\"a\":1}");
    BAD("{\"minProperties\":1}", "{}", "$: property count 0 is less than minProperties 1");
    BAD("{\"maxProperties\":1}", "{\"a\":1,\"b\":2}", "$: property count 2 is greater than maxProperties 1");
}

static void test_arrays(void) {
    OK("{\"type\":\"array\",\"items\":{\"type\":\"string\"}}", "[\"a\",\"b\"]");
    BAD("{\"type\":\"array\",\"items\":{\"type\":\"string\"}}", "[\"a\",2]", "$[1]: expected string, got number");
    BAD("{\"properties\":{\"items\":{\"items\":{\"enum\":[\"a\",\"b\"]}}}}", "{\"items\":[\"a\",\"b\",\"c\"]}",
        "$.items[2]: value not in enum [\"a\",\"b\"]");
    BAD("{\"items\":{\"items\":{\"type\":\"integer\"}}}", "[[1],[2,\"x\"]]", "$[1][1]: expected integer, got string");
    OK("{\"items\":{\"type\":\"string\"}}", "\"not an array\"");
    /* prefixItems, with items for the rest */
    OK("{\"prefixItems\":[{\"type\":\"string\"},{\"type\":\"number\"}]}", "[\"a\",1,true]");
    OK("{\"prefixItems\":[{\"type\":\"string\"},{\"type\":\"number\"}],\"items\":false}", "[\"a\"]");
    BAD("{\"prefixItems\":[{\"type\":\"string\"},{\"type\":\"number\"}],\"items\":false}", "[\"a\",\"b\"]",
        "$[1]: expected number, got string");
    BAD("{\"prefixItems\":[{\"type\":\"string\"},{\"type\":\"number\"}],\"items\":false}", "[\"a\",1,2]",
        "$[2]: no value is allowed here (schema false)");
    BAD("{\"prefixItems\":[{}],\"items\":{\"type\":\"boolean\"}}", "[1,true,null]", "$[2]: expected boolean, got null");
    /* minItems, maxItems */
    OK("{\"minItems\":1,\"maxItems\":2}", "[1,2]");
    BAD("{\"minItems\":2}", "[1]", "$: array length 1 is less than minItems 2");
    BAD("{\"maxItems\":1}", "[1,2]", "$: array length 2 is greater than maxItems 1");
    /* uniqueItems: cJSON_Compare, case-sensitive; 1 and 1.0 are the same number */
    OK("{\"uniqueItems\":true}", "[1,2,\"1\",\"a\",\"A\",{\"a\":1},{\"a\":2},[1],[1,1]]");
    BAD("{\"uniqueItems\":true}", "[1,2,1]", "$: items [0] and [2] are equal (uniqueItems)");
    BAD("{\"uniqueItems\":true}", "[1,1.0]", "$: items [0] and [1] are equal (uniqueItems)");
    BAD("{\"uniqueItems\":true}", "[\"x\",{\"a\":[1,{\"b\":null}]},{\"a\":[1,{\"b\":null}]}]",
        "$: items [1] and [2] are equal (uniqueItems)");
    OK("{\"uniqueItems\":false}", "[1,1]");
}

static void test_enum_const(void) {
    const char *e = "{\"enum\":[\"a\",1,null,{\"x\":[1]},true]}";
    OK(e, "\"a\"");
    OK(e, "1");
    OK(e, "1.0");
    OK(e, "null");
    OK(e, "{\"x\":[1]}");
    OK(e, "true");
    BAD(e, "\"A\"", "$: value not in enum [\"a\",1,null,{\"x\":[1]},true]");
    BAD(e, "false", "$: value not in enum [\"a\",1,null,{\"x\":[1]},true]");
    BAD(e, "{\"x\":[1,2]}", "$: value not in enum [\"a\",1,null,{\"x\":[1]},true]");
    /* a long enum is not repeated in the message */
    BAD("{\"enum\":[\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\","
        "\"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"]}",
        "\"c\"", "$: value not in enum");
    OK("{\"const\":\"x\"}", "\"x\"");
    BAD("{\"const\":\"x\"}", "\"y\"", "$: value not equal to const \"x\"");
    OK("{\"const\":{\"a\":[1,2]}}", "{\"a\":[1,2]}");
    BAD("{\"const\":{\"a\":[1,2]}}", "{\"a\":[2,1]}", "$: value not equal to const {\"a\":[1,2]}");
    OK("{\"const\":null}", "null");
    BAD("{\"const\":null}", "0", "$: value not equal to const null");
}

static void test_numbers(void) {
    OK("{\"minimum\":1}", "1");
    BAD("{\"minimum\":1}", "0.5", "$: 0.5 is less than minimum 1");
    OK("{\"maximum\":10}", "10");
    BAD("{\"maximum\":10}", "10.5", "$: 10.5 is greater than maximum 10");
    OK("{\"exclusiveMinimum\":0}", "0.1");
    BAD("{\"exclusiveMinimum\":0}", "0", "$: 0 is not greater than exclusiveMinimum 0");
    OK("{\"exclusiveMaximum\":5}", "4.99");
    BAD("{\"exclusiveMaximum\":5}", "5", "$: 5 is not less than exclusiveMaximum 5");
    /* OpenAPI 3.0 boolean form */
    BAD("{\"minimum\":0,\"exclusiveMinimum\":true}", "0", "$: 0 is not greater than the exclusive minimum 0");
    BAD("{\"maximum\":5,\"exclusiveMaximum\":true}", "5", "$: 5 is not less than the exclusive maximum 5");
    OK("{\"minimum\":0,\"exclusiveMinimum\":false}", "0");
    OK("{\"minimum\":0,\"exclusiveMinimum\":true}", "0.001");
    /* multipleOf: exact for integers, tolerant of decimal rounding */
    OK("{\"multipleOf\":2}", "4");
    OK("{\"multipleOf\":2}", "-6");
    BAD("{\"multipleOf\":2}", "7", "$: 7 is not a multiple of 2");
    OK("{\"multipleOf\":0.1}", "0.3");
    OK("{\"multipleOf\":0.01}", "19.99");
    BAD("{\"multipleOf\":0.1}", "0.35", "$: 0.35 is not a multiple of 0.1");
    BAD("{\"multipleOf\":1.5}", "4", "$: 4 is not a multiple of 1.5");
    OK("{\"multipleOf\":1.5}", "4.5");
    BAD("{\"multipleOf\":3}", "1e999", "$: inf is not a multiple of 3");
    /* numbers in messages keep their precision */
    BAD("{\"maximum\":0.1}", "0.10000000000000002", "$: 0.10000000000000002 is greater than maximum 0.1");
    /* number keywords ignore other types */
    OK("{\"minimum\":5,\"multipleOf\":7}", "\"abc\"");
}

static void test_strings(void) {
    OK("{\"minLength\":2,\"maxLength\":3}", "\"ab\"");
    BAD("{\"minLength\":2}", "\"a\"", "$: string length 1 is less than minLength 2");
    BAD("{\"maxLength\":3}", "\"abcd\"", "$: string length 4 is greater than maxLength 3");
    OK("{\"minLength\":0}", "\"\"");
    /* lengths are code points, not bytes */
    OK("{\"maxLength\":3}", "\"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\"");
    BAD("{\"maxLength\":3}", "\"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9ex\"",
        "$: string length 4 is greater than maxLength 3");
    BAD("{\"minLength\":2}", "\"\xc3\xa9\"", "$: string length 1 is less than minLength 2");
    OK("{\"minLength\":1,\"maxLength\":1}", "\"\xf0\x9f\x98\x80\"");
    OK("{\"minLength\":2,\"maxLength\":2}", "\"\\u00e9\\ud83d\\ude00\"");
    /* string keywords ignore other types */
    OK("{\"minLength\":5,\"pattern\":\"^x$\"}", "12");
}

static void test_patterns(void) {
    OK("{\"pattern\":\"^[a-z]+$\"}", "\"abc\"");
    BAD("{\"pattern\":\"^[a-z]+$\"}", "\"abC\"", "$: string does not match pattern \"^[a-z]+$\"");
    /* unanchored search, as in ECMA-262 */
    OK("{\"pattern\":\"b\"}", "\"abc\"");
    BAD("{\"pattern\":\"^b\"}", "\"abc\"", "$: string does not match pattern \"^b\"");
    /* ECMA escapes */
    OK("{\"pattern\":\"^\\\\d{4}-\\\\d{2}-\\\\d{2}$\"}", "\"2024-01-31\"");
    BAD("{\"pattern\":\"^\\\\d{4}-\\\\d{2}-\\\\d{2}$\"}", "\"dddd-dd-dd\"",
        "$: string does not match pattern \"^\\\\d{4}-\\\\d{2}-\\\\d{2}$\"");
    BAD("{\"pattern\":\"^\\\\d+$\"}", "\"12a\"", "$: string does not match pattern \"^\\\\d+$\"");
    OK("{\"pattern\":\"^\\\\D+$\"}", "\"ab\"");
    BAD("{\"pattern\":\"^\\\\D+$\"}", "\"a1\"", "$: string does not match pattern \"^\\\\D+$\"");
    OK("{\"pattern\":\"^\\\\w+$\"}", "\"a_1Z\"");
    BAD("{\"pattern\":\"^\\\\w+$\"}", "\"a-1\"", "$: string does not match pattern \"^\\\\w+$\"");
    OK("{\"pattern\":\"^\\\\W$\"}", "\"-\"");
    OK("{\"pattern\":\"^a\\\\sb\\\\Sc$\"}", "\"a\\tbxc\"");
    BAD("{\"pattern\":\"^a\\\\sb$\"}", "\"axb\"", "$: string does not match pattern \"^a\\\\sb$\"");
    OK("{\"pattern\":\"^a\\\\nb\\\\t$\"}", "\"a\\nb\\t\"");
    OK("{\"pattern\":\"^a\\\\.b$\"}", "\"a.b\"");
    BAD("{\"pattern\":\"^a\\\\.b$\"}", "\"axb\"", "$: string does not match pattern \"^a\\\\.b$\"");
    OK("{\"pattern\":\"^\\\\/x\\\\-y\\\\<$\"}", "\"/x-y<\"");
    OK("{\"pattern\":\"\\\\bfoo\\\\b\"}", "\"a foo b\"");
    BAD("{\"pattern\":\"\\\\bfoo\\\\b\"}", "\"afoob\"", "$: string does not match pattern \"\\\\bfoo\\\\b\"");
    /* inside brackets: \d \w \s and escaped ] - ^ [ \ */
    const char *email = "{\"pattern\":\"^[\\\\w.\\\\-]+@[\\\\w\\\\-]+\\\\.[a-z]{2,}$\"}";
    OK(email, "\"john.doe-x@ex-ample.com\"");
    BAD(email, "\"a b@x.com\"", "$: string does not match pattern \"^[\\\\w.\\\\-]+@[\\\\w\\\\-]+\\\\.[a-z]{2,}$\"");
    OK("{\"pattern\":\"^[\\\\d\\\\s]+$\"}", "\"1 2\\t3\"");
    OK("{\"pattern\":\"^[\\\\]\\\\[\\\\^\\\\\\\\-]+$\"}", "\"][^\\\\-\"");
    BAD("{\"pattern\":\"^[\\\\]]$\"}", "\"a\"", "$: string does not match pattern \"^[\\\\]]$\"");
    OK("{\"pattern\":\"^[^\\\\d]+$\"}", "\"abc\"");
    BAD("{\"pattern\":\"^[^\\\\d]+$\"}", "\"a1\"", "$: string does not match pattern \"^[^\\\\d]+$\"");
    OK("{\"pattern\":\"^[[:alpha:]]+$\"}", "\"abc\"");
    /* (?:...) groups; back-references */
    OK("{\"pattern\":\"^(?:ab)+$\"}", "\"abab\"");
    BAD("{\"pattern\":\"^(?:ab)+$\"}", "\"aba\"", "$: string does not match pattern \"^(?:ab)+$\"");
    /* ECMA's lazy quantifiers match the same strings */
    OK("{\"pattern\":\"^a+?b*?c??d{1,2}?$\"}", "\"aaabd\"");
    /* "{" that is not an interval is the character, as in ECMA */
    OK("{\"pattern\":\"^a{b}$\"}", "\"a{b}\"");
    OK("{\"pattern\":\"^a{2}$\"}", "\"aa\"");
    BAD("{\"pattern\":\"^a{2}$\"}", "\"a{2}\"", "$: string does not match pattern \"^a{2}$\"");
    /* alternation keeps its anchors: ^ and $ are the ends of the string */
    OK("{\"pattern\":\"^ab|cd$\"}", "\"xxcd\"");
    BAD("{\"pattern\":\"^ab|cd$\"}", "\"xabx\"", "$: string does not match pattern \"^ab|cd$\"");
    /* a match may be on any line of the string */
    OK("{\"pattern\":\"y\"}", "\"x\\ny\"");
    /* non-ASCII literals */
    OK("{\"pattern\":\"^\xc3\xa9+$\"}", "\"\xc3\xa9\xc3\xa9\"");
    /* characters, not bytes, whatever the process's locale */
    OK("{\"pattern\":\"^.{3}$\"}", "\"h\xc3\xa9\xc3\xa9\"");
    OK("{\"pattern\":\"^[\xc3\xa9\xc3\xa0]$\"}", "\"\xc3\xa0\"");
    OK("{\"pattern\":\"^[^\xc3\xa9]$\"}", "\"\xc3\xa0\"");
    BAD("{\"pattern\":\"^[^\xc3\xa9]$\"}", "\"\xc3\xa9\"", "$: string does not match pattern \"^[^\xc3\xa9]$\"");
    OK("{\"pattern\":\"^\\\\w\\\\W\\\\w$\"}", "\"a\xc3\xa9"
                                              "b\"");
    OK("{\"pattern\":\"^[[:alpha:]]+$\"}", "\"\xc3\xa9t\xc3\xa9\"");
    T_EQ_STR(setlocale(LC_CTYPE, NULL), "C"); /* the process's locale is left alone */
    /* the empty pattern matches everything */
    OK("{\"pattern\":\"\"}", "\"x\"");
    /* a phone-number pattern of the kind models are given */
    OK("{\"pattern\":\"^\\\\+?[0-9 ()\\\\-]{7,20}$\"}", "\"+47 (22) 12-34-56\"");
}

static void test_combinators(void) {
    const char *any = "{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"number\"}]}";
    OK(any, "\"x\"");
    OK(any, "1");
    BAD(any, "true", "$: value matches no schema of anyOf (anyOf[0]: expected string, got boolean)");
    BAD("{\"anyOf\":[{\"properties\":{\"a\":{\"type\":\"string\"}}},{\"type\":\"array\"}]}", "{\"a\":1}",
        "$: value matches no schema of anyOf (anyOf[0]: $.a: expected string, got number)");
    BAD("{\"properties\":{\"v\":{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"null\"}]}}}", "{\"v\":2}",
        "$.v: value matches no schema of anyOf (anyOf[0]: expected string, got number)");
    const char *one = "{\"oneOf\":[{\"type\":\"integer\"},{\"type\":\"number\"}]}";
    OK(one, "1.5");
    BAD(one, "1", "$: value matches both oneOf[0] and oneOf[1], expected exactly one");
    BAD(one, "\"x\"", "$: value matches no schema of oneOf (oneOf[0]: expected integer, got string)");
    const char *all =
        "{\"allOf\":[{\"type\":\"object\"},{\"required\":[\"a\"]},{\"properties\":{\"a\":{\"minimum\":2}}}]}";
    OK(all, "{\"a\":3}");
    BAD(all, "{}", "$: missing required property \"a\"");
    BAD(all, "{\"a\":1}", "$.a: 1 is less than minimum 2");
    BAD(all, "[]", "$: expected object, got array");
    OK("{\"not\":{\"type\":\"null\"}}", "1");
    BAD("{\"not\":{\"type\":\"null\"}}", "null", "$: value must not match the schema of \"not\"");
    BAD("{\"properties\":{\"a\":{\"not\":{}}}}", "{\"a\":1}", "$.a: value must not match the schema of \"not\"");
    /* boolean schemas */
    OK("true", "{\"anything\":[1,2]}");
    BAD("false", "1", "$: no value is allowed here (schema false)");
    BAD("{\"properties\":{\"a\":false}}", "{\"a\":1}", "$.a: no value is allowed here (schema false)");
    OK("{\"properties\":{\"a\":false}}", "{\"b\":1}");
    BAD("{\"not\":true}", "1", "$: value must not match the schema of \"not\"");
}

static void test_refs(void) {
    const char *defs = "{\"$defs\":{\"pos\":{\"type\":\"integer\",\"minimum\":1}},"
                       "\"properties\":{\"n\":{\"$ref\":\"#/$defs/pos\"}}}";
    OK(defs, "{\"n\":2}");
    BAD(defs, "{\"n\":0}", "$.n: 0 is less than minimum 1");
    BAD(defs, "{\"n\":\"2\"}", "$.n: expected integer, got string");
    OK("{\"definitions\":{\"s\":{\"type\":\"string\"}},\"items\":{\"$ref\":\"#/definitions/s\"}}", "[\"a\"]");
    BAD("{\"definitions\":{\"s\":{\"type\":\"string\"}},\"items\":{\"$ref\":\"#/definitions/s\"}}", "[\"a\",1]",
        "$[1]: expected string, got number");
    /* a recursive tree */
    const char *tree = "{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{"
                       "\"name\":{\"type\":\"string\"},"
                       "\"children\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/node\"}}},"
                       "\"additionalProperties\":false}},\"$ref\":\"#/$defs/node\"}";
    OK(tree, "{\"name\":\"r\",\"children\":[{\"name\":\"a\",\"children\":[{\"name\":\"b\"}]},{\"children\":[]}]}");
    BAD(tree, "{\"children\":[{\"children\":[{\"name\":1}]}]}",
        "$.children[0].children[0].name: expected string, got number");
    BAD(tree, "{\"children\":[{\"x\":1}]}", "$.children[0]: unexpected property \"x\"");
    /* "#" is the root */
    const char *list = "{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},\"next\":{\"$ref\":\"#\"}}}";
    OK(list, "{\"v\":1,\"next\":{\"v\":2,\"next\":{\"v\":3}}}");
    BAD(list, "{\"v\":1,\"next\":{\"v\":2,\"next\":{\"v\":\"3\"}}}", "$.next.next.v: expected integer, got string");
    /* JSON-pointer escapes in the name: ~1 is /, ~0 is ~ */
    BAD("{\"$defs\":{\"a/b~c\":{\"type\":\"string\"}},\"$ref\":\"#/$defs/a~1b~0c\"}", "1",
        "$: expected string, got number");
    /* $ref with siblings: both apply (2020-12) */
    BAD("{\"$defs\":{\"s\":{\"type\":\"string\"}},\"$ref\":\"#/$defs/s\",\"maxLength\":2}", "\"abc\"",
        "$: string length 3 is greater than maxLength 2");
}

static void test_schema_check(void) {
    char err[256];
    cJSON *j;

    SBAD("{\"properties\":{\"query\":{\"type\":\"strin\"}}}", "properties.query.type: unknown type \"strin\"");
    SBAD("5", "(root): a schema must be an object or a boolean");
    SBAD("\"string\"", "(root): a schema must be an object or a boolean");
    SBAD("{\"properties\":{\"a\":5}}", "properties.a: a schema must be an object or a boolean");
    SBAD("{\"properties\":[]}", "properties: must be an object of schemas");
    SBAD("{\"type\":5}", "type: must be a type name or a non-empty array of type names");
    SBAD("{\"type\":[]}", "type: must be a type name or a non-empty array of type names");
    SBAD("{\"type\":[\"string\",\"x\"]}", "type[1]: unknown type \"x\"");
    SBAD("{\"type\":[\"string\",1]}",
         "type[1]: must be a type name (object, array, string, number, integer, boolean, null)");
    SBAD("{\"type\":\"Object\"}", "type: unknown type \"Object\"");
    SBAD("{\"required\":\"a\"}", "required: must be an array of property names");
    SBAD("{\"required\":[\"a\",1]}", "required[1]: must be a string (a property name)");
    SBAD("{\"enum\":\"a\"}", "enum: must be a non-empty array of values");
    SBAD("{\"enum\":[]}", "enum: must be a non-empty array of values");
    SBAD("{\"minimum\":\"1\"}", "minimum: must be a finite number");
    SBAD("{\"maximum\":1e999}", "maximum: must be a finite number");
    SBAD("{\"exclusiveMinimum\":\"x\"}", "exclusiveMinimum: must be a finite number (or, OpenAPI 3.0, a boolean)");
    SBAD("{\"exclusiveMaximum\":null}", "exclusiveMaximum: must be a finite number (or, OpenAPI 3.0, a boolean)");
    SBAD("{\"multipleOf\":0}", "multipleOf: must be a number greater than 0");
    SBAD("{\"multipleOf\":-2}", "multipleOf: must be a number greater than 0");
    SBAD("{\"minLength\":-1}", "minLength: must be a non-negative integer");
    SBAD("{\"maxLength\":\"3\"}", "maxLength: must be a non-negative integer");
    SBAD("{\"minItems\":1.5}", "minItems: must be a non-negative integer");
    SBAD("{\"maxItems\":-0.5}", "maxItems: must be a non-negative integer");
    SBAD("{\"minProperties\":true}", "minProperties: must be a non-negative integer");
    SBAD("{\"maxProperties\":1e999}", "maxProperties: must be a non-negative integer");
    SBAD("{\"uniqueItems\":1}", "uniqueItems: must be true or false");
    SBAD("{\"nullable\":\"yes\"}", "nullable: must be true or false");
    SBAD("{\"items\":[{}]}", "items: must be a schema (an array of schemas is the old tuple form: use prefixItems)");
    SBAD("{\"items\":{\"type\":\"nope\"}}", "items.type: unknown type \"nope\"");
    SBAD("{\"prefixItems\":[]}", "prefixItems: must be a non-empty array of schemas");
    SBAD("{\"anyOf\":[]}", "anyOf: must be a non-empty array of schemas");
    SBAD("{\"oneOf\":{}}", "oneOf: must be a non-empty array of schemas");
    SBAD("{\"allOf\":[{},3]}", "allOf[1]: a schema must be an object or a boolean");
    SBAD("{\"not\":[]}", "not: a schema must be an object or a boolean");
    SBAD("{\"additionalProperties\":{\"minimum\":\"0\"}}", "additionalProperties.minimum: must be a finite number");
    SBAD("{\"properties\":{\"a b\":{\"type\":1}}}",
         "properties[\"a b\"].type: must be a type name or a non-empty array of type names");
    /* patterns */
    SBAD("{\"pattern\":5}", "pattern: must be a string");
    SBAD("{\"pattern\":\"[\"}", "pattern: unterminated \"[\"");
    SBAD_PREFIX("{\"pattern\":\"[b-a]\"}", "pattern: does not compile: ");
    SBAD_PREFIX("{\"pattern\":\"a{3,2}\"}", "pattern: does not compile: ");
    SBAD("{\"pattern\":\"a\\\\\"}", "pattern: ends with a lone backslash");
    SBAD("{\"pattern\":\"^(?=x)\"}", "pattern: lookaround and named groups \"(?\" are not supported");
    SBAD("{\"pattern\":\"(?<n>x)\"}", "pattern: lookaround and named groups \"(?\" are not supported");
    SBAD("{\"pattern\":\"\\\\u00e9\"}", "pattern: the escape \\u is not supported (write the character itself)");
    SBAD("{\"pattern\":\"\\\\x41\"}", "pattern: the escape \\x is not supported (write the character itself)");
    SBAD("{\"pattern\":\"\\\\p{L}\"}", "pattern: the escape \\p is not supported (write the character itself)");
    SBAD("{\"pattern\":\"[\\\\D]\"}", "pattern: \\D inside [...] is not supported");
    SBAD("{\"pattern\":\"[]a]\"}",
         "pattern: \"[]\" and \"[^]\" are not supported (ECMA and POSIX read them differently)");
    SBAD("{\"pattern\":\"[^]\"}",
         "pattern: \"[]\" and \"[^]\" are not supported (ECMA and POSIX read them differently)");
    SBAD("{\"pattern\":\"[[:alpha]\"}", "pattern: unterminated \"[:\" inside [...]");
    SBAD("{\"pattern\":\"[abc\"}", "pattern: unterminated \"[\"");
    SBAD("{\"pattern\":\"(a\"}", "pattern: unmatched \"(\"");
    SBAD("{\"pattern\":\"a)(b\"}", "pattern: unmatched \")\"");
    SBAD("{\"pattern\":\"^(a)\\\\1$\"}", "pattern: back-references (\\1) are not supported");
    /* what ECMA calls "nothing to repeat"; stacked quantifiers make regcomp cubic */
    SBAD("{\"pattern\":\"a**\"}", "pattern: nothing to repeat before \"*\"");
    SBAD("{\"pattern\":\"a{2}{3}\"}", "pattern: nothing to repeat before \"{3}\"");
    SBAD("{\"pattern\":\"a*??\"}", "pattern: nothing to repeat before \"?\"");
    SBAD("{\"pattern\":\"*a\"}", "pattern: nothing to repeat before \"*\"");
    SBAD("{\"pattern\":\"(|+)\"}", "pattern: nothing to repeat before \"+\"");
    SBAD("{\"pattern\":\"^+\"}", "pattern: nothing to repeat before \"+\"");
    /* counted repetitions are copied by regcomp: their expanded size is bounded */
    SBAD("{\"pattern\":\"^.{1,5000}$\"}",
         "pattern: too complex: its repetitions expand to more than 1000 elements (for a length limit, use "
         "minLength/maxLength)");
    SBAD("{\"pattern\":\"^((a{1,30}){1,30}){1,30}$\"}",
         "pattern: too complex: its repetitions expand to more than 1000 elements (for a length limit, use "
         "minLength/maxLength)");
    OK("{\"pattern\":\"^((a{1,30}){1,30})$\"}", "\"aaa\"");
    OK("{\"pattern\":\"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$\"}",
       "\"7f1c1a52-8f3e-4c2b-9b7a-1e2d3c4b5a69\"");
    SBAD("{\"pattern\":\"((((((((((((((((((((((((((((((((((a))))))))))))))))))))))))))))))))))\"}",
         "pattern: groups nest more than 32 deep");
    SBAD_PREFIX("{\"pattern\":\"^[\xc3\x80-\xc3\xbf]+$\"}", "pattern: does not compile: ");
    SBAD("{\"properties\":{\"p\":{\"pattern\":\"(a\"}}}", "properties.p.pattern: unmatched \"(\"");
    SBAD_PREFIX("{\"patternProperties\":{\"[z-a]\":{}}}", "patternProperties[\"[z-a]\"]: does not compile: ");
    {
        /* the length limit */
        char big[LR_SCHEMA_MAX_PATTERN + 64];
        int n = snprintf(big, sizeof(big), "{\"pattern\":\"");
        memset(big + n, 'a', LR_SCHEMA_MAX_PATTERN + 1);
        snprintf(big + n + LR_SCHEMA_MAX_PATTERN + 1, sizeof(big) - (size_t)n - LR_SCHEMA_MAX_PATTERN - 1, "\"}");
        SBAD(big, "pattern: longer than 1024 bytes");
        for (int i = 0; i < LR_SCHEMA_MAX_PATTERN; i += 2) {
            memcpy(big + n + i, "a?", 2); /* 1024 bytes is still fine */
        }
        big[n + LR_SCHEMA_MAX_PATTERN] = '"';
        big[n + LR_SCHEMA_MAX_PATTERN + 1] = '}';
        big[n + LR_SCHEMA_MAX_PATTERN + 2] = '\0';
        OK(big, "\"x\"");
    }
    /* references */
    SBAD("{\"properties\":{\"a\":{\"$ref\":\"#/$defs/missing\"}}}",
         "properties.a.$ref: unresolved reference \"#/$defs/missing\"");
    SBAD("{\"$defs\":{\"x\":{}},\"$ref\":\"#/definitions/x\"}", "$ref: unresolved reference \"#/definitions/x\"");
    SBAD("{\"$ref\":\"https://example.com/s.json\"}",
         "$ref: unsupported reference \"https://example.com/s.json\" (only \"#\", \"#/$defs/NAME\" and "
         "\"#/definitions/NAME\")");
    SBAD("{\"$defs\":{\"a\":{\"properties\":{\"b\":{}}}},\"$ref\":\"#/$defs/a/properties/b\"}",
         "$ref: unsupported reference \"#/$defs/a/properties/b\" (only \"#\", \"#/$defs/NAME\" and "
         "\"#/definitions/NAME\")");
    SBAD("{\"$ref\":5}", "$ref: must be a string");
    SBAD("{\"$defs\":{\"a\":{\"$ref\":\"#/$defs/b\"},\"b\":{\"$ref\":\"#/$defs/a\"}},\"$ref\":\"#/$defs/a\"}",
         "$defs.a.$ref: reference cycle: \"#/$defs/b\" only leads to more references");
    SBAD("{\"$ref\":\"#\"}", "$ref: reference cycle: \"#\" only leads to more references");
    SBAD("{\"$defs\":{\"a\":{\"type\":\"strng\"}}}", "$defs.a.type: unknown type \"strng\"");
    SBAD("{\"definitions\":{\"a\":3}}", "definitions.a: a schema must be an object or a boolean");
    /* what is accepted */
    OK("{\"description\":\"x\",\"title\":\"t\",\"examples\":[1],\"default\":5,\"$comment\":\"c\","
       "\"format\":\"date-time\",\"$schema\":\"https://json-schema.org/draft/2020-12/schema\","
       "\"x-custom\":{\"type\":\"bogus\"},\"propertyNames\":{\"pattern\":\"[\"}}",
       "\"2024-01-01T00:00:00Z\"");
    OK("true", "1");
    j = cJSON_Parse("false");
    T_EQ_INT(lr_schema_check(j, err, sizeof(err)), 0);
    cJSON_Delete(j);
    T_EQ_INT(lr_schema_check(NULL, err, sizeof(err)), LR_ECONFIG);
    T_EQ_STR(err, "(root): no schema");
    ncases += 2;
}

/* "{"properties":{"a": ... {} ...}}" nested n levels deep (caller frees). */
static char *nested_schema(int n) {
    size_t cap = (size_t)n * 24 + 16, o = 0;
    char *s = malloc(cap);
    T_ASSERT(s != NULL);
    for (int i = 0; i < n; i++) {
        o += (size_t)snprintf(s + o, cap - o, "{\"properties\":{\"a\":");
    }
    o += (size_t)snprintf(s + o, cap - o, "{}");
    for (int i = 0; i < n; i++) {
        o += (size_t)snprintf(s + o, cap - o, "}}");
    }
    return s;
}

/* n nested arrays around 1 (caller frees). */
static char *nested_array(int n) {
    char *s = malloc((size_t)n * 2 + 2);
    T_ASSERT(s != NULL);
    memset(s, '[', (size_t)n);
    s[n] = '1';
    memset(s + n + 1, ']', (size_t)n);
    s[2 * n + 1] = '\0';
    return s;
}

static void test_depth(void) {
    char *s, want[512], err[512], *p;
    cJSON *j, *v;
    int rc;

    /* schema nesting: 32 levels of subschemas are fine, 33 are not */
    s = nested_schema(32);
    OK(s, "{\"a\":{\"a\":1}}");
    free(s);
    s = nested_schema(33);
    j = cJSON_Parse(s);
    rc = lr_schema_check(j, err, sizeof(err));
    T_EQ_INT(rc, LR_ECONFIG);
    p = strstr(err, ": nesting too deep (more than 32 levels of subschemas)");
    T_ASSERT(p != NULL && p[strlen(": nesting too deep (more than 32 levels of subschemas)")] == '\0');
    T_ASSERT(strncmp(err, "properties.a.properties.a.", 26) == 0);
    T_ASSERT(strstr(err, "...") != NULL); /* the path (33 * 13 bytes) is cut */
    assert_clean_msg(__LINE__, err);
    cJSON_Delete(j);
    free(s);
    ncases++;

    /* value nesting: 32 levels of arrays pass, 33 fail whatever the schema */
    s = nested_array(32);
    OK("{}", s);
    OK("true", s);
    free(s);
    s = nested_array(33);
    p = want + snprintf(want, sizeof(want), "$");
    for (int i = 0; i < 32; i++) {
        p += snprintf(p, sizeof(want) - (size_t)(p - want), "[0]");
    }
    snprintf(p, sizeof(want) - (size_t)(p - want), ": nesting too deep (more than 32 levels of arrays and objects)");
    BAD("true", s, want);
    BAD("{}", s, want);
    free(s);
    BAD("{}", "{\"a\":{\"b\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[{}]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}",
        "$.a.b[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]: nesting "
        "too deep (more than 32 levels of arrays and objects)");

    /* a reference loop that consumes nothing passes the check (it goes
     * through allOf) but ends in "nesting too deep", and "not" does not turn
     * that hard error into a success */
    BAD("{\"allOf\":[{\"$ref\":\"#\"}]}", "1", "$: nesting too deep (more than 128 nested subschemas; a $ref loop?)");
    BAD("{\"not\":{\"$ref\":\"#\"}}", "1", "$: nesting too deep (more than 128 nested subschemas; a $ref loop?)");
    BAD("{\"anyOf\":[{\"$ref\":\"#\"},true]}", "1",
        "$: nesting too deep (more than 128 nested subschemas; a $ref loop?)");

    /* a deep but legitimate recursive value stays within the limits */
    {
        char val[4096];
        size_t o = 0;
        for (int i = 0; i < 31; i++) {
            o += (size_t)snprintf(val + o, sizeof(val) - o, "{\"next\":");
        }
        o += (size_t)snprintf(val + o, sizeof(val) - o, "{\"v\":1}");
        for (int i = 0; i < 31; i++) {
            o += (size_t)snprintf(val + o, sizeof(val) - o, "}");
        }
        OK("{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},\"next\":{\"$ref\":\"#\"}}}", val);
    }

    /* anyOf over a recursive reference, two failing branches per level: the
     * work is 2^depth, stopped by the step budget */
    {
        const char *expo = "{\"$defs\":{\"a\":{\"anyOf\":["
                           "{\"properties\":{\"x\":{\"$ref\":\"#/$defs/a\"}},\"not\":{}},"
                           "{\"properties\":{\"x\":{\"$ref\":\"#/$defs/a\"}},\"not\":{}}]}},"
                           "\"$ref\":\"#/$defs/a\"}";
        char val[4096];
        size_t o = 0;
        for (int i = 0; i < 30; i++) {
            o += (size_t)snprintf(val + o, sizeof(val) - o, "{\"x\":");
        }
        o += (size_t)snprintf(val + o, sizeof(val) - o, "1");
        for (int i = 0; i < 30; i++) {
            o += (size_t)snprintf(val + o, sizeof(val) - o, "}");
        }
        j = cJSON_Parse(expo);
        v = cJSON_Parse(val);
        T_EQ_INT(lr_schema_check(j, err, sizeof(err)), 0);
        rc = lr_schema_validate(j, v, err, sizeof(err));
        T_EQ_INT(rc, LR_EINVAL);
        T_ASSERT(strstr(err, "validation too costly (more than 1000000 steps") != NULL);
        assert_clean_msg(__LINE__, err);
        cJSON_Delete(j);
        cJSON_Delete(v);
        ncases++;
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* glibc's regexec retries a failing unanchored search from every position
 * (seconds for "[a-z]+@" on 20 kB); the translated "^.*(P)" is one pass. */
static void test_pattern_cost(void) {
    size_t n = 200000;
    char *val = malloc(n + 3), err[512];
    cJSON *s, *v;
    double t0;
    int rc;
    T_ASSERT(val != NULL);
    val[0] = '"';
    memset(val + 1, 'a', n);
    val[n + 1] = '"';
    val[n + 2] = '\0';
    v = cJSON_Parse(val);
    T_ASSERT(v != NULL);

    s = cJSON_Parse("{\"pattern\":\"[a-z]+@\"}");
    t0 = now_s();
    rc = lr_schema_validate(s, v, err, sizeof(err));
    T_EQ_INT(rc, LR_EINVAL);
    T_EQ_STR(err, "$: string does not match pattern \"[a-z]+@\"");
    if (now_s() - t0 > 2.0) {
        T_FAIL("a 200 kB string took %.2f s against [a-z]+@", now_s() - t0);
    }
    cJSON_Delete(s);

    /* a big pattern over a big string is charged to the step budget */
    s = cJSON_Parse("{\"pattern\":\"^[a-z]{1,900}$\"}");
    T_EQ_INT(lr_schema_check(s, err, sizeof(err)), 0);
    rc = lr_schema_validate(s, v, err, sizeof(err));
    T_EQ_INT(rc, LR_EINVAL);
    T_EQ_STR(err, "$: validation too costly (more than 1000000 steps; simplify the schema or the value)");
    cJSON_Delete(s);
    /* ... also inside "not", which must not turn it into a success */
    s = cJSON_Parse("{\"not\":{\"pattern\":\"^[a-z]{1,900}$\"}}");
    rc = lr_schema_validate(s, v, err, sizeof(err));
    T_EQ_INT(rc, LR_EINVAL);
    T_EQ_STR(err, "$: validation too costly (more than 1000000 steps; simplify the schema or the value)");
    cJSON_Delete(s);
    cJSON_Delete(v);
    free(val);
    ncases += 3;

    /* strings that are not valid UTF-8 do not match */
    BAD("{\"pattern\":\"a\"}", "\"a\xff\"", "$: string does not match pattern \"a\"");
}

/* Validation of a schema that skipped lr_schema_check is memory-safe and
 * says LR_ECONFIG for what it cannot skip. */
static void test_unchecked(void) {
    static const struct {
        const char *schema, *value, *msg;
        int rc;
    } cases[] = {
        {"{\"pattern\":\"[\"}", "\"x\"", "$: schema error: pattern \"[\": ", LR_ECONFIG},
        {"{\"properties\":{\"a\":{\"$ref\":\"#/$defs/nope\"}}}", "{\"a\":1}",
         "$.a: schema error: unresolved $ref \"#/$defs/nope\" (lr_schema_check was skipped)", LR_ECONFIG},
        {"5", "1", "$: schema error: a schema must be an object or a boolean (lr_schema_check was skipped)",
         LR_ECONFIG},
        {"{\"anyOf\":[{\"pattern\":\"(\"}]}", "\"x\"", "$: schema error: pattern \"(\": ", LR_ECONFIG},
        /* malformed keywords that can be skipped are */
        {"{\"type\":5,\"minimum\":\"x\",\"required\":\"a\",\"enum\":3,\"items\":[1],\"anyOf\":[]}", "{}", "", 0},
        {"{\"type\":[\"bogus\"]}", "1", "$: expected bogus, got number", LR_EINVAL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cJSON *s = cJSON_Parse(cases[i].schema), *v = cJSON_Parse(cases[i].value);
        char err[512] = "";
        int rc;
        T_ASSERT(s != NULL && v != NULL);
        rc = lr_schema_validate(s, v, err, sizeof(err));
        if (rc != cases[i].rc || strncmp(err, cases[i].msg, strlen(cases[i].msg)) != 0) {
            T_FAIL("unchecked case %zu: %s \"%s\", want %s \"%s...\"", i, lr_err_name(rc), err,
                   lr_err_name(cases[i].rc), cases[i].msg);
        }
        assert_clean_msg(__LINE__, err);
        cJSON_Delete(s);
        cJSON_Delete(v);
        ncases++;
    }
}

/* Messages in small buffers, no buffer at all, long names and paths. */
static void test_messages(void) {
    cJSON *s = cJSON_Parse("{\"additionalProperties\":false}");
    cJSON *v = cJSON_Parse("{\"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\":1}");
    char err[512], small[28];
    char longname[200], sch[512], val[512], want[512];

    T_ASSERT(s != NULL && v != NULL);
    /* "$: unexpected property \"" is 25 bytes: the cut falls inside the
     * second character, which must go whole */
    T_EQ_INT(lr_schema_validate(s, v, small, sizeof(small)), LR_EINVAL);
    T_EQ_STR(small, "$: unexpected property \"\xe6\x97\xa5");
    assert_clean_msg(__LINE__, small);
    T_EQ_INT(lr_schema_validate(s, v, small, 1), LR_EINVAL);
    T_EQ_STR(small, "");
    T_EQ_INT(lr_schema_validate(s, v, NULL, 0), LR_EINVAL);
    T_EQ_INT(lr_schema_validate(s, v, NULL, 100), LR_EINVAL);
    T_EQ_INT(lr_schema_check(s, NULL, 0), 0);
    cJSON_Delete(v);
    v = cJSON_Parse("{}");
    memset(err, 'X', sizeof(err));
    T_EQ_INT(lr_schema_validate(s, v, err, sizeof(err)), 0);
    T_EQ_STR(err, ""); /* success leaves an empty message */
    T_EQ_INT(lr_schema_validate(s, NULL, err, sizeof(err)), LR_EINVAL);
    T_EQ_STR(err, "$: no value");
    T_EQ_INT(lr_schema_validate(NULL, v, err, sizeof(err)), LR_EINVAL);
    T_EQ_STR(err, "$: no schema");
    cJSON_Delete(s);
    cJSON_Delete(v);
    ncases += 10;

    /* a long name is cut in the path and in the message */
    memset(longname, 'a', 100);
    longname[100] = '\0';
    snprintf(sch, sizeof(sch), "{\"properties\":{\"%s\":{\"type\":\"string\"}}}", longname);
    snprintf(val, sizeof(val), "{\"%s\":1}", longname);
    snprintf(want, sizeof(want), "$[\"%.68s...\"]: expected string, got number", longname);
    BAD(sch, val, want);
    snprintf(sch, sizeof(sch), "{\"additionalProperties\":false}");
    snprintf(want, sizeof(want), "$: unexpected property \"%.68s...\"", longname);
    BAD(sch, val, want);
    /* a path longer than its buffer ends in "..." */
    {
        char deep[1024];
        size_t o = 0;
        for (int i = 0; i < 12; i++) {
            o += (size_t)snprintf(deep + o, sizeof(deep) - o, "{\"abcdefghijklmnop\":");
        }
        o += (size_t)snprintf(deep + o, sizeof(deep) - o, "1");
        for (int i = 0; i < 12; i++) {
            o += (size_t)snprintf(deep + o, sizeof(deep) - o, "}");
        }
        snprintf(want, sizeof(want), "$");
        for (int i = 0; i < 9; i++) { /* 1 + 9 * 17 bytes, and no room for a tenth */
            strcat(want, ".abcdefghijklmnop");
        }
        strcat(want, "...: expected object or string, got number");
        BAD("{\"additionalProperties\":{\"$ref\":\"#\"},\"type\":[\"object\",\"string\"]}", deep, want);
    }
}

int main(void) {
    test_type();
    test_nullable();
    test_objects();
    test_arrays();
    test_enum_const();
    test_numbers();
    test_strings();
    test_patterns();
    test_combinators();
    test_refs();
    test_schema_check();
    test_depth();
    test_pattern_cost();
    test_unchecked();
    test_messages();
    printf("test_jsonschema: %d cases passed\n", ncases);
    return 0;
}
