/*
 * jsonschema.h - a small JSON Schema validator for the arguments a model
 * passes to a tool, checked against that tool's "parameters" schema.
 *
 * It covers the subset of JSON Schema (2020-12, with the draft-7 and
 * OpenAPI 3.0 spellings that tool definitions still use) that OpenAI and
 * Anthropic tool definitions are written in:
 *
 *   type (a name or an array of names; "integer" is a number without a
 *   fractional part), nullable (OpenAPI: true also allows null), enum, const,
 *   properties, required, additionalProperties (boolean or schema),
 *   patternProperties, minProperties, maxProperties, items, prefixItems,
 *   minItems, maxItems, uniqueItems, minimum, maximum, exclusiveMinimum,
 *   exclusiveMaximum (number form, and the OpenAPI 3.0 boolean form that
 *   makes minimum/maximum exclusive), multipleOf, minLength, maxLength
 *   (in Unicode code points, not bytes), pattern, allOf, anyOf, oneOf, not,
 *   $defs/definitions with local "$ref" ("#", "#/$defs/NAME",
 *   "#/definitions/NAME"), and the boolean schemas true and false.
 *
 * Every other keyword is ignored: annotations (description, title, default,
 * examples, format, $comment, $schema, $id ...) and the assertions this
 * subset does not implement (contains, propertyNames, dependentRequired,
 * dependentSchemas, if/then/else, unevaluated*, additionalItems).
 *
 * "pattern" is a POSIX extended regular expression (<regex.h>) searched
 * anywhere in the string, as in ECMA-262 (anchor it with ^...$), with the
 * ECMA syntax tool schemas use translated first: \d \D \w \W \s \S (also
 * inside [...], except the negated ones), \n \t \r \f \v, a backslash
 * before punctuation for that character, "(?:" groups, lazy quantifiers
 * ("*?" matches what "*" matches) and a "{" that starts no interval.  What
 * POSIX would read differently or too slowly is refused by lr_schema_check
 * rather than silently misread: \uXXXX, \xHH, \p{..}, \cX, \0 and other
 * letter escapes, lookaround and named groups, back-references, stacked
 * quantifiers ("a**", ECMA's "nothing to repeat"), counted repetitions that
 * expand to more than 1000 elements ("^.{1,5000}$": use maxLength), and
 * ranges with non-ASCII ends ("[À-ÿ]": glibc's "Invalid collation
 * character").  Matching is by characters: regcomp/regexec run under a
 * C.UTF-8 locale for the calling thread only (uselocale), so "." and [é]
 * are one character whatever the process's locale; "." also matches a
 * newline; a string that is not valid UTF-8 matches no pattern.  The search
 * is one pass over the string (linear), where glibc's own unanchored search
 * is quadratic.
 *
 * Limits (each a clear error, never unbounded work): schemas nest at most
 * LR_SCHEMA_MAX_DEPTH levels of subschemas and values at most
 * LR_SCHEMA_MAX_DEPTH levels of arrays/objects; one validation applies at
 * most LR_SCHEMA_MAX_APPLY nested subschemas (a "$ref" loop that consumes
 * nothing ends there) and does at most LR_SCHEMA_MAX_STEPS units of work
 * (subschema applications, enum/uniqueItems comparisons, pattern searches
 * charged by pattern size times string length), which bounds what
 * anyOf/oneOf over recursive references can cost; a pattern is at most
 * LR_SCHEMA_MAX_PATTERN bytes.
 *
 * Cost: a pattern is compiled each time it is used (about 50 us for an
 * e-mail pattern); everything else is a walk over the value.
 *
 * Thread-safety: no global state; both functions may run concurrently, also
 * on the same schema (they only read it).  Nothing is allocated that
 * outlives a call.  The schema and the value are borrowed for the call.
 */
#ifndef LR_JSONSCHEMA_H
#define LR_JSONSCHEMA_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "err.h"

#define LR_SCHEMA_MAX_DEPTH 32       /* subschema nesting; value nesting */
#define LR_SCHEMA_MAX_APPLY 128      /* nested subschema applications per validation */
#define LR_SCHEMA_MAX_STEPS 1000000L /* units of work per validation */
#define LR_SCHEMA_MAX_PATTERN 1024   /* bytes of one "pattern" */

/* Checks a schema once, when it is loaded (agents file, built-in tools).
 * Returns 0, or LR_ECONFIG with errbuf naming the problem and the JSON path
 * inside the schema, e.g. "properties.query.type: unknown type \"strin\""
 * (the schema itself is "(root)").  Rejected: a schema that is neither an
 * object nor a boolean, unknown type names, a "required" that is not an
 * array of strings, an "enum" that is not a non-empty array, non-numeric
 * bounds, negative or fractional minLength/maxItems/..., multipleOf <= 0,
 * a "pattern" that does not compile (or uses an escape POSIX would misread),
 * a "$ref" that is not local, does not resolve against the root or only
 * leads to more references in a loop, and nesting deeper than
 * LR_SCHEMA_MAX_DEPTH.  Unknown keywords are ignored.  LR_ENOMEM when
 * regcomp runs out of memory.  errbuf may be NULL; it is empty on success;
 * its text is valid UTF-8 without control characters (odd bytes of names
 * and patterns are escaped), also when errlen cuts it.  On LR_ECONFIG,
 * refuse to load the tool (or the agents file) and show the message. */
int lr_schema_check(const cJSON *schema, char *errbuf, size_t errlen) LR_MUSTCHECK;

/* Validates value against schema, which should have passed
 * lr_schema_check.  Returns
 *   0            the value conforms;
 *   LR_EINVAL    it does not: errbuf holds the first violation with its path
 *                in the value, e.g. "$.query: expected string, got number",
 *                "$: missing required property \"query\"", "$.items[2]: value
 *                not in enum", "$: unexpected property \"foo\"", or a limit
 *                ("$.a.b...: nesting too deep").  For tool arguments: do not
 *                run the tool, give the model the message as the tool result
 *                (it is short, names the field and holds valid UTF-8);
 *   LR_ECONFIG   the schema is broken in a way lr_schema_check would have
 *                reported (a bad pattern, an unresolved $ref); a bug of the
 *                caller, who skipped the check;
 *   LR_ENOMEM    regcomp ran out of memory.
 * errbuf may be NULL; it is empty on success.  The value is expected to come from cJSON_Parse (its own nesting limit
 * bounds the comparisons of enum/const/uniqueItems). */
int lr_schema_validate(const cJSON *schema, const cJSON *value, char *errbuf, size_t errlen) LR_MUSTCHECK;

#endif
